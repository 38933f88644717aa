// Data-parallel gradient averaging. The flat gradient buffer is cut into buckets in reverse
// layer order (the end of the buffer first, since backward finishes the last layers first).
// In overlap mode a sync thread allreduces each bucket but the last, on a communicator of its own,
// as soon as backward reports its layers done, while the training thread goes on with the layers
// before them; `finish` allreduces the last bucket on the training thread and waits for the buckets
// still in flight before the optimiser step. The loss gradient
// is already scaled by 1/global batch, so the sum over replicas is the gradient of the mean loss:
// no further scaling.
//
// Why a thread that polls: OpenMPI 4.1 progresses a non-blocking collective only inside MPI calls,
// so polled from the training thread between layers its Iallreduce took about twice the blocking
// call (session 1: wait 0.38 ms per LeNet-5 step against 0.19 ms). A blocking MPI_Allreduce on the
// sync thread progressed at once but spun on the rank's only core while the other rank caught up
// (LeNet-5 -np 2, batch 128: 24,926 img/s); polled with naps it leaves that time to backward
// (29,154-29,863 img/s, the same as one allreduce after backward, with less wait).
//
// Session 4: a woken sync thread runs only when the scheduler lets it preempt the training thread
// on the rank's core, so the training thread also runs the progress engine between backward layers
// while a bucket is in flight (LeNet-5's 236 KB bucket: 1.7 ms from start to end -> 0.2-0.8 ms), does
// the last bucket's allreduce itself (no hand-off and wake-up at the end of every step), and cuts
// the sync thread's nap short when it starts waiting.
//
// Session 5: when every rank of the replica group is on one machine (`transport` auto), the buckets
// go through shared memory instead (SharedMemoryReduce): the training thread posts each bucket as
// backward finishes it, sums its slice of each bucket once every rank has posted it, between
// backward layers, and copies the sums out; no MPI call, no sync thread. Since session 6 the
// network's gradient buffer is this rank's slot of the segment, so that nothing is copied in and a
// rank's own slice is summed in place. Across machines, or with
// `transport` mpi, the MPI path above.
import Foundation
import Synchronization
import TandemComm
import TandemCore

public final class GradientSync: GradientObserver {
    public enum Mode: String, Sendable, CaseIterable {
        /// Each bucket allreduced by the sync thread as soon as backward finishes its layers (the
        /// last one by the training thread after backward).
        case overlap
        /// One blocking allreduce of the whole buffer after backward.
        case after
    }
    /// How overlap's buckets travel.
    public enum Transport: String, Sendable, CaseIterable {
        /// Shared memory when every rank of the group is on one machine, else MPI.
        case auto
        /// MPI always (a sync thread's non-blocking allreduces).
        case mpi
    }
    let comm: Communicator
    /// The replica's flat gradient buffer, which the network's backward writes (`Network`'s
    /// `gradients:`): through shared memory this rank's slot of the segment, so that posting a
    /// bucket copies nothing; otherwise memory of its own.
    public let gradients: UnsafeMutableBufferPointer<Float>
    private let ownsGradients: Bool
    public let mode: Mode
    /// Bucket boundaries as offsets into the buffer, from the end: buckets[i] = start..<end.
    public let buckets: [Range<Int>]
    /// Why overlap was asked for and not used (MPI without MPI_THREAD_MULTIPLE), for rank 0 to say.
    public private(set) var note: String?
    private let worker: SyncWorker?
    /// The shared-memory allreduce (overlap on one machine), or nil.
    private let shared: SharedMemoryReduce?
    /// "shared memory" or "MPI": how the buckets travel (for bench's report).
    public var transportName: String { shared != nil ? "shared memory" : "MPI" }
    /// Seconds of `finish` spent before the slowest rank had released its last bucket (shared
    /// memory only): the ranks' compute difference, not the allreduce.
    public private(set) var slowestRankSeconds = 0.0
    /// Buckets handed to the sync thread this step.
    private var released = 0
    /// Seconds spent in `finish` (the allreduce wait on the critical path, with overlap including the
    /// last bucket's allreduce on the training thread).
    public private(set) var waitSeconds = 0.0
    /// Seconds the allreduces themselves took (overlap: on the sync thread, and the last bucket on the
    /// training thread), summed over buckets.
    public var allreduceSeconds: Double { (worker?.busySeconds ?? 0) + afterSeconds + sharedSeconds }
    /// Shared memory: each bucket from its release to its sums copied out, summed over buckets (which
    /// are in flight at once, so this can exceed the step; the allreduce alone: `bench-allreduce`).
    private var sharedSeconds = 0.0
    /// The training thread's own allreduces: the whole buffer (after), the last bucket (overlap).
    private var afterSeconds = 0.0
    /// `--trace`: each bucket's allreduce from start to completion, and the wait in `finish`.
    var trace: TraceRecorder?

