// trainer bench: warm-up steps, then timed training steps; per-phase and per-layer times.
// Works under mpirun too (each rank times its own share; rank 0 reports the job).
import ArgumentParser
import Foundation
import TandemComm
import TandemCore
import TandemTrain

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure training steps: images/s, phases, per-layer time and GFLOP/s.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Untimed steps first.") var warmup: Int = 20
    @Option(help: "Timed steps.") var steps: Int = 100
    @Option(help: "Write the results as JSON to this file.") var json: String?
    @Flag(help: "Random images of the config's shape instead of the dataset.") var synthetic = false
    @OptionGroup var shares: ShareOptions
    @Flag(name: .customLong("per-layer"), help: "Print forward and backward time and GFLOP/s per layer.") var perLayer = false
    @OptionGroup var sync: SyncOptions
    @Option(help: ArgumentHelp("Write a Chrome trace (Perfetto, chrome://tracing) of the timed steps: per layer forward and backward, allreduces, data, optimiser; FILE.rankN per rank under MPI.", valueName: "file"))
    var trace: String?
    @Option(help: ArgumentHelp("Add key=value to the JSON (repeatable; launch/scaling-benchmark labels its rows with it).", valueName: "key=value"))
    var tag: [String] = []
    @Option(help: ArgumentHelp("Interleave blocks of N synced steps with blocks as long in which each rank trains its own share apart (no gradient sync): the job's images/s against the ranks' own, measured in the same seconds (data parallel only).", valueName: "N"))
    var interleave: Int?

    mutating func validate() throws {
        if warmup < 0 || steps <= 0 { throw ValidationError("--warmup must be >= 0 and --steps positive") }
        for t in tag where !t.contains("=") { throw ValidationError("--tag must be key=value, got \(t)") }
        if let interleave, interleave <= 0 { throw ValidationError("--interleave must be positive, got \(interleave)") }
    }

    func run() throws {
        runReportingErrors {
            let comm = try makeWorld()
            var c = try common.load()
            try shares.apply(to: &c)
            let data = synthetic
                ? try DataPipeline.synthetic(shape: c.input ?? Shape(1, 28, 28), classes: 10, train: max(4096, 4 * c.batchSize), test: 256, seed: c.seed)
                : try DataPipeline(config: c.data)
            var o = RunOptions()
            o.quiet = true
            sync.apply(to: &o)
            o.ranksOnThisMachine = ranksOnThisMachine(comm)
            o.initWeights = common.initWeights
            if interleave != nil {
                if comm.size > 1 && c.parallel.towers > 1 { throw ValidationError("--interleave compares data-parallel replicas with the ranks training apart: it needs parallel.towers 1 (--towers 1), got \(c.parallel.towers)") }
                if c.batchSize % comm.size != 0 { throw ValidationError("--interleave gives each of the \(comm.size) ranks an even share of the batch apart: --batch-size must be a multiple of \(comm.size), got \(c.batchSize)") }
            }
            let trainer = try Trainer(config: c, comm: comm, data: data, options: o)
            let apart = try interleave.map { _ in try apartTrainer(config: c, synced: trainer, worldSize: comm.size, data: data, initWeights: common.initWeights) }
            let net = trainer.net, graph = trainer.graph
            let profile = UnsafeMutablePointer<Double>.allocate(capacity: 2 * graph.nodes.count)
            defer { profile.deallocate() }
            net.profile = profile
            data.shuffle(epoch: 0, seed: c.seed)
            let perEpoch = data.train.count / c.batchSize
            func runSteps(_ n: Int, _ timing: StepTiming?) throws {
                for s in 0..<n {
                    _ = try trainer.step(epoch: 0, start: (s % perEpoch) * c.batchSize, globalCount: c.batchSize, step: s, lr: 1e-4, timing: timing)
                }
            }
            // With --interleave, the trainer apart's own per-layer times (its steps are counted by the interleaved run).
            let apartProfile = UnsafeMutablePointer<Double>.allocate(capacity: 2 * graph.nodes.count)
            defer { apartProfile.deallocate() }
            try runSteps(warmup, nil)
            // parallel.head auto: the tuning runs in the warm-up, as long as it takes (its steps are
            // the job's own, at the candidates' heads); the timed steps run at the chosen one.
            var tuningSteps = 0
            if let tuner = trainer.headTuner {
                while !tuner.done {
                    _ = try trainer.step(epoch: 0, start: ((warmup + tuningSteps) % perEpoch) * c.batchSize, globalCount: c.batchSize, step: warmup + tuningSteps, lr: 1e-4)
                    tuningSteps += 1
                }
            }
            if let apart {
                for s in 0..<warmup { _ = try apart.step(epoch: 0, start: (s % perEpoch) * apart.config.batchSize, globalCount: apart.config.batchSize, step: s, lr: 1e-4) }
            }
            profile.update(repeating: 0, count: 2 * graph.nodes.count)
            apartProfile.update(repeating: 0, count: 2 * graph.nodes.count)
            apart?.net.profile = apartProfile
            trainer.resetShareCounts()
            let recorder = trace.map { _ in trainer.startTrace(steps: steps) }
            try comm.barrier()
            let timing = StepTiming()
            let busy0 = trainer.sync.allreduceSeconds
            let slowest0 = trainer.sync.slowestRankSeconds
            let gradientWait0 = trainer.sync.waitSeconds
            var interleaved: InterleavedResult?
            let elapsed: Double
            if let apart, let interleave {
                let r = try runInterleaved(synced: trainer, apart: apart, comm: comm, steps: steps, k: interleave, globalBatch: c.batchSize, timing: timing)
                interleaved = r
                elapsed = r.syncedSeconds
            } else {
                let t0 = Clock.now
                try runSteps(steps, timing)
                try comm.barrier()
                elapsed = Clock.now - t0
            }
            // The allreduces themselves (overlap: on the sync thread, including waiting for the other ranks to release a bucket,
            // and the last bucket on the training thread).
            let allreduceMs = 1000 * (trainer.sync.allreduceSeconds - busy0) / Double(steps)
            // Shared memory: the part of the wait before the slowest rank had posted its last bucket.
            let slowestMs = 1000 * (trainer.sync.slowestRankSeconds - slowest0) / Double(steps)
            // The gradients' part of allreduce_wait (the rest is the loss sum).
            let gradientWaitMs = 1000 * (trainer.sync.waitSeconds - gradientWait0) / Double(steps)
            if let recorder, let trace { try recorder.write(to: trace, worldSize: comm.size) }
            var forward = 0.0
            for i in 0..<graph.nodes.count { forward += profile[2 * i] }
            // The job's rate: every rank's share of each global batch together.
            let images = Double(steps * c.batchSize)
            let perStep = { (x: Double) in 1000 * x / Double(steps) }
            let phases: [String: Double] = ["data": perStep(timing.data), "forward": perStep(forward),
                                            "backward": perStep(timing.compute - forward),
                                            "allreduce_wait": perStep(timing.allreduce), "optimizer": perStep(timing.optimizer)]
            // Every rank's phases, gathered to all (rank 0 reports them): where the ranks differ, the
            // faster one waits for the slower one after backward.
            let names = ["data", "forward", "backward", "allreduce_wait", "optimizer"]
            let perRank = try fromEveryRank(names.map { phases[$0]! } + [allreduceMs, slowestMs, gradientWaitMs], comm: comm)
            guard comm.rank == 0 else { return }
            let cores = ProcessInfo.processInfo.activeProcessorCount
            let oversubscribed = o.ranksOnThisMachine * trainer.threads > cores
            print(String(format: "%@: %d steps of batch %d, %d rank(s) x %d thread(s): %@ img/s (%.3f ms/step)",
                         c.source, steps, c.batchSize, comm.size, trainer.threads, formatCount(images / elapsed), 1000 * elapsed / Double(steps)))
            print("BLAS: OpenBLAS, \(BLAS.core) kernels" + blasNote)
            if let r = interleaved, let interleave {
                print(String(format: "interleaved (%d blocks of %d synced steps, each beside as long apart): synced %@ img/s, the ranks apart %@ img/s (%@), synced / apart %.1f%%",
                             r.blocks, interleave, formatCount(images / elapsed), formatCount(r.apartImagesPerSecond),
                             r.apartPerRank.map { formatCount($0) }.joined(separator: " + "), 100 * images / elapsed / r.apartImagesPerSecond))
                print("apart (ms per step): " + r.apartPhases.enumerated().map { q, v in
                    String(format: "rank %d data %.3f forward+backward %.3f finite check %.3f optimizer %.3f", q, v[0], v[1], v[2], v[3]) }.joined(separator: "; "))
            }
            if let trace { print("trace: " + (comm.size > 1 ? "\(trace).rank0 .. \(trace).rank\(comm.size - 1)" : trace)) }
            print(names.map { String(format: "%@ %.3f ms", $0, phases[$0]!) }.joined(separator: ", "))
            if trainer.sync.active {
                print(String(format: "gradient sync (%@ through %@, %d bucket(s)%@): allreduces %.3f ms per step, %.3f ms of it waited for after backward",
                             trainer.sync.mode.rawValue, trainer.sync.transportName, trainer.sync.buckets.count,
                             trainer.sync.updatesParameters ? ", sharded update" : "", allreduceMs, phases["allreduce_wait"]!)
                      + (trainer.sync.transportName == "shared memory" ? String(format: " (gradients %.3f ms, %.3f ms of that for the slowest rank's backward; the loss sum the rest)", gradientWaitMs, slowestMs) : ""))
            }
            if trainer.balancing { print("balance: shares of the batch at the end " + trainer.shares.map(String.init).joined(separator: ", ")) }
            if trainer.dynamic { print(String(format: "dynamic: heads of %g of each replica's speed-balanced share (%d at even shares), then chunks of %d to %d; each replica took ", trainer.headFraction, trainer.headChunk, trainer.chunkBounds.min, trainer.chunkBounds.max) + trainer.shares.map(String.init).joined(separator: ", ") + " samples per step on average") }
            if let summary = trainer.headTuningSummary { print(summary + ", in \(tuningSteps) steps after the warm-up") }
            if comm.size > 1 {
                print("per rank (ms per step): " + perRank.enumerated().map { r, v in
                    String(format: "rank %d forward %.3f backward %.3f wait %.3f (gradients %.3f, slowest rank %.3f)", r, v[1], v[2], v[3], v[7], v[6]) }.joined(separator: "; "))
            }
            if perLayer {
                let local = Double(c.batchSize / comm.size) / Double(trainer.threads)
                let apartSteps = Double(interleaved.map { $0.apartSteps[comm.rank] } ?? 0)
                print(pad("layer", 10) + " " + pad("type", 14) + "    fwd ms   GFLOP/s     bwd ms   GFLOP/s" + (apartSteps > 0 ? "  apart fwd  apart bwd" : "") + String(format: "   (part 0: %.0f images per step)", local))
                for node in graph.nodes.dropFirst() {
                    let f = profile[2 * node.index] / Double(steps), b = profile[2 * node.index + 1] / Double(steps)
                    let flops = Double(node.flopsPerSample) * local
                    // Backward of conv and linear is two products of the forward's size (weights and input).
                    let bflops: Double
                    switch node.kind! { case .convolution, .linear: bflops = 2 * flops; default: bflops = flops }
                    let forward = trainer.net.fusedReLUs.contains(node.index)
                        ? padLeft("in " + graph.nodes[node.inputs[0]].name, 20)
                        : String(format: "%10.3f %9.2f", 1000 * f, flops / max(f, 1e-12) / 1e9)
                    let backward = trainer.net.pooledReLUs.contains(node.index)
                        ? " " + padLeft("in " + graph.nodes[graph.consumers[node.index][0]].name, 20)
                        : String(format: " %10.3f %9.2f", 1000 * b, bflops / max(b, 1e-12) / 1e9)
                    let apartColumns = apartSteps > 0 ? String(format: " %10.3f %10.3f", 1000 * apartProfile[2 * node.index] / apartSteps, 1000 * apartProfile[2 * node.index + 1] / apartSteps) : ""
                    print(pad(node.name, 10) + " " + pad(node.kind!.typeName, 14) + " " + forward + backward + apartColumns)
                }
            }
            if let json {
                let result: [String: Any] = [
                    "config": c.source, "images_per_second": images / elapsed, "world_size": comm.size, "threads": trainer.threads,
                    "batch_size": c.batchSize, "steps": steps, "warmup": warmup, "phases_ms": phases,
                    "ms_per_step": 1000 * elapsed / Double(steps), "synthetic": synthetic, "gradient_sync": trainer.sync.mode.rawValue, "bucket_kb": sync.bucketKB,
                    "update": trainer.sync.updatesParameters ? "sharded" : "replicated",
                    "transport": trainer.sync.transportName, "balance": trainer.balancing, "dynamic": trainer.dynamic, "head_fraction": trainer.dynamic ? trainer.headFraction : 0, "shares": trainer.shares, "wait_for_slowest_rank_ms": slowestMs, "gradient_wait_ms": gradientWaitMs,
                    "allreduce_ms": allreduceMs, "buckets": trainer.sync.buckets.count,
                    "replicas": trainer.replicas, "towers": trainer.towers, "local_batch": trainer.localBatch,
                    "blas_core": BLAS.core, "blas_openblas_pick": getenv(BLAS.replacedCoreVariable).map { String(cString: $0) } ?? BLAS.core, "cores": cores, "ranks_on_this_machine": o.ranksOnThisMachine, "oversubscribed": oversubscribed,
                    "tags": tagDictionary(tag),
                    "ranks": perRank.enumerated().map { r, v in
                        ["rank": r, "phases_ms": Dictionary(uniqueKeysWithValues: zip(names, v)), "allreduce_ms": v[5], "wait_for_slowest_rank_ms": v[6], "gradient_wait_ms": v[7]] as [String: Any] },
                ].merging(trainer.headTuner.map { t in ["head_tuning": ["candidates": t.candidates, "trimmed_mean_step_ms": t.scores.map { 1000 * $0 }, "chosen": t.fraction,
                                                         "steps_measured": t.measured, "steps_after_warmup": tuningSteps, "step_ms": t.stepsByCandidate.map { $0.map { 1000 * $0 } }] as [String: Any]] } ?? [:]) { a, _ in a }
                .merging(interleaved.map { ["interleaved": $0.json(syncedImagesPerSecond: images / elapsed, k: interleave!)] } ?? [:]) { a, _ in a }
                let d = try JSONSerialization.data(withJSONObject: result, options: [.prettyPrinted, .sortedKeys])
                try writeAtomically(d, to: json)
            }
        }
    }
}

