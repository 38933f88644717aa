// Communicator: the collectives Tandem's data and model parallelism need, behind one protocol.
//
// Three backends conform (the shape of swift-log's handlers):
//   SingleProcessCommunicator  rank 0 of 1; every collective returns at once.
//   ThreadCommunicator         N ranks as threads of one process, for `swift test`.
//   MPICommunicator            (module TandemMPI) OpenMPI; the only code that touches MPI.
//
// Every collective is called by every rank of the communicator, in the same order, with the
// same counts and root (as in MPI). Sizes are counts of elements unless a name says `bytes`.

/// A group of ranks that run collectives together.
///
/// Ranks are numbered `0..<size`. A communicator is used by one thread at a time (its rank's
/// thread); sub-communicators made by `split` are independent of each other and of their parent.
public protocol Communicator: AnyObject {
    /// This process's (or thread's) rank in `0..<size`.
    var rank: Int { get }
    /// Number of ranks in the communicator.
    var size: Int { get }

    /// In-place sum across ranks: afterwards every rank holds the elementwise sum of every
    /// rank's `buffer[0..<count]`.
    ///
    /// `ThreadCommunicator` adds in rank order 0, 1, 2, ... so the result is bit-identical on
    /// every rank and across runs. MPI's reduction order is OpenMPI's choice (it may depend on
    /// the algorithm, the message size and the number of ranks); the result is identical on
    /// every rank, and for 2 ranks a + b == b + a anyway.
    func allreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws
    /// In-place sum across ranks, in double precision (losses, metrics).
    func allreduceSum(_ buffer: UnsafeMutablePointer<Double>, count: Int) throws
    /// In-place sum across ranks of 64-bit integers (sample counts, correct predictions).
    func allreduceSum(_ buffer: UnsafeMutablePointer<Int64>, count: Int) throws

    /// Non-blocking in-place sum (MPI_Iallreduce). The buffer must stay untouched, neither read
    /// nor written, until the request completes.
    /// - Returns: a request to poll with `test()` (which also drives progress) or finish with `wait()`.
    func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws -> CommRequest

    /// The same, reusing `request` (a completed request this communicator returned before) so that
    /// nothing is allocated; any other value is ignored.
    func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int, reusing request: CommRequest?) throws -> CommRequest

    /// Moves the library's non-blocking operations on without waiting for any (MPI: one pass of
    /// the progress engine, through MPI_Iprobe). Safe from one thread while another thread polls
    /// requests of another communicator of this process; a no-op for the in-process backends.
    func progress()

    /// Copies `bytes` bytes from `root`'s buffer into every other rank's buffer.
    func broadcast(_ buffer: UnsafeMutableRawPointer, bytes: Int, root: Int) throws

    /// Each rank contributes `bytes` bytes; `receive` (size * bytes) then holds every rank's
    /// contribution in rank order: rank r's bytes at offset r * bytes.
    func allgather(_ send: UnsafeRawPointer, bytes: Int, into receive: UnsafeMutableRawPointer) throws

    /// `send` holds size * countPerRank floats, block r being `send[r*countPerRank ..< (r+1)*countPerRank]`;
    /// rank r receives into `receive[0..<countPerRank]` the sum over ranks of their block r.
    func reduceScatterSum(_ send: UnsafePointer<Float>, into receive: UnsafeMutablePointer<Float>, countPerRank: Int) throws

    /// Returns once every rank has called it.
    func barrier() throws

    /// Like MPI_Comm_split: ranks that pass the same `color` (>= 0) form a new communicator,
    /// ranked by `key` (ties broken by rank in this communicator). Every rank must call it.
    ///
    /// Tandem uses it for tower groups and replica groups, e.g. with 4 ranks
    /// `split(color: rank / 2, key: rank)` gives {0,1}, {2,3} and
    /// `split(color: rank % 2, key: rank)` gives {0,2}, {1,3}.
    func split(color: Int, key: Int) throws -> Communicator

    /// Whether two communicators of this process may run collectives from two threads at the same
    /// time (MPI: initialised with MPI_THREAD_MULTIPLE). The gradient-sync thread needs it.
    var allowsConcurrentCommunicators: Bool { get }

    /// Ends the whole job at once with exit status `code` (MPI_Abort for MPI, `exit` for the
    /// in-process backends). Prints nothing itself: say why before calling it.
    func abort(code: Int32) -> Never
}

extension Communicator {
    /// The in-process backends: every communicator is independent of the others.
    public var allowsConcurrentCommunicators: Bool { true }

    /// The in-process backends finish their operations when they start them.
    public func progress() {}

    /// The in-process backends finish at once; their requests hold nothing to reuse.
    public func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int, reusing request: CommRequest?) throws -> CommRequest {
        try startAllreduceSum(buffer, count: count)
    }
}

/// An operation started by a non-blocking collective.
public protocol CommRequest: AnyObject {
    /// Progresses the operation (MPI_Test); true once it is complete. Calling it again after
    /// completion keeps returning true.
    func test() throws -> Bool
    /// Blocks until the operation is complete (MPI_Wait). Returns at once if already complete.
    func wait() throws
}

/// A request whose operation finished when it was started (the in-process backends).
final class CompletedRequest: CommRequest {
    func test() throws -> Bool { true }
    func wait() throws {}
}
