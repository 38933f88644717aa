// --trace: the Chrome trace-event file parses and has, per step, every layer's forward and
// backward, the data, the optimiser and (with 2 ranks) the gradient allreduce and its wait. And the
// scaling report's arithmetic (speedup against the one-rank row of the same model and mode).
import Foundation
import Testing
import TandemComm
import TandemCore
@testable import TandemTrain

@Suite struct TraceTests {
    @Test func traceHasEveryLayerAndTheAllreduce() throws {
        final class Box: @unchecked Sendable { var json = ""; var layers: [String] = []; var buckets = 0 }
        let box = Box()
        for (mode, transport) in [(GradientSync.Mode.after, GradientSync.Transport.auto), (.overlap, .mpi), (.overlap, .auto)] {
            try ThreadCommunicator.run(size: 2) { comm in
                var o = RunOptions()
                o.quiet = true
                o.gradientMode = mode
                o.transport = transport
                o.bucketKB = 16
                var c = try config(lenetYAML)
                c.parallel.threads = 1
                let t = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
                let trace = t.startTrace(steps: 2)
                t.data.shuffle(epoch: 0, seed: c.seed)
                for s in 0..<2 { _ = try t.step(epoch: 0, start: s * c.batchSize, globalCount: c.batchSize, step: s, lr: c.lr) }
                if comm.rank == 1 {
                    box.json = trace.json()
                    box.layers = t.graph.nodes.dropFirst().map(\.name)
                    box.buckets = t.sync.buckets.count
                }
            }
            let parsed = try JSONSerialization.jsonObject(with: Data(box.json.utf8)) as? [String: Any]
            let events = try #require(parsed?["traceEvents"] as? [[String: Any]])
            let complete = events.filter { $0["ph"] as? String == "X" }
            for e in complete {
                #expect(e["ts"] is Double && e["dur"] is Double && e["pid"] as? Int == 1 && e["tid"] is Int && e["name"] is String)
            }
            func count(_ name: String) -> Int { complete.filter { $0["name"] as? String == name }.count }
            for layer in box.layers {
                #expect(count("\(layer) forward") == 2, "\(mode): \(layer) forward")
                #expect(count("\(layer) backward") == 2, "\(mode): \(layer) backward")
            }
            for name in ["step", "data", "optimizer", "allreduce wait"] { #expect(count(name) == 2, "\(mode): \(name)") }
            // On the communication track, but for overlap's last bucket over MPI, which the training
            // thread's track holds; through shared memory bucket i on track 1 + i.
            let allreduces = complete.filter { $0["cat"] as? String == "allreduce" && $0["name"] as? String != "allreduce wait" }
            if mode == .overlap && transport == .auto {
                for i in 0..<box.buckets { #expect(allreduces.filter { $0["tid"] as? Int == 1 + i }.count == 2, "bucket \(i)") }
                #expect(events.contains { $0["ph"] as? String == "M" && $0["tid"] as? Int == 2 && ($0["args"] as? [String: Any])?["name"] as? String == "gradient bucket 1 in flight" })
            } else {
                #expect(allreduces.filter { $0["tid"] as? Int == 1 }.count == 2 * (mode == .after ? 1 : box.buckets - 1), "\(mode)")
            }
            #expect(allreduces.count == 2 * box.buckets, "\(mode): one event per bucket per step")
            #expect(mode == .after ? box.buckets == 1 : box.buckets > 1)
            #expect(events.contains { $0["ph"] as? String == "M" && ($0["args"] as? [String: Any])?["name"] as? String == "rank 1" })
        }
        #expect(TraceRecorder.path("t.json", rank: 3, worldSize: 4) == "t.json.rank3")
        #expect(TraceRecorder.path("t.json", rank: 0, worldSize: 1) == "t.json")
    }

    @Test func fullTraceDropsAndSaysSo() throws {
        let t = TraceRecorder(capacity: 2, rank: 0)
        for i in 0..<5 { t.record(t.dataName, start: Double(i), end: Double(i) + 0.5) }
        #expect(t.count == 2 && t.dropped == 3)
        #expect(t.json().contains("3 later events dropped"))
        _ = try JSONSerialization.jsonObject(with: Data(t.json().utf8))
    }

    @Test func scalingReportSpeedups() throws {
        func bench(_ model: String, _ layout: String, _ mode: String, np: Int, ips: Double, over: Bool = false, apart: Double? = nil) throws -> ScalingRow {
            try ScalingRow(bench: ["images_per_second": ips, "world_size": np, "batch_size": mode == "weak" ? 64 * np : 64, "ms_per_step": 10.0,
                                   "phases_ms": ["allreduce_wait": 2.5], "oversubscribed": over,
                                   "tags": ["model": model, "layout": layout, "mode": mode]]
                           .merging(apart.map { ["interleaved": ["synced_over_apart": $0]] } ?? [:]) { a, _ in a })
        }
        var rows = [try bench("lenet5", "data parallel", "strong", np: 1, ips: 1000), try bench("lenet5", "data parallel", "strong", np: 2, ips: 1800),
                    try bench("lenet5", "data parallel", "weak", np: 1, ips: 900), try bench("lenet5", "data parallel", "weak", np: 4, ips: 1800, over: true),
                    try bench("alexnet", "2 towers", "strong", np: 2, ips: 50),
                    try bench("lenet5", "data parallel, balanced", "strong", np: 2, ips: 1900),
                    try bench("lenet5", "data parallel, dynamic", "strong", np: 2, ips: 1950),
                    try bench("lenet5", "data parallel, dynamic", "weak", np: 2, ips: 1700, apart: 0.953)]
        ScalingReport.computeSpeedups(&rows)
        #expect(abs(rows[1].speedup - 1.8) < 1e-12 && abs(rows[1].efficiency - 0.9) < 1e-12)
        #expect(abs(rows[3].speedup - 2) < 1e-12 && abs(rows[3].efficiency - 0.5) < 1e-12)
        #expect(rows[4].speedup.isNaN, "no one-rank row for alexnet")
        #expect(rows[1].allreduceWaitPercent == 25)
        let table = ScalingReport.markdown(rows: rows, allreduce: [])
        #expect(table.contains("| lenet5 | data parallel | 2 | strong | 64 | 1800 | 1.80 | 90% | - | 25.0 |  |"))
        #expect(table.contains("| lenet5 | data parallel | 4 | weak | 256 | 1800 | 2.00 | 50% | - | 25.0 | oversubscribed |"))
        // An interleaved row: the job against its ranks apart, beside its speedup against the one-rank run.
        #expect(table.contains("| lenet5 | data parallel, dynamic | 2 | weak | 128 | 1700 | 1.89 | 94% | 95.3% | 25.0 |  |"), "\(table)")
        let allreduce = try AllreduceResult(["world_size": 2, "memcpy_gbps": 10.0, "rows": [["bytes": 4096, "median_us": 5.0, "algbw_gbps": 0.8,
                                                                                            "busbw_gbps": 0.8, "ring_bound_us": 0.4]]])
        let svg = ScalingReport.svg(rows: rows, allreduce: [allreduce], cores: 2, title: "t")
        #expect(svg.hasPrefix("<svg") && svg.contains("oversubscribed") && svg.contains(">lenet5 DP</text>") && svg.contains("busbw np 2"))
        // Balanced data parallel is a line of its own, from the same one-rank row.
        #expect(abs(rows[5].speedup - 1.9) < 1e-12 && svg.contains(">lenet5 DP balanced</text>"))
        #expect(abs(rows[6].speedup - 1.95) < 1e-12 && svg.contains(">lenet5 DP dynamic</text>"))
        #expect(ScalingReport.markdown(rows: [], allreduce: [allreduce]).contains("| 4096 | 5.0 | 0.800 | 0.800 | 0.4 | 0.08 |"))
    }
}
