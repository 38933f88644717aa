// trainer debug: the single-process debug mode. No MPI launcher, one thread, deterministic.
import ArgumentParser
import Foundation
import TandemComm
import TandemCore
import TandemTrain

struct Debug: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Single-process debug mode: model table, whole-network gradient check, a few steps with per-layer statistics.",
        discussion: "Stops at the first layer whose activations or gradients hold NaN or Inf, naming it. Exit status 1 then, or when the gradient check fails.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Training steps to run with per-layer statistics.") var steps: Int = 5
    @Option(help: "Learning rate (overrides optimizer.lr).") var lr: Double?
    @Option(name: .customLong("check-batch"), help: "Batch size of the Float64 gradient check.") var checkBatch: Int = 2
    @Option(name: .customLong("check-per-tensor"), help: "Elements checked per parameter tensor.") var checkPerTensor: Int = 6
    @Flag(name: .customLong("skip-check"), help: "Skip the gradient check.") var skipCheck = false

    func run() throws {
        runReportingErrors {
            var c = try common.load()
            if let lr { c.lr = lr }
            c.parallel.threads = 1
            let data = try DataPipeline(config: c.data)
            var o = RunOptions()
            o.quiet = true
            o.initWeights = common.initWeights
            let trainer = try Trainer(config: c, comm: SingleProcessCommunicator(), data: data, options: o)
            print(ModelTable.render(trainer.graph, batch: c.batchSize, plan: trainer.plan))
            var failed = false
            if !skipCheck {
                print("\nGradient check (Float64, batch \(checkBatch), \(checkPerTensor) elements per tensor, tolerance 1e-5):")
                let results = GradientCheck.run(graph: trainer.graph, batch: checkBatch, seed: c.seed, objective: .loss, loss: c.loss,
                                                scheme: c.initScheme, perTensor: checkPerTensor)
                for r in results {
                    let ok = r.maxRelativeError < 1e-5
                    failed = failed || !ok
                    print("  " + (ok ? "ok   " : "FAIL ") + pad(r.tensor, 18) + String(format: " %3d checked, %d at kinks, max relative error %.2e", r.checked, r.skippedAtKinks, r.maxRelativeError))
                }
            }
            print("\nTraining \(steps) steps (batch \(c.batchSize), lr \(c.lr)):")
            data.shuffle(epoch: 0, seed: c.seed)
            let net = trainer.net
            let graph = trainer.graph
            for step in 0..<steps {
                let start = step * c.batchSize % max(1, data.train.count - c.batchSize)
                let r = try? trainer.step(epoch: 0, start: start, globalCount: c.batchSize, step: step, lr: c.lr)
                print(String(format: "step %d: loss %@", step, r.map { String(format: "%.5f", $0.loss) } ?? "not finite"))
                print("  layer            activation: mean      std       max|x|    nan/inf  | gradient: mean      std       max|x|    nan/inf")
                var firstBad: String? = nil
                for node in graph.nodes {
                    let n = c.batchSize * node.outputShape.count
                    let a = TensorStats(net.activations[node.index], count: n)
                    let g = net.activationGradients[node.index].map { TensorStats($0, count: n) }
                    print("  " + pad(node.name, 16) + String(format: " %10.3e %9.3e %9.3e %7d  | %@", a.mean, a.std, a.maxAbs, a.nonFinite,
                                 g.map { String(format: "%10.3e %9.3e %9.3e %7d", $0.mean, $0.std, $0.maxAbs, $0.nonFinite) } ?? "   (not computed)"))
                    if firstBad == nil && a.nonFinite > 0 { firstBad = "layer '\(node.name)' produced \(a.nonFinite) NaN/Inf activations in forward" }
                }
                if firstBad == nil {
                    // Backward runs last layer first: the first non-finite gradient in that order is the culprit.
                    for node in graph.nodes.reversed() {
                        if let g = net.activationGradients[node.index], TensorStats(g, count: c.batchSize * node.outputShape.count).nonFinite > 0 {
                            firstBad = "backward produced NaN/Inf in the gradient of layer '\(node.name)''s output"
                            break
                        }
                    }
                }
                if firstBad == nil, net.parameters.contains(where: { !$0.isFinite }) { firstBad = "the optimiser step made parameters NaN/Inf" }
                if let firstBad {
                    throw TrainingError("step \(step): \(firstBad); the learning rate (\(c.lr)) may be too high")
                }
            }
            if failed { throw TrainingError("the gradient check failed (see FAIL above)") }
            print("\ndebug: OK")
        }
    }
}

