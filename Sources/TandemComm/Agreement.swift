// Agreement: ending a job cleanly when some ranks fail at a point every rank reaches.
//
// A rank that fails while the others wait in a collective must end the job with MPI_Abort, and
// a rank killed by the abort may die before it has said why. When every rank reaches the same
// point anyway (after reading the config and the dataset, after creating the output folder),
// one small allgather there tells every rank who failed: then every rank prints its line and
// all finalise and exit, with nobody killed mid-sentence.

/// An error every rank of the world learnt of at the same point (through `agree`): the job can
/// end with MPI_Finalize on every rank instead of MPI_Abort.
public struct AgreedFailure: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Communicator {
    /// Runs `body` on every rank, then tells every rank which ranks failed. Every rank must call
    /// it, with no collective inside `body`.
    /// - Returns: `body`'s result when no rank failed.
    /// - Throws: `AgreedFailure` on every rank when any failed: a failed rank's carries its own
    ///   error, the others' the error of the lowest failed rank, "(on rank r)".
    public func agree<T>(_ body: () throws -> T) throws -> T {
        let result: Result<T, Error>
        do { result = .success(try body()) } catch { result = .failure(error) }
        guard size > 1 else {
            if case .failure(let error) = result { throw AgreedFailure(String(describing: error)) }
            return try result.get()
        }
        var mine: Int64 = 0
        if case .failure = result { mine = 1 }
        var all = [Int64](repeating: 0, count: size)
        try all.withUnsafeMutableBytes { a in try withUnsafeBytes(of: &mine) { try allgather($0.baseAddress!, bytes: 8, into: a.baseAddress!) } }
        guard let first = all.firstIndex(where: { $0 != 0 }) else { return try result.get() }
        // The lowest failed rank's message, so that every rank's line names the file or key.
        var text: [UInt8] = []
        if case .failure(let error) = result, rank == first { text = Array(String(describing: error).utf8.prefix(4000)) }
        var length = Int64(text.count)
        try withUnsafeMutableBytes(of: &length) { try broadcast($0.baseAddress!, bytes: 8, root: first) }
        if text.count != Int(length) { text = [UInt8](repeating: 0, count: Int(length)) }
        if length > 0 { try text.withUnsafeMutableBytes { try broadcast($0.baseAddress!, bytes: $0.count, root: first) } }
        if case .failure(let error) = result { throw AgreedFailure(String(describing: error)) }
        throw AgreedFailure(String(decoding: text, as: UTF8.self) + " (on rank \(first))")
    }
}
