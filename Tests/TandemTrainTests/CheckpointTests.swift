// Checkpoints and exact resume, in-process: the file format refuses damaged files with one line,
// a run stopped after K steps and resumed trains bit for bit what one uninterrupted run trains
// (1 and 2 ranks as threads), a checkpoint written by 2 ranks resumes on 1, `auto` falls back
// past unusable checkpoints, and poisoned weights are never written.
import Foundation
import Testing
import TandemComm
import TandemCore
import TandemData
@testable import TandemTrain

/// A small network with every kind of state a checkpoint carries: BN running statistics, dropout
/// masks keyed by step, momentum, weight decay, and a warm-up + cosine schedule.
let tinyYAML = """
model:
  layers:
    - {name: conv1, type: conv, out: 4, kernel: 3, pad: 1, bias: false}
    - {name: bn1, type: batchnorm}
    - {name: relu1, type: relu}
    - {name: pool1, type: maxpool, kernel: 2}
    - {name: flatten, type: flatten}
    - {name: fc1, type: linear, out: 16}
    - {name: relu2, type: relu}
    - {name: drop, type: dropout, rate: 0.25}
    - {name: fc2, type: linear, out: 10}
train: {epochs: 2, batch_size: 16, seed: 5, log_every_steps: 1, eval_every_epochs: 0.5, keep_checkpoints: 10}
optimizer: {lr: 0.05, momentum: 0.9, weight_decay: 0.0005, schedule: {type: cosine, min_lr: 0.001, warmup_epochs: 0.25}}
"""

/// 96 random 1x12x12 images (6 steps of 16 per epoch, 12 in the run), augmented with crops and flips.
let tinyData: @Sendable () throws -> DataPipeline = {
    let s = try DataPipeline.synthetic(shape: Shape(1, 12, 12), classes: 10, train: 96, test: 32, seed: 4)
    var c = s.config
    c.flip = true
    c.cropPadding = 1
    return try DataPipeline(train: s.train, test: s.test, config: c)
}

struct TrainedState {
    var parameters: [Float] = [], velocity: [Float] = [], statistics: [Float] = []
    var steps = 0
    var resumedFrom: Int?
}

/// Runs `Trainer.run()` on `ranks` in-process ranks writing to `out`; returns rank 0's buffers.
func trainRun(_ cfg: TrainConfig, ranks: Int, out: String, maxSteps: Int = 0, resume: String? = nil) throws -> TrainedState {
    final class Box: @unchecked Sendable { var state = TrainedState() }
    let box = Box()
    try ThreadCommunicator.run(size: ranks) { comm in
        var o = RunOptions()
        o.quiet = true
        o.outDir = out
        o.bucketKB = 1
        o.resume = resume
        var c = cfg
        c.parallel.threads = 1
        c.maxSteps = maxSteps
        let t = try Trainer(config: c, comm: comm, data: try tinyData(), options: o)
        let s = try t.run()
        if comm.rank == 0 {
            box.state = TrainedState(parameters: Array(t.net.parameters), velocity: Array(t.sgd.velocity), statistics: Array(t.net.statistics),
                                     steps: s.steps, resumedFrom: t.resumedFrom?.step)
        }
    }
    return box.state
}

func checkpointSteps(_ folder: String) -> [Int] { Checkpoint.list(in: folder).map(\.step) }

/// Flips one bit of a file in place.
func flipBit(_ path: String, at offset: Int) throws {
    var d = try Data(contentsOf: URL(fileURLWithPath: path))
    d[offset] ^= 0x10
    try d.write(to: URL(fileURLWithPath: path))
}

@Suite struct CheckpointFormatTests {
    func sample() -> Checkpoint {
        var c = Checkpoint()
        c.header.configHash = 0xDEAD_BEEF_0123_4567
        c.header.worldSize = 2; c.header.threads = 3
        c.header.epoch = 4; c.header.position = 32; c.header.step = 26; c.header.lrStep = 26
        c.header.seed = 9; c.header.batchSize = 16; c.header.trainCount = 96
        c.header.input = Shape(1, 12, 12)
        c.header.trainSeconds = 1.5; c.header.wallSeconds = 2.25; c.header.secondsTo90 = 1.25; c.header.lastTrainLoss = 0.75
        c.configText = "model: {}  # é"
        c.parameters = [1, -2, .pi, 0, 1e-30]
        c.velocity = [0.5, 0.25, -1, 2, 3]
        c.statistics = [7, 8]
        return c
    }

