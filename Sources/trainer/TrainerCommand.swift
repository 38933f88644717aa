// trainer: Tandem's command line. `trainer` (= `trainer train`) trains a config, as one process or
// under `mpirun -np N trainer`; `trainer debug` is the single-process debug mode; `trainer bench`
// measures a training step.
import ArgumentParser
import Foundation
import TandemComm
import TandemCore
import TandemMPI
import TandemTrain

/// Options every subcommand shares.
struct CommonOptions: ParsableArguments {
    @Option(help: "The experiment's YAML config (default: the built-in configs/lenet5-bn.yaml).")
    var config: String?
    @Option(help: "Dataset folder (overrides data.path).")
    var data: String?
    @Option(name: .customLong("batch-size"), help: "Global batch size (overrides train.batch_size); each of R replicas takes batch/R.")
    var batchSize: Int?
    @Option(help: "Seed for weights, shuffling, augmentation and dropout (overrides train.seed).")
    var seed: Int?
    @Option(help: "Threads per process that split the batch (overrides parallel.threads; default: the cores / ranks on this machine).")
    var threads: Int?
    @Option(help: "Towers the model is split into (overrides parallel.towers); the world is replicas x towers.")
    var towers: Int?
    @Option(name: .customLong("init-weights"), help: "Start from these weights (a safetensors file, e.g. from `trainer export`) instead of the initialiser.")
    var initWeights: String?

    func load() throws -> TrainConfig {
        var c = try config.map { try TrainConfig.load(path: $0) } ?? TrainConfig.builtInDefault()
        if let data { c.data.path = data }
        if let batchSize {
            guard batchSize > 0 else { throw ValidationError("--batch-size must be positive, got \(batchSize)") }
            c.batchSize = batchSize
        }
        if let seed {
            guard seed >= 0 else { throw ValidationError("--seed must be >= 0, got \(seed)") }
            c.seed = UInt64(seed)
        }
        if let threads {
            guard threads > 0 else { throw ValidationError("--threads must be positive, got \(threads)") }
            c.parallel.threads = threads
        }
        if let towers {
            guard towers > 0 else { throw ValidationError("--towers must be positive, got \(towers)") }
            c.parallel.towers = towers
        }
        return c
    }

    var name: String {
        guard let config else { return TrainConfig.defaultName }
        return URL(fileURLWithPath: config).deletingPathExtension().lastPathComponent
    }
}

@main
struct TrainerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trainer",
        abstract: "Tandem: data- and model-parallel training of convolutional networks on CPUs over MPI.",
        discussion: "With no subcommand, trains the default model (LeNet-5 with batch norm on Fashion-MNIST). Run it under `mpirun -np N trainer` for N data-parallel replicas.",
        subcommands: [Train.self, Debug.self, Bench.self, Export.self, BenchAllreduce.self, BenchReport.self, BenchLockstep.self],
        defaultSubcommand: Train.self)

    static func main() {
        // OpenBLAS picks its kernels as it loads, before any of this runs. Where it took the CPU for
        // one without AVX2 (a CPU newer than it), start this program again, same process and
        // arguments (under mpirun the same rank), with OPENBLAS_CORETYPE set to kernels the CPU runs.
        if let better = BLAS.betterCore {
            setenv(BLAS.replacedCoreVariable, BLAS.core, 1)
            setenv("OPENBLAS_CORETYPE", better, 1)
            execv("/proc/self/exe", CommandLine.unsafeArgv)
            // The exec failed: carry on with OpenBLAS's own kernels.
            unsetenv("OPENBLAS_CORETYPE")
            unsetenv(BLAS.replacedCoreVariable)
        }
        // ArgumentParser's own main writes an error in pieces; under mpirun every rank writes it at
        // once and the pieces of two ranks could interleave mid-line. Each message goes out in one
        // write instead (a pipe keeps writes of up to 4 KB whole).
        do {
            var command = try parseAsRoot(nil)
            try command.run()
        } catch {
            let code = exitCode(for: error)
            var text = fullMessage(for: error)
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text.withCString { _ = write(code == .success ? STDOUT_FILENO : STDERR_FILENO, $0, strlen($0)) }
            Foundation.exit(code.rawValue)
        }
    }
}

