// Threads inside one process. A process that owns the machine splits each batch into parts, one
// per core, each running the whole network on its samples with single-threaded BLAS; the parts
// meet only where batch statistics are shared (batch norm) and when their gradients are summed.
import Foundation
import Synchronization

/// A reusable barrier that spins briefly, then yields. Parts meet at it a few times per step
/// (batch-norm statistics), where a condition variable's wake-up would cost more than the work.
public final class SpinBarrier: @unchecked Sendable {
    public let parties: Int
    private let arrived = Atomic<Int>(0)
    private let generation = Atomic<Int>(0)

    public init(parties: Int) { self.parties = parties }

    public func wait() {
        if parties == 1 { return }
        let gen = generation.load(ordering: .acquiring)
        if arrived.add(1, ordering: .acquiringAndReleasing).newValue == parties {
            arrived.store(0, ordering: .relaxed)
            generation.add(1, ordering: .releasing)
            return
        }
        var spins = 0
        while generation.load(ordering: .acquiring) == gen {
            spins += 1
            if spins > 2000 { sched_yield() }
        }
    }
}

/// Persistent worker threads that run `body(part)` for parts 1..<parts while the caller runs
/// part 0. Nothing is allocated per run.
public final class WorkerPool: @unchecked Sendable {
    public let parts: Int
    private var body: (Int) -> Void = { _ in }
    private let start: [DispatchSemaphore]
    private let done = DispatchSemaphore(value: 0)
    private var threads: [Thread] = []
    private let stopping = Atomic<Bool>(false)

    public init(parts: Int) {
        precondition(parts >= 1)
        self.parts = parts
        start = (0..<parts).map { _ in DispatchSemaphore(value: 0) }
        for k in 1..<max(parts, 1) {
            let t = Thread { [unowned self] in self.loop(k) }
            t.name = "tandem-part-\(k)"
            t.stackSize = 8 << 20
            threads.append(t)
            t.start()
        }
    }

    /// Sets what every run executes (once, when the owner is built).
    public func setBody(_ body: @escaping (Int) -> Void) { self.body = body }

    private func loop(_ k: Int) {
        while true {
            start[k].wait()
            if stopping.load(ordering: .acquiring) { done.signal(); return }
            body(k)
            done.signal()
        }
    }

    /// Runs the body on every part and returns when all have finished.
    public func run() {
        for k in 1..<parts { start[k].signal() }
        body(0)
        for _ in 1..<parts { done.wait() }
    }

    /// Stops the worker threads; the pool cannot run afterwards.
    public func shutdown() {
        guard parts > 1, !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for k in 1..<parts { start[k].signal() }
        for _ in 1..<parts { done.wait() }
    }
}

/// Sums small vectors of statistics (batch norm's per-channel sums) over every part of the
/// batch that shares them: the threads of this process and, with sync_bn, the other ranks.
public protocol StatisticsReducer: AnyObject {
    /// Replaces `values` by their elementwise sum over all parts; every part calls it in the same order.
    func sum(_ values: UnsafeMutablePointer<Double>, count: Int, part: Int)
    /// Whether a sum adds anything (other parts or ranks), or leaves one part's values as they are.
    var combines: Bool { get }
}

/// Sums across the parts of one process in a fixed order (part 0, 1, ...), so the result is the
/// same on every part and in every run; then, if set, across ranks through `crossRank`.
///
/// Within a process the parts meet once per sum: each writes its vector into one of two slot sets
/// (alternating from sum to sum), waits at the barrier, and adds up every part's slot itself. A
/// part may then run ahead into the next sum, which writes the other set; it cannot reach a third
/// before every part has passed the second barrier, so nobody overwrites a set still being read.
/// With `crossRank`, part 0 sums across ranks in between and the parts meet a second time.
public final class PartReducer: StatisticsReducer, @unchecked Sendable {
    public let parts: Int
    public let capacity: Int
    private let barrier: SpinBarrier
    /// Two sets of one slot per part, then the cross-rank result.
    private let slots: UnsafeMutablePointer<Double>
    /// Per part, how many sums it has entered (each part touches only its own).
    private let calls: UnsafeMutablePointer<Int>
    /// Sums a vector across ranks in place (sync_bn); called by part 0 only.
    public var crossRank: ((UnsafeMutablePointer<Double>, Int) -> Void)?

    public init(parts: Int, capacity: Int) {
        self.parts = parts
        self.capacity = capacity
        barrier = SpinBarrier(parties: parts)
        slots = allocateZeroed(Double.self, count: (2 * parts + 1) * capacity)
        calls = allocateZeroed(Int.self, count: parts)
    }
    deinit { slots.deallocate(); calls.deallocate() }

    public var combines: Bool { parts > 1 || crossRank != nil }

    public func sum(_ values: UnsafeMutablePointer<Double>, count: Int, part: Int) {
        precondition(count <= capacity, "statistics vector larger than the reducer's capacity")
        if parts == 1 { crossRank?(values, count); return }
        let set = slots + (calls[part] & 1) * parts * capacity
        calls[part] += 1
        (set + part * capacity).update(from: values, count: count)
        barrier.wait()
        guard let crossRank else {
            values.update(from: set, count: count)
            for k in 1..<parts {
                let s = set + k * capacity
                for i in 0..<count { values[i] += s[i] }
            }
            return
        }
        let result = slots + 2 * parts * capacity
        if part == 0 {
            result.update(from: set, count: count)
            for k in 1..<parts {
                let s = set + k * capacity
                for i in 0..<count { result[i] += s[i] }
            }
            crossRank(result, count)
        }
        barrier.wait()
        values.update(from: result, count: count)
    }
}