/// Every rank's `values` (the same count on every rank), gathered to all, in rank order.
func fromEveryRank(_ values: [Double], comm: Communicator) throws -> [[Double]] {
    var all = [Double](repeating: 0, count: values.count * comm.size)
    try values.withUnsafeBytes { m in
        try all.withUnsafeMutableBytes { a in try comm.allgather(m.baseAddress!, bytes: m.count, into: a.baseAddress!) }
    }
    return (0..<comm.size).map { r in Array(all[(r * values.count)..<((r + 1) * values.count)]) }
}

/// Why OpenBLAS runs the kernels it runs, for bench's BLAS line: "" for its own pick.
var blasNote: String {
    if let picked = getenv(BLAS.replacedCoreVariable) { return " (set by Tandem: OpenBLAS picked \(String(cString: picked)), without AVX2, for this CPU)" }
    return getenv("OPENBLAS_CORETYPE") != nil ? " (OPENBLAS_CORETYPE)" : ""
}

/// `--tag key=value` options as a dictionary (a later key wins).
func tagDictionary(_ tags: [String]) -> [String: String] {
    Dictionary(tags.map { t in
        let kv = t.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        return (kv[0], kv.count > 1 ? kv[1] : "")
    }, uniquingKeysWith: { _, later in later })
}
