// CommError: a failed collective, in one line that names the call.

/// A collective that failed, e.g.
/// `MPI_Allreduce failed: MPI_ERR_TRUNCATE: message truncated (rank 1)`.
///
/// Every backend throws this type, so callers (the trainer, data and model parallel helpers)
/// handle communication failures without knowing which backend they run on.
public struct CommError: Error, CustomStringConvertible, Sendable {
    /// One line naming the call, what went wrong and on which rank.
    public let message: String

    public init(_ message: String) {
        self.message = message
    }

    /// `"<call> failed: <reason> (rank <rank>)"`, the shape every backend uses.
    public init(call: String, reason: String, rank: Int) {
        self.message = "\(call) failed: \(reason) (rank \(rank))"
    }

    public var description: String { message }
}
