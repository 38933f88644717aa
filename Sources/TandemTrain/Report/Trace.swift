// A Chrome trace-event recorder (`--trace FILE`): what each rank did, when, as complete ("X")
// events that Perfetto (ui.perfetto.dev) and chrome://tracing open.
//
// Events go into an array allocated once (a training step allocates nothing); names are interned
// when the recorder is attached, so an event is four numbers. The file is written at the end of
// the run: {"traceEvents": [{"name", "cat", "ph": "X", "ts", "dur", "pid", "tid", "args"}, ...]},
// times in microseconds of CLOCK_MONOTONIC, so files of ranks on one machine line up when merged
// (pid = rank; `jq -s '{traceEvents: map(.traceEvents) | add}' t.json.rank*` merges them).
// Tracks: tid 0 is the rank's training thread (step, data, per-layer forward and backward of part
// 0, allreduce wait, optimiser), tid 1 the gradient allreduces in flight (start to completion).
import Foundation
import TandemCore

public final class TraceRecorder: LayerTimer {
    /// One complete event: `name` indexes `names`; `arg` is the step it belongs to.
    struct Event {
        var name: Int32, tid: Int32
        var arg: Int64
        var start: Double, end: Double
    }

    /// Interned event names, their categories and (allreduce buckets) their bytes.
    private(set) var names: [(name: String, category: String, bytes: Int?)] = [
        ("step", "step", nil), ("data", "data", nil), ("optimizer", "optimizer", nil), ("allreduce wait", "allreduce", nil), ("evaluate", "evaluate", nil),
    ]
    private let events: UnsafeMutablePointer<Event>
    public let capacity: Int
    public private(set) var count = 0
    /// Events that did not fit (the file says so in its metadata).
    public private(set) var dropped = 0
    /// The step events are tagged with (set by the training loop).
    public var step = 0
    public let rank: Int

    // The fixed names' indices in `names`.
    let stepName: Int32 = 0, dataName: Int32 = 1, optimizerName: Int32 = 2, waitName: Int32 = 3, evaluateName: Int32 = 4
    /// Per graph node: forward and backward names (2 * node, 2 * node + 1) start at `layerBase`.
    private var layerBase: Int32 = -1
    private var bucketBase: Int32 = -1

    public init(capacity: Int, rank: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.rank = rank
        events = UnsafeMutablePointer<Event>.allocate(capacity: capacity)
    }

    deinit { events.deallocate() }

    /// Records one event (dropped once the array is full).
    @inline(__always)
    public func record(_ name: Int32, tid: Int32 = 0, start: Double, end: Double) {
        guard count < capacity else { dropped += 1; return }
        events[count] = Event(name: name, tid: tid, arg: Int64(step), start: start, end: end)
        count += 1
    }

    // MARK: - Layers (Network's timing hook)

    /// Interns every layer's forward and backward names; call before the first step.
    func internLayers(_ graph: Graph) {
        layerBase = Int32(names.count)
        for node in graph.nodes {
            names.append(("\(node.name) forward", "forward", nil))
            names.append(("\(node.name) backward", "backward", nil))
        }
    }

    public func layerTimed(node: Int, backward: Bool, start: Double, end: Double) {
        record(layerBase + Int32(2 * node + (backward ? 1 : 0)), start: start, end: end)
    }

    // MARK: - Gradient allreduce buckets

    /// Interns one name per bucket ("allreduce bucket i"; args say its bytes).
    func internBuckets(_ buckets: [Range<Int>]) {
        bucketBase = Int32(names.count)
        for (i, b) in buckets.enumerated() {
            names.append((buckets.count == 1 ? "allreduce" : "allreduce bucket \(i)", "allreduce", b.count * MemoryLayout<Float>.stride))
        }
    }

    /// A gradient bucket's allreduce, from its start to its completion: on the communication track
    /// (1) when the sync thread or one whole-buffer call ran it, on the training track (0) for the
    /// last bucket that the training thread allreduces itself (inside its wait, so slices nest);
    /// shared memory's bucket i on track 1 + i (its buckets are in flight at once).
    func bucket(_ i: Int, start: Double, end: Double, tid: Int32 = 1) {
        record(bucketBase + Int32(i), tid: tid, start: start, end: end)
    }

