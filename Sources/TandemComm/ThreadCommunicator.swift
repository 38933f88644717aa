// ThreadCommunicator: N ranks as threads of one process, so that `swift test` exercises the
// data- and model-parallel paths without mpirun.
//
// Every collective is a rendezvous (ThreadRendezvous): each rank posts its arguments, the last
// to arrive releases everyone, and all ranks then see the same list of arguments. Ranks then
// read each other's buffers directly and meet once more before returning, so that no buffer
// is changed while another rank may still read it.
//
// Sums are deterministic: every element is added in rank order 0, 1, 2, ... whichever thread
// does the adding, so results are bit-identical on every rank and across runs.
import Foundation

/// One rank of an in-process group. Run rank r's code on its own thread with `ranks[r]`.
public final class ThreadCommunicator: Communicator, @unchecked Sendable {
    public let rank: Int
    public var size: Int { rendezvous.size }

    private let rendezvous: ThreadRendezvous

    init(rendezvous: ThreadRendezvous, rank: Int) {
        self.rendezvous = rendezvous
        self.rank = rank
    }

    /// Creates `size` communicators that talk to each other in memory; run rank r's code on its
    /// own thread with `ranks[r]`. Calling collectives of one group from a single thread deadlocks.
    public static func group(size: Int) -> [ThreadCommunicator] {
        precondition(size >= 1, "ThreadCommunicator.group: size must be at least 1, got \(size)")
        let rendezvous = ThreadRendezvous(job: ThreadJob(), size: size)
        return (0..<size).map { ThreadCommunicator(rendezvous: rendezvous, rank: $0) }
    }

    /// Runs `body(comm)` for every rank on its own thread (8 MiB stack) and waits for all of
    /// them. If a body throws, ranks still waiting in a collective of this group (or of groups
    /// split from it) throw too instead of hanging, and the first error thrown is rethrown.
    public static func run(size: Int, _ body: @escaping @Sendable (Communicator) throws -> Void) throws {
        let ranks = group(size: size)
        let outcome = RunOutcome(remaining: size)
        for comm in ranks {
            let thread = Thread {
                do {
                    try body(comm)
                } catch {
                    // Record before waking the others, so that the first error kept is the
                    // cause and not another rank's "job stopped".
                    outcome.record(error)
                    comm.rendezvous.job.fail(rank: comm.rank, error: error)
                }
                outcome.finishOne()
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
        if let error = outcome.waitForAll() { throw error }
    }

    // MARK: - Sums

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws {
        try allreduce(buffer, count: count, call: "allreduceSum(Float)")
    }

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Double>, count: Int) throws {
        try allreduce(buffer, count: count, call: "allreduceSum(Double)")
    }

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Int64>, count: Int) throws {
        try allreduce(buffer, count: count, call: "allreduceSum(Int64)")
    }

    /// Runs the blocking allreduce now and returns a completed request: then no rank depends
    /// on how often another rank calls `test()`.
    public func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws -> CommRequest {
        try allreduce(buffer, count: count, call: "startAllreduceSum")
        return CompletedRequest()
    }

    /// Rank r sums the elements of slice r (`count*r/size ..< count*(r+1)/size`) over all ranks
    /// in rank order and writes the sum into every rank's buffer. Each slice is read and written
    /// by one thread only, so no scratch buffer is needed.
    private func allreduce<T: AdditiveArithmetic>(_ buffer: UnsafeMutablePointer<T>, count: Int, call: String) throws {
        precondition(count >= 0, "\(call): negative count \(count)")
        let posts = try rendezvous.exchange(rank: rank, Post(call: call, pointer: UnsafeMutableRawPointer(buffer), count: count))
        try agree(posts, call: call, onCount: true)
        let buffers = posts.map { $0.pointer!.assumingMemoryBound(to: T.self) }
        let lo = count * rank / size, hi = count * (rank + 1) / size
        for i in lo..<hi {
            var sum = buffers[0][i]
            for q in 1..<buffers.count { sum += buffers[q][i] }
            for q in 0..<buffers.count { buffers[q][i] = sum }
        }
        _ = try rendezvous.exchange(rank: rank, Post(call: call + " (done)"))
    }

    // MARK: - Data movement

