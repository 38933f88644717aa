// The training loop every rank runs. Each rank holds a replica of the model; the global batch
// (the config's batch size) is split evenly over the replicas, every rank computing the same
// permutation and taking its own slice, so the samples of each global step are exactly those a
// single process uses. Gradients are averaged through `GradientSync`; only rank 0 prints and writes.
import Foundation
import TandemComm
import TandemCore

public struct RunOptions: Sendable {
    /// Output folder (rank 0 writes metrics.csv, summary.json, curves.svg there).
    public var outDir: String = "runs/default"
    /// An extra copy of summary.json.
    public var summaryJSON: String?
    public var quiet = false
    public var gradientMode: GradientSync.Mode = .overlap
    public var bucketKB = 1024
    /// Cores on this machine and the ranks sharing it (for threads: auto).
    public var cores = ProcessInfo.processInfo.activeProcessorCount
    public var ranksOnThisMachine = 1
    public init() {}
}

/// An error in a running job: stops every rank with one line.
public struct TrainingError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public final class Trainer {
    public let config: TrainConfig
    public let comm: Communicator
    public let data: DataPipeline
    public let graph: Graph
    public let net: Network<Float>
    public let sgd: SGD<Float>
    public let sync: GradientSync
    public let options: RunOptions
    public let threads: Int
    public var replicas: Int { comm.size }
    public var localBatch: Int { config.batchSize / replicas }
    var isRoot: Bool { comm.rank == 0 }

    public init(config: TrainConfig, comm: Communicator, data: DataPipeline, options: RunOptions) throws {
        self.config = config
        self.comm = comm
        self.data = data
        self.options = options
        if let input = config.input, input != data.shape {
            throw ConfigError("\(config.source): model.input is \(input) but the dataset's images are \(data.shape)")
        }
        graph = try Graph(input: data.shape, layers: config.layers)
        guard graph.outputShape.count == data.train.classes else {
            throw ConfigError("\(config.source): the last layer '\(graph.nodes.last!.name)' has \(graph.outputShape.count) outputs but the dataset has \(data.train.classes) classes")
        }
        guard config.batchSize % comm.size == 0 else {
            throw ConfigError("\(config.source): train.batch_size \(config.batchSize) is not divisible by the \(comm.size) replicas (the batch size is the global batch; each replica takes batch/\(comm.size))")
        }
        let auto = max(1, options.cores / max(1, options.ranksOnThisMachine))
        threads = min(config.parallel.threads > 0 ? config.parallel.threads : auto, max(1, config.batchSize / comm.size))
        BLAS.setThreads(1)
        net = Network(graph: graph, capacity: config.batchSize / comm.size, parts: threads, loss: config.loss)
        net.seed = config.seed
        sgd = SGD(graph: graph, settings: config.sgd)
        sync = GradientSync(comm: comm, graph: graph, gradients: net.gradients, mode: options.gradientMode, bucketBytes: options.bucketKB * 1024)
        net.observer = sync
        if config.parallel.syncBN && comm.size > 1 {
            let c = comm
            net.reducer.crossRank = { values, count in
                do { try c.allreduceSum(values, count: count) } catch {
                    fputs("tandem: rank \(c.rank): \(error)\n", stderr)
                    c.abort(code: 1)
                }
            }
        }
        try checkSameConfig()
        // Rank 0 initialises and broadcasts parameters and running statistics.
        if isRoot { Initializer.initialize(net, scheme: config.initScheme, seed: config.seed) }
        try comm.broadcast(UnsafeMutableRawPointer(net.parameters.baseAddress!), bytes: net.parameters.count * 4, root: 0)
        if net.statistics.count > 0 {
            try comm.broadcast(UnsafeMutableRawPointer(net.statistics.baseAddress!), bytes: net.statistics.count * 4, root: 0)
        }
    }

