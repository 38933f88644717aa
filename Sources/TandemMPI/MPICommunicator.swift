// MPICommunicator: the Communicator protocol on OpenMPI. The only module that imports CMPI.
//
// Every MPI return code is checked: the world communicator and every communicator split from
// it use MPI_ERRORS_RETURN, and a code other than MPI_SUCCESS becomes a CommError naming the
// call, e.g. "MPI_Allreduce failed: MPI_ERR_TRUNCATE: message truncated (rank 1)", where the
// rank is the rank in MPI_COMM_WORLD.
//
// MPI counts are Int32. Calls whose count could exceed that (byte counts of broadcast and
// allgather, element counts of the sums) are split into calls of at most `maxCountPerCall`.
//
// Threading: MPI is initialised asking for MPI_THREAD_MULTIPLE (and needing at least
// MPI_THREAD_FUNNELED). A communicator is used by one thread at a time; with MPI_THREAD_MULTIPLE,
// different communicators may be used by different threads at once (the gradient-sync thread
// allreduces on its own communicator while the training thread runs backward and its collectives).
import CMPI
import Foundation
import TandemComm

/// A communicator of MPI processes: the world from `initialize()`, or one made by `split`.
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int

    /// Largest count passed to one MPI call (bytes for broadcast and allgather, elements for
    /// the sums). MPI takes Int32 counts, hence the default; the self-test lowers it so that
    /// the chunked paths run on small buffers.
    public var maxCountPerCall = Int(Int32.max) {
        didSet { precondition((1...Int(Int32.max)).contains(maxCountPerCall), "maxCountPerCall must be in 1...Int32.max") }
    }

    private var comm: MPI_Comm?
    /// MPI_COMM_WORLD is MPI's own; communicators from MPI_Comm_split are freed on deinit.
    private let ownsComm: Bool

    /// The world communicator, once `initialize()` has made it. Funneled: touched only from
    /// the thread that initialises MPI.
    nonisolated(unsafe) private static var world: MPICommunicator?

    private init(comm: MPI_Comm?, ownsComm: Bool) throws {
        self.comm = comm
        self.ownsComm = ownsComm
        try mpiCheck(MPI_Comm_set_errhandler(comm, tandem_MPI_ERRORS_RETURN()), "MPI_Comm_set_errhandler")
        var rank: Int32 = 0, size: Int32 = 0
        try mpiCheck(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank")
        try mpiCheck(MPI_Comm_size(comm, &size), "MPI_Comm_size")
        self.rank = Int(rank)
        self.size = Int(size)
    }

    deinit {
        guard ownsComm, MPIState.isActive else { return }
        let code = MPI_Comm_free(&comm)
        if code != MPI_SUCCESS {
            // deinit cannot throw; say it rather than drop it.
            FileHandle.standardError.write(Data("\(CommError(call: "MPI_Comm_free", reason: mpiErrorString(code), rank: MPIState.worldRank))\n".utf8))
        }
    }

    // MARK: - Set-up

    /// Initialises MPI with MPI_Init_thread, requesting MPI_THREAD_MULTIPLE and checking that at
    /// least MPI_THREAD_FUNNELED was provided, or does nothing if MPI is already initialised. Works in a singleton
    /// process started without mpirun (OpenMPI then runs it as a world of size 1).
    /// - Returns: the world communicator; a second call returns the same object.
    /// - Throws: `CommError` naming the call that failed, or if MPI was already finalised.
    public static func initialize() throws -> MPICommunicator {
        if let world { return world }
        var flag: Int32 = 0
        try mpiCheck(MPI_Finalized(&flag), "MPI_Finalized")
        if flag != 0 {
            throw CommError(call: "MPI_Init_thread", reason: "MPI was already finalized and cannot start again", rank: MPIState.worldRank)
        }
        try mpiCheck(MPI_Initialized(&flag), "MPI_Initialized")
        var provided: Int32 = 0
        if flag == 0 {
            // A rank waiting in a collective yields its core instead of spinning: the gradient-sync
            // thread shares its rank's core with the training thread, and spinning while the other
            // rank catches up took that time from backward (LeNet-5 -np 2 weak scaling, medians of 3
            // alternating: 24,926 img/s spinning, 29,612 yielding). A user's own setting wins.
            setenv("OMPI_MCA_mpi_yield_when_idle", "1", 0)
            try mpiCheck(MPI_Init_thread(nil, nil, Int32(MPI_THREAD_MULTIPLE), &provided), "MPI_Init_thread")
        } else {
            try mpiCheck(MPI_Query_thread(&provided), "MPI_Query_thread")
        }
        guard provided >= Int32(MPI_THREAD_FUNNELED) else {
            throw CommError(call: "MPI_Init_thread", reason: "MPI provides thread level \(provided), Tandem needs MPI_THREAD_FUNNELED (\(MPI_THREAD_FUNNELED))", rank: MPIState.worldRank)
        }
        MPIState.threadMultiple = provided >= Int32(MPI_THREAD_MULTIPLE)
        let world = try MPICommunicator(comm: tandem_MPI_COMM_WORLD(), ownsComm: false)
        Self.world = world
        return world
    }

    /// Finalises MPI if it is initialised and not yet finalised. Every rank must call it, after
    /// its last collective. MPI cannot be initialised again afterwards.
    public static func finalize() {
        guard MPIState.isActive else { return }
        let code = MPI_Finalize()
        if code != MPI_SUCCESS {
            FileHandle.standardError.write(Data("\(CommError(call: "MPI_Finalize", reason: mpiErrorString(code), rank: MPIState.worldRank))\n".utf8))
        }
    }

    /// True when this process was started by mpirun or srun (OMPI_COMM_WORLD_SIZE, PMI_SIZE or
    /// PMIX_RANK is set), so that the trainer can decide whether to touch MPI at all.
    public static var launchedByMPI: Bool {
        let environment = ProcessInfo.processInfo.environment
        return ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].contains { environment[$0] != nil }
    }

    /// Whether MPI was initialised with MPI_THREAD_MULTIPLE.
    public var allowsConcurrentCommunicators: Bool { MPIState.threadMultiple }

    // MARK: - Sums

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws {
        try allreduce(buffer, count: count, type: tandem_MPI_FLOAT())
    }

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Double>, count: Int) throws {
        try allreduce(buffer, count: count, type: tandem_MPI_DOUBLE())
    }

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Int64>, count: Int) throws {
        try allreduce(buffer, count: count, type: tandem_MPI_INT64_T())
    }

    /// MPI_Allreduce with MPI_IN_PLACE, in chunks of at most `maxCountPerCall` elements.
    private func allreduce<T>(_ buffer: UnsafeMutablePointer<T>, count: Int, type: MPI_Datatype?) throws {
        precondition(count >= 0, "allreduceSum: negative count \(count)")
        for (offset, n) in chunks(count) {
            try check(MPI_Allreduce(tandem_MPI_IN_PLACE(), buffer + offset, Int32(n), type, tandem_MPI_SUM(), comm), "MPI_Allreduce")
        }
    }

    /// MPI_Iallreduce with MPI_IN_PLACE (one request per chunk of `maxCountPerCall` elements).
    /// OpenMPI progresses it only inside MPI calls: poll `test()` while computing to overlap.
    public func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws -> CommRequest {
        try startAllreduceSum(buffer, count: count, reusing: nil)
    }

    public func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int, reusing old: CommRequest?) throws -> CommRequest {
        precondition(count >= 0, "startAllreduceSum: negative count \(count)")
        let request: MPIRequest
        if let old = old as? MPIRequest, old.communicator === self, old.isComplete {
            request = old
            request.handles.removeAll(keepingCapacity: true)
        } else {
            request = MPIRequest(communicator: self)
        }
        // In chunks of at most maxCountPerCall elements, without building a list of them.
        var offset = 0
        repeat {
            let n = min(maxCountPerCall, count - offset)
            var handle: MPI_Request? = tandem_MPI_REQUEST_NULL()
            try check(MPI_Iallreduce(tandem_MPI_IN_PLACE(), buffer + offset, Int32(n), tandem_MPI_FLOAT(), tandem_MPI_SUM(), comm, &handle), "MPI_Iallreduce")
            request.handles.append(handle)
            offset += n
        } while offset < count
        return request
    }

    // MARK: - Data movement

    public func broadcast(_ buffer: UnsafeMutableRawPointer, bytes: Int, root: Int) throws {
        precondition(bytes >= 0, "broadcast: negative byte count \(bytes)")
        // An out-of-range root goes to MPI unchanged, which reports MPI_ERR_ROOT.
        let mpiRoot = Int32(clamping: root)
        for (offset, n) in chunks(bytes) {
            try check(MPI_Bcast(buffer + offset, Int32(n), tandem_MPI_BYTE(), mpiRoot, comm), "MPI_Bcast")
        }
    }

    public func allgather(_ send: UnsafeRawPointer, bytes: Int, into receive: UnsafeMutableRawPointer) throws {
        precondition(bytes >= 0, "allgather: negative byte count \(bytes)")
        if bytes <= maxCountPerCall {
            try check(MPI_Allgather(send, Int32(bytes), tandem_MPI_BYTE(), receive, Int32(bytes), tandem_MPI_BYTE(), comm), "MPI_Allgather")
            return
        }
        // Chunk c gathers bytes [offset, offset+n) of every rank. Rank r's piece belongs at
        // receive + r*bytes + offset: a block of n bytes resized to extent `bytes` places it
        // there without a staging copy (extents are MPI_Aint, 64-bit).
        for (offset, n) in chunks(bytes) {
            var block: MPI_Datatype? = nil
            try check(MPI_Type_contiguous(Int32(n), tandem_MPI_BYTE(), &block), "MPI_Type_contiguous")
            defer { freeType(&block) }
            var strided: MPI_Datatype? = nil
            try check(MPI_Type_create_resized(block, 0, MPI_Aint(bytes), &strided), "MPI_Type_create_resized")
            defer { freeType(&strided) }
            try check(MPI_Type_commit(&strided), "MPI_Type_commit")
            try check(MPI_Allgather(send + offset, Int32(n), tandem_MPI_BYTE(), receive + offset, 1, strided, comm), "MPI_Allgather")
        }
    }

    public func reduceScatterSum(_ send: UnsafePointer<Float>, into receive: UnsafeMutablePointer<Float>, countPerRank: Int) throws {
        precondition(countPerRank >= 0, "reduceScatterSum: negative count \(countPerRank)")
        if countPerRank <= maxCountPerCall {
            try check(MPI_Reduce_scatter_block(send, receive, Int32(countPerRank), tandem_MPI_FLOAT(), tandem_MPI_SUM(), comm), "MPI_Reduce_scatter_block")
            return
        }
        // Chunk c packs elements [offset, offset+n) of every rank's block contiguously, so that
        // MPI_Reduce_scatter_block (which needs contiguous blocks) delivers them to their rank.
        // Chunks of at most 2^24 elements keep the staging buffer at 64 MB per rank.
        let limit = min(maxCountPerCall, 1 << 24)
        let staging = UnsafeMutablePointer<Float>.allocate(capacity: size * limit)
        defer { staging.deallocate() }
        for (offset, n) in chunks(countPerRank, limit: limit) {
            for r in 0..<size {
                (staging + r * n).update(from: send + r * countPerRank + offset, count: n)
            }
            try check(MPI_Reduce_scatter_block(staging, receive + offset, Int32(n), tandem_MPI_FLOAT(), tandem_MPI_SUM(), comm), "MPI_Reduce_scatter_block")
        }
    }

    /// OpenMPI 4.1 moves a non-blocking collective on only inside MPI calls; an MPI_Iprobe that
    /// finds nothing runs the progress engine once (the collectives' internal messages carry
    /// negative tags, which MPI_ANY_TAG does not match, so nothing is disturbed).
    public func progress() {
        var flag: Int32 = 0
        _ = MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm, &flag, tandem_MPI_STATUS_IGNORE())
    }

    public func barrier() throws {
        try check(MPI_Barrier(comm), "MPI_Barrier")
    }

    // MARK: - Groups

    public func split(color: Int, key: Int) throws -> Communicator {
        precondition(color <= Int(Int32.max) && Int(Int32.min)...Int(Int32.max) ~= key, "split: color \(color) or key \(key) does not fit MPI's Int32")
        // Checked here rather than by MPI: one negative color, MPI_UNDEFINED, is legal in MPI
        // and would hand this rank MPI_COMM_NULL instead of a communicator.
        guard color >= 0 else {
            throw CommError(call: "MPI_Comm_split", reason: "color \(color) is negative", rank: MPIState.worldRank)
        }
        var newComm: MPI_Comm? = nil
        try check(MPI_Comm_split(comm, Int32(color), Int32(key), &newComm), "MPI_Comm_split")
        return try MPICommunicator(comm: newComm, ownsComm: true)
    }

    /// MPI_Abort on this communicator, which OpenMPI turns into the end of the whole job.
    public func abort(code: Int32) -> Never {
        if MPIState.isActive { _ = MPI_Abort(comm, code) }
        exit(code)
    }

    // MARK: - Helpers

    /// (offset, count) pieces of `total` of at most `maxCountPerCall`; one (0, 0) piece for
    /// `total == 0`, so that every rank still makes the (empty) collective call.
    /// A sequence, not an array: the per-step loss sum and last gradient bucket allocate nothing.
    private func chunks(_ total: Int, limit: Int? = nil) -> Chunks { Chunks(total: total, limit: limit ?? maxCountPerCall) }

    struct Chunks: Sequence, IteratorProtocol {
        let total: Int, limit: Int
        var offset = 0, done = false
        mutating func next() -> (Int, Int)? {
            if done { return nil }
            let piece = (offset, Swift.min(limit, total - offset))
            offset += piece.1
            done = offset >= total
            return piece
        }
    }

    private func check(_ code: Int32, _ call: String) throws {
        try mpiCheck(code, call)
    }

    private func freeType(_ type: inout MPI_Datatype?) {
        guard type != nil else { return }
        let code = MPI_Type_free(&type)
        if code != MPI_SUCCESS {
            FileHandle.standardError.write(Data("\(CommError(call: "MPI_Type_free", reason: mpiErrorString(code), rank: MPIState.worldRank))\n".utf8))
        }
    }
}