    @Test func roundTrip() throws {
        let c = sample()
        let d = try Checkpoint.decode(c.encoded(), path: "x")
        #expect(d.header == c.header)
        #expect(d.header.step == 26 && d.header.input == Shape(1, 12, 12) && d.header.configHash == c.header.configHash)
        #expect(d.configText == c.configText && d.parameters == c.parameters && d.velocity == c.velocity && d.statistics == c.statistics)
        let bytes = c.encoded()
        #expect(Array(bytes.prefix(8)) == Array("TANDEMCK".utf8))
        #expect(Checkpoint.fileName(step: 123) == "ckpt-step-000123.tandem")
        #expect(Checkpoint.step(ofFileName: "ckpt-step-1234567.tandem") == 1_234_567)
        #expect(Checkpoint.step(ofFileName: ".ckpt-step-000001.tandem.tmp-7") == nil)
    }

    @Test func everyTruncationAndEveryFlippedBitIsRefusedWithOneLine() throws {
        let bytes = sample().encoded()
        for n in 0..<bytes.count {
            let err = expectError(["ck.tandem: "]) { _ = try Checkpoint.decode(bytes.prefix(n), path: "ck.tandem") }
            #expect(err == nil, "truncated to \(n): \(err ?? "")")
        }
        for i in 0..<bytes.count {
            var d = bytes
            d[i] ^= 0x10
            do {
                _ = try Checkpoint.decode(d, path: "ck.tandem")
                Issue.record("a flipped bit at byte \(i) was not noticed")
            } catch {
                let text = String(describing: error)
                #expect(text.hasPrefix("ck.tandem: ") && !text.contains("\n"), "\(text)")
            }
        }
    }

    @Test func errorsSayWhatIsWrong() throws {
        let bytes = sample().encoded()
        let cases: [(Data, [String])] = [
            (bytes.prefix(40), ["ck.tandem", "truncated"]),
            (bytes.prefix(bytes.count - 30), ["ck.tandem", "truncated"]),
            (Data("PK\u{3}\u{4}not a checkpoint".utf8), ["ck.tandem", "not a Tandem checkpoint"]),
            ({ var d = bytes; d[8] = 7; return d }(), ["ck.tandem", "format version 7", "reads version 1"]),
            ({ var d = bytes; d[d.count - 12] ^= 1; return d }(), ["ck.tandem", "checksum mismatch", "corrupt"]),
            (bytes + Data([0]), ["ck.tandem", "unexpected bytes"]),
        ]
        for (data, fragments) in cases {
            let err = expectError(fragments) { _ = try Checkpoint.decode(data, path: "ck.tandem") }
            #expect(err == nil, "\(fragments): \(err ?? "")")
        }
        let missing = expectError(["/no/such.tandem", "no such checkpoint"]) { _ = try Checkpoint.read(path: "/no/such.tandem") }
        #expect(missing == nil, "\(missing ?? "")")
    }

    @Test func checkRefusesAnotherConfigAndAnotherModel() throws {
        let cfg = try config(tinyYAML)
        let graph = try Graph(input: Shape(1, 12, 12), layers: cfg.layers)
        var c = Checkpoint()
        c.header.configHash = cfg.hash
        c.header.batchSize = 16; c.header.trainCount = 96; c.header.epoch = 1; c.header.position = 32; c.header.step = 8
        c.parameters = [Float](repeating: 0, count: graph.parameterCount)
        c.velocity = c.parameters
        c.statistics = [Float](repeating: 0, count: graph.statisticsCount)
        try c.check(config: cfg, graph: graph, trainCount: 96, path: "a.tandem")

        var other = cfg
        other.lr = 0.1
        var err = expectError(["a.tandem", "was written by a different config (hash \(String(format: "%016llx", cfg.hash))"]) {
            try c.check(config: other, graph: graph, trainCount: 96, path: "a.tandem")
        }
        #expect(err == nil, "\(err ?? "")")
        var short = c
        short.parameters.removeLast(); short.velocity.removeLast()
        err = expectError(["a.tandem", "parameters but the model has \(graph.parameterCount)"]) {
            try short.check(config: cfg, graph: graph, trainCount: 96, path: "a.tandem")
        }
        #expect(err == nil, "\(err ?? "")")
        err = expectError(["a.tandem", "training set of 96 images; this one has 80"]) {
            try c.check(config: cfg, graph: graph, trainCount: 80, path: "a.tandem")
        }
        #expect(err == nil, "\(err ?? "")")
    }