    /// Every rank must run the same experiment: compare the config hashes and the world layout.
    func checkSameConfig() throws {
        var mine: [Int64] = [Int64(bitPattern: config.hash), Int64(config.batchSize), Int64(bitPattern: config.seed)]
        var all = [Int64](repeating: 0, count: 3 * comm.size)
        try mine.withUnsafeMutableBytes { m in
            try all.withUnsafeMutableBytes { a in try comm.allgather(m.baseAddress!, bytes: 24, into: a.baseAddress!) }
        }
        for r in 0..<comm.size where all[3 * r] != all[0] || all[3 * r + 1] != all[1] || all[3 * r + 2] != all[2] {
            throw TrainingError("rank \(r) runs a different config than rank 0 (config hash, batch size or seed differ): start every rank with the same config and options")
        }
        mine.removeAll()
    }

    public var stepsPerEpoch: Int { (data.train.count + config.batchSize - 1) / config.batchSize }
    public var totalSteps: Int {
        let s = Int((config.epochs * Double(stepsPerEpoch)).rounded(.up))
        return config.maxSteps > 0 ? min(s, config.maxSteps) : s
    }

    /// The learning-rate schedule in optimiser steps.
    public var schedule: LRSchedule {
        let spe = Double(stepsPerEpoch)
        let kind: LRSchedule.Kind
        switch config.schedule.kind {
        case .constant: kind = .constant
        case .step: kind = .step(every: max(1, Int((config.schedule.everyEpochs * spe).rounded())), gamma: config.schedule.gamma)
        case .cosine: kind = .cosine(minimum: config.schedule.minLR)
        }
        return LRSchedule(base: config.lr, kind: kind, warmupSteps: Int((config.schedule.warmupEpochs * spe).rounded()), totalSteps: totalSteps)
    }

    /// This rank's share [lo, hi) of a global batch of `m` samples.
    public func share(of m: Int) -> Range<Int> { (m * comm.rank / comm.size)..<(m * (comm.rank + 1) / comm.size) }

    /// One optimiser step on global positions [start, start + m) of the epoch's order. Returns the
    /// global mean loss and the correct count over the global batch.
    public func step(epoch: Int, start: Int, globalCount m: Int, step: Int, lr: Double, timing: StepTiming? = nil) throws -> (loss: Double, correct: Int) {
        let mine = share(of: m)
        var t0 = Clock.now
        data.loadTrain((start + mine.lowerBound)..<(start + mine.upperBound), epoch: epoch, seed: config.seed, input: net.input, labels: net.labels)
        net.globalOffset = mine.lowerBound
        if let timing { let t = Clock.now; timing.data += t - t0; t0 = t }
        let r = net.trainStep(count: mine.count, lossScale: 1 / Double(m), step: step)
        if let timing { let t = Clock.now; timing.compute += t - t0; t0 = t }
        try sync.finish()
        var stats: [Double] = [r.loss, Double(r.correct)]
        if comm.size > 1 { try comm.allreduceSum(&stats, count: 2) }
        if let timing { let t = Clock.now; timing.allreduce += t - t0; t0 = t }
        guard stats[0].isFinite else {
            throw TrainingError("step \(step): the loss is \(stats[0]) (NaN or Inf); lower the learning rate, or run `trainer debug` to find the first layer that produces it")
        }
        sgd.step(parameters: net.parameters, gradients: net.gradients, lr: lr)
        if let timing { timing.optimizer += Clock.now - t0 }
        return (stats[0] / Double(m), Int(stats[1]))
    }

    /// Test loss and accuracy: the test set is sharded over the ranks and the sums reduced.
    public func evaluate() throws -> (loss: Double, accuracy: Double) {
        let n = data.test.count
        let mine = (n * comm.rank / comm.size)..<(n * (comm.rank + 1) / comm.size)
        var loss = 0.0, correct = 0.0
        var i = mine.lowerBound
        while i < mine.upperBound {
            let k = min(net.capacity, mine.upperBound - i)
            data.loadTest(i..<(i + k), input: net.input, labels: net.labels)
            let r = net.evaluate(count: k)
            loss += r.loss
            correct += Double(r.correct)
            i += k
        }
        var sums = [loss, correct]
        if comm.size > 1 { try comm.allreduceSum(&sums, count: 2) }
        return (sums[0] / Double(n), sums[1] / Double(n))
    }

