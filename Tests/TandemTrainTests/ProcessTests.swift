// Tests that start the release trainer (built by launch/test) as a user would: under mpirun,
// with bad input, and in debug mode. Skipped with a message when the binary or mpirun is missing.
import Foundation
import Testing
@testable import TandemCore
import TandemTrain

let trainerBinary = packageRoot + "/.build/release/trainer"
let hasTrainer = FileManager.default.isExecutableFile(atPath: trainerBinary)
let mpirunPath = ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first { FileManager.default.isExecutableFile(atPath: $0) }
let hasMPI = hasTrainer && mpirunPath != nil
let fashionMNIST = "/usr/share/datasets/fashion-mnist"
let hasData = FileManager.default.fileExists(atPath: fashionMNIST + "/t10k-labels-idx1-ubyte.gz")

struct ProcessResult { var status: Int32; var output: String; var error: String; var seconds: Double }

/// Runs a command with a time limit (killed after `timeout` seconds).
func run(_ executable: String, _ arguments: [String], timeout: Double = 120, in directory: String? = nil) throws -> ProcessResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let directory { p.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    final class Buffer: @unchecked Sendable { var data = Data(); let lock = NSLock() }
    let o = Buffer(), e = Buffer()
    out.fileHandleForReading.readabilityHandler = { h in let d = h.availableData; o.lock.lock(); o.data.append(d); o.lock.unlock() }
    err.fileHandleForReading.readabilityHandler = { h in let d = h.availableData; e.lock.lock(); e.data.append(d); e.lock.unlock() }
    let start = Date()
    try p.run()
    while p.isRunning {
        if Date().timeIntervalSince(start) > timeout { p.terminate(); usleep(500_000); kill(p.processIdentifier, SIGKILL) }
        usleep(20_000)
    }
    out.fileHandleForReading.readabilityHandler = nil
    err.fileHandleForReading.readabilityHandler = nil
    o.data.append(out.fileHandleForReading.readDataToEndOfFile())
    e.data.append(err.fileHandleForReading.readDataToEndOfFile())
    return ProcessResult(status: p.terminationStatus, output: String(decoding: o.data, as: UTF8.self),
                         error: String(decoding: e.data, as: UTF8.self), seconds: Date().timeIntervalSince(start))
}

func mpirun(_ np: Int, _ arguments: [String], timeout: Double = 180) throws -> ProcessResult {
    try run(mpirunPath!, ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "\(np)", trainerBinary] + arguments, timeout: timeout)
}

/// Step losses from a metrics.csv (one row per step when log_every_steps is 1).
func stepLosses(_ folder: String) throws -> [Double] {
    try String(contentsOfFile: folder + "/metrics.csv", encoding: .utf8).split(separator: "\n")
        .filter { $0.hasPrefix("step,") }.map { Double($0.split(separator: ",", omittingEmptySubsequences: false)[3])! }
}

func summary(_ folder: String) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: folder + "/summary.json"))) as! [String: Any]
}

