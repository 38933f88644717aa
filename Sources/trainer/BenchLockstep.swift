// trainer bench-lockstep: what synchronous data parallelism can reach here at most, from the traces
// of two single-process benches that ran side by side (launch/weak-scaling with LOCKSTEP=1 runs it):
// each step in lockstep takes the slower of the two, so the pair's own step-to-step differences
// bound what any trainer meeting every step can keep of the pair's throughput (LockstepBound).
import ArgumentParser
import Foundation
import TandemTrain

struct BenchLockstep: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-lockstep",
        abstract: "The lockstep bound of two side-by-side `trainer bench --trace` runs: the share of their throughput that ranks meeting every step can keep.")
    @Argument(help: "The two Chrome traces (`trainer bench --trace FILE`, one process each, started together).") var traces: [String]
    @Option(help: "Write the bound as JSON to this file.") var json: String?

    func validate() throws {
        guard traces.count == 2 else { throw ValidationError("expected two trace files, got \(traces.count)") }
    }

    func run() throws {
        runReportingErrors {
            let steps = try traces.map { file in
                guard let d = FileManager.default.contents(atPath: file) else { throw ValidationError("\(file): cannot read") }
                return try LockstepBound.steps(traceJSON: d, file: file)
            }
            let b = try LockstepBound(a: steps[0], b: steps[1])
            print(String(format: "%.2f s side by side at %.3f and %.3f ms per step, %.3f ms apart on average at the same moment; %d steps in lockstep would keep %.1f%% of the pair with even shares, %.1f%% with balanced shares",
                         b.window, 1000 * b.meanA, 1000 * b.meanB, 1000 * b.meanDifference, b.lockstepSteps, 100 * b.even, 100 * b.balanced))
            if let json {
                let o: [String: Any] = ["lockstep_steps": b.lockstepSteps, "window_seconds": b.window, "mean_step_ms": [1000 * b.meanA, 1000 * b.meanB],
                                        "mean_difference_ms": 1000 * b.meanDifference, "even": b.even, "balanced": b.balanced]
                try writeAtomically(try JSONSerialization.data(withJSONObject: o, options: [.prettyPrinted, .sortedKeys]), to: json)
            }
        }
    }
}