    /// L2 norm of all parameters, in Double.
    public var parameterNorm: Double {
        var s = 0.0
        for v in net.parameters { s += Double(v) * Double(v) }
        return s.squareRoot()
    }

    // MARK: - The run

    public func run() throws -> RunSummary {
        let out = options.outDir
        var metrics: MetricsLog? = nil
        if isRoot {
            do { try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true) } catch {
                throw ConfigError("\(out): cannot create the output folder: \(error.localizedDescription)")
            }
            metrics = try MetricsLog(path: out + "/metrics.csv")
        }
        let progress = ProgressDisplay()
        let say: (String) -> Void = { [isRoot, options] s in if isRoot && !options.quiet { progress.line(s) } }
        let total = totalSteps
        let spe = stepsPerEpoch
        let schedule = self.schedule
        let epochsToRun = Int((Double(total) / Double(spe)).rounded(.up))
        say("tandem: \(config.source): \(graph.layerCount) layers, \(formatCount(Double(graph.parameterCount))) parameters; \(data.train.count) train / \(data.test.count) test images \(data.shape)")
        say("tandem: \(comm.size) replica\(comm.size == 1 ? "" : "s") x \(threads) thread\(threads == 1 ? "" : "s"), global batch \(config.batchSize), \(total) steps (\(String(format: "%.3g", Double(total) / Double(spe))) epochs), output \(out)")

        let wallStart = Clock.now
        var trainSeconds = 0.0
        var step = 0
        var lastLoss = Double.nan
        var windowLoss = 0.0, windowCorrect = 0, windowSamples = 0, windowTrain = 0.0
        var epochLoss = 0.0, epochCorrect = 0, epochSamples = 0
        var testLoss = Double.nan, testAccuracy = Double.nan
        var secondsTo90: Double? = nil
        let evalEvery = max(1, Int((config.evalEveryEpochs * Double(spe)).rounded()))
        var samplesDone = 0