/// The world of this process once made (errors are reported and the job ended through it).
nonisolated(unsafe) var currentWorld: Communicator?

/// The world: MPI when started by mpirun/srun, otherwise a single process.
func makeWorld() throws -> Communicator {
    let world: Communicator = MPICommunicator.launchedByMPI ? try MPICommunicator.initialize() : SingleProcessCommunicator()
    currentWorld = world
    return world
}

/// Ranks on this machine (OpenMPI and Slurm say; otherwise all ranks are here).
func ranksOnThisMachine(_ world: Communicator) -> Int {
    let env = ProcessInfo.processInfo.environment
    for key in ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"] {
        if let v = env[key], let n = Int(v.split(separator: "(").first ?? ""), n > 0 { return n }
    }
    return world.size
}

/// Runs `body` and turns any error into one line on stderr (prefixed with the rank under MPI) and exit status 1.
func runReportingErrors(_ body: () throws -> Void) -> Never {
    do {
        try body()
        let world = currentWorld
        if world is MPICommunicator { MPICommunicator.finalize() }
        exit(0)
    } catch {
        let world = currentWorld
        let prefix = (world?.size ?? 1) > 1 ? "tandem: rank \(world!.rank): " : "tandem: "
        fputs(prefix + String(describing: error).replacingOccurrences(of: "\n", with: " ") + "\n", stderr)
        if error is AgreedFailure {
            // Every rank stops here with its own line (see Agreement.swift): no rank is waiting
            // in a collective, so all finalise instead of one aborting the others mid-sentence.
            if world is MPICommunicator { MPICommunicator.finalize() }
            exit(1)
        }
        if let world, world.size > 1 {
            // Other ranks may be waiting in a collective this rank will never enter: end the job,
            // after a moment in which ranks that met the same error can say so too.
            usleep(300_000)
            world.abort(code: 1)
        }
        exit(1)
    }
}

/// How data-parallel replicas share each global batch (train and bench).
struct ShareOptions: ParsableArguments {
    @Flag(help: "Size each replica's share of the batch to its measured speed (parallel.balance).") var balance = false
    @Flag(help: "Replicas claim the batch's samples from a pool they share as they go (parallel.dynamic, one machine).") var dynamic = false
    @Option(help: "With --dynamic, the largest chunk a replica claims after its first (parallel.chunk).") var chunk: Int?
    @Option(help: ArgumentHelp("With --dynamic, the fraction of its speed-balanced share a replica's first claim of a step takes, in (0, 1], or auto: the fastest of \(ParallelConfig.headCandidates.map { String(format: "%g", $0) }.joined(separator: ", ")) over the first full batches (parallel.head; default 0.375, 0.75 with batch norm).", valueName: "fraction|auto")) var head: String?

    func apply(to c: inout TrainConfig) throws {
        if balance { c.parallel.balance = true }
        if dynamic { c.parallel.dynamic = true }
        if let chunk {
            guard chunk > 0 else { throw ValidationError("--chunk must be positive, got \(chunk)") }
            c.parallel.chunk = chunk
        }
        if let head {
            if head == "auto" {
                c.parallel.headAuto = true
                c.parallel.head = 0
            } else {
                guard let h = Double(head), h > 0 && h <= 1 else { throw ValidationError("--head must be a fraction in (0, 1] or auto, got \(head)") }
                c.parallel.head = h
                c.parallel.headAuto = false
            }
        }
    }
}

/// How the gradients are synchronised (train and bench alike).
struct SyncOptions: ParsableArguments {
    @Option(name: .customLong("gradient-sync"), help: "overlap (default): each bucket of gradients allreduced while backward runs; after: one allreduce after backward.")
    var gradientSync: String = "overlap"
    @Option(name: .customLong("bucket-kb"), help: "Smallest gradient bucket, in KiB.") var bucketKB: Int = 64
    @Option(help: "How overlap's buckets travel: auto (shared memory when every rank is on one machine, else MPI) or mpi.") var transport: String = "auto"
    @Option(help: "With the buckets in shared memory: sharded (default: the ranks share one copy of the parameters and SGD state, each updating its slices as it sums them) or replicated (each rank updates its own copy after the allreduce).")
    var update: String = "sharded"

