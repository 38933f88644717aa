// Data-parallel gradient averaging. The flat gradient buffer is cut into buckets in reverse
// layer order (the end of the buffer first, since backward finishes the last layers first);
// a bucket's allreduce starts as soon as backward reports its layers done, and all complete
// before the optimiser step. The loss gradient is already scaled by 1/global batch, so the sum
// over replicas is the gradient of the mean loss: no further scaling.
import Foundation
import TandemComm
import TandemCore

public final class GradientSync: GradientObserver {
    public enum Mode: String, Sendable, CaseIterable {
        /// Start each bucket's non-blocking allreduce as backward finishes its layers.
        case overlap
        /// One blocking allreduce of the whole buffer after backward (for comparison).
        case after
    }
    let comm: Communicator
    let gradients: UnsafeMutableBufferPointer<Float>
    public let mode: Mode
    /// Bucket boundaries as offsets into the buffer, from the end: buckets[i] = start..<end.
    public let buckets: [Range<Int>]
    private var requests: [CommRequest?]
    private var next = 0
    public private(set) var error: Error?
    /// Seconds spent blocked in `finish` (the allreduce wait on the critical path) and in total collectives.
    public private(set) var waitSeconds = 0.0
    /// `--trace`: each bucket's allreduce from start to completion, and the wait in `finish`.
    var trace: TraceRecorder? {
        didSet { traceStart = Array(repeating: -1, count: buckets.count) }
    }
    /// Per bucket: when its allreduce started (-1: not started or already recorded).
    private var traceStart: [Double] = []

    /// - Parameter bucketBytes: the smallest bucket; buckets end on parameter-tensor boundaries.
    public init(comm: Communicator, graph: Graph, gradients: UnsafeMutableBufferPointer<Float>, mode: Mode, bucketBytes: Int) {
        self.comm = comm
        self.gradients = gradients
        self.mode = mode
        var cuts: [Range<Int>] = []
        var end = graph.parameterCount
        let minCount = max(1, bucketBytes / MemoryLayout<Float>.stride)
        for info in graph.parameters.reversed() where end - info.offset >= minCount || info.offset == 0 {
            cuts.append(info.offset..<end)
            end = info.offset
        }
        if end > 0 { cuts.append(0..<end) }
        buckets = mode == .after ? [0..<graph.parameterCount] : cuts
        requests = Array(repeating: nil, count: buckets.count)
    }

    public var active: Bool { comm.size > 1 }

    /// Called by backward: every gradient at offset >= `offset` is final.
    public func gradientsReady(from offset: Int) {
        guard active, mode == .overlap, error == nil else { return }
        do {
            while next < buckets.count && buckets[next].lowerBound >= offset {
                let b = buckets[next]
                if trace != nil { traceStart[next] = Clock.now }
                requests[next] = try comm.startAllreduceSum(gradients.baseAddress! + b.lowerBound, count: b.count)
                next += 1
            }
            // Drive progress of the ones in flight (OpenMPI progresses only inside MPI calls).
            for i in requests.indices { if let r = requests[i], try r.test() { traceCompleted(i) } }
        } catch { self.error = error }
    }

    /// Completes every allreduce; call after backward, before the optimiser step.
    public func finish() throws {
        guard active else { return }
        let start = Clock.now
        defer {
            let end = Clock.now
            waitSeconds += end - start
            next = 0
            if let trace { trace.record(trace.waitName, start: start, end: end) }
        }
        if let error { throw error }
        if mode == .after {
            try comm.allreduceSum(gradients.baseAddress!, count: gradients.count)
            trace?.bucket(0, start: start, end: Clock.now)
            return
        }
        // Buckets not started yet (e.g. backward ran on several threads and reported at the end).
        while next < buckets.count {
            let b = buckets[next]
            if trace != nil { traceStart[next] = Clock.now }
            requests[next] = try comm.startAllreduceSum(gradients.baseAddress! + b.lowerBound, count: b.count)
            next += 1
        }
        for i in 0..<requests.count { try requests[i]?.wait(); traceCompleted(i); requests[i] = nil }
    }

    /// Records bucket `i`'s allreduce once, when it is first seen complete.
    @inline(__always)
    private func traceCompleted(_ i: Int) {
        guard let trace, traceStart[i] >= 0 else { return }
        trace.bucket(i, start: traceStart[i], end: Clock.now)
        traceStart[i] = -1
    }
}

/// Monotonic seconds.
public enum Clock {
    public static var now: Double { monotonicSeconds() }
}