/// Mean, standard deviation, max |x| and the count of NaN/Inf of a Float tensor.
struct TensorStats {
    var mean = 0.0, std = 0.0, maxAbs = 0.0, nonFinite = 0
    init(_ p: UnsafePointer<Float>, count: Int) {
        var s = 0.0, s2 = 0.0, finite = 0
        for i in 0..<count {
            let v = p[i]
            if !v.isFinite { nonFinite += 1; continue }
            let d = Double(v)
            s += d; s2 += d * d; finite += 1
            maxAbs = max(maxAbs, abs(d))
        }
        if finite > 0 { mean = s / Double(finite); std = max(0, s2 / Double(finite) - mean * mean).squareRoot() }
    }
}

/// `s` left-aligned in a column of `width` characters.
func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s : s + String(repeating: " ", count: width - s.count) }

/// `s` right-aligned in a column of `width` characters.
func padLeft(_ s: String, _ width: Int) -> String { s.count >= width ? s : String(repeating: " ", count: width - s.count) + s }

/// The model as a table: layer, type, inputs, output shape, parameters, forward FLOPs per image.
enum ModelTable {
    static let widths = [10, 15, 14, 12, 11, 14, 26]
    static func row(_ cells: [String]) -> String {
        zip(cells, widths).enumerated().map { i, c in i == 4 || i == 5 ? padLeft(c.0, c.1) : pad(c.0, c.1) }.joined(separator: " ")
    }

    /// With towers, a last column says where the towers exchange activations and how many bytes each
    /// rank receives per step (forward allgather / backward reduce-scatter) for one replica's batch.
    static func render(_ g: Graph, batch: Int, plan: TowerPlan) -> String {
        let split = plan.towers > 1
        let talk = Dictionary(uniqueKeysWithValues: plan.exchanges.map { ($0.layer, $0) })
        func kb(_ elements: Int) -> String { String(format: "%.1f KB", Double(elements * batch * 4) / 1024) }
        var lines = [row(["layer", "type", "input", "output", "parameters", "FLOPs/image"] + (split ? ["towers (fwd / bwd per step)"] : []))]
        for node in g.nodes {
            let params = g.parameters(of: node.index).reduce(0) { $0 + $1.count }
            let inputs = node.inputs.map { g.nodes[$0].name }.joined(separator: ",")
            var type = node.kind?.typeName ?? "data"
            if case let .convolution(_, w, groups, _)? = node.kind { type += " \(w.kernelH)x\(w.kernelW)" + (groups > 1 ? " g\(groups)" : "") }
            var cells = [node.name, type, inputs, node.outputShape.description, formatCount(Double(params)), formatCount(Double(node.flopsPerSample))]
            if split {
                if let e = talk[node.name] { cells.append("  all: \(kb(e.forwardElementsPerSample)) / \(kb(e.backwardElementsPerSample))") } else if node.index > 0 { cells.append("  own") }
            }
            lines.append(row(cells))
        }
        if split, let loss = talk["loss (logits)"] {
            lines.append("loss: the towers gather the logits (\(kb(loss.forwardElementsPerSample)) per step); \(plan.towers) towers, so each rank holds 1/\(plan.towers) of every layer's outputs")
            let total = plan.exchanges.reduce(0) { $0 + $1.forwardElementsPerSample + $1.backwardElementsPerSample }
            lines.append("tower traffic per rank and step: \(kb(total)) at batch \(batch) (nothing else crosses between towers)")
        }
        lines.append(String(format: "total: %@ parameters, %@ running statistics, %@ forward FLOPs per image (%@ per step of %d, forward + backward ~3x)",
                            formatCount(Double(g.parameterCount)), formatCount(Double(g.statisticsCount)), formatCount(Double(g.flopsPerSample)),
                            formatCount(Double(3 * g.flopsPerSample * batch)), batch))
        return lines.joined(separator: "\n")
    }
}