    @Test func hashCoversWhatIsTrainedNotWhereItStops() throws {
        let c = try config(tinyYAML)
        var x = c
        x.maxSteps = 3; x.parallel.threads = 7; x.data.path = "/elsewhere"
        #expect(x.hash == c.hash)
        let changes: [(inout TrainConfig) -> Void] = [{ $0.lr = 0.2 }, { $0.epochs = 3 }, { $0.batchSize = 32 }, { $0.seed = 6 }, { $0.text += "\n#" }]
        for change in changes {
            var y = c
            change(&y)
            #expect(y.hash != c.hash)
        }
    }

    @Test func checkpointKeysParse() throws {
        let c = try config(ConfigTests.minimal + "train: {checkpoint_every_epochs: 0.5, checkpoint_every_steps: 7, keep_checkpoints: 2}\n")
        #expect(c.checkpointEveryEpochs == 0.5 && c.checkpointEverySteps == 7 && c.keepCheckpoints == 2)
        let d = try config(ConfigTests.minimal)
        #expect(d.checkpointEveryEpochs == 1 && d.checkpointEverySteps == 0 && d.keepCheckpoints == 3)
        let cases: [(String, [String])] = [
            ("train: {keep_checkpoints: 0}\n", ["test.yaml", "train.keep_checkpoints", "positive"]),
            ("train: {checkpoint_every_epochs: -1}\n", ["train.checkpoint_every_epochs", ">= 0"]),
            ("train: {checkpoint_every_steps: often}\n", ["train.checkpoint_every_steps", "expected an integer"]),
            ("train: {checkpoint_evry_steps: 3}\n", ["train.checkpoint_evry_steps", "unknown key", "checkpoint_every_steps"]),
        ]
        for (text, fragments) in cases {
            let err = expectError(fragments) { _ = try config(ConfigTests.minimal + text) }
            #expect(err == nil, "\(text): \(err ?? "")")
        }
    }
}

@Suite struct ResumeTests {
    /// (ranks, stop after K steps): in the middle of epoch 0, at the epoch boundary, inside epoch 1.
    @Test(arguments: [(1, 4), (1, 6), (2, 3), (2, 9)])
    func stoppedAndResumedRunIsBitIdentical(ranks: Int, stopAfter k: Int) throws {
        let c = try config(tinyYAML)
        let whole = try trainRun(c, ranks: ranks, out: temporaryFolder())
        #expect(whole.steps == 12)
        let out = temporaryFolder()
        let first = try trainRun(c, ranks: ranks, out: out, maxSteps: k)
        #expect(first.steps == k)
        #expect(checkpointSteps(out).last == k)
        let rest = try trainRun(c, ranks: ranks, out: out, resume: "auto")
        #expect(rest.resumedFrom == k)
        #expect(rest.steps == 12)
        #expect(rest.parameters == whole.parameters, "parameters differ after resuming at step \(k)")
        #expect(rest.velocity == whole.velocity)
        #expect(rest.statistics == whole.statistics)
        // metrics.csv holds every step once: the first run's rows, then the resumed run's.
        let csv = try String(contentsOfFile: out + "/metrics.csv", encoding: .utf8)
        let steps = csv.split(separator: "\n").filter { $0.hasPrefix("step,") }.map { Int($0.split(separator: ",")[2])! }
        #expect(steps == Array(1...12), "\(csv)")
        #expect(csv.hasPrefix(MetricsRow.header))
    }

    @Test func twoRankCheckpointResumesOnOneRank() throws {
        // sync_bn: 2 ranks then compute what one process computes (up to rounding).
        var c = try config(tinyYAML)
        c.parallel.syncBN = true
        let whole = try trainRun(c, ranks: 2, out: temporaryFolder())
        let out = temporaryFolder()
        _ = try trainRun(c, ranks: 2, out: out, maxSteps: 5)
        let rest = try trainRun(c, ranks: 1, out: out, resume: out + "/" + Checkpoint.fileName(step: 5))
        #expect(rest.resumedFrom == 5 && rest.steps == 12)
        // Another summation order: equal within float rounding, not bit for bit.
        #expect(relativeDifference(rest.parameters, whole.parameters) < 1e-4)
        let header = try Checkpoint.read(path: out + "/" + Checkpoint.fileName(step: 12)).header
        #expect(header.worldSize == 1 && header.step == 12 && header.epoch == 2 && header.position == 0)
    }

