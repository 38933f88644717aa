// The experiment a config file describes: model, data, optimiser and schedule, training length,
// and the parallel layout. One YAML file per experiment (configs/*.yaml); every key is listed
// in the README's config reference, and anything else is an error naming the file and key.
import Foundation
import TandemCore
import Yams

public struct DataConfig: Sendable, Equatable {
    public enum Format: String, Sendable, CaseIterable {
        /// IDX files named like MNIST's (train-images-idx3-ubyte[.gz], ...): MNIST, Fashion-MNIST, KMNIST.
        case idx
        case cifar10
        case cifar100
    }
    public var format: Format = .idx
    public var path: String = "/usr/share/datasets/fashion-mnist"
    /// Per-channel mean and standard deviation of pixels scaled to [0, 1]; nil: computed from the training set.
    public var mean: [Double]? = nil
    public var std: [Double]? = nil
    /// Random crop: pad by this many pixels, then crop back to the original size (0: off).
    public var cropPadding: Int = 0
    /// Random horizontal flip with probability 1/2.
    public var flip: Bool = false
    /// Use only the first N training / test samples (0: all), for quick experiments.
    public var trainLimit: Int = 0
    public var testLimit: Int = 0
}

public struct ScheduleConfig: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable { case constant, step, cosine }
    public var kind: Kind = .constant
    /// step: multiply by gamma every `everyEpochs` epochs.
    public var everyEpochs: Double = 1
    public var gamma: Double = 0.1
    /// cosine: the final rate.
    public var minLR: Double = 0
    /// Linear warm-up over this many epochs (may be fractional).
    public var warmupEpochs: Double = 0
}

public struct ParallelConfig: Sendable, Equatable {
    /// Threads that split each local batch; 0: all cores when this is the only rank on the machine, else 1.
    public var threads: Int = 0
    /// Batch norm statistics summed over every rank (N ranks then compute what one process computes).
    public var syncBN: Bool = false
    /// Model parallelism: every parameterised layer's outputs split over this many ranks (AlexNet's
    /// towers); the world is replicas x towers. One process runs the whole (grouped) model.
    public var towers: Int = 1
    /// A blocking collective that takes longer than this ends the job, naming it (0: off).
    public var collectiveTimeoutSeconds: Double = 300
    /// Data parallel: each replica's share of the global batch follows its measured speed (faster
    /// ranks take more samples, 0.5x to 1.5x the even share), so that no rank waits for a slower one.
    public var balance: Bool = false
    /// Data parallel on one machine: the replicas claim the samples of each global batch from a pool
    /// they share as they go, first one large chunk each (the head), then chunks that shrink towards
    /// the end of the step (guided self-scheduling), so that they finish a step within a small chunk
    /// of one another whatever their speeds do during it.
    public var dynamic: Bool = false
    /// parallel.dynamic: the largest chunk a replica claims after its head (0: half the even share, at
    /// least 1); the smallest is a thirty-second of it (at least 1: at batch 128 on two ranks, chunks
    /// of 1 at the end of a step ran 3.6% faster than of 2, back to back over 16 rounds). The network is sized for the larger
    /// of this and the largest head.
    public var chunk: Int = 0

    /// parallel.dynamic's largest and smallest chunk after the head for this global batch and number
    /// of replicas.
    public func chunkBounds(batch: Int, replicas: Int) -> (min: Int, max: Int) {
        let largest = chunk > 0 ? min(chunk, batch) : max(1, batch / replicas / 2)
        return (max(1, largest / 32), largest)
    }

    /// parallel.dynamic: the fraction of a replica's speed-balanced share its first claim of a step
    /// (its head) takes, in (0, 1] (0: the default, `headFraction`).
    public var head: Double = 0
    /// parallel.dynamic with `head: auto`: the trainer tries each of `headCandidates` in turn over
    /// the first full batches (`HeadTuner`) and keeps the one whose steps ran fastest.
    public var headAuto: Bool = false
    /// The head fractions `head: auto` tries: the best one differs from machine to machine and from
    /// model to model (see `HeadTuner`).
    public static let headCandidates: [Double] = [0.25, 0.375, 0.5, 0.75, 0.9, 1.0]