    public func broadcast(_ buffer: UnsafeMutableRawPointer, bytes: Int, root: Int) throws {
        let call = "broadcast"
        precondition(bytes >= 0, "\(call): negative byte count \(bytes)")
        let posts = try rendezvous.exchange(rank: rank, Post(call: call, pointer: buffer, count: bytes, root: root))
        try agree(posts, call: call, onCount: true)
        guard posts.allSatisfy({ $0.root == root }) else {
            throw CommError(call: call, reason: "ranks passed different roots \(posts.map(\.root))", rank: rank)
        }
        guard (0..<size).contains(root) else {
            throw CommError(call: call, reason: "root \(root) is not a rank of a communicator of size \(size)", rank: rank)
        }
        if rank != root { buffer.copyMemory(from: posts[root].pointer!, byteCount: bytes) }
        _ = try rendezvous.exchange(rank: rank, Post(call: call + " (done)"))
    }

    public func allgather(_ send: UnsafeRawPointer, bytes: Int, into receive: UnsafeMutableRawPointer) throws {
        let call = "allgather"
        precondition(bytes >= 0, "\(call): negative byte count \(bytes)")
        let posts = try rendezvous.exchange(rank: rank, Post(call: call, pointer: UnsafeMutableRawPointer(mutating: send), count: bytes))
        try agree(posts, call: call, onCount: true)
        for q in 0..<size {
            let target = receive + q * bytes
            if UnsafeRawPointer(target) != UnsafeRawPointer(posts[q].pointer!) {
                target.copyMemory(from: posts[q].pointer!, byteCount: bytes)
            }
        }
        _ = try rendezvous.exchange(rank: rank, Post(call: call + " (done)"))
    }

    /// `receive` must not overlap this rank's `send` (as in MPI without MPI_IN_PLACE).
    public func reduceScatterSum(_ send: UnsafePointer<Float>, into receive: UnsafeMutablePointer<Float>, countPerRank: Int) throws {
        let call = "reduceScatterSum"
        precondition(countPerRank >= 0, "\(call): negative count \(countPerRank)")
        let posts = try rendezvous.exchange(rank: rank, Post(call: call, pointer: UnsafeMutableRawPointer(mutating: send), count: countPerRank))
        try agree(posts, call: call, onCount: true)
        let sends = posts.map { UnsafePointer($0.pointer!.assumingMemoryBound(to: Float.self)) + rank * countPerRank }
        for i in 0..<countPerRank {
            var sum = sends[0][i]
            for q in 1..<sends.count { sum += sends[q][i] }
            receive[i] = sum
        }
        _ = try rendezvous.exchange(rank: rank, Post(call: call + " (done)"))
    }

    public func barrier() throws {
        let posts = try rendezvous.exchange(rank: rank, Post(call: "barrier"))
        try agree(posts, call: "barrier", onCount: false)
    }

    // MARK: - Groups

    public func split(color: Int, key: Int) throws -> Communicator {
        let posts = try rendezvous.exchange(rank: rank, Post(call: "split", color: color, key: key))
        try agree(posts, call: "split", onCount: false)
        if let bad = posts.firstIndex(where: { $0.color < 0 }) {
            throw CommError(call: "split", reason: "rank \(bad) passed negative color \(posts[bad].color)", rank: rank)
        }
        let (child, childRank) = rendezvous.splitResult(rank: rank)
        return ThreadCommunicator(rendezvous: child, rank: childRank)
    }

    public func abort(code: Int32) -> Never {
        exit(code)
    }

    // MARK: - Checks

    /// Every rank runs this on the same posts, so either all ranks throw or none does.
    private func agree(_ posts: [Post], call: String, onCount: Bool) throws {
        if let other = posts.first(where: { $0.call != call }) {
            let calls = posts.enumerated().map { "rank \($0.offset): \($0.element.call)" }.joined(separator: ", ")
            throw CommError(call: call, reason: "ranks called different collectives (\(calls)); first mismatch \(other.call)", rank: rank)
        }
        if onCount, posts.contains(where: { $0.count != posts[0].count }) {
            throw CommError(call: call, reason: "ranks passed different counts \(posts.map(\.count))", rank: rank)
        }
    }
}

// MARK: - Shared state