// MARK: - Errors and state

/// Throws a CommError naming `call` unless `code` is MPI_SUCCESS.
func mpiCheck(_ code: Int32, _ call: String) throws {
    guard code != MPI_SUCCESS else { return }
    throw CommError(call: call, reason: mpiErrorString(code), rank: MPIState.worldRank)
}

/// OpenMPI's text for an error code, which starts with the class name
/// ("MPI_ERR_TRUNCATE: message truncated").
func mpiErrorString(_ code: Int32) -> String {
    var text = [CChar](repeating: 0, count: Int(MPI_MAX_ERROR_STRING) + 1)
    var length: Int32 = 0
    guard MPI_Error_string(code, &text, &length) == MPI_SUCCESS else { return "MPI error code \(code)" }
    return String(decoding: text.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

enum MPIState {
    /// The thread level MPI_Init_thread provided was MPI_THREAD_MULTIPLE. Set once, before any other thread exists.
    nonisolated(unsafe) static var threadMultiple = false

    /// MPI_Initialized and not MPI_Finalized: the only time MPI calls are allowed.
    static var isActive: Bool {
        var initialized: Int32 = 0, finalized: Int32 = 0
        guard MPI_Initialized(&initialized) == MPI_SUCCESS, MPI_Finalized(&finalized) == MPI_SUCCESS else { return false }
        return initialized != 0 && finalized == 0
    }

    /// Rank in MPI_COMM_WORLD for error messages; from the launcher's environment before
    /// MPI is initialised, 0 for a singleton.
    static var worldRank: Int {
        if isActive {
            var rank: Int32 = 0
            if MPI_Comm_rank(tandem_MPI_COMM_WORLD(), &rank) == MPI_SUCCESS { return Int(rank) }
        }
        let environment = ProcessInfo.processInfo.environment
        for name in ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"] {
            if let value = environment[name], let rank = Int(value) { return rank }
        }
        return 0
    }
}