    func validate() throws {
        if GradientSync.Mode(rawValue: gradientSync) == nil { throw ValidationError("--gradient-sync must be overlap or after, got \(gradientSync)") }
        if GradientSync.Transport(rawValue: transport) == nil { throw ValidationError("--transport must be auto or mpi, got \(transport)") }
        if bucketKB <= 0 { throw ValidationError("--bucket-kb must be positive, got \(bucketKB)") }
        if update != "sharded" && update != "replicated" { throw ValidationError("--update must be sharded or replicated, got \(update)") }
    }

    func apply(to o: inout RunOptions) {
        o.gradientMode = GradientSync.Mode(rawValue: gradientSync)!
        o.bucketKB = bucketKB
        o.transport = GradientSync.Transport(rawValue: transport)!
        o.shardedUpdate = update == "sharded"
    }
}

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Train a config (the default subcommand).")
    @OptionGroup var common: CommonOptions
    @Option(help: "Epochs (overrides train.epochs; fractions allowed).") var epochs: Double?
    @Option(help: "Learning rate (overrides optimizer.lr).") var lr: Double?
    @Option(help: "Output folder (default: runs/<config name>).") var out: String?
    @Option(name: .customLong("max-steps"), help: "Stop after this many optimiser steps (the learning-rate schedule still spans the epochs, so the run can be resumed).") var maxSteps: Int?
    @Option(help: ArgumentHelp("Continue from a checkpoint: a file, a folder (its newest usable checkpoint) or auto (the output folder's; none: start fresh).",
                               valueName: "file|dir|auto")) var resume: String?
    @Option(name: .customLong("summary-json"), help: "Also write summary.json to this file.") var summaryJSON: String?
    @Option(help: ArgumentHelp("Write a Chrome trace (Perfetto, chrome://tracing) of the run at its end: per layer forward and backward, allreduces, data, optimiser, evaluations; FILE.rankN per rank under MPI. Large for long runs: combine with --max-steps.", valueName: "file"))
    var trace: String?
    @OptionGroup var sync: SyncOptions
    @OptionGroup var shares: ShareOptions
    @Flag(help: "Print only errors and the final line.") var quiet = false

    func run() throws {
        runReportingErrors {
            let world = try makeWorld()
            // Config, dataset and layout errors are found by every rank alike: agree on them
            // before the first collective, so that every rank prints its line.
            let (c, data) = try world.agree { () throws -> (TrainConfig, DataPipeline) in
                var c = try common.load()
                if let epochs { c.epochs = epochs }
                if let lr { c.lr = lr }
                if let maxSteps { c.maxSteps = maxSteps }
                try shares.apply(to: &c)
                let data = try DataPipeline(config: c.data)
                _ = try Trainer.checkLayout(config: c, data: data, worldSize: world.size)
                return (c, data)
            }
            var o = RunOptions()
            o.outDir = out ?? "runs/\(common.name)"
            o.summaryJSON = summaryJSON
            o.quiet = quiet
            sync.apply(to: &o)
            o.ranksOnThisMachine = ranksOnThisMachine(world)
            o.resume = resume
            o.initWeights = common.initWeights
            let trainer = try Trainer(config: c, comm: world, data: data, options: o)
            let recorder = trace.map { _ in trainer.startTrace(steps: trainer.totalSteps, evaluations: Int((c.epochs / max(c.evalEveryEpochs, 1e-9)).rounded(.up)) + 1) }
            _ = try trainer.run()
            if let recorder, let trace { try recorder.write(to: trace, worldSize: world.size) }
        }
    }

    mutating func validate() throws {
        if let epochs, !(epochs > 0) { throw ValidationError("--epochs must be positive, got \(epochs)") }
        if let lr, !(lr > 0) { throw ValidationError("--lr must be positive, got \(lr)") }
        if let maxSteps, maxSteps <= 0 { throw ValidationError("--max-steps must be positive, got \(maxSteps)") }
        if let resume, resume.isEmpty { throw ValidationError("--resume needs a checkpoint file, a folder or auto") }
    }
}