/// A small LeNet-5 config on the first 4096 Fashion-MNIST images, one metrics row per step.
func smallConfig(batchNorm: Bool = false, syncBN: Bool = false, batch: Int = 64) throws -> String {
    var text = try String(contentsOfFile: packageRoot + (batchNorm ? "/configs/lenet5-bn.yaml" : "/configs/lenet5.yaml"), encoding: .utf8)
    text = text.replacingOccurrences(of: "  path: /usr/share/datasets/fashion-mnist", with: "  path: \(fashionMNIST)\n  train_limit: 4096\n  test_limit: 1000")
    text = text.replacingOccurrences(of: "  batch_size: 64\n", with: "  batch_size: \(batch)\n  log_every_steps: 1\n  max_steps: 12\n")
    text = text.replacingOccurrences(of: "parallel:\n  threads: auto\n", with: "")
    text += "parallel:\n  threads: 1\n  sync_bn: \(syncBN)\n"
    let path = temporaryFolder() + "/small.yaml"
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

@Suite(.serialized, .enabled(if: hasMPI && hasData, "needs .build/release/trainer (launch/test builds it), mpirun and Fashion-MNIST"))
struct MPITests {
    func compare(np: Int, batchNorm: Bool, syncBN: Bool) throws {
        let cfg = try smallConfig(batchNorm: batchNorm, syncBN: syncBN)
        let one = temporaryFolder(), many = temporaryFolder()
        let a = try run(trainerBinary, ["--config", cfg, "--out", one, "--quiet"])
        #expect(a.status == 0, "\(a.error)")
        let b = try mpirun(np, ["--config", cfg, "--out", many, "--quiet"])
        #expect(b.status == 0, "\(b.error)")
        let la = try stepLosses(one), lb = try stepLosses(many)
        #expect(la.count == 12 && lb.count == 12)
        for (x, y) in zip(la, lb) { #expect(abs(x - y) <= 2e-4 * abs(x), "np \(np): losses \(la) vs \(lb)") }
        let na = try summary(one)["param_norm"] as! Double, nb = try summary(many)["param_norm"] as! Double
        #expect(abs(na - nb) <= 1e-4 * na, "param_norm \(na) vs \(nb)")
        #expect(try summary(many)["world_size"] as? Int == np)
    }

    @Test(arguments: [2, 4]) func lenetRanksMatchOneProcess(np: Int) throws { try compare(np: np, batchNorm: false, syncBN: false) }
    @Test(arguments: [2, 4]) func batchNormWithSyncBNMatchesOneProcess(np: Int) throws { try compare(np: np, batchNorm: true, syncBN: true) }

    @Test func sameSeedTwiceIsBitIdentical() throws {
        let cfg = try smallConfig()
        let a = temporaryFolder(), b = temporaryFolder()
        for out in [a, b] { let r = try mpirun(2, ["--config", cfg, "--out", out, "--quiet"]); #expect(r.status == 0, "\(r.error)") }
        #expect(try stepLosses(a) == stepLosses(b))
        #expect(try summary(a)["param_norm"] as! Double == summary(b)["param_norm"] as! Double)
    }

    @Test func overlapAndAfterGiveTheSameSteps() throws {
        // Buckets summed through shared memory or allreduced by the sync thread while backward runs,
        // or the whole buffer after it: with 2 ranks each element is a + b every way, so the runs are
        // bit-identical.
        let cfg = try smallConfig()
        let after = temporaryFolder(), shared = temporaryFolder(), overMPI = temporaryFolder()
        let a = try mpirun(2, ["--config", cfg, "--out", after, "--quiet", "--gradient-sync", "after"])
        let b = try mpirun(2, ["--config", cfg, "--out", shared, "--quiet", "--gradient-sync", "overlap", "--bucket-kb", "16"])
        let c = try mpirun(2, ["--config", cfg, "--out", overMPI, "--quiet", "--gradient-sync", "overlap", "--bucket-kb", "16", "--transport", "mpi"])
        #expect(a.status == 0 && b.status == 0 && c.status == 0, "\(a.error)\(b.error)\(c.error)")
        #expect(try stepLosses(after) == stepLosses(shared))
        #expect(try stepLosses(after) == stepLosses(overMPI))
        #expect(try summary(after)["param_norm"] as! Double == summary(shared)["param_norm"] as! Double)
        #expect(try summary(after)["param_norm"] as! Double == summary(overMPI)["param_norm"] as! Double)
    }

    @Test func benchUnderMPIWritesTheJobAndEveryRank() throws {
        let json = temporaryFolder() + "/bench.json"
        let r = try mpirun(2, ["bench", "--config", try smallConfig(), "--synthetic", "--batch-size", "32", "--warmup", "1", "--steps", "3", "--json", json])
        #expect(r.status == 0, "\(r.error)")
        #expect(r.output.contains("per rank (ms per step): rank 0 forward"), "\(r.output)")
        #expect(r.output.contains("gradient sync (overlap through shared memory"), "\(r.output)")
        let o = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
        #expect(o["world_size"] as? Int == 2 && o["threads"] as? Int == 1 && o["batch_size"] as? Int == 32)
        #expect((o["images_per_second"] as? Double ?? 0) > 0)
        // The OpenBLAS kernels the ranks run (openblas_get_corename), in the JSON and the report.
        let core = try #require(o["blas_core"] as? String)
        #expect(!core.isEmpty && core != "unknown" && r.output.contains("BLAS: OpenBLAS, \(core) kernels"), "\(core): \(r.output)")
        let phases = ["data", "forward", "backward", "allreduce_wait", "optimizer"]
        let job = try #require(o["phases_ms"] as? [String: Double])
        #expect(Set(job.keys) == Set(phases))
        let ranks = try #require(o["ranks"] as? [[String: Any]])
        #expect(ranks.map { $0["rank"] as? Int } == [0, 1])
        for rank in ranks {
            let p = try #require(rank["phases_ms"] as? [String: Double])
            #expect(Set(p.keys) == Set(phases) && p["forward"]! > 0 && p["backward"]! > 0, "\(rank)")
        }
        // Rank 0's own phases are the job's.
        #expect(ranks[0]["phases_ms"] as? [String: Double] == job)
        #expect(o["transport"] as? String == "shared memory" && o["wait_for_slowest_rank_ms"] is Double)
    }

    @Test func interleavedBenchMeasuresTheJobBesideItsRanksApart() throws {
        let json = temporaryFolder() + "/bench.json"
        let r = try mpirun(2, ["bench", "--config", try smallConfig(), "--synthetic", "--batch-size", "32", "--warmup", "1", "--steps", "7", "--interleave", "3", "--dynamic", "--head", "0.5", "--chunk", "8", "--json", json])
        #expect(r.status == 0, "\(r.error)")
        #expect(r.output.contains("interleaved (3 blocks of 3 synced steps"), "\(r.output)")
        let o = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
        let i = try #require(o["interleaved"] as? [String: Any], "\(o)")
        #expect(i["blocks"] as? Int == 3 && i["steps_per_block"] as? Int == 3 && o["dynamic"] as? Bool == true)
        let job = try #require(o["images_per_second"] as? Double), synced = try #require(i["synced_images_per_second"] as? Double)
        let apart = try #require(i["apart_per_rank"] as? [Double]), steps = try #require(i["apart_steps"] as? [Int])
        #expect(synced == job && job > 0)
        // Each rank steps apart at least once per block, and the job's rate is the two ranks' sum's share.
        #expect(apart.count == 2 && apart.allSatisfy { $0 > 0 } && steps.count == 2 && steps.allSatisfy { $0 >= 3 }, "\(i)")
        let ratio = try #require(i["synced_over_apart"] as? Double)
        #expect(abs(ratio - job / apart.reduce(0, +)) < 1e-9 * ratio)
        // What cannot be interleaved: towers, and a batch the ranks cannot share evenly apart.
        for (args, fragment) in [(["--towers", "2"], "--interleave compares data-parallel replicas"),
                                 (["--batch-size", "33", "--balance"], "--batch-size must be a multiple of 2"),
                                 (["--interleave", "0"], "--interleave must be positive")] {
            let bad = try mpirun(2, ["bench", "--config", try smallConfig(), "--synthetic", "--batch-size", "32", "--steps", "2", "--interleave", "2"] + args, timeout: 30)
            #expect(bad.status != 0 && bad.seconds < 10, "\(args): status \(bad.status), \(bad.seconds) s")
            #expect((bad.error + bad.output).contains(fragment), "\(args): \(bad.error)")
        }
        // An option's error comes whole from every rank: each writes it at once, in one piece (in
        // pieces, two ranks' lines came out mixed in 3 of 6 runs).
        for _ in 0..<3 {
            let bad = try mpirun(2, ["bench", "--config", try smallConfig(), "--synthetic", "--steps", "2", "--interleave", "0"], timeout: 30)
            let whole = (bad.error + bad.output).split(separator: "\n").filter { $0 == "Error: --interleave must be positive, got 0" }
            #expect(bad.status != 0 && whole.count == 2, "\(bad.error)")
        }
    }

    @Test func benchTunesTheHeadsInItsWarmUp() throws {
        // --head auto: the tuning runs on after the warm-up until it ends, and the timed steps run
        // at its choice; JSON head_tuning holds every candidate's score and steps. Interleaved too
        // (the trainer apart has no heads to tune).
        let json = temporaryFolder() + "/bench.json"
        let r = try mpirun(2, ["bench", "--config", try smallConfig(), "--synthetic", "--batch-size", "32", "--warmup", "5", "--steps", "6", "--dynamic", "--head", "auto",
                               "--interleave", "3", "--json", json])
        #expect(r.status == 0, "\(r.error)")
        #expect(r.output.contains("parallel.head auto: heads of "), "\(r.output)")
        let o = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
        let t = try #require(o["head_tuning"] as? [String: Any], "\(o)")
        let candidates = try #require(t["candidates"] as? [Double]), scores = try #require(t["trimmed_mean_step_ms"] as? [Double])
        let chosen = try #require(t["chosen"] as? Double), steps = try #require(t["step_ms"] as? [[Double]])
        #expect(candidates == ParallelConfig.headCandidates && scores.count == candidates.count && scores.allSatisfy { $0 > 0 })
        #expect(candidates.contains(chosen) && o["head_fraction"] as? Double == chosen && o["interleaved"] is [String: Any])
        // 20 rounds of 5 steps each, unless 30 s passed first; the tuning started in the warm-up's second step.
        #expect(steps.allSatisfy { $0.count == steps[0].count && $0.count % 5 == 0 && $0.count >= 15 } && t["steps_measured"] as? Int == steps.count * steps[0].count)
        #expect(t["steps_after_warmup"] as? Int == steps.count * steps[0].count - 4, "\(t)")
        let bad = try mpirun(2, ["bench", "--config", try smallConfig(), "--synthetic", "--steps", "2", "--dynamic", "--head", "often"], timeout: 30)
        #expect(bad.status != 0 && (bad.error + bad.output).contains("--head must be a fraction in (0, 1] or auto, got often"), "\(bad.error)")
    }

    @Test func benchRunsKernelsWithAVX2WhereOpenBLASPickedOlderOnes() throws {
        // OpenBLAS 0.3.21 takes CPUs newer than it for a Prescott (SSE3); the trainer then starts
        // again with OPENBLAS_CORETYPE set to kernels the CPU runs. A user's OPENBLAS_CORETYPE stands.
        let withoutAVX2 = BLAS.withoutAVX2
        let json = temporaryFolder() + "/bench.json"
        let cpuHasAVX2 = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?.contains(" avx2 ") ?? false
        for user in [nil, "Prescott"] as [String?] {
            let r = try run("/usr/bin/env", ["-u", "OPENBLAS_CORETYPE"] + (user.map { ["OPENBLAS_CORETYPE=\($0)"] } ?? []) +
                            [trainerBinary, "bench", "--config", try smallConfig(), "--synthetic", "--threads", "1", "--warmup", "1", "--steps", "2", "--json", json])
            #expect(r.status == 0, "\(r.error)")
            let o = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
            let core = try #require(o["blas_core"] as? String), picked = try #require(o["blas_openblas_pick"] as? String)
            if let user {
                #expect(core == user && picked == user && r.output.contains("\(user) kernels (OPENBLAS_CORETYPE)"), "\(r.output)")
            } else if withoutAVX2.contains(picked.lowercased()) && cpuHasAVX2 {
                #expect(["SkylakeX", "Haswell"].contains(core) && r.output.contains("(set by Tandem: OpenBLAS picked \(picked)"), "\(core) \(picked): \(r.output)")
            } else {
                #expect(core == picked, "\(core) \(picked)")
            }
        }
    }

    /// One process, then `mpirun -np 2` with `options` and rank 1 sleeping `slowMicros` per sample
    /// after each backward (TestHooks): checks that both ran and trained the same 12 steps, and
    /// returns the 2-rank run's and the single process's summary.json.
    func slowRankRun(_ options: [String], slowMicros: Int) throws -> (many: [String: Any], one: [String: Any]) {
        let cfg = try smallConfig()
        let one = temporaryFolder(), many = temporaryFolder()
        let a = try run(trainerBinary, ["--config", cfg, "--out", one, "--quiet"])
        let b = try run("/usr/bin/env", ["TANDEM_TEST_SLOW_RANK=1", "TANDEM_TEST_SLOW_US=\(slowMicros)", mpirunPath!, "--allow-run-as-root", "--oversubscribe",
                                         "--bind-to", "none", "-x", "TANDEM_TEST_SLOW_RANK", "-x", "TANDEM_TEST_SLOW_US", "-np", "2", trainerBinary,
                                         "--config", cfg, "--out", many, "--quiet"] + options, timeout: 180)
        #expect(a.status == 0 && b.status == 0, "\(a.error)\(b.error)")
        let la = try stepLosses(one), lb = try stepLosses(many)
        #expect(la.count == 12 && lb.count == 12)
        for (x, y) in zip(la, lb) { #expect(abs(x - y) <= 2e-4 * abs(x), "losses \(la) vs \(lb)") }
        return (try summary(many), try summary(one))
    }

    @Test func balancedRanksMatchOneProcessAndTheSlowRankTakesLess() throws {
        // Rank 1 sleeps 300 us per sample after backward: with --balance rank 0 takes the larger
        // share, and the steps still train what one process trains.
        let r = try slowRankRun(["--balance"], slowMicros: 300)
        let shares = try #require(r.many["shares"] as? [Int])
        #expect(shares.count == 2 && shares[0] + shares[1] == 64 && shares[0] > shares[1], "shares \(shares)")
        #expect(r.one["shares"] == nil)
    }

    @Test func dynamicRanksMatchOneProcessAndTheSlowRankTakesLess() throws {
        // Rank 1 sleeps 1 ms per sample after each chunk (about ten times its compute): with
        // --dynamic rank 0 claims more of each batch from the shared pool, and the steps still train
        // what one process trains.
        let r = try slowRankRun(["--dynamic", "--chunk", "8"], slowMicros: 1000)
        let shares = try #require(r.many["shares"] as? [Int])
        #expect(shares.count == 2 && abs(shares[0] + shares[1] - 64) <= 1 && shares[0] > shares[1], "shares \(shares)")
    }

    @Test func worldSizeThatDoesNotFitEndsEveryRankWithOneLine() throws {
        let cfg = try smallConfig(batch: 30)
        let r = try mpirun(4, ["--config", cfg, "--out", temporaryFolder()], timeout: 60)
        #expect(r.status != 0)
        #expect(r.seconds < 30)
        let lines = r.error.split(separator: "\n").filter { $0.contains("not divisible by the 4 replicas") }
        #expect(lines.count >= 1, "\(r.error)")
        #expect(lines.allSatisfy { $0.hasPrefix("tandem: rank ") })
    }

    @Test func ranksWithDifferentConfigsStop() throws {
        let a = try smallConfig(), b = try smallConfig(batchNorm: true)
        let r = try run(mpirunPath!, ["--allow-run-as-root", "--oversubscribe", "-np", "1", trainerBinary, "--config", a, "--out", temporaryFolder(),
                                      ":", "-np", "1", trainerBinary, "--config", b, "--out", temporaryFolder()], timeout: 60)
        #expect(r.status != 0)
        #expect(r.error.contains("runs a different config than rank 0"), "\(r.error)")
    }
}

@Suite(.enabled(if: hasTrainer && hasData, "needs .build/release/trainer (launch/test builds it) and Fashion-MNIST"))
struct CommandLineTests {
    @Test func debugModeStopsAtTheFirstNaNLayer() throws {
        let r = try run(trainerBinary, ["debug", "--config", try smallConfig(batchNorm: true), "--lr", "1e30", "--skip-check", "--steps", "6"], timeout: 60)
        #expect(r.status == 1)
        #expect(r.error.contains("NaN/Inf"), "\(r.error)")
        #expect(r.error.contains("layer '"), "\(r.error)")
        #expect(r.error.split(separator: "\n").count == 1)
    }

    @Test func trainingStopsAtNaNNamingStepAndLayer() throws {
        let out = temporaryFolder()
        let r = try run(trainerBinary, ["--config", try smallConfig(), "--lr", "1e4", "--out", out, "--quiet"], timeout: 60)
        #expect(r.status == 1)
        #expect(r.error.contains("step ") && r.error.contains("NaN or Inf") && r.error.contains("layer '"), "\(r.error)")
        #expect(r.error.split(separator: "\n").count == 1)
        // Nothing was checkpointed from poisoned weights.
        let files = try FileManager.default.contentsOfDirectory(atPath: out)
        #expect(!files.contains { $0.hasSuffix(".tandem") }, "\(files)")
    }

    @Test func debugModeChecksGradientsAndPrintsTheModel() throws {
        let r = try run(trainerBinary, ["debug", "--steps", "1"], timeout: 120)
        #expect(r.status == 0, "\(r.error)")
        #expect(r.output.contains("61,932 parameters"))
        #expect(r.output.contains("conv1.weight") && !r.output.contains("FAIL"))
        #expect(r.output.contains("debug: OK"))
    }

    @Test func badInputIsOneLineAndNonZero() throws {
        let cases: [([String], String)] = [
            (["--data", "/no/such/folder"], "/no/such/folder"),
            (["--config", "/no/such.yaml"], "/no/such.yaml: config file does not exist"),
            (["--config", try smallConfig(batchNorm: false), "--batch-size", "0"], "--batch-size must be positive"),
        ]
        for (args, fragment) in cases {
            let r = try run(trainerBinary, args + ["--out", temporaryFolder()], timeout: 30)
            #expect(r.status != 0)
            #expect(r.error.contains(fragment), "\(args): \(r.error)")
        }
    }

    @Test func trainWritesItsOutputs() throws {
        let out = temporaryFolder()
        let extra = out + "/extra.json"
        let r = try run(trainerBinary, ["--config", try smallConfig(), "--out", out, "--summary-json", extra], timeout: 60)
        #expect(r.status == 0, "\(r.error)")
        #expect(r.output.contains("test accuracy"))
        let s = try summary(out)
        for key in ["test_accuracy", "test_loss", "final_train_loss", "epochs", "steps", "images_per_second", "wall_seconds", "world_size", "param_norm"] {
            #expect(s[key] != nil, "summary.json lacks \(key)")
        }
        #expect(FileManager.default.fileExists(atPath: extra))
        let svg = try String(contentsOfFile: out + "/curves.svg", encoding: .utf8)
        #expect(svg.hasPrefix("<svg") && svg.contains("polyline"))
    }
}

/// The small AlexNet of TowerTests on Fashion-MNIST, one metrics row per step.
func smallAlexConfig() throws -> String {
    var text = smallAlexYAML.replacingOccurrences(of: "train: {batch_size: 16, seed: 5}",
                                                   with: "train: {batch_size: 16, seed: 5, max_steps: 8, log_every_steps: 1}")
    text += "\ndata: {path: \(fashionMNIST), train_limit: 2048, test_limit: 500}\n"
    let path = temporaryFolder() + "/alex.yaml"
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

@Suite(.serialized, .enabled(if: hasMPI && hasData, "needs .build/release/trainer (launch/test builds it), mpirun and Fashion-MNIST"))
struct MPITowerTests {
    @Test(arguments: [2, 4])
    func towersUnderMPIMatchTheUnsplitModel(np: Int) throws {
        let cfg = try smallAlexConfig()
        let one = temporaryFolder(), split = temporaryFolder()
        let a = try run(trainerBinary, ["--config", cfg, "--out", one, "--quiet"])
        #expect(a.status == 0, "\(a.error)")
        let b = try mpirun(np, ["--config", cfg, "--out", split, "--quiet"])
        #expect(b.status == 0, "\(b.error)")
        let la = try stepLosses(one), lb = try stepLosses(split)
        #expect(la.count == 8 && lb.count == 8)
        for (x, y) in zip(la, lb) { #expect(abs(x - y) <= 1e-4 * abs(x), "np \(np): losses \(la) vs \(lb)") }
        let na = try summary(one)["param_norm"] as! Double, nb = try summary(split)["param_norm"] as! Double
        #expect(abs(na - nb) <= 1e-5 * na, "param_norm \(na) vs \(nb)")
    }

    @Test func debugTableShowsWhereTowersTalk() throws {
        let r = try run(trainerBinary, ["debug", "--config", try smallAlexConfig(), "--steps", "1", "--skip-check"], timeout: 60)
        #expect(r.status == 0, "\(r.error)")
        let talking = r.output.split(separator: "\n").filter { $0.contains("  all: ") }.map { String($0.split(separator: " ")[0]) }
        #expect(talking == ["conv3", "fc5", "fc6"], "\(r.output)")
        #expect(r.output.contains("tower traffic per rank and step"))
    }

    @Test func worldSizeThatDoesNotFitTheTowers() throws {
        let r = try mpirun(3, ["--config", try smallAlexConfig(), "--out", temporaryFolder()], timeout: 60)
        #expect(r.status != 0)
        #expect(r.error.contains("world size 3 does not fit parallel.towers 2"), "\(r.error)")
    }
}