    /// parallel.dynamic's head fraction: `head` when set, else 3/8 of the share, or 3/4 with batch norm.
    /// The smaller the heads, the more of each step goes to the guided chunks, which even out the
    /// replicas' speeds as the step runs (LeNet-5 at batch 128 on two ranks: 3/8 ran 4-8% faster than
    /// 1/2 or 3/4 back to back, and 1/4 or 1/8 no faster); batch norm normalises each chunk over its
    /// own samples, and large heads keep most of a step in large ghost batches.
    public func headFraction(batchNorm: Bool) -> Double {
        head > 0 ? head : batchNorm ? 0.75 : 0.375
    }

    /// parallel.dynamic's head at even shares: `fraction` of the even share (at least 1), the most
    /// samples a replica's first claim of a step takes before the replicas' speeds are measured;
    /// the trainer then takes that fraction of the balanced shares instead.
    public static func headChunk(batch: Int, replicas: Int, fraction: Double) -> Int {
        head(ofShare: batch / replicas, fraction: fraction)
    }

    /// parallel.dynamic's head of a replica whose share is `share` samples: `fraction` of it, rounded
    /// down, at least 1.
    public static func head(ofShare share: Int, fraction: Double) -> Int { max(1, Int(Double(share) * fraction)) }
}

public struct TrainConfig: Sendable {
    /// The file it came from ("built-in lenet5-bn" for the embedded default).
    public var source: String
    /// The YAML text, hashed so that every rank can check it runs the same experiment.
    public var text: String
    public var layers: [LayerSpec]
    public var input: Shape?
    public var initScheme: InitScheme = .pytorch
    public var loss: LossKind = .softmaxCrossEntropy
    public var data = DataConfig()
    public var epochs: Double = 5
    /// The global batch: with R replicas each takes batch/R.
    public var batchSize: Int = 64
    public var seed: UInt64 = 1
    /// Stop after this many optimiser steps (0: no limit).
    public var maxSteps: Int = 0
    /// Evaluate on the test set every this many epochs (fractions allowed; the last epoch always).
    public var evalEveryEpochs: Double = 1
    /// Log a metrics row every this many steps.
    public var logEverySteps: Int = 50
    /// Write a checkpoint every this many epochs (fractions allowed; 0: off) and every this many
    /// steps (0: off); a checkpoint is written at the end of the run too.
    public var checkpointEveryEpochs: Double = 1
    public var checkpointEverySteps: Int = 0
    /// Checkpoints kept in the output folder (older ones are deleted).
    public var keepCheckpoints: Int = 3
    public var lr: Double = 0.05
    public var sgd = SGDSettings()
    public var schedule = ScheduleConfig()
    public var parallel = ParallelConfig()

    /// Fingerprint of the experiment: the YAML text and the settings the command line overrides
    /// that change what is trained (epochs, batch size, seed, learning rate). Not the stop
    /// (max_steps), the data folder or the threads: a run stopped early, moved to another
    /// machine or resumed with another layout is still the same experiment.
    public var hash: UInt64 {
        stableHash(text + "\n# effective: epochs \(epochs), batch_size \(batchSize), seed \(seed), lr \(lr), towers \(parallel.towers)")
    }
}