    @Test func cadenceEndOfRunAndKeep() throws {
        var c = try config(tinyYAML)
        c.checkpointEveryEpochs = 0.5   // every 3 steps
        c.checkpointEverySteps = 4
        var out = temporaryFolder()
        _ = try trainRun(c, ranks: 1, out: out)
        #expect(checkpointSteps(out) == [3, 4, 6, 8, 9, 12])
        c.keepCheckpoints = 2
        out = temporaryFolder()
        _ = try trainRun(c, ranks: 1, out: out, maxSteps: 10)
        #expect(checkpointSteps(out) == [9, 10])
        c.checkpointEveryEpochs = 0
        c.checkpointEverySteps = 0
        out = temporaryFolder()
        _ = try trainRun(c, ranks: 1, out: out)
        #expect(checkpointSteps(out).isEmpty)
    }

    @Test func autoFallsBackPastCorruptAndForeignCheckpoints() throws {
        var c = try config(tinyYAML)
        c.checkpointEverySteps = 2
        c.keepCheckpoints = 3
        let whole = try trainRun(c, ranks: 1, out: temporaryFolder())
        let out = temporaryFolder()
        _ = try trainRun(c, ranks: 1, out: out, maxSteps: 10)
        #expect(checkpointSteps(out) == [6, 8, 10])
        let bad = out + "/" + Checkpoint.fileName(step: 10)
        try flipBit(bad, at: 200)
        // A checkpoint of another experiment with a later step is skipped too.
        var foreign = try Checkpoint.read(path: out + "/" + Checkpoint.fileName(step: 8))
        foreign.header.configHash ^= 1
        let foreignPath = out + "/" + Checkpoint.fileName(step: 11)
        try foreign.write(to: foreignPath)
        // Named as FILE, either is an error.
        var err = expectError([bad, "checksum mismatch"]) { _ = try trainRun(c, ranks: 1, out: temporaryFolder(), resume: bad) }
        #expect(err == nil, "\(err ?? "")")
        err = expectError([foreignPath, "was written by a different config"]) { _ = try trainRun(c, ranks: 1, out: temporaryFolder(), resume: foreignPath) }
        #expect(err == nil, "\(err ?? "")")
        // With 2 ranks every rank stops (rank 1 says that rank 0 could not resume).
        #expect(throws: (any Error).self) { _ = try trainRun(c, ranks: 2, out: temporaryFolder(), resume: bad) }

        let rest = try trainRun(c, ranks: 1, out: out, resume: "auto")
        #expect(rest.resumedFrom == 8)
        #expect(rest.parameters == whole.parameters)
        // The same folder given as DIR: its newest usable checkpoint is now the end of the run.
        let again = try trainRun(c, ranks: 1, out: temporaryFolder(), resume: out)
        #expect(again.resumedFrom == 12 && again.parameters == whole.parameters)
    }

    @Test func resumeWithNothingToResumeFrom() throws {
        let c = try config(tinyYAML)
        // auto in an empty output folder starts from the beginning.
        let fresh = try trainRun(c, ranks: 1, out: temporaryFolder(), maxSteps: 2, resume: "auto")
        #expect(fresh.resumedFrom == nil && fresh.steps == 2)
        let empty = temporaryFolder()
        let err = expectError([empty, "no checkpoints"]) { _ = try trainRun(c, ranks: 1, out: temporaryFolder(), resume: empty) }
        #expect(err == nil, "\(err ?? "")")
    }

    @Test func poisonedWeightsAreNeverCheckpointed() throws {
        let c = try config(tinyYAML)
        let out = temporaryFolder()
        var o = RunOptions()
        o.quiet = true
        o.outDir = out
        let t = try Trainer(config: c, comm: SingleProcessCommunicator(), data: try tinyData(), options: o)
        var state = RunState()
        state.step = 7
        #expect(try t.saveCheckpoint(state) != nil)
        t.net.parameters[t.graph.parameters.first { $0.name == "fc1.weight" }!.offset + 3] = .infinity
        state.step = 8
        let err = expectError(["step 8", "NaN/Inf", "fc1.weight", "no checkpoint was written"]) { _ = try t.saveCheckpoint(state) }
        #expect(err == nil, "\(err ?? "")")
        #expect(checkpointSteps(out) == [7])
    }
}
