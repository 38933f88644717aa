// The training loop every rank runs. Each rank holds a replica of the model; the global batch
// (the config's batch size) is split over the replicas, evenly or (parallel.balance) in shares that
// follow each replica's measured speed, every rank computing the same permutation and taking its
// own slice, so the samples of each global step are exactly those a single process uses. With
// parallel.dynamic the replicas instead claim chunks of the global batch from a pool in shared
// memory as they go (the same samples, whoever computes them).
// Gradients are averaged through `GradientSync`; only rank 0 prints and writes.
import CKernels
import Foundation
import Synchronization
import TandemComm
import TandemCore

public struct RunOptions: Sendable {
    /// Output folder (rank 0 writes metrics.csv, summary.json, curves.svg there).
    public var outDir: String = "runs/default"
    /// An extra copy of summary.json.
    public var summaryJSON: String?
    public var quiet = false
    /// `overlap` by default: buckets allreduced by a sync thread while backward runs (see GradientSync and the README).
    public var gradientMode: GradientSync.Mode = .overlap
    public var bucketKB = 64
    /// How overlap's buckets travel: shared memory on one machine (auto) or MPI always.
    public var transport: GradientSync.Transport = .auto
    /// Through shared memory: one copy of the parameters and velocity for the replicas on the
    /// machine, each rank updating its slices as it sums them (`--update sharded`), or a copy per
    /// rank, each updating all of it after the allreduce (`--update replicated`).
    public var shardedUpdate = true
    /// Cores on this machine and the ranks sharing it (for threads: auto).
    public var cores = ProcessInfo.processInfo.activeProcessorCount
    public var ranksOnThisMachine = 1
    /// Continue from a checkpoint: a file, a folder (its newest usable checkpoint) or "auto" (the
    /// output folder's newest usable one; none there: start from the beginning). nil: start fresh.
    public var resume: String?
    /// Start from these weights (a safetensors file) instead of the initialiser.
    public var initWeights: String?
    public init() {}
}

/// Where a run stands between two steps: what a checkpoint records besides the buffers.
public struct RunState: Sendable, Equatable {
    /// The next step trains global positions [position, position + batch) of epoch `epoch`'s order.
    public var epoch = 0, position = 0
    /// Optimiser steps done, and the step the learning-rate schedule continues at.
    public var step = 0, lrStep = 0
    public var trainSeconds = 0.0, wallSeconds = 0.0
    public var secondsTo90: Double? = nil
    public var lastTrainLoss = Double.nan
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
    /// The world: replicas x towers ranks, rank = replica * towers + tower.
    public let comm: Communicator
    /// Ranks that hold the same tower (all ranks without towers): they average gradients.
    public let replicaComm: Communicator
    /// Ranks that hold the towers of one replica (nil without towers): they exchange activations.
    public let towerComm: Communicator?
    public let data: DataPipeline
    /// The split of the model (towers: 1 means none); `global` is the whole model.
    public let plan: TowerPlan
    /// What this rank runs: its tower's share, or the whole model.
    public let graph: Graph
    public let net: Network<Float>
    public let sgd: SGD<Float>
    public let sync: GradientSync
    public let options: RunOptions
    public let threads: Int
    public let exchange: CommTowerExchange?
    /// Watchdog and fingerprint of the blocking collectives (see CollectiveMonitor).
    public let monitor: CollectiveMonitor
    /// Test-only hooks, read from the environment (see `TestHooks`); in-process tests set them.
    var hooks = TestHooks()
    /// The step in progress, for the watchdog's message from inside the network (sync_bn, towers).
    var currentStep = 0
    /// `--trace`: records steps, data, layers, allreduces and the optimiser (see `startTrace`).
    public internal(set) var trace: TraceRecorder?
    public var replicas: Int { replicaComm.size }
    public var replica: Int { replicaComm.rank }
    /// Towers this run splits the model into (1 when it runs the whole model in one rank).
    public var towers: Int { towerComm?.size ?? 1 }
    public var tower: Int { towerComm?.rank ?? 0 }
    /// The even share of the global batch (with balance or dynamic, `shares` says what each took).
    public var localBatch: Int { config.batchSize / replicas }
    /// The per-step loss, correct count and four divergence-check slots, reduced over the replicas;
    /// with `parallel.balance`, then each replica's seconds per sample of this step (with
    /// `parallel.dynamic` the samples it took, then its seconds per sample in its first chunk); with
    /// the sharded update, then each replica's first non-finite gradient (1 + its index, 0 if none).
    private let stepStatistics: UnsafeMutablePointer<Double>
    /// `parallel.balance` and `parallel.dynamic`: each replica's seconds per sample (moving average),
    /// and the share cuts of a full global batch that follow from them: with balance replica r takes
    /// [cuts[r], cuts[r + 1]); with dynamic shares they size the heads (`setHeads`).
    private let perSample: UnsafeMutablePointer<Double>
    private let cuts: UnsafeMutablePointer<Int>
    /// Whether shares follow the replicas' speeds (parallel.balance with more than one replica).
    public let balancing: Bool
    /// Full global batches whose speeds this process has measured (the first is not averaged in).
    private var balancedSteps = 0
    /// Whether the replicas claim their samples from a shared pool (parallel.dynamic with more than
    /// one replica).
    public let dynamic: Bool
    /// parallel.dynamic: the pool's counter (see `tandem_claim_samples`) in memory the replica group
    /// shares, this process's step tag, the chunks' bounds, and per replica the samples it took in
    /// the full global batches so far (summed over `dynamicSteps` of them).
    private var pool: SharedSegment?
    private var poolTag: UInt32 = 0
    public let chunkBounds: (min: Int, max: Int)
    /// parallel.dynamic: the head (the most samples of a rank's first claim of a step) at even shares
    /// (`ParallelConfig.headChunk`); each replica's head of a full global batch, `headFraction` of
    /// its share as `parallel.balance` would size it from the replicas' measured speeds (even until
    /// they are measured); and the samples no head takes (the batch less every head). With
    /// `parallel.head: auto` the fraction is the tuner's current candidate, then its choice.
    public private(set) var headFraction: Double
    public private(set) var headChunk: Int
    /// parallel.dynamic with `parallel.head: auto`: the tuning of the head fraction (nil otherwise).
    public let headTuner: HeadTuner?
    /// parallel.head auto: when this rank last had the step's sums (the tuner's step times run from
    /// one to the next; 0 after anything but a step, such as an evaluation).
    private var cycleMark = 0.0
    /// Whether the head tuner still measures (read every step without touching the tuner).
    private var tuningHeads = false
    private let headOf: UnsafeMutablePointer<Int>
    private var headReserve = 0
    /// parallel.dynamic: the most chunks one rank can take of a full global batch (all of them).
    public let chunksPerBatch: Int
    private let samplesTaken: UnsafeMutablePointer<Double>
    private var dynamicSteps = 0
    /// Towers: per tower, 1 + the index of its first non-finite gradient (0 if none), summed over the tower group.
    private let towerBad: UnsafeMutablePointer<Double>
    /// parallel.dynamic: where the first chunk of this step whose loss was not finite went bad.
    private var nonFiniteChunk: String?
    var isRoot: Bool { comm.rank == 0 }
    /// The checkpoint `run()` resumed from (its path on rank 0, "" on other ranks) and its step.
    public private(set) var resumedFrom: (path: String, step: Int)?

