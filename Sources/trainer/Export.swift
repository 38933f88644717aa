// trainer export: a checkpoint's parameters and batch-norm running statistics as safetensors,
// with PyTorch state_dict names and layouts, for PyTorch (load_state_dict) or `--init-weights`.
import ArgumentParser
import Foundation
import TandemCore
import TandemTrain

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a checkpoint's parameters and running statistics as safetensors (PyTorch state_dict names and layouts).",
        discussion: """
        The layers come from the config stored in the checkpoint, or from --config. No num_batches_tracked \
        tensors are written: load into PyTorch with load_state_dict(..., strict=False). --names peers names the \
        AlexNet config's tensors as the peers' AlexNetSmall does (features.N, classifier.N).
        """)
    @Option(help: "The checkpoint (ckpt-step-*.tandem).") var checkpoint: String
    @Option(help: "The safetensors file to write.") var out: String
    @Option(help: "Take the layers from this config instead of the one stored in the checkpoint.") var config: String?
    @Option(help: "tandem: Tandem's names (PyTorch's for the LeNet-5 configs); peers: the peers' AlexNetSmall names (features.N, classifier.N).")
    var names: String = "tandem"

    mutating func validate() throws {
        if TensorNaming(rawValue: names) == nil { throw ValidationError("--names must be tandem or peers, got \(names)") }
    }

    func run() throws {
        runReportingErrors {
            let c = try Checkpoint.read(path: checkpoint)
            let cfg = try config.map { try TrainConfig.load(path: $0) } ?? TrainConfig.parse(c.configText, source: "\(checkpoint) (its stored config)")
            let graph = try Graph(input: c.header.input, layers: cfg.layers)
            guard graph.parameterCount == c.parameters.count, graph.statisticsCount == c.statistics.count else {
                throw CheckpointError("\(checkpoint): holds \(c.parameters.count) parameters and \(c.statistics.count) running statistics, but \(cfg.source)'s model has \(graph.parameterCount) and \(graph.statisticsCount)")
            }
            if config != nil && c.configText != cfg.text {
                fputs("tandem: note: \(cfg.source) is not the config stored in \(checkpoint); names and shapes come from \(cfg.source)\n", stderr)
            }
            let metadata = ["tandem_step": "\(c.header.step)", "tandem_epoch": "\(c.header.epoch)",
                            "tandem_config_hash": String(format: "%016llx", c.header.configHash), "tandem_seed": "\(c.header.seed)"]
            let bytes = try ModelWeights.encode(graph: graph, parameters: c.parameters, statistics: c.statistics,
                                                naming: TensorNaming(rawValue: names)!, metadata: metadata)
            try writeDurably(bytes, to: out)
            let tensors = graph.parameters.count + graph.statistics.count
            print("wrote \(out): \(tensors) tensors (\(formatCount(Double(graph.parameterCount))) parameters, \(formatCount(Double(graph.statisticsCount))) running statistics) from step \(c.header.step)")
        }
    }
}