    /// - Parameter bucketBytes: the smallest bucket; buckets end on parameter-tensor boundaries.
    /// Every rank of `comm` must create its GradientSync at the same point (overlap splits `comm`),
    /// before the network, which takes `gradients` as its gradient buffer.
    /// - Parameter sharded: through shared memory, hold one copy of the parameters and velocity for
    ///   every rank and update each rank's slices as they are summed (`updatesParameters`).
    /// - Parameter scalars: the most doubles one `sumScalars` call sums.
    public init(comm: Communicator, graph: Graph, mode: Mode, bucketBytes: Int, transport: Transport = .auto, sharded: Bool = false,
                scalars: Int = 0) throws {
        self.comm = comm
        if comm.size > 1 { try Self.checkSameOptions(comm: comm, mode: mode, bucketBytes: bucketBytes, transport: transport, sharded: sharded) }
        var cuts: [Range<Int>] = []
        var end = graph.parameterCount
        let minCount = max(1, bucketBytes / MemoryLayout<Float>.stride)
        for info in graph.parameters.reversed() where end - info.offset >= minCount || info.offset == 0 {
            cuts.append(info.offset..<end)
            end = info.offset
        }
        if end > 0 { cuts.append(0..<end) }
        var mode = mode
        var shared: SharedMemoryReduce?
        if mode == .overlap && comm.size > 1 && transport == .auto {
            switch try SharedMemoryReduce.make(comm: comm, count: graph.parameterCount, buckets: cuts, sharded: sharded, scalars: scalars) {
            case .success(let engine): shared = engine
            case .failure(.otherMachines): break
            case .failure(let reason): note = "gradient sync: \(reason), so buckets go through MPI" + (sharded ? " and every rank updates its own copy of the parameters" : "")
            }
        }
        self.shared = shared
        if let shared {
            gradients = UnsafeMutableBufferPointer(start: shared.gradients, count: graph.parameterCount)
            ownsGradients = false
        } else {
            gradients = UnsafeMutableBufferPointer(start: allocateZeroed(Float.self, count: graph.parameterCount), count: graph.parameterCount)
            ownsGradients = true
        }
        if shared == nil && mode == .overlap && comm.size > 1 && !comm.allowsConcurrentCommunicators {
            note = "gradient sync: MPI was not initialised with MPI_THREAD_MULTIPLE, so buckets are allreduced after backward"
            mode = .after
        }
        self.mode = mode
        buckets = mode == .after ? [0..<graph.parameterCount] : cuts
        if shared == nil && mode == .overlap && comm.size > 1 && buckets.count > 1 {
            // Its own communicator, so that its allreduces never interleave with the training
            // thread's collectives on `comm` (loss sums, sync BN, checkpoints). The last bucket,
            // which backward finishes as it ends, is the training thread's own (see `finish`).
            worker = SyncWorker(comm: try comm.split(color: 0, key: comm.rank), base: gradients.baseAddress!, buckets: Array(buckets.dropLast()))
        } else {
            worker = nil
        }
    }

    deinit {
        worker?.stop()
        if ownsGradients { UnsafeMutableRawPointer(gradients.baseAddress!).deallocate() }
    }