/// What one rank brings to a collective.
struct Post {
    var call: String
    var pointer: UnsafeMutableRawPointer? = nil
    var count = 0
    var root = 0
    var color = 0
    var key = 0
}

/// State shared by every communicator that descends from one `group(size:)` call. One lock and
/// condition serve all of them: a rank that fails can then wake every waiter in every
/// sub-communicator. Waiters recheck their own group's generation, so groups do not interfere.
final class ThreadJob: @unchecked Sendable {
    let condition = NSCondition()
    /// Set (under `condition`) once a rank's body has thrown; waiters then throw instead of waiting.
    var failure: String?

    func fail(rank: Int, error: Error) {
        condition.lock()
        if failure == nil { failure = "rank \(rank) failed: \(error)" }
        condition.broadcast()
        condition.unlock()
    }
}

/// The meeting point of one communicator's ranks: a generation-counted barrier that also
/// hands every rank the posts of all ranks.
final class ThreadRendezvous: @unchecked Sendable {
    let job: ThreadJob
    let size: Int

    // All guarded by job.condition.
    private var arrived = 0
    private var generation = 0
    private var posts: [Post]
    /// Posts of the last completed exchange. Safe to read after waking: it is replaced only
    /// when the next exchange completes, which needs this rank to arrive again.
    private var completed: [Post] = []
    /// For a completed split: each rank's new rendezvous and rank in it.
    private var splitResults: [(ThreadRendezvous, Int)] = []

    init(job: ThreadJob, size: Int) {
        self.job = job
        self.size = size
        self.posts = Array(repeating: Post(call: ""), count: size)
    }

    /// Posts `post` as rank `rank`'s and waits until every rank has posted.
    /// - Returns: the posts of all ranks, indexed by rank (the same array on every rank).
    /// - Throws: `CommError` if another rank of the job failed while this one waited.
    func exchange(rank: Int, _ post: Post) throws -> [Post] {
        let condition = job.condition
        condition.lock()
        defer { condition.unlock() }
        if let failure = job.failure {
            throw CommError(call: post.call, reason: "ThreadCommunicator job stopped, \(failure)", rank: rank)
        }
        posts[rank] = post
        arrived += 1
        if arrived == size {
            completed = posts
            if posts.allSatisfy({ $0.call == "split" && $0.color >= 0 }) { formSplit() }
            arrived = 0
            generation &+= 1
            condition.broadcast()
            return completed
        }
        let mine = generation
        while generation == mine {
            if let failure = job.failure {
                throw CommError(call: post.call, reason: "ThreadCommunicator job stopped, \(failure)", rank: rank)
            }
            condition.wait()
        }
        return completed
    }

    /// The new rendezvous and rank for `rank` after a split exchange.
    func splitResult(rank: Int) -> (ThreadRendezvous, Int) {
        job.condition.lock()
        defer { job.condition.unlock() }
        return splitResults[rank]
    }

    /// Groups ranks by color, orders each group by (key, old rank) as MPI_Comm_split does, and
    /// gives each group a fresh rendezvous. Runs on the last rank to arrive, under the lock.
    private func formSplit() {
        var members: [Int: [Int]] = [:]
        for r in 0..<size { members[posts[r].color, default: []].append(r) }
        splitResults = Array(repeating: (self, 0), count: size)
        for ranks in members.values {
            let ordered = ranks.sorted { (posts[$0].key, $0) < (posts[$1].key, $1) }
            let child = ThreadRendezvous(job: job, size: ordered.count)
            for (newRank, oldRank) in ordered.enumerated() { splitResults[oldRank] = (child, newRank) }
        }
    }
}

/// Collects the outcome of `ThreadCommunicator.run`'s threads.
private final class RunOutcome: @unchecked Sendable {
    private let condition = NSCondition()
    private var remaining: Int
    private var firstError: Error?

    init(remaining: Int) { self.remaining = remaining }

    func record(_ error: Error) {
        condition.lock()
        if firstError == nil { firstError = error }
        condition.unlock()
    }

    func finishOne() {
        condition.lock()
        remaining -= 1
        condition.broadcast()
        condition.unlock()
    }

    func waitForAll() -> Error? {
        condition.lock()
        defer { condition.unlock() }
        while remaining > 0 { condition.wait() }
        return firstError
    }
}