extension TrainConfig {
    public static func load(path: String) throws -> TrainConfig {
        guard FileManager.default.fileExists(atPath: path) else { throw ConfigError("\(path): config file does not exist") }
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigError("\(path): cannot read the config file (not readable or not UTF-8)")
        }
        return try parse(text, source: path)
    }

    /// Parses a config. Throws `ConfigError` (file:line: key: what was expected) or `ModelError`.
    public static func parse(_ text: String, source: String) throws -> TrainConfig {
        let root: Yams.Node
        do {
            guard let node = try Yams.compose(yaml: text) else { throw ConfigError("\(source): the config is empty") }
            root = node
        } catch let e as ConfigError {
            throw e
        } catch {
            throw ConfigError("\(source): not valid YAML: \(String(describing: error).split(separator: "\n").joined(separator: " "))")
        }
        var c = TrainConfig(source: source, text: text, layers: [])
        let top = try YAMLValue(node: root, path: "", file: source).fields(["model", "data", "train", "optimizer", "parallel"])
        guard let model = top["model"] else { throw ConfigError("\(source): missing key 'model' (the layers of the network)") }
        try parseModel(model, into: &c)
        if let d = top["data"] { try parseData(d, into: &c) }
        if let t = top["train"] { try parseTrain(t, into: &c) }
        if let o = top["optimizer"] { try parseOptimizer(o, into: &c) }
        if let p = top["parallel"] { try parseParallel(p, into: &c) }
        return c
    }

    // MARK: - Sections

    static func parseModel(_ v: YAMLValue, into c: inout TrainConfig) throws {
        let f = try v.fields(["input", "init", "loss", "layers"])
        if let i = f["input"] {
            let items = try i.list()
            guard items.count == 3 else { throw i.error("expected [channels, height, width], got a list of \(items.count)") }
            c.input = Shape(try items[0].positiveInt(), try items[1].positiveInt(), try items[2].positiveInt())
        }
        if let i = f["init"] { c.initScheme = try i.choice(InitScheme.self) }
        if let l = f["loss"] { c.loss = try l.choice(LossKind.self) }
        guard let layers = f["layers"] else { throw v.error("missing key 'layers'") }
        let items = try layers.list()
        guard !items.isEmpty else { throw layers.error("expected at least one layer") }
        var counts: [String: Int] = [:]
        for item in items { c.layers.append(try parseLayer(item, counts: &counts)) }
    }

    static let layerTypes = ["conv", "maxpool", "avgpool", "global_avgpool", "relu", "leaky_relu", "sigmoid", "tanh",
                             "lrn", "batchnorm", "dropout", "linear", "flatten", "concat", "add"]

    static func parseLayer(_ v: YAMLValue, counts: inout [String: Int]) throws -> LayerSpec {
        let m = try v.mapping()
        guard let typeValue = m.first(where: { $0.0 == "type" })?.1 else { throw v.error("missing key 'type' (one of: \(layerTypes.joined(separator: ", ")))") }
        let type = try typeValue.string()
        let common = ["type", "name", "inputs", "towers"]
        let specific: [String]
        switch type {
        case "conv": specific = ["out", "kernel", "stride", "pad", "groups", "bias"]
        case "maxpool", "avgpool": specific = ["kernel", "stride", "pad"]
        case "leaky_relu": specific = ["alpha"]
        case "lrn": specific = ["size", "alpha", "beta", "k"]
        case "batchnorm": specific = ["eps", "momentum"]
        case "dropout": specific = ["rate"]
        case "linear": specific = ["out", "bias"]
        case "global_avgpool", "relu", "sigmoid", "tanh", "flatten", "concat", "add": specific = []
        default: throw typeValue.error("unknown layer type '\(type)' (expected one of: \(layerTypes.joined(separator: ", ")))")
        }
        let f = try v.fields(common + specific)
        func req(_ key: String) throws(ConfigError) -> YAMLValue {
            guard let x = f[key] else { throw v.error("layer type '\(type)' needs key '\(key)'") }
            return x
        }
        func window(defaultStride: Bool) throws(ConfigError) -> Window {
            let (kh, kw) = try req("kernel").pair()
            let (sh, sw) = try f["stride"]?.pair() ?? (defaultStride ? (kh, kw) : (1, 1))
            let (ph, pw) = try f["pad"]?.pair() ?? (0, 0)
            return Window(kernelH: kh, kernelW: kw, strideH: sh, strideW: sw, padH: ph, padW: pw)
        }
        let kind: LayerKind
        switch type {
        case "conv":
            kind = .convolution(outChannels: try req("out").int(), window: try window(defaultStride: false),
                                groups: try f["groups"]?.int() ?? 1, bias: try f["bias"]?.bool() ?? true)
        case "maxpool": kind = .maxPool(try window(defaultStride: true))
        case "avgpool": kind = .avgPool(try window(defaultStride: true))
        case "global_avgpool": kind = .globalAvgPool
        case "relu": kind = .relu
        case "leaky_relu": kind = .leakyRelu(alpha: try f["alpha"]?.double() ?? 0.01)
        case "sigmoid": kind = .sigmoid
        case "tanh": kind = .tanh
        case "lrn":
            kind = .lrn(size: try f["size"]?.int() ?? 5, alpha: try f["alpha"]?.double() ?? 1e-4,
                        beta: try f["beta"]?.double() ?? 0.75, k: try f["k"]?.double() ?? 2)
        case "batchnorm": kind = .batchNorm(eps: try f["eps"]?.double() ?? 1e-5, momentum: try f["momentum"]?.double() ?? 0.1)
        case "dropout": kind = .dropout(rate: try f["rate"]?.double() ?? 0.5)
        case "linear": kind = .linear(outFeatures: try req("out").int(), bias: try f["bias"]?.bool() ?? true)
        case "flatten": kind = .flatten
        case "concat": kind = .concat
        default: kind = .add
        }
        counts[type, default: 0] += 1
        let name = try f["name"]?.string() ?? "\(type)\(counts[type]!)"
        var inputs: [String] = []
        if let i = f["inputs"] { for x in try i.list() { inputs.append(try x.string()) } }
        var towers: TowerInput? = nil
        if let t = f["towers"] {
            let s = try t.string()
            guard let tv = TowerInput(rawValue: s) else { throw t.error("expected 'own' or 'all', got '\(s)'") }
            towers = tv
        }
        return LayerSpec(name: name, kind: kind, inputs: inputs, towerInput: towers)
    }

    static func parseData(_ v: YAMLValue, into c: inout TrainConfig) throws {
        let f = try v.fields(["format", "path", "mean", "std", "crop_padding", "flip", "train_limit", "test_limit"])
        if let x = f["format"] { c.data.format = try x.choice(DataConfig.Format.self) }
        if let x = f["path"] { c.data.path = try x.string() }
        if let x = f["mean"] { c.data.mean = try x.doubles() }
        if let x = f["std"] {
            let s = try x.doubles()
            guard s.allSatisfy({ $0 > 0 }) else { throw x.error("every std must be positive") }
            c.data.std = s
        }
        if (c.data.mean == nil) != (c.data.std == nil) { throw v.error("give both 'mean' and 'std', or neither (then both come from the training set)") }
        if let x = f["crop_padding"] { c.data.cropPadding = try x.nonNegativeInt() }
        if let x = f["flip"] { c.data.flip = try x.bool() }
        if let x = f["train_limit"] { c.data.trainLimit = try x.nonNegativeInt() }
        if let x = f["test_limit"] { c.data.testLimit = try x.nonNegativeInt() }
    }

    static func parseTrain(_ v: YAMLValue, into c: inout TrainConfig) throws {
        let f = try v.fields(["epochs", "batch_size", "seed", "max_steps", "eval_every_epochs", "log_every_steps",
                               "checkpoint_every_epochs", "checkpoint_every_steps", "keep_checkpoints"])
        if let x = f["epochs"] {
            c.epochs = try x.double()
            guard c.epochs > 0 else { throw x.error("expected a positive number of epochs, got \(c.epochs)") }
        }
        if let x = f["batch_size"] { c.batchSize = try x.positiveInt() }
        if let x = f["seed"] { c.seed = UInt64(try x.nonNegativeInt()) }
        if let x = f["max_steps"] { c.maxSteps = try x.nonNegativeInt() }
        if let x = f["eval_every_epochs"] {
            c.evalEveryEpochs = try x.double()
            guard c.evalEveryEpochs > 0 else { throw x.error("expected a positive number, got \(c.evalEveryEpochs)") }
        }
        if let x = f["log_every_steps"] { c.logEverySteps = try x.positiveInt() }
        if let x = f["checkpoint_every_epochs"] {
            c.checkpointEveryEpochs = try x.double()
            guard c.checkpointEveryEpochs >= 0 else { throw x.error("expected a number >= 0 (0: off), got \(c.checkpointEveryEpochs)") }
        }
        if let x = f["checkpoint_every_steps"] { c.checkpointEverySteps = try x.nonNegativeInt() }
        if let x = f["keep_checkpoints"] { c.keepCheckpoints = try x.positiveInt() }
    }

    static func parseOptimizer(_ v: YAMLValue, into c: inout TrainConfig) throws {
        let f = try v.fields(["type", "lr", "momentum", "nesterov", "weight_decay", "l1", "schedule"])
        if let x = f["type"] {
            let t = try x.string()
            guard t == "sgd" else { throw x.error("expected 'sgd' (mini-batch SGD with momentum), got '\(t)'") }
        }
        if let x = f["lr"] {
            c.lr = try x.double()
            guard c.lr > 0 else { throw x.error("expected a positive learning rate, got \(c.lr)") }
        }
        if let x = f["momentum"] {
            c.sgd.momentum = try x.double()
            guard (0..<1).contains(c.sgd.momentum) else { throw x.error("expected a momentum in [0, 1), got \(c.sgd.momentum)") }
        }
        if let x = f["nesterov"] { c.sgd.nesterov = try x.bool() }
        if let x = f["weight_decay"] {
            c.sgd.weightDecay = try x.double()
            guard c.sgd.weightDecay >= 0 else { throw x.error("expected a number >= 0") }
        }
        if let x = f["l1"] {
            c.sgd.l1 = try x.double()
            guard c.sgd.l1 >= 0 else { throw x.error("expected a number >= 0") }
        }
        if let s = f["schedule"] {
            let g = try s.fields(["type", "every_epochs", "gamma", "min_lr", "warmup_epochs"])
            if let x = g["type"] { c.schedule.kind = try x.choice(ScheduleConfig.Kind.self) }
            if let x = g["every_epochs"] {
                c.schedule.everyEpochs = try x.double()
                guard c.schedule.everyEpochs > 0 else { throw x.error("expected a positive number") }
            }
            if let x = g["gamma"] { c.schedule.gamma = try x.double() }
            if let x = g["min_lr"] { c.schedule.minLR = try x.double() }
            if let x = g["warmup_epochs"] {
                c.schedule.warmupEpochs = try x.double()
                guard c.schedule.warmupEpochs >= 0 else { throw x.error("expected a number >= 0") }
            }
        }
    }

    static func parseParallel(_ v: YAMLValue, into c: inout TrainConfig) throws {
        let f = try v.fields(["threads", "sync_bn", "towers", "collective_timeout_seconds", "balance", "dynamic", "chunk", "head"])
        if let x = f["threads"] {
            if case let .scalar(s) = x.node, s.string == "auto" { c.parallel.threads = 0 } else { c.parallel.threads = try x.positiveInt() }
        }
        if let x = f["sync_bn"] { c.parallel.syncBN = try x.bool() }
        if let x = f["towers"] { c.parallel.towers = try x.positiveInt() }
        if let x = f["balance"] { c.parallel.balance = try x.bool() }
        if let x = f["dynamic"] { c.parallel.dynamic = try x.bool() }
        if let x = f["chunk"] { c.parallel.chunk = try x.positiveInt() }
        if let x = f["head"] {
            if case let .scalar(s) = x.node, s.string == "auto" {
                c.parallel.headAuto = true
            } else {
                guard let h = try? x.double() else { throw x.error("expected a fraction of the replica's share in (0, 1], or auto, got \(x.describedValue)") }
                guard h > 0 && h <= 1 else { throw x.error("expected a fraction of the replica's share in (0, 1], or auto, got \(h)") }
                c.parallel.head = h
            }
        }
        if let x = f["collective_timeout_seconds"] {
            let t = try x.double()
            guard t >= 0 && t.isFinite else { throw x.error("expected seconds >= 0 (0: off), got \(t)") }
            c.parallel.collectiveTimeoutSeconds = t
        }
    }
}