    /// Ranks started with different sync options would hang at the first bucket (or at the split of
    /// the communicator): every rank compares its options with rank 0's and stops with one line.
    private static func checkSameOptions(comm: Communicator, mode: Mode, bucketBytes: Int, transport: Transport, sharded: Bool) throws {
        var mine: [Int64] = [mode == .overlap ? 0 : 1, Int64(bucketBytes), transport == .auto ? 0 : 1, sharded ? 0 : 1]
        var all = [Int64](repeating: 0, count: 4 * comm.size)
        try mine.withUnsafeMutableBytes { m in try all.withUnsafeMutableBytes { try comm.allgather(m.baseAddress!, bytes: 32, into: $0.baseAddress!) } }
        guard let r = (1..<comm.size).first(where: { all[(4 * $0)..<(4 * $0 + 4)] != all[0..<4] }) else { return }
        func describe(_ q: Int) -> String {
            "--gradient-sync \(all[4 * q] == 0 ? "overlap" : "after") --bucket-kb \(all[4 * q + 1] / 1024) --transport \(all[4 * q + 2] == 0 ? "auto" : "mpi") --update \(all[4 * q + 3] == 0 ? "sharded" : "replicated")"
        }
        throw CommError("gradient sync: ranks were started with different options: rank \(r) has \(describe(r)), rank 0 \(describe(0)); every rank needs the same")
    }

    public var active: Bool { comm.size > 1 }

    /// Sharded update: the parameters and SGD velocity every rank of the group shares (nil otherwise).
    public var sharedParameters: UnsafeMutablePointer<Float>? { shared?.sharedParameters }
    public var sharedVelocity: UnsafeMutablePointer<Float>? { shared?.sharedVelocity }
    /// Whether `finish` leaves the parameters updated (sharded update): the caller runs no
    /// optimiser step, and only this rank's slices of `gradients` hold the summed gradient.
    public private(set) var updatesParameters = false

    /// The sum over the ranks of `count` doubles in place (the per-step loss and statistics): through
    /// the shared segment when the buckets use it (a store and a few loads where MPI took 30-60 us of
    /// LeNet-5's 6 ms step), else an MPI allreduce. Every rank calls it at the same point.
    public func sumScalars(_ values: UnsafeMutablePointer<Double>, count: Int) throws {
        if let shared, count <= shared.scalarCapacity { shared.sumScalars(values, count: count) } else { try comm.allreduceSum(values, count: count) }
    }

    /// Sharded update: the optimiser (whose velocity is `sharedVelocity`) that updates this rank's
    /// slices of `sharedParameters` as they are summed.
    public func attach(optimizer: SGD<Float>) {
        precondition(shared?.sharedParameters != nil && optimizer.velocity.baseAddress == shared?.sharedVelocity, "a sharded update needs the shared velocity")
        shared!.optimizer = optimizer
        updatesParameters = true
    }

    /// This step's learning rate for the sharded update; set before backward.
    public var learningRate: Double {
        get { shared?.learningRate ?? 0 }
        set { shared?.learningRate = newValue }
    }

    /// Called by backward: every gradient at offset >= `offset` is final.
    public func gradientsReady(from offset: Int) {
        if let shared {
            while released < buckets.count && buckets[released].lowerBound >= offset {
                shared.release(released)
                released += 1
            }
            return
        }
        guard let worker else { return }
        while released < buckets.count - 1 && buckets[released].lowerBound >= offset {
            worker.release()
            released += 1
        }
    }

    /// Through shared memory the gradients are this rank's slot, which the other ranks read until
    /// they have copied the last step's sums out: waits for that (at once in the training loop,
    /// whose per-step loss allreduce comes after every rank's `finish`).
    public func willWriteGradients() { shared?.awaitSlotFree() }

    /// Called by backward after each layer: while the sync thread has a bucket in flight, runs
    /// MPI's progress engine once from the training thread (see `SyncWorker.inFlight`).
    public func layerBackwardDone() {
        if let shared { shared.progress(); return }
        if let worker, worker.inFlight.load(ordering: .relaxed) { comm.progress() }
    }