        for epoch in 0..<epochsToRun {
            data.shuffle(epoch: epoch, seed: config.seed)
            var pos = 0
            var inEpoch = 0
            while pos < data.train.count && step < total {
                let m = min(config.batchSize, data.train.count - pos)
                let lr = schedule.rate(at: step)
                let t0 = Clock.now
                let r = try self.step(epoch: epoch, start: pos, globalCount: m, step: step, lr: lr)
                let dt = Clock.now - t0
                trainSeconds += dt
                windowTrain += dt
                pos += m
                step += 1
                inEpoch += 1
                samplesDone += m
                lastLoss = r.loss
                windowLoss += r.loss * Double(m); windowCorrect += r.correct; windowSamples += m
                epochLoss += r.loss * Double(m); epochCorrect += r.correct; epochSamples += m
                let now = Clock.now
                if isRoot {
                    let rate = Double(samplesDone) / max(trainSeconds, 1e-9)
                    if !options.quiet {
                        progress.update(epoch: epoch + 1, epochs: epochsToRun, step: inEpoch, stepsInEpoch: spe, loss: windowLoss / Double(max(windowSamples, 1)),
                                        imagesPerSecond: rate, secondsLeft: Double(total - step) * trainSeconds / Double(step), now: now)
                    }
                    if step % config.logEverySteps == 0 || step == total {
                        metrics?.append(MetricsRow(kind: .step, epoch: Double(step) / Double(spe), step: step,
                                                   trainLoss: windowLoss / Double(windowSamples), trainAccuracy: Double(windowCorrect) / Double(windowSamples),
                                                   lr: lr, imagesPerSecond: Double(windowSamples) / max(windowTrain, 1e-9), wallSeconds: now - wallStart))
                        windowLoss = 0; windowCorrect = 0; windowSamples = 0; windowTrain = 0
                    }
                }
                if step % evalEvery == 0 || step == total {
                    let e = try evaluate()
                    testLoss = e.loss; testAccuracy = e.accuracy
                    if secondsTo90 == nil && testAccuracy >= 0.9 { secondsTo90 = trainSeconds }
                    let trainL = epochLoss / Double(max(epochSamples, 1)), trainA = Double(epochCorrect) / Double(max(epochSamples, 1))
                    say(String(format: "epoch %.2f  step %d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%  (%.1f s training, %@ img/s)",
                               Double(step) / Double(spe), step, trainL, trainA * 100, testLoss, testAccuracy * 100, trainSeconds,
                               formatCount(Double(samplesDone) / max(trainSeconds, 1e-9))))
                    metrics?.append(MetricsRow(kind: .eval, epoch: Double(step) / Double(spe), step: step, trainLoss: trainL, trainAccuracy: trainA,
                                               testLoss: testLoss, testAccuracy: testAccuracy, wallSeconds: Clock.now - wallStart))
                    epochLoss = 0; epochCorrect = 0; epochSamples = 0
                }
            }
        }
        let summary = RunSummary(config: config.source, test_accuracy: testAccuracy, test_loss: testLoss, final_train_loss: lastLoss,
                                 epochs: Double(step) / Double(spe), steps: step,
                                 images_per_second: Double(samplesDone) / max(trainSeconds, 1e-9),
                                 train_seconds: trainSeconds, wall_seconds: Clock.now - wallStart, world_size: comm.size, threads: threads,
                                 batch_size: config.batchSize, param_norm: parameterNorm, parameters: graph.parameterCount, seed: config.seed,
                                 seconds_to_90: secondsTo90)
        if isRoot {
            try summary.write(to: out + "/summary.json")
            if let extra = options.summaryJSON { try summary.write(to: extra) }
            if let metrics { try writeCurves(metrics.rows, to: out + "/curves.svg", epochs: summary.epochs) }
            progress.line(String(format: "test accuracy %.2f%% (loss %.4f) after %.2f epochs, %.1f s of training, %.1f s wall; %@ img/s. Wrote %@/{metrics.csv,summary.json,curves.svg}",
                       testAccuracy * 100, testLoss, summary.epochs, trainSeconds, summary.wall_seconds, formatCount(summary.images_per_second), out))
        }
        return summary
    }

    func writeCurves(_ rows: [MetricsRow], to path: String, epochs: Double) throws {
        let steps = rows.filter { $0.kind == .step }, evals = rows.filter { $0.kind == .eval }
        let loss = [Series(name: "train (logged steps)", color: "#1f77b4", points: steps.compactMap { r in r.trainLoss.map { (r.epoch, $0) } }),
                    Series(name: "test", color: "#d62728", points: evals.compactMap { r in r.testLoss.map { (r.epoch, $0) } })]
        let acc = [Series(name: "train (since last eval)", color: "#1f77b4", points: evals.compactMap { r in r.trainAccuracy.map { (r.epoch, $0) } }),
                   Series(name: "test", color: "#d62728", points: evals.compactMap { r in r.testAccuracy.map { (r.epoch, $0) } })]
        let svg = SVGPlot.curves(title: "\(config.source): \(comm.size) replica(s), batch \(config.batchSize)", loss: loss, accuracy: acc, epochs: max(epochs, 1))
        try writeAtomically(Data(svg.utf8), to: path)
    }
}

/// Seconds per phase, summed over steps (the benchmark's breakdown).
public final class StepTiming {
    public var data = 0.0, compute = 0.0, allreduce = 0.0, optimizer = 0.0
    public init() {}
}
