import Foundation
import TandemComm
import TandemCore
@testable import TandemTrain

/// The package root, found from this file.
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

func temporaryFolder() -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tandem-test-\(UUID().uuidString)").path
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// A config from YAML text with the given layers section.
func config(_ text: String) throws -> TrainConfig { try TrainConfig.parse(text, source: "test.yaml") }

/// Returns nil when `body` throws an error whose description contains every fragment, else what went wrong.
func expectError(_ fragments: [String], _ body: () throws -> Void) -> String? {
    do { try body() } catch {
        let text = String(describing: error)
        for f in fragments where !text.contains(f) { return "error \"\(text)\" does not contain \"\(f)\"" }
        return nil
    }
    return "no error was thrown"
}

/// Runs `steps` training steps of `cfg` on `ranks` in-process ranks (threads) and returns rank 0's
/// per-step losses and final parameters.
/// `prepare` runs on each rank's trainer before the first step, `finished` after the last.
/// `threads`: per rank; `counts`: each step's global batch (default: the config's, every step).
func trainInProcess(_ cfg: TrainConfig, ranks: Int, steps: Int, threads: Int = 1, counts: [Int]? = nil,
                    transport: GradientSync.Transport = .auto, sharded: Bool = true, transportUsed: ((String) -> Void)? = nil,
                    prepare: ((Trainer) -> Void)? = nil, finished: ((Trainer) -> Void)? = nil,
                    data: @escaping @Sendable () throws -> DataPipeline) throws -> (losses: [Double], parameters: [Float]) {
    final class Box: @unchecked Sendable { var losses: [Double] = []; var params: [Float] = [] }
    let box = Box()
    nonisolated(unsafe) let transportUsed = transportUsed
    nonisolated(unsafe) let prepare = prepare, finished = finished
    try ThreadCommunicator.run(size: ranks) { comm in
        var o = RunOptions()
        o.quiet = true
        o.bucketKB = 16
        o.transport = transport
        o.shardedUpdate = sharded
        var c = cfg
        c.parallel.threads = threads
        let t = try Trainer(config: c, comm: comm, data: try data(), options: o)
        if comm.rank == 0 { transportUsed?(t.sync.transportName) }
        prepare?(t)
        t.data.shuffle(epoch: 0, seed: c.seed)
        var losses: [Double] = []
        for s in 0..<steps {
            let r = try t.step(epoch: 0, start: s * c.batchSize, globalCount: counts?[s] ?? c.batchSize, step: s, lr: c.lr)
            losses.append(r.loss)
        }
        finished?(t)
        let whole = try t.wholeModel(t.net.parameters, tensors: \.parameters)
        if comm.rank == 0 { box.losses = losses; box.params = whole }
    }
    return (box.losses, box.params)
}

/// Builds a trainer on each of `ranks` in-process ranks, rank r with `configFor(r)` (the start-up
/// checks, nothing trained).
func startTrainers(ranks: Int = 2, _ configFor: @escaping @Sendable (Int) -> TrainConfig) throws {
    try ThreadCommunicator.run(size: ranks) { comm in
        var o = RunOptions()
        o.quiet = true
        _ = try Trainer(config: configFor(comm.rank), comm: comm, data: try syntheticData(), options: o)
    }
}