    /// Completes every allreduce; call after backward, before the optimiser step (with
    /// `updatesParameters`, after the optimiser step too).
    public func finish() throws {
        guard active else { return }
        let start = Clock.now
        defer {
            let end = Clock.now
            waitSeconds += end - start
            if let trace { trace.record(trace.waitName, start: start, end: end) }
        }
        if let shared {
            shared.finish()
            released = 0
            var lastReleased = start
            for i in buckets.indices {
                sharedSeconds += shared.ended[i] - shared.started[i]
                lastReleased = max(lastReleased, shared.allReleased[i])
                trace?.bucket(i, start: shared.started[i], end: shared.ended[i], tid: Int32(1 + i))
            }
            slowestRankSeconds += lastReleased - start
            return
        }
        guard let worker else {
            try comm.allreduceSum(gradients.baseAddress!, count: gradients.count)
            let end = Clock.now
            afterSeconds += end - start
            trace?.bucket(0, start: start, end: end)
            return
        }
        // Buckets not released yet (backward ran on several threads and reported at the end).
        while released < buckets.count - 1 { worker.release(); released += 1 }
        released = 0
        // The last bucket on this thread, blocking, on `comm`: handing it to the sync thread and
        // waiting for it cost two thread wake-ups on the rank's core per step (LeNet-5 -np 2: a wait
        // of 0.14 ms per step for a 10 KB bucket whose allreduce takes 15-25 us). The other buckets'
        // allreduces move on meanwhile (one progress engine), and all ranks take the same order.
        let last = buckets[buckets.count - 1]
        var failure: Error?
        do { try comm.allreduceSum(gradients.baseAddress! + last.lowerBound, count: last.count) } catch { failure = error }
        let end = Clock.now
        afterSeconds += end - start
        worker.waitForAll()
        if let trace {
            for i in 0..<(buckets.count - 1) { trace.bucket(i, start: worker.started[i], end: worker.ended[i]) }
            trace.bucket(buckets.count - 1, start: start, end: end, tid: 0)
        }
        // Take the sync thread's error in any case, so that none is left for a later step.
        let workerError = worker.takeError()
        if let error = failure ?? workerError { throw error }
    }
}

/// The sync thread: allreduces buckets 0, 1, 2, ... of each step in order, each once the training
/// thread releases it. Waits sleep on semaphores (no spinning); a step allocates nothing.
private final class SyncWorker: @unchecked Sendable {
    /// The thread's own communicator; dropped by `stop` on the caller's thread once the sync thread
    /// has ended, so that it is freed (MPI_Comm_free) before the program finalises MPI.
    private var comm: Communicator?
    let base: UnsafeMutablePointer<Float>
    let buckets: [Range<Int>]
    private let releasedSignal = DispatchSemaphore(value: 0)
    private let doneSignal = DispatchSemaphore(value: 0)
    /// Per bucket, the nap between polls while backward runs (see `nap(bytes:)`).
    private let naps: [UInt32]
    private let exited = DispatchSemaphore(value: 0)
    /// Per bucket, this step's start and end times (read by the training thread after `waitForAll`).
    let started: UnsafeMutablePointer<Double>
    let ended: UnsafeMutablePointer<Double>
    /// Per bucket, its request, reused step after step (a step allocates nothing).
    private var requests: [CommRequest?]
    private(set) var busySeconds = 0.0
    private var error: Error?
    private let stopping = Atomic<Bool>(false)
    /// Set while a bucket's allreduce is in flight. The sync thread shares its rank's core with the
    /// training thread, and the scheduler lets a thread woken from a nap run only after the running
    /// one's slice: polled from the sync thread alone, LeNet-5's 236 KB bucket took 1.7-2 ms (its
    /// allreduce alone: 66-172 us) and often ended after backward. The training thread therefore
    /// also runs the progress engine between layers while this is set.
    let inFlight = Atomic<Bool>(false)
    /// Set while the training thread is blocked in `waitForAll`.
    private let trainingWaits = Atomic<Bool>(false)
    /// A nap the training thread cuts short when it starts waiting (see `nap(_:)`).
    private let wake = DispatchSemaphore(value: 0)
    private let napping = Atomic<Bool>(false)

    init(comm: Communicator, base: UnsafeMutablePointer<Float>, buckets: [Range<Int>]) {
        precondition(!buckets.isEmpty, "SyncWorker needs at least one bucket")
        self.comm = comm
        self.base = base
        self.buckets = buckets
        started = .allocate(capacity: buckets.count)
        ended = .allocate(capacity: buckets.count)
        requests = Array(repeating: nil, count: buckets.count)
        naps = buckets.map { UInt32(Self.nap(bytes: $0.count * MemoryLayout<Float>.stride)) }
        let thread = Thread { [self] in
            run()
            exited.signal()
        }
        thread.name = "tandem-gradient-sync"
        thread.start()
    }