    // MARK: - The file

    /// The trace as Chrome trace-event JSON.
    public func json() -> String {
        var s = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n"
        s.reserveCapacity(120 * (count + 4))
        let pid = rank
        s += "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":0,\"args\":{\"name\":\"rank \(rank)\"}},\n"
        s += "{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":0,\"args\":{\"sort_index\":\(rank)}},\n"
        s += "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":0,\"args\":{\"name\":\"training (part 0)\"}},\n"
        // Shared memory's buckets, in flight at once, each on a track of its own (tid 1 + bucket).
        let tracks = (0..<count).reduce(Int32(1)) { max($0, events[$1].tid) }
        s += "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":1,\"args\":{\"name\":\"\(tracks > 1 ? "gradient bucket 0 in flight" : "gradient allreduce in flight")\"}}"
        if tracks > 1 {
            for t in 2...tracks {
                s += ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(pid),\"tid\":\(t),\"args\":{\"name\":\"gradient bucket \(t - 1) in flight\"}}"
            }
        }
        if dropped > 0 {
            s += ",\n{\"name\":\"trace full: \(dropped) later events dropped\",\"ph\":\"i\",\"s\":\"p\",\"pid\":\(pid),\"tid\":0,\"ts\":\(count > 0 ? String(format: "%.3f", events[count - 1].end * 1e6) : "0")}"
        }
        let escaped = names.map { (jsonEscape($0.name), jsonEscape($0.category), $0.bytes) }
        for i in 0..<count {
            let e = events[i]
            let n = escaped[Int(e.name)]
            let args = n.2.map { "{\"bytes\":\($0),\"step\":\(e.arg)}" } ?? "{\"step\":\(e.arg)}"
            s += ",\n{\"name\":\"\(n.0)\",\"cat\":\"\(n.1)\",\"ph\":\"X\",\"ts\":"
            s += String(format: "%.3f", e.start * 1e6) + ",\"dur\":" + String(format: "%.3f", max(0, e.end - e.start) * 1e6)
            s += ",\"pid\":\(pid),\"tid\":\(e.tid),\"args\":\(args)}"
        }
        s += "\n]}\n"
        return s
    }

    /// Writes the trace; with several ranks, to `path.rankN`. Returns the path written.
    @discardableResult
    public func write(to path: String, worldSize: Int) throws -> String {
        let file = TraceRecorder.path(path, rank: rank, worldSize: worldSize)
        try writeAtomically(Data(json().utf8), to: file)
        return file
    }

    /// `path` for one process, `path.rankN` for rank N of several.
    public static func path(_ path: String, rank: Int, worldSize: Int) -> String { worldSize > 1 ? "\(path).rank\(rank)" : path }
}

func jsonEscape(_ s: String) -> String {
    var o = ""
    for ch in s.unicodeScalars {
        switch ch {
        case "\"": o += "\\\""
        case "\\": o += "\\\\"
        case _ where ch.value < 0x20: o += String(format: "\\u%04x", ch.value)
        default: o.unicodeScalars.append(ch)
        }
    }
    return o
}

extension Trainer {
    /// Attaches a trace recorder to this trainer (its steps, its network's layers and its gradient
    /// sync), sized for `steps` steps; returns it. Write it with `write(to:worldSize:)` at the end.
    @discardableResult
    public func startTrace(steps: Int, evaluations: Int = 0, maxEvents: Int = 1_000_000) -> TraceRecorder {
        // Per step: the step, data, optimiser, the wait, each layer forward and backward, each bucket
        // (with parallel.dynamic data and the layers once per chunk, for as many chunks as one rank
        // can take); per evaluation: the evaluation and each layer's forward per batch.
        let perStep = 3 + sync.buckets.count + (dynamic ? chunksPerBatch : 1) * (1 + 2 * graph.nodes.count)
        let perEvaluation = 1 + graph.nodes.count * ((data.test.count / replicas + net.capacity - 1) / net.capacity)
        let t = TraceRecorder(capacity: max(64, min(maxEvents, perStep * max(1, steps) + perEvaluation * evaluations + 16)), rank: comm.rank)
        t.internLayers(graph)
        t.internBuckets(sync.buckets)
        net.layerTimer = t
        sync.trace = t
        trace = t
        return t
    }
}
