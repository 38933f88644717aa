// trainer bench-report: the scaling benchmark's report from `trainer bench --json` and
// `trainer bench-allreduce --json` files (launch/scaling-benchmark runs it): results.json with
// every row (speedup and efficiency added), scaling.md (printed too) and scaling.svg.
import ArgumentParser
import Foundation
import TandemTrain

struct BenchReport: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-report",
        abstract: "Scaling report from bench and bench-allreduce JSON files: results.json, scaling.md (printed) and scaling.svg.")
    @Option(help: "Output folder.") var out: String = "runs/scaling"
    @Option(help: "Title of the figure.") var title: String?
    @Argument(help: "JSON files written by `trainer bench --json` and `trainer bench-allreduce --json`, in table order.") var files: [String]

    func run() throws {
        runReportingErrors {
            var rows: [ScalingRow] = []
            var allreduce: [AllreduceResult] = []
            for file in files {
                guard let d = FileManager.default.contents(atPath: file) else { throw ValidationError("\(file): cannot read") }
                guard let j = try? JSONSerialization.jsonObject(with: d) as? [String: Any] else { throw ValidationError("\(file): not a JSON object") }
                do {
                    if j["kind"] as? String == "allreduce" { allreduce.append(try AllreduceResult(j)) } else { rows.append(try ScalingRow(bench: j)) }
                } catch { throw ValidationError("\(file): \(error)") }
            }
            ScalingReport.computeSpeedups(&rows)
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            let results: [String: Any] = ["rows": rows.map(\.raw), "allreduce": allreduce.map(\.raw)]
            try writeAtomically(try JSONSerialization.data(withJSONObject: results, options: [.prettyPrinted, .sortedKeys]), to: out + "/results.json")
            let table = ScalingReport.markdown(rows: rows, allreduce: allreduce)
            try writeAtomically(Data(table.utf8), to: out + "/scaling.md")
            let cores = rows.compactMap { $0.raw["cores"] as? Int }.first ?? ProcessInfo.processInfo.activeProcessorCount
            let svg = ScalingReport.svg(rows: rows, allreduce: allreduce, cores: cores,
                                        title: title ?? "Tandem scaling, \(cores) core(s); speedup = images/s against 1 rank (solid: strong, fixed global batch; dashed: weak, fixed per-rank batch)")
            try writeAtomically(Data(svg.utf8), to: out + "/scaling.svg")
            print(table, terminator: "")
            print("\nwrote \(out)/{results.json,scaling.md,scaling.svg}")
        }
    }
}