    deinit { started.deallocate(); ended.deallocate() }

    func release() { releasedSignal.signal() }

    /// Returns once every bucket of this step is done (semaphores order the memory accesses).
    func waitForAll() {
        trainingWaits.store(true, ordering: .sequentiallyConsistent)
        if napping.exchange(false, ordering: .sequentiallyConsistent) { wake.signal() }
        doneSignal.wait()
        trainingWaits.store(false, ordering: .releasing)
    }

    func takeError() -> Error? { defer { error = nil }; return error }

    /// Ends the thread and waits for it (up to 10 s: a thread stuck in a collective with a dead rank
    /// is left to the job's end), then drops the communicator on the calling thread.
    func stop() {
        stopping.store(true, ordering: .releasing)
        releasedSignal.signal()
        if exited.wait(timeout: .now() + 10) == .success {
            requests = []
            comm = nil
        }
    }

    /// One bucket: a non-blocking allreduce polled with naps while the training thread computes
    /// (so that waiting for the other rank to release the same bucket takes no compute time from
    /// this rank's core, and the reduction still progresses during backward), polled back to back
    /// once the training thread waits for it.
    private func allreduce(_ i: Int, _ comm: Communicator) throws {
        let b = buckets[i]
        let request = try comm.startAllreduceSum(base + b.lowerBound, count: b.count, reusing: requests[i])
        requests[i] = request
        inFlight.store(true, ordering: .relaxed)
        defer { inFlight.store(false, ordering: .relaxed) }
        while try !request.test() {
            if trainingWaits.load(ordering: .sequentiallyConsistent) { sched_yield() } else { nap(naps[i]) }
        }
    }

    /// Sleeps up to `microseconds`, or until the training thread starts waiting for the buckets:
    /// a nap of the small AlexNet's 2 ms for its fc6 bucket must not delay the end of the step.
    /// Either this thread sees `trainingWaits` or the training thread sees `napping` (sequentially
    /// consistent), and every signal of `wake` is consumed here, so none is left for a later nap.
    private func nap(_ microseconds: UInt32) {
        napping.store(true, ordering: .sequentiallyConsistent)
        var consumed = false
        if !trainingWaits.load(ordering: .sequentiallyConsistent) {
            consumed = wake.wait(timeout: .now() + .microseconds(Int(microseconds))) == .success
        }
        // The training thread took the flag: its signal is on its way if the wait did not take it.
        if !napping.exchange(false, ordering: .sequentiallyConsistent) && !consumed { wake.wait() }
    }

    /// The nap between polls of a bucket of `bytes` while backward runs: about the time the
    /// allreduce of that many bytes takes on shared memory (4 KB per microsecond), 20 us to 2 ms. Each
    /// poll costs the rank's core a context switch: with 20 us naps for every bucket the small
    /// AlexNet's 8 MB fc6 bucket was polled thousands of times per step (-np 2, batch 128: 467-560
    /// img/s, waits 3-21 ms) against 533-562 img/s and waits of 0.1-3 ms with naps sized to the
    /// bucket. With the kernel's default timer slack a 20 us nap lasts 50-80 us.
    static func nap(bytes: Int) -> Int { min(2000, max(20, bytes / 4096)) }

    private func run() {
        guard let comm else { return }
        while true {
            for i in buckets.indices {
                releasedSignal.wait()
                if stopping.load(ordering: .acquiring) { return }
                let t0 = Clock.now
                // After a failure, the rest of the step's buckets are skipped; `finish` throws it.
                if error == nil {
                    do { try allreduce(i, comm) } catch { self.error = error }
                }
                let t1 = Clock.now
                started[i] = t0; ended[i] = t1
                busySeconds += t1 - t0
            }
            doneSignal.signal()
        }
    }
}

/// Monotonic seconds.
public enum Clock {
    public static var now: Double { monotonicSeconds() }
}