    public init(config: TrainConfig, comm: Communicator, data: DataPipeline, options: RunOptions) throws {
        self.config = config
        self.comm = comm
        self.data = data
        self.options = options
        monitor = CollectiveMonitor(world: comm, timeout: config.parallel.collectiveTimeoutSeconds)
        plan = try Self.checkLayout(config: config, data: data, worldSize: comm.size)
        let wanted = comm.size > 1 ? config.parallel.towers : 1
        if wanted > 1 {
            let t = try comm.split(color: comm.rank / wanted, key: comm.rank)
            towerComm = t
            replicaComm = try comm.split(color: comm.rank % wanted, key: comm.rank)
            let e = CommTowerExchange(comm: t)
            exchange = e
            graph = plan.local[t.rank]
        } else {
            towerComm = nil
            replicaComm = comm
            exchange = nil
            graph = plan.global
        }
        let replicas = replicaComm.size
        let auto = max(1, options.cores / max(1, options.ranksOnThisMachine))
        threads = wanted > 1 ? 1 : min(config.parallel.threads > 0 ? config.parallel.threads : auto, max(1, config.batchSize / replicas))
        BLAS.setThreads(1)
        balancing = config.parallel.balance && replicas > 1
        dynamic = config.parallel.dynamic && replicas > 1
        let hasBatchNorm = graph.nodes.contains { if case .batchNorm? = $0.kind { return true } else { return false } }
        var bounds = config.parallel.chunkBounds(batch: config.batchSize, replicas: replicas)
        // Batch norm normalises each chunk over its own samples: none smaller than 8 (one sample
        // after a linear layer would normalise to beta).
        if hasBatchNorm {
            bounds.min = max(bounds.min, min(bounds.max, 8))
        }
        chunkBounds = bounds
        headTuner = dynamic && config.parallel.headAuto ? HeadTuner(candidates: ParallelConfig.headCandidates) : nil
        headFraction = headTuner?.fraction ?? config.parallel.headFraction(batchNorm: hasBatchNorm)
        tuningHeads = headTuner != nil
        headChunk = max(ParallelConfig.headChunk(batch: config.batchSize, replicas: replicas, fraction: headFraction), bounds.min)
        // The network holds the largest head any candidate gives.
        let largestFraction = headTuner?.candidates.max() ?? headFraction
        let largestHeadChunk = max(ParallelConfig.headChunk(batch: config.batchSize, replicas: replicas, fraction: largestFraction), bounds.min)
        var counter: UInt64 = 0, first = 0, chunks = 0
        if dynamic {
            // One rank claiming the whole batch in chunks, without a head (more chunks than with any).
            while tandem_claim_samples(&counter, 1, config.batchSize, replicas, bounds.min, bounds.max, 0, 0, &first) > 0 { chunks += 1 }
        }
        chunksPerBatch = max(1, chunks)
        samplesTaken = .allocate(capacity: replicas)
        samplesTaken.initialize(repeating: 0, count: replicas)
        stepStatistics = .allocate(capacity: Self.statisticsSlots(replicas: replicas))
        towerBad = .allocate(capacity: max(1, towerComm?.size ?? 1))
        perSample = .allocate(capacity: replicas)
        perSample.initialize(repeating: 0, count: replicas)
        cuts = .allocate(capacity: replicas + 1)
        for r in 0...replicas { cuts[r] = config.batchSize * r / replicas }
        headOf = .allocate(capacity: replicas)
        headOf.initialize(repeating: 0, count: replicas)
        // The sync first: through shared memory the network's gradients live in this rank's slot.
        // With the sharded update also the parameters and the SGD velocity live in memory the
        // replicas share.
        sync = try GradientSync(comm: replicaComm, graph: graph, mode: options.gradientMode, bucketBytes: options.bucketKB * 1024, transport: options.transport,
                                sharded: options.shardedUpdate, scalars: Self.statisticsSlots(replicas: replicas))
        // A claim that would leave fewer than the smallest chunk takes the rest too.
        let capacity = dynamic ? min(config.batchSize, max(ParallelConfig.head(ofShare: Self.balancedCapacity(batch: config.batchSize, replicas: replicas), fraction: largestFraction), largestHeadChunk, chunkBounds.max) + chunkBounds.min - 1) : balancing ? Self.balancedCapacity(batch: config.batchSize, replicas: replicas) : config.batchSize / replicas
        net = Network(graph: graph, capacity: capacity, parts: threads, loss: config.loss, exchange: exchange,
                      gradients: sync.gradients.baseAddress!, parameters: sync.sharedParameters, gradientsOwner: sync)
        net.seed = config.seed
        // A rank may claim up to the whole batch in one step.
        if dynamic { net.deferWeightGradients(samplesPerStep: config.batchSize) }
        sgd = SGD(graph: graph, settings: config.sgd, velocity: sync.sharedVelocity)
        if sync.sharedParameters != nil { sync.attach(optimizer: sgd) }
        if let note = sync.note, comm.rank == 0 { fputs("tandem: \(note)\n", stderr) }
        if balancing && !config.parallel.syncBN && hasBatchNorm && comm.rank == 0 && !options.quiet {
            fputs("tandem: parallel.balance with batch norm and without parallel.sync_bn: each replica normalises over a share whose size follows the ranks' timing, so runs differ from one another and from one process; set sync_bn: true for the same statistics as one process\n", stderr)
        }
        if dynamic && hasBatchNorm && comm.rank == 0 && !options.quiet {
            let heads = headTuner == nil ? "a head of \(headFraction) of the replica's speed-balanced share, \(headChunk) samples at even shares" : "a head of the fraction of the replica's speed-balanced share that parallel.head auto picks"
            fputs("tandem: parallel.dynamic with batch norm: each chunk (\(heads), then \(chunkBounds.min) to \(chunkBounds.max)) is normalised over its own samples (ghost batches) and moves the running averages once, so runs differ from one another and from one process\n", stderr)
        }
        net.observer = sync
        if config.parallel.syncBN && replicas > 1 {
            let c = replicaComm
            net.reducer.crossRank = { [unowned self] values, count in
                do { try monitor.watch(.syncBN, step: currentStep, count: count) { try c.allreduceSum(values, count: count) } } catch {
                    fputs("tandem: rank \(c.rank): \(error)\n", stderr)
                    c.abort(code: 1)
                }
            }
        }
        try checkSameConfig()
        if dynamic {
            // One cache line that every replica maps (all on one machine), after the config check,
            // so that every rank gets here.
            switch try SharedSegment.make(comm: replicaComm, bytes: 64) {
            case .success(let segment): pool = segment
            case .failure(let reason):
                throw TrainingError("parallel.dynamic: the replicas claim their samples through memory they share, and \(reason); use parallel.balance across machines")
            }
        }
        // Rank 0 initialises (or loads --init-weights) the whole model and broadcasts it; each
        // rank keeps its tower's slices.
        var parameters = [Float](repeating: 0, count: plan.global.parameterCount)
        var statistics = [Float](repeating: 0, count: plan.global.statisticsCount)
        let global = plan.global
        try parameters.withUnsafeMutableBufferPointer { p in
            try statistics.withUnsafeMutableBufferPointer { st in
                if isRoot { Initializer.initialize(parameters: p, statistics: st, graph: global, scheme: config.initScheme, seed: config.seed) }
                if let weights = options.initWeights {
                    try onRoot("read the --init-weights file") {
                        _ = try ModelWeights.load(path: weights, graph: global, parameters: p, statistics: st)
                    }
                }
            }
        }
        if comm.size > 1 {
            try parameters.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: $0.count, root: 0) }
            if !statistics.isEmpty { try statistics.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: $0.count, root: 0) } }
        }
        try loadShared {
            loadGlobal(parameters, into: net.parameters, tensors: \.parameters)
        }
        loadGlobal(statistics, into: net.statistics, tensors: \.statistics)
        if dynamic { setHeads() }
    }

    /// parallel.head auto, once tuned: the choice and every candidate's score, one line.
    public var headTuningSummary: String? {
        guard let tuner = headTuner, let chosen = tuner.chosen else { return nil }
        let tried = zip(tuner.candidates, tuner.scores).map { String(format: "%g: %.3f ms", $0, 1000 * $1) }.joined(separator: ", ")
        return "parallel.head auto: heads of \(tuner.candidates[chosen]) of each replica's share (each candidate's mean step without its fastest and slowest tenth, over \(tuner.measured) steps, \(tuner.blockSteps) at a time in turn: \(tried))"
    }

    /// parallel.dynamic: each replica's head of a full global batch from the share cuts, `headFraction`
    /// of its share (at least the smallest chunk), and the samples left for the chunks.
    private func setHeads() {
        var sum = 0
        for r in 0..<replicas {
            headOf[r] = max(chunkBounds.min, ParallelConfig.head(ofShare: cuts[r + 1] - cuts[r], fraction: headFraction))
            sum += headOf[r]
        }
        headReserve = max(0, config.batchSize - sum)
    }

    /// Runs `write`, which fills the parameters or the velocity: with the sharded update (one copy
    /// that the replica group shares) on the group's rank 0 only, the others waiting until it is done.
    func loadShared(_ write: () throws -> Void) throws {
        guard sync.updatesParameters else { return try write() }
        if replicaComm.rank == 0 { try write() }
        // The fences order rank 0's stores before the barrier and the others' loads after it, whatever
        // the barrier's own implementation promises about memory.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        try replicaComm.barrier()
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }

    /// The checks of a config against the dataset and the world size that need no collective,
    /// so that every rank finds the same error before the first one.
    /// - Returns: the model's split over `config.parallel.towers` (the model whole on one rank).
    public static func checkLayout(config: TrainConfig, data: DataPipeline, worldSize: Int) throws -> TowerPlan {
        if let input = config.input, input != data.shape {
            throw ConfigError("\(config.source): model.input is \(input) but the dataset's images are \(data.shape)")
        }
        // The model is the config's (grouped by its towers); one rank runs it whole, several split
        // it into replicas x towers.
        let plan = try TowerPlan(input: data.shape, layers: config.layers, towers: config.parallel.towers)
        let wanted = worldSize > 1 ? config.parallel.towers : 1
        guard plan.global.outputShape.count == data.train.classes else {
            throw ConfigError("\(config.source): the last layer '\(plan.global.nodes.last!.name)' has \(plan.global.outputShape.count) outputs but the dataset has \(data.train.classes) classes")
        }
        guard worldSize % wanted == 0 else {
            throw ConfigError("\(config.source): world size \(worldSize) does not fit parallel.towers \(wanted): run a multiple of \(wanted) ranks (replicas x towers), or set --towers")
        }
        let replicas = worldSize / wanted
        if config.parallel.balance && wanted > 1 {
            throw ConfigError("\(config.source): parallel.balance sizes the replicas' shares of the batch and needs parallel.towers 1 (the towers of a replica share its samples), got towers \(wanted)")
        }
        if config.parallel.chunk > 0 && !config.parallel.dynamic {
            throw ConfigError("\(config.source): parallel.chunk sizes the chunks of parallel.dynamic, which is off: set parallel.dynamic: true (or --dynamic), or drop parallel.chunk")
        }
        if (config.parallel.head > 0 || config.parallel.headAuto) && !config.parallel.dynamic {
            throw ConfigError("\(config.source): parallel.head sizes the heads of parallel.dynamic, which is off: set parallel.dynamic: true (or --dynamic), or drop parallel.head")
        }
        if config.parallel.dynamic {
            if wanted > 1 {
                throw ConfigError("\(config.source): parallel.dynamic lets each replica claim its samples and needs parallel.towers 1 (the towers of a replica share its samples), got towers \(wanted)")
            }
            if config.parallel.balance {
                throw ConfigError("\(config.source): parallel.dynamic and parallel.balance are two ways of sizing the replicas' shares: set one of them")
            }
            if config.parallel.syncBN && replicas > 1 {
                throw ConfigError("\(config.source): parallel.dynamic with parallel.sync_bn: the replicas take different numbers of chunks, and sync_bn needs every rank in each batch norm layer's allreduce; set one of them")
            }
        }
        guard config.batchSize % replicas == 0 else {
            throw ConfigError("\(config.source): train.batch_size \(config.batchSize) is not divisible by the \(replicas) replicas (the batch size is the global batch; each replica takes batch/\(replicas))")
        }
        return plan
    }

    /// Copies a whole-model buffer (laid out as `plan.global`) into this rank's buffer.
    func loadGlobal(_ values: [Float], into buffer: UnsafeMutableBufferPointer<Float>, tensors: KeyPath<Graph, [ParameterInfo]>) {
        precondition(values.count == plan.global[keyPath: tensors].reduce(0) { $0 + $1.count }, "a whole-model section of \(values.count) values")
        guard !values.isEmpty else { return }
        values.withUnsafeBufferPointer { v in
            if towerComm == nil { buffer.baseAddress!.update(from: v.baseAddress!, count: values.count) } else {
                plan.scatter(v.baseAddress!, into: buffer.baseAddress!, tensors: tensors, tower: tower)
            }
        }
    }

    /// This rank's buffer as a whole-model buffer: the towers' slices put together (on every rank of a tower group).
    func wholeModel(_ buffer: UnsafeMutableBufferPointer<Float>, tensors: KeyPath<Graph, [ParameterInfo]>) throws -> [Float] {
        guard let towerComm else { return Array(buffer) }
        var whole = [Float](repeating: 0, count: plan.global[keyPath: tensors].reduce(0) { $0 + $1.count })
        guard !whole.isEmpty else { return whole }
        // Slices are disjoint: summing zero-filled copies assembles the whole exactly.
        try whole.withUnsafeMutableBufferPointer { w in
            plan.gather(buffer.baseAddress!, into: w.baseAddress!, tensors: tensors, tower: tower)
            try towerComm.allreduceSum(w.baseAddress!, count: w.count)
        }
        return whole
    }

    deinit { stepStatistics.deallocate(); perSample.deallocate(); cuts.deallocate(); headOf.deallocate(); samplesTaken.deallocate(); towerBad.deallocate() }

    /// Every rank must run the same experiment: compare the config hashes and the world layout.
    func checkSameConfig() throws {
        // parallel.balance and parallel.dynamic change the per-step collective's size and how the
        // ranks meet, not what is trained (so that `--balance` and `--dynamic` are not in the hash
        // that checkpoints carry): compared here on their own.
        var mine: [Int64] = [Int64(bitPattern: config.hash), Int64(config.batchSize), Int64(bitPattern: config.seed), config.parallel.balance ? 1 : 0,
                             config.parallel.dynamic ? 1 : 0, Int64(config.parallel.chunk), Int64(bitPattern: config.parallel.head.bitPattern),
                             config.parallel.headAuto ? 1 : 0]
        let k = mine.count
        var all = [Int64](repeating: 0, count: k * comm.size)
        try mine.withUnsafeMutableBytes { m in
            try all.withUnsafeMutableBytes { a in try comm.allgather(m.baseAddress!, bytes: 8 * k, into: a.baseAddress!) }
        }
        for r in 0..<comm.size where (0..<k).contains(where: { all[k * r + $0] != all[$0] }) {
            throw TrainingError("rank \(r) runs a different config than rank 0 (config hash, batch size, seed, parallel.balance, parallel.dynamic, parallel.chunk or parallel.head differ): start every rank with the same config and options")
        }
        mine.removeAll()
    }

    /// Runs `body` on rank 0 and tells every rank whether it worked, so that a failure there stops
    /// every rank with an error instead of leaving the others waiting in the next collective.
    func onRoot(_ what: String, _ body: () throws -> Void) throws {
        var failure: Error? = nil
        if isRoot { do { try body() } catch { failure = error } }
        var flag: Int64 = failure == nil ? 0 : 1
        if comm.size > 1 { try comm.broadcast(&flag, bytes: 8, root: 0) }
        if let failure { throw failure }
        if flag != 0 { throw TrainingError("rank 0 could not \(what) (rank 0's error says why)") }
    }

    public var stepsPerEpoch: Int { (data.train.count + config.batchSize - 1) / config.batchSize }
    /// Steps of the whole run (train.epochs); the learning-rate schedule spans these.
    public var plannedSteps: Int { Int((config.epochs * Double(stepsPerEpoch)).rounded(.up)) }
    /// Where this run stops: the planned steps, or max_steps if fewer.
    public var totalSteps: Int { config.maxSteps > 0 ? min(plannedSteps, config.maxSteps) : plannedSteps }

    /// The learning-rate schedule in optimiser steps. It spans the planned run, not max_steps: a
    /// stop is not a shorter schedule, so a run stopped early and resumed trains what one
    /// uninterrupted run trains.
    public var schedule: LRSchedule {
        let spe = Double(stepsPerEpoch)
        let kind: LRSchedule.Kind
        switch config.schedule.kind {
        case .constant: kind = .constant
        case .step: kind = .step(every: max(1, Int((config.schedule.everyEpochs * spe).rounded())), gamma: config.schedule.gamma)
        case .cosine: kind = .cosine(minimum: config.schedule.minLR)
        }
        return LRSchedule(base: config.lr, kind: kind, warmupSteps: Int((config.schedule.warmupEpochs * spe).rounded()), totalSteps: plannedSteps)
    }

    /// This rank's share [lo, hi) of a global batch of `m` samples: even, or with `parallel.balance`
    /// for a full batch, sized to the replicas' measured speeds (`balancedCuts`).
    public func share(of m: Int) -> Range<Int> {
        if balancing && m == config.batchSize { return cuts[replica]..<cuts[replica + 1] }
        return (m * replica / replicas)..<(m * (replica + 1) / replicas)
    }

    /// parallel.dynamic: forgets the samples taken so far (`shares` then averages the steps after
    /// this call; `trainer bench` calls it after the warm-up).
    public func resetShareCounts() {
        samplesTaken.update(repeating: 0, count: replicas)
        dynamicSteps = 0
    }

    /// parallel.dynamic: each replica's head of the next full global batch (`setHeads`).
    public var heads: [Int] { (0..<replicas).map { headOf[$0] } }

    /// Each replica's share of a full global batch: at this point with `parallel.balance`, the mean
    /// over the full batches so far (rounded) with `parallel.dynamic`, else the even share.
    public var shares: [Int] {
        (0..<replicas).map { r in
            if balancing { return cuts[r + 1] - cuts[r] }
            if dynamic && dynamicSteps > 0 { return Int((samplesTaken[r] / Double(dynamicSteps)).rounded()) }
            return config.batchSize / replicas
        }
    }

    /// `parallel.balance`: the weight of the newest step in each replica's moving average of seconds
    /// per sample. A rank's speed on a shared machine moves in phases of tens to hundreds of steps,
    /// so the last few steps predict the next best: replaying the step times of side-by-side runs
    /// (`trainer bench-lockstep`'s model, 4 LeNet-5 pairs) kept 93.2-95.7% of the pair at 0.1,
    /// 94.7-96.6% at 0.3 and 94.8-96.8% at 0.5; 0.3 leaves a little smoothing for the noise.
    public static let balanceSmoothing = 0.3

    /// The per-step sum's slots: loss, correct, the collective fingerprints, then per replica its
    /// speed (balance) or its samples and speed (dynamic), its first bad gradient (sharded update),
    /// and the head tuner's step time.
    static func statisticsSlots(replicas: Int) -> Int { 7 + 3 * replicas }

    /// The most samples a replica takes with `parallel.balance`: 1.5x the even share, rounded up, and
    /// one for rounding.
    static func balancedCapacity(batch: Int, replicas: Int) -> Int { min(batch, (3 * batch + 2 * replicas - 1) / (2 * replicas) + 1) }

    /// Share cuts of `batch` samples over replicas whose seconds per sample are `perSample` (0: not
    /// measured yet): each share proportional to its replica's speed, held within 0.5x and 1.5x of
    /// the even share, the held shares' difference spread over the others in proportion (the scale
    /// found by bisection); `cuts[0] = 0`, `cuts[replicas] = batch`, each share at least one sample
    /// and at most the bound plus one for rounding. The same inputs give the same cuts on every rank.
    static func balancedCuts(batch: Int, perSample: UnsafePointer<Double>, replicas: Int, into cuts: UnsafeMutablePointer<Int>) {
        var slowest = 0.0
        for r in 0..<replicas {
            guard perSample[r] > 0 && perSample[r].isFinite else {
                for q in 0...replicas { cuts[q] = batch * q / replicas }
                return
            }
            slowest = max(slowest, perSample[r])
        }
        let even = Double(batch) / Double(replicas)
        // At least one sample each (so that every replica goes on measuring its speed): shares of at
        // least 1 round to whole shares of at least 1.
        let lo = max(1, 0.5 * even), hi = 1.5 * even
        // Replica r's share for scale k: k / perSample[r], held within [lo, hi]. The total grows
        // with k from replicas * lo (k = 0) to replicas * hi (k = hi * slowest), so batch lies between.
        func total(_ k: Double) -> Double {
            var t = 0.0
            for r in 0..<replicas { t += min(hi, max(lo, k / perSample[r])) }
            return t
        }
        var a = 0.0, b = hi * slowest
        for _ in 0..<64 {
            let k = 0.5 * (a + b)
            if total(k) < Double(batch) { a = k } else { b = k }
        }
        var sum = 0.0
        cuts[0] = 0
        for r in 0..<replicas {
            sum += min(hi, max(lo, b / perSample[r]))
            cuts[r + 1] = r + 1 == replicas ? batch : min(batch, max(cuts[r], Int(sum.rounded())))
        }
    }

    /// One optimiser step on global positions [start, start + m) of the epoch's order. Returns the
    /// global mean loss and the correct count over the global batch.
    public func step(epoch: Int, start: Int, globalCount m: Int, step: Int, lr: Double, timing: StepTiming? = nil) throws -> (loss: Double, correct: Int) {
        var t0 = Clock.now
        let stepStart = t0
        trace?.step = step
        currentStep = step
        nonFiniteChunk = nil
        // The sharded update applies it as the buckets are summed, during backward.
        sync.learningRate = lr
        // This rank's summed loss and correct count, the samples it computed, and how many of
        // them the network's activations hold (for the NaN report).
        let r: (loss: Double, correct: Int)
        let taken: Int, resident: Int
        // The forward and backward seconds (parallel.balance's measure of speed).
        var computeSeconds = 0.0
        // parallel.dynamic: the speed measure, from the rank's first chunk alone (its head): the
        // later chunks are small and a rank that takes more of them would look slower per sample
        // for their fixed costs, shrinking its head further.
        var speedSamples = 0
        if dynamic {
            var loss = 0.0, correct = 0, last = 0, total = 0
            claimChunks(epoch: epoch, start: start, globalCount: m, step: step, timing: timing) { chunk in
                loss += chunk.loss
                correct += chunk.correct
                total += chunk.count
                last = chunk.count
                if speedSamples == 0 {
                    computeSeconds = chunk.seconds
                    speedSamples = chunk.count
                }
            }
            r = (loss, correct)
            taken = total
            resident = last
            t0 = Clock.now
        } else {
            let mine = share(of: m)
            data.loadTrain((start + mine.lowerBound)..<(start + mine.upperBound), epoch: epoch, seed: config.seed, input: net.input, labels: net.labels)
            net.globalOffset = mine.lowerBound
            if let trace { trace.record(trace.dataName, start: stepStart, end: Clock.now) }
            if let timing { let t = Clock.now; timing.data += t - t0; t0 = t }
            let computeStart = Clock.now
            r = net.trainStep(count: mine.count, lossScale: lossScale(globalCount: m, step: step), step: step)
            if comm.rank == hooks.slowRank { usleep(UInt32(hooks.slowMicrosPerSample * mine.count)) }
            computeSeconds = Clock.now - computeStart
            if let timing { let t = Clock.now; timing.compute += t - t0; t0 = t }
            taken = mine.count
            resident = mine.count
        }
        if step == hooks.hangStep && comm.rank == hooks.hangRank {
            // Test-only: this rank stops calling collectives, as a stuck rank would.
            while true { sleep(3600) }
        }
        try monitor.watch(.gradients, step: step, count: sync.active ? net.gradients.count : 0) { try sync.finish() }
        if step == hooks.divergeStep && comm.rank == hooks.divergeRank {
            // Test-only: this rank believes it ran one more collective than the others.
            monitor.record(.phantom, step: step, count: 1)
        }
        // Within a tower group every rank computed the same loss (the loss sees all logits). The
        // last four slots compare the ranks' collective fingerprints (see CollectiveMonitor).
        // Preallocated: a training step allocates nothing.
        let stats = stepStatistics
        stats[0] = r.loss
        stats[1] = Double(r.correct)
        // The first NaN or Inf in this rank's gradients. With the sharded update each rank holds the
        // sums of its own slices only: a NaN or Inf in any rank's gradient shows in the sum of some
        // slice, so each rank's first one rides along (1 + its index, 0 if none) and every rank names
        // the smallest.
        let sharded = sync.updatesParameters
        let badSlot = dynamic ? 6 + 2 * replicas : balancing ? 6 + replicas : 6
        var bad: Int?
        if tandem_all_finite_f32(net.gradients.baseAddress!, net.gradients.count) == 0 { bad = net.gradients.firstIndex { !$0.isFinite } }
        if replicas > 1 {
            monitor.writeCheckSlots(stats + 2)
            // With balance, each replica's seconds per sample rides along (zero in the others' slots);
            // with dynamic shares, the samples each took and then (for a full batch) its seconds per
            // sample, which size the next step's heads.
            // parallel.head auto: this rank's seconds since it last had the sums, from the second
            // full step on (the same steps are tuned on every rank: whether the tuning is over follows
            // from the sums). Not gated on the speeds being measured: a rank that never gets a chunk
            // would then hold the tuning, and bench's warm-up that waits for it, for ever.
            let tuning = tuningHeads
            let count = badSlot + (sharded ? replicas : 0) + (tuning ? 1 : 0)
            if count > 6 { (stats + 6).update(repeating: 0, count: count - 6) }
            if tuning && m == config.batchSize && cycleMark > 0 { stats[count - 1] = Clock.now - cycleMark }
            if balancing && taken > 0 && m == config.batchSize { stats[6 + replica] = computeSeconds / Double(taken) }
            if dynamic {
                stats[6 + replica] = Double(taken)
                if speedSamples > 0 && m == config.batchSize { stats[6 + replicas + replica] = computeSeconds / Double(speedSamples) }
            }
            if sharded { stats[badSlot + replica] = Double((bad ?? -1) + 1) }
            try monitor.watch(.loss, step: step, count: count) { try sync.sumScalars(stats, count: count) }
            cycleMark = Clock.now
            if !CollectiveMonitor.slotsAgree(stats + 2, ranks: replicas) { try reportDivergence(step: step) }
            if tuning, let tuner = headTuner, stats[count - 1] > 0 {
                // Every rank's step, averaged: the same on every rank, and so the same choice.
                tuner.record(stats[count - 1] / Double(replicas))
                if tuner.fraction != headFraction {
                    headFraction = tuner.fraction
                    headChunk = max(ParallelConfig.headChunk(batch: config.batchSize, replicas: replicas, fraction: headFraction), chunkBounds.min)
                    setHeads()
                }
                if tuner.done { tuningHeads = false }
            }
            if dynamic && m == config.batchSize {
                for q in 0..<replicas { samplesTaken[q] += stats[6 + q] }
                dynamicSteps += 1
            }
            // With balance the seconds per sample are in slots 6..., with dynamic shares after the
            // samples taken.
            let speeds = stats + (dynamic ? 6 + replicas : 6)
            if (balancing || dynamic) && m == config.batchSize && (0..<replicas).allSatisfy({ speeds[$0] > 0 }) {
                // A moving average over the last few steps; the first step of this process (cold
                // caches, also after a resume) is skipped.
                if balancedSteps > 0 {
                    let a = Self.balanceSmoothing
                    for q in 0..<replicas { perSample[q] = perSample[q] > 0 ? (1 - a) * perSample[q] + a * speeds[q] : speeds[q] }
                }
                balancedSteps += 1
                Self.balancedCuts(batch: config.batchSize, perSample: perSample, replicas: replicas, into: cuts)
                if dynamic { setHeads() }
            }
        }
        if let timing { let t = Clock.now; timing.allreduce += t - t0; t0 = t }
        guard stats[0].isFinite else {
            throw TrainingError("step \(step): the loss is \(stats[0]) (NaN or Inf)\((nonFiniteChunk ?? firstNonFinite(count: resident)).map { "; it first appeared in \($0)" } ?? ""); lower the learning rate, or run `trainer debug` for every layer's statistics")
        }
        // Gradients are the same on every replica after the allreduce (sharded: every rank found the
        // same smallest index), so every rank stops together.
        if sharded {
            bad = nil
            for q in 0..<replicas where stats[badSlot + q] > 0 { bad = min(bad ?? Int.max, Int(stats[badSlot + q]) - 1) }
        }
        // Each tower holds only its slices of the model: the towers agree on the first tower with a
        // bad gradient (and its index), so that every rank of the tower group stops too.
        var badTower = tower
        if let towerComm {
            let slots = towerBad
            slots.update(repeating: 0, count: towers)
            slots[tower] = Double((bad ?? -1) + 1)
            try monitor.watch(.towerGradientCheck, step: step, count: towers) { try towerComm.allreduceSum(slots, count: towers) }
            bad = nil
            if let t = (0..<towers).first(where: { slots[$0] > 0 }) {
                bad = Int(slots[t]) - 1
                badTower = t
            }
        }
        if let i = bad {
            let tensors = towerComm == nil ? graph.parameters : plan.local[badTower].parameters
            let tensor = tensors.first { $0.offset <= i && i < $0.offset + $0.count }?.name ?? "?"
            throw TrainingError("step \(step): the gradient of '\(tensor)'\(towerComm == nil ? "" : " (tower \(badTower))") holds NaN or Inf\(firstNonFinite(count: resident).map { "; the activations first went bad in \($0)" } ?? ""); lower the learning rate, or run `trainer debug`")
        }
        let optimizerStart = trace != nil ? Clock.now : 0
        // The sharded update was applied as the buckets were summed (inside backward and `finish`).
        if !sharded { sgd.step(parameters: net.parameters, gradients: net.gradients, lr: lr) }
        if let timing { timing.optimizer += Clock.now - t0 }
        if let trace {
            let t = Clock.now
            trace.record(trace.optimizerName, start: optimizerStart, end: t)
            trace.record(trace.stepName, start: stepStart, end: t)
        }
        return (stats[0] / Double(m), Int(stats[1]))
    }

    /// parallel.dynamic: this rank's part of one optimiser step on global positions [start, start + m):
    /// claims chunks from the pool the replicas share until none is left, loading, forwarding and
    /// backpropagating each (the gradients add up over the chunks) and handing each chunk's loss,
    /// correct count, size and seconds (forward and backward) to `took`. The next chunk is claimed
    /// after a chunk's backward; a chunk's backward that finds the pool empty already knows it is the
    /// last and posts the gradient buckets as it goes (overlap); a rank that gets no chunk posts zero
    /// gradients. Every claim of a step comes before the rank's gradient sync, which every rank
    /// finishes before any starts the next step's claims.
    private func claimChunks(epoch: Int, start: Int, globalCount m: Int, step: Int, timing: StepTiming?,
                             took: (_ chunk: (loss: Double, correct: Int, count: Int, seconds: Double)) -> Void) {
        let counter = pool!.base.assumingMemoryBound(to: UInt64.self)
        poolTag &+= 1
        if poolTag == 0 { poolTag = 1 }   // 0 is the fresh segment's tag
        let bounds = chunkBounds
        var first = 0
        // This rank's head: for a full batch sized to the replicas' speeds (`setHeads`), else even
        // (`headChunk` is the full batch's even head).
        let full = m == config.batchSize
        let head = full ? headOf[replica] : max(bounds.min, ParallelConfig.headChunk(batch: m, replicas: replicas, fraction: headFraction))
        let reserve = full ? headReserve : max(0, m - replicas * head)
        var claims = 0
        func claim() -> Int {
            claims += 1
            return tandem_claim_samples(counter, poolTag, m, replicas, bounds.min, bounds.max, claims == 1 ? head : 0, reserve, &first)
        }
        if comm.rank == hooks.lateRank {
            // Test-only: wait until the other ranks have claimed the whole batch.
            while !poolEmpty(counter, batch: m) { usleep(100) }
        }
        var size = claim()
        if size == 0 {
            net.contributeNothing()
            return
        }
        var accumulate = false
        while size > 0 {
            let lo = first, n = size
            var t0 = Clock.now
            data.loadTrain((start + lo)..<(start + lo + n), epoch: epoch, seed: config.seed, input: net.input, labels: net.labels)
            net.globalOffset = lo
            let t1 = Clock.now
            if let trace { trace.record(trace.dataName, start: t0, end: t1) }
            timing?.data += t1 - t0
            t0 = t1
            let r = net.trainForward(count: n, lossScale: lossScale(globalCount: m, step: step), step: step, accumulate: accumulate)
            // The first chunk whose loss went bad: where, while its activations are still there (the
            // NaN report names it; the network holds only the last chunk's by the end of the step).
            if !r.loss.isFinite && nonFiniteChunk == nil {
                nonFiniteChunk = firstNonFinite(count: n, backward: false) ?? "the loss of samples \(lo)..<\(lo + n) of the batch"
            }
            accumulate = true
            // Claimed only after the backward, so that a rank holds no chunk it has not started when
            // the others run out. Whether this chunk is the last is known before its backward (which
            // then posts the gradient buckets as it goes) only when the pool is empty already; when
            // the next claim finds it emptied during the backward, the gradients are reported at once
            // (the rank that took the rest is the later one, and its last backward posts as it goes).
            let last = poolEmpty(counter, batch: m)
            net.trainBackward(count: n, step: step, last: last)
            if comm.rank == hooks.slowRank { usleep(UInt32(hooks.slowMicrosPerSample * n)) }
            let t2 = Clock.now
            timing?.compute += t2 - t0
            took((r.loss, r.correct, n, t2 - t0))
            if last { return }
            size = claim()
            if size == 0 { net.finishChunks(step: step) }
        }
    }

    /// parallel.dynamic: whether every sample of the current step's pool is claimed.
    @inline(__always)
    private func poolEmpty(_ counter: UnsafeMutablePointer<UInt64>, batch m: Int) -> Bool {
        let c = tandem_load_acquire_u64(counter)
        return UInt32(truncatingIfNeeded: c >> 32) == poolTag && Int(c & 0xffff_ffff) >= m
    }

    /// The loss gradient's scale: 1 / the global batch (NaN on the test hook's poisoned rank and step,
    /// which makes that rank's gradients NaN while its loss stays finite).
    @inline(__always)
    private func lossScale(globalCount m: Int, step: Int) -> Double {
        comm.rank == hooks.poisonRank && step == hooks.poisonStep ? .nan : 1 / Double(m)
    }

    /// Every rank of `replicaComm` saw different fingerprints in the loss allreduce: gathers them
    /// to name the ranks that differ from rank 0 (world ranks) and stops.
    func reportDivergence(step: Int) throws -> Never {
        var mine: [UInt64] = [monitor.fingerprint, UInt64(comm.rank)]
        var all = [UInt64](repeating: 0, count: 2 * replicas)
        try mine.withUnsafeMutableBytes { m in
            try all.withUnsafeMutableBytes { a in try replicaComm.allgather(m.baseAddress!, bytes: 16, into: a.baseAddress!) }
        }
        let differ = (0..<replicas).filter { all[2 * $0] != all[0] }.map { "rank \(all[2 * $0 + 1])" }
        throw TrainingError("step \(step): ranks diverged: the collectives of \(differ.joined(separator: ", ")) differ from rank \(all[1])'s (fingerprint \(String(all[2 * (differ.isEmpty ? 0 : (0..<replicas).first { all[2 * $0] != all[0] }!)], radix: 16)) vs \(String(all[0], radix: 16))); every rank must run the same collectives with the same sizes")
    }

    /// The first layer (in forward order) whose output, or (in backward order, unless `backward` is
    /// false) whose output gradient, holds NaN or Inf for this rank's last `count` samples, described
    /// for an error message.
    func firstNonFinite(count: Int, backward: Bool = true) -> String? {
        for node in graph.nodes.dropFirst() {
            let n = count * node.outputShape.count
            let p = net.activations[node.index]
            if (0..<n).contains(where: { !p[$0].isFinite }) { return "the output of layer '\(node.name)' (forward)" }
        }
        guard backward else { return nil }
        for node in graph.nodes.reversed() {
            guard let g = net.activationGradients[node.index] else { continue }
            let n = count * node.outputShape.count
            if (0..<n).contains(where: { !g[$0].isFinite }) { return "the gradient of layer '\(node.name)''s output (backward)" }
        }
        return nil
    }

    /// Test loss and accuracy: the test set is sharded over the ranks and the sums reduced.
    public func evaluate() throws -> (loss: Double, accuracy: Double) {
        cycleMark = 0
        let n = data.test.count
        let mine = (n * replica / replicas)..<(n * (replica + 1) / replicas)
        let evaluateStart = Clock.now
        defer { if let trace { trace.record(trace.evaluateName, start: evaluateStart, end: Clock.now) } }
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
        if replicas > 1 { try monitor.watch(.testMetrics, step: currentStep, count: 2) { try replicaComm.allreduceSum(&sums, count: 2) } }
        return (sums[0] / Double(n), sums[1] / Double(n))
    }

    /// L2 norm of all parameters of the whole model, in Double.
    public func parameterNorm() throws -> Double {
        var s = [0.0]
        for v in net.parameters { s[0] += Double(v) * Double(v) }
        if let towerComm { try towerComm.allreduceSum(&s, count: 1) }
        return s[0].squareRoot()
    }

    // MARK: - The run

    /// Trains from the beginning, or with `options.resume` from a checkpoint, to `totalSteps`;
    /// evaluates, logs and writes checkpoints on the way. Returns the run's summary.
    public func run() throws -> RunSummary {
        let out = options.outDir
        try comm.agree {
            guard isRoot else { return }
            do { try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true) } catch {
                throw ConfigError("\(out): cannot create the output folder: \(error.localizedDescription)")
            }
        }
        let progress = ProgressDisplay()
        let say: (String) -> Void = { [isRoot, options] s in if isRoot && !options.quiet { progress.line(s) } }
        let resumed = try resume(say: say)
        let start = resumed ?? RunState()
        let metrics: MetricsLog? = isRoot ? try openMetrics(keepingStepsUpTo: resumed?.step) : nil
        let total = totalSteps
        let spe = stepsPerEpoch
        let schedule = self.schedule
        let epochsToRun = Int((Double(total) / Double(spe)).rounded(.up))
        say("tandem: \(config.source): \(graph.layerCount) layers, \(formatCount(Double(graph.parameterCount))) parameters; \(data.train.count) train / \(data.test.count) test images \(data.shape)")
        say("tandem: \(replicas) replica\(replicas == 1 ? "" : "s")\(towers > 1 ? " x \(towers) towers" : "") x \(threads) thread\(threads == 1 ? "" : "s"), global batch \(config.batchSize), \(total) steps (\(String(format: "%.3g", Double(total) / Double(spe))) epochs), output \(out)")

        let wallStart = Clock.now - start.wallSeconds
        var trainSeconds = start.trainSeconds
        var step = start.step
        let lrOffset = start.lrStep - start.step
        var lastLoss = start.lastTrainLoss
        var windowLoss = 0.0, windowCorrect = 0, windowSamples = 0, windowTrain = 0.0
        var epochLoss = 0.0, epochCorrect = 0, epochSamples = 0
        var testLoss = Double.nan, testAccuracy = Double.nan
        var secondsTo90 = start.secondsTo90
        let evalEvery = max(1, Int((config.evalEveryEpochs * Double(spe)).rounded()))
        let checkpointsOn = config.checkpointEveryEpochs > 0 || config.checkpointEverySteps > 0
        let checkpointEvery = config.checkpointEveryEpochs > 0 ? max(1, Int((config.checkpointEveryEpochs * Double(spe)).rounded())) : 0
        var lastCheckpoint = resumed?.step ?? -1
        // Samples trained so far: images/s counts the whole job, as the training seconds do.
        var samplesDone = start.epoch * data.train.count + start.position
        var next = start

        // Each epoch's order permutes the previous one (DataPipeline.shuffle), so a resumed run
        // replays the shuffles of the epochs before its own.
        for e in 0..<min(start.epoch, epochsToRun) { data.shuffle(epoch: e, seed: config.seed) }
        for epoch in min(start.epoch, epochsToRun)..<epochsToRun {
            data.shuffle(epoch: epoch, seed: config.seed)
            var pos = epoch == start.epoch ? start.position : 0
            var inEpoch = pos / config.batchSize
            while pos < data.train.count && step < total {
                let m = min(config.batchSize, data.train.count - pos)
                let lr = schedule.rate(at: step + lrOffset)
                let t0 = Clock.now
                let tuning = tuningHeads
                let r = try self.step(epoch: epoch, start: pos, globalCount: m, step: step, lr: lr)
                let dt = Clock.now - t0
                if tuning && !tuningHeads, let summary = headTuningSummary { say("tandem: " + summary) }
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
                next.epoch = pos < data.train.count ? epoch : epoch + 1
                next.position = pos < data.train.count ? pos : 0
                next.step = step
                next.lrStep = step + lrOffset
                next.trainSeconds = trainSeconds
                next.wallSeconds = Clock.now - wallStart
                next.secondsTo90 = secondsTo90
                next.lastTrainLoss = lastLoss
                let due = (checkpointEvery > 0 && step % checkpointEvery == 0) || (config.checkpointEverySteps > 0 && step % config.checkpointEverySteps == 0)
                if checkpointsOn && (due || step == total) {
                    if let path = try saveCheckpoint(next) { say("tandem: wrote \(path)") }
                    lastCheckpoint = step
                }
            }
        }
        if checkpointsOn && step != lastCheckpoint {
            next.wallSeconds = Clock.now - wallStart
            if let path = try saveCheckpoint(next) { say("tandem: wrote \(path)") }
        }
        // Resumed at its end: nothing was trained, but the summary still reports the model.
        if testLoss.isNaN {
            (testLoss, testAccuracy) = try evaluate()
        }
        let summary = RunSummary(config: config.source, test_accuracy: testAccuracy, test_loss: testLoss, final_train_loss: lastLoss,
                                 epochs: Double(step) / Double(spe), steps: step,
                                 images_per_second: Double(samplesDone) / max(trainSeconds, 1e-9),
                                 train_seconds: trainSeconds, wall_seconds: Clock.now - wallStart, world_size: comm.size, threads: threads,
                                 batch_size: config.batchSize, param_norm: try parameterNorm(), parameters: plan.global.parameterCount, seed: config.seed,
                                 seconds_to_90: secondsTo90, shares: balancing || dynamic ? shares : nil,
                                 head_fraction: dynamic ? headFraction : nil)
        if isRoot {
            if balancing { say("tandem: balance: the replicas' shares of the batch at the end " + shares.map(String.init).joined(separator: ", ")) }
            if dynamic { say("tandem: dynamic: the samples each replica took per step, on average " + shares.map(String.init).joined(separator: ", ") + ", with heads of \(headFraction)" + (headTuner.map { $0.done ? " (parallel.head auto)" : " (parallel.head auto, still tuning: \($0.measured) of \($0.rounds * $0.stepsPerRound) steps measured)" } ?? "")) }
            try summary.write(to: out + "/summary.json")
            if let extra = options.summaryJSON { try summary.write(to: extra) }
            if let metrics { try writeCurves(metrics.rows, to: out + "/curves.svg", epochs: summary.epochs) }
            progress.line(String(format: "test accuracy %.2f%% (loss %.4f) after %.2f epochs, %.1f s of training, %.1f s wall; %@ img/s. Wrote %@/{metrics.csv,summary.json,curves.svg}",
                       testAccuracy * 100, testLoss, summary.epochs, trainSeconds, summary.wall_seconds, formatCount(summary.images_per_second), out))
        }
        return summary
    }

    // MARK: - Checkpoints

    /// With `options.resume`: finds the checkpoint on rank 0, checks that it continues this run,
    /// and gives every rank its parameters, SGD velocity, running statistics and counters.
    /// Returns nil when starting from the beginning.
    func resume(say: (String) -> Void) throws -> RunState? {
        guard let spec = options.resume else { return nil }
        var found: (checkpoint: Checkpoint, path: String)? = nil
        try onRoot("find a checkpoint to resume from") {
            found = try Checkpoint.resolve(spec, outDir: options.outDir, warn: { _ = fputs($0 + "\n", stderr) }) { c, path in
                try c.check(config: config, graph: plan.global, trainCount: data.train.count, path: path)
            }
        }
        var counters = [Int64](repeating: 0, count: 7)
        var times = [Double](repeating: .nan, count: 4)
        // The checkpoint holds the whole model whatever the layout; rank 0 sends it to every rank,
        // which keeps its tower's slices.
        var whole = [[Float](repeating: 0, count: plan.global.parameterCount), [Float](repeating: 0, count: plan.global.parameterCount),
                     [Float](repeating: 0, count: plan.global.statisticsCount)]
        if let c = found?.checkpoint {
            let h = c.header
            counters = [1, Int64(h.epoch), Int64(h.position), Int64(h.step), Int64(h.lrStep), Int64(h.worldSize), Int64(h.threads)]
            times = [h.trainSeconds, h.wallSeconds, h.secondsTo90, h.lastTrainLoss]
            whole = [c.parameters, c.velocity, c.statistics]
        }
        if comm.size > 1 {
            try counters.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: $0.count, root: 0) }
            try times.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: $0.count, root: 0) }
            if counters[0] == 1 {
                for i in whole.indices where !whole[i].isEmpty {
                    try whole[i].withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: $0.count, root: 0) }
                }
            }
        }
        if counters[0] == 1 {
            try loadShared {
                loadGlobal(whole[0], into: net.parameters, tensors: \.parameters)
                loadGlobal(whole[1], into: sgd.velocity, tensors: \.parameters)
            }
            loadGlobal(whole[2], into: net.statistics, tensors: \.statistics)
        }
        guard counters[0] == 1 else {
            say("tandem: --resume auto: no checkpoint in \(options.outDir); starting from the beginning")
            return nil
        }
        var state = RunState()
        state.epoch = Int(counters[1]); state.position = Int(counters[2]); state.step = Int(counters[3]); state.lrStep = Int(counters[4])
        state.trainSeconds = times[0]; state.wallSeconds = times[1]; state.secondsTo90 = times[2].isNaN ? nil : times[2]
        state.lastTrainLoss = times[3]
        resumedFrom = (found?.path ?? "", state.step)
        say("tandem: resuming from \(found?.path ?? "") at step \(state.step) (epoch \(state.epoch), \(state.position) images into its order)")
        if counters[5] != Int64(comm.size) || counters[6] != Int64(threads) {
            say("tandem: the checkpoint was written by \(counters[5]) replica(s) x \(counters[6]) thread(s), this run has \(comm.size) x \(threads): results match an uninterrupted run within float rounding, not bit for bit")
        }
        return state
    }

    /// Checks on every rank that the weights and optimiser state are finite, then (rank 0) writes
    /// the checkpoint of `state` and deletes old ones. Returns the file written (rank 0).
    func saveCheckpoint(_ state: RunState) throws -> String? {
        cycleMark = 0
        try checkFinite(step: state.step)
        // The whole model, whatever the layout: towers put their slices together first.
        let (parameters, velocity, statistics) = try monitor.watch(.checkpoint, step: state.step, count: towerComm == nil ? 0 : net.parameters.count) {
            (try wholeModel(net.parameters, tensors: \.parameters), try wholeModel(sgd.velocity, tensors: \.parameters),
             try wholeModel(net.statistics, tensors: \.statistics))
        }
        guard isRoot else { return nil }
        var c = Checkpoint()
        c.header.configHash = config.hash
        c.header.worldSize = comm.size
        c.header.threads = threads
        c.header.epoch = state.epoch; c.header.position = state.position; c.header.step = state.step; c.header.lrStep = state.lrStep
        c.header.seed = config.seed
        c.header.batchSize = config.batchSize
        c.header.trainCount = data.train.count
        c.header.input = graph.inputShape
        c.header.trainSeconds = state.trainSeconds; c.header.wallSeconds = state.wallSeconds; c.header.secondsTo90 = state.secondsTo90 ?? .nan
        c.header.lastTrainLoss = state.lastTrainLoss
        c.configText = config.text
        c.parameters = parameters
        c.velocity = velocity
        c.statistics = statistics
        let path = options.outDir + "/" + Checkpoint.fileName(step: state.step)
        try c.write(to: path)
        Checkpoint.prune(folder: options.outDir, keep: config.keepCheckpoints, writtenStep: state.step)
        return path
    }

    /// Never checkpoint poisoned weights: NaN or Inf anywhere stops the run, naming the step and tensor.
    func checkFinite(step: Int) throws {
        let buffers: [(String, UnsafeMutableBufferPointer<Float>, [ParameterInfo])] = [
            ("the parameters", net.parameters, graph.parameters), ("the SGD velocity", sgd.velocity, graph.parameters),
            ("the running statistics", net.statistics, graph.statistics),
        ]
        for (what, buffer, infos) in buffers {
            guard let i = buffer.firstIndex(where: { !$0.isFinite }) else { continue }
            let tensor = infos.first { $0.offset <= i && i < $0.offset + $0.count }?.name ?? "?"
            throw TrainingError("step \(step): \(what) hold NaN/Inf (first in '\(tensor)'), so no checkpoint was written and the run stops; the last checkpoint is still good. Lower the learning rate, or run `trainer debug` to find the first layer that produces it")
        }
    }

    /// metrics.csv: a new file; on resume the existing file's rows up to the checkpoint's step
    /// (rows a stopped run wrote after its last checkpoint are dropped: the resumed run writes
    /// them again), then the resumed run's rows appended.
    func openMetrics(keepingStepsUpTo step: Int?) throws -> MetricsLog {
        let path = options.outDir + "/metrics.csv"
        guard let step, let text = try? String(contentsOfFile: path, encoding: .utf8) else { return try MetricsLog(path: path) }
        let kept = text.split(separator: "\n").dropFirst().compactMap { MetricsRow(csvLine: $0) }.filter { $0.step <= step }
        // Written under a temporary name and renamed, so that a crash here cannot lose the history;
        // the log keeps writing to the renamed file.
        let tmp = options.outDir + "/.metrics.csv.resume-\(getpid())"
        let log = try MetricsLog(path: tmp)
        for row in kept { log.append(row) }
        guard rename(tmp, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(tmp)
            throw ConfigError("\(path): cannot rewrite the metrics file: \(reason)")
        }
        return log
    }

    func writeCurves(_ rows: [MetricsRow], to path: String, epochs: Double) throws {
        let steps = rows.filter { $0.kind == .step }, evals = rows.filter { $0.kind == .eval }
        let loss = [Series(name: "train (logged steps)", color: "#1f77b4", points: steps.compactMap { r in r.trainLoss.map { (r.epoch, $0) } }),
                    Series(name: "test", color: "#d62728", points: evals.compactMap { r in r.testLoss.map { (r.epoch, $0) } })]
        let acc = [Series(name: "train (since last eval)", color: "#1f77b4", points: evals.compactMap { r in r.trainAccuracy.map { (r.epoch, $0) } }),
                   Series(name: "test", color: "#d62728", points: evals.compactMap { r in r.testAccuracy.map { (r.epoch, $0) } })]
        let svg = SVGPlot.curves(title: "\(config.source): \(replicas) replica(s)\(towers > 1 ? " x \(towers) towers" : ""), batch \(config.batchSize)", loss: loss, accuracy: acc, epochs: max(epochs, 1))
        try writeAtomically(Data(svg.utf8), to: path)
    }
}

extension MetricsRow {
    /// A row read back from metrics.csv (nil for the header or a damaged line).
    init?(csvLine line: Substring) {
        let f = line.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard f.count == 10, let kind = Kind(rawValue: f[0]), let epoch = Double(f[1]), let step = Int(f[2]), let wall = Double(f[9]) else { return nil }
        func v(_ i: Int) -> Double? { Double(f[i]) }
        self.init(kind: kind, epoch: epoch, step: step, trainLoss: v(3), trainAccuracy: v(4), testLoss: v(5), testAccuracy: v(6),
                  lr: v(7), imagesPerSecond: v(8), wallSeconds: wall)
    }
}

/// Seconds per phase, summed over steps (the benchmark's breakdown).
public final class StepTiming {
    public var data = 0.0, compute = 0.0, allreduce = 0.0, optimizer = 0.0
    public init() {}
}
