// Checkpoints, resume and safetensors through the release trainer, as a user runs them: stop
// with --max-steps, resume with --resume auto (one process and under mpirun), resume a 2-rank
// checkpoint on one process, export, and --init-weights in train, debug and bench.
import Foundation
import Testing
@testable import TandemTrain

/// LeNet-5-BN on 512 Fashion-MNIST images with augmentation, 8 steps per epoch, 16 in the run,
/// warm-up and cosine schedule, sync_bn (so 1 and 2 processes train the same model).
func resumeConfig() throws -> String {
    let shipped = try String(contentsOfFile: packageRoot + "/configs/lenet5-bn.yaml", encoding: .utf8)
    let model = shipped[..<shipped.range(of: "data:")!.lowerBound]
    let text = String(model) + """
    data:
      path: \(fashionMNIST)
      train_limit: 512
      test_limit: 200
      crop_padding: 2
      flip: true
    train:
      epochs: 2
      batch_size: 64
      seed: 1
      log_every_steps: 1
      eval_every_epochs: 0.5
    optimizer:
      lr: 0.05
      momentum: 0.9
      weight_decay: 0.0005
      schedule: {type: cosine, min_lr: 0.0005, warmup_epochs: 0.25}
    parallel:
      threads: 1
      sync_bn: true

    """
    let path = temporaryFolder() + "/resume.yaml"
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

func finalCheckpoint(_ folder: String, step: Int = 16) throws -> Checkpoint {
    try Checkpoint.read(path: folder + "/" + Checkpoint.fileName(step: step))
}

@Suite(.serialized, .enabled(if: hasTrainer && hasData, "needs .build/release/trainer (launch/test builds it) and Fashion-MNIST"))
struct ResumeProcessTests {
    @Test func stoppedAndResumedTrainerIsBitIdentical() throws {
        let cfg = try resumeConfig()
        let whole = temporaryFolder(), parts = temporaryFolder()
        let a = try run(trainerBinary, ["--config", cfg, "--out", whole, "--quiet"])
        #expect(a.status == 0, "\(a.error)")
        let b = try run(trainerBinary, ["--config", cfg, "--out", parts, "--quiet", "--max-steps", "5"])
        #expect(b.status == 0, "\(b.error)")
        #expect(FileManager.default.fileExists(atPath: parts + "/" + Checkpoint.fileName(step: 5)))
        let c = try run(trainerBinary, ["--config", cfg, "--out", parts, "--resume", "auto"])
        #expect(c.status == 0, "\(c.error)")
        #expect(c.output.contains("resuming from \(parts)/ckpt-step-000005.tandem at step 5"), "\(c.output)")
        let x = try finalCheckpoint(whole), y = try finalCheckpoint(parts)
        #expect(x.parameters == y.parameters, "parameters differ")
        #expect(x.velocity == y.velocity && x.statistics == y.statistics)
        #expect(try summary(whole)["param_norm"] as! Double == summary(parts)["param_norm"] as! Double)
        #expect(try stepLosses(parts) == stepLosses(whole))
    }

    @Test(.enabled(if: hasMPI, "needs mpirun"))
    func underMPIResumeIsBitIdenticalAndAnotherLayoutIsClose() throws {
        let cfg = try resumeConfig()
        let whole = temporaryFolder(), parts = temporaryFolder(), single = temporaryFolder()
        let a = try mpirun(2, ["--config", cfg, "--out", whole, "--quiet"])
        #expect(a.status == 0, "\(a.error)")
        let b = try mpirun(2, ["--config", cfg, "--out", parts, "--quiet", "--max-steps", "11"])
        #expect(b.status == 0, "\(b.error)")
        let c = try mpirun(2, ["--config", cfg, "--out", parts, "--quiet", "--resume", "auto"])
        #expect(c.status == 0, "\(c.error)")
        #expect(try finalCheckpoint(whole).parameters == finalCheckpoint(parts).parameters)
        // Written by 2 ranks, resumed by one process: the same model within float rounding.
        let d = try run(trainerBinary, ["--config", cfg, "--out", single, "--resume", parts + "/" + Checkpoint.fileName(step: 11)])
        #expect(d.status == 0, "\(d.error)")
        #expect(d.output.contains("not bit for bit"), "\(d.output)")
        let w = try finalCheckpoint(whole).parameters, s = try finalCheckpoint(single).parameters
        #expect(relativeDifference(w, s) < 1e-4)
    }

    @Test func exportThenInitWeightsInTrainDebugAndBench() throws {
        let cfg = try resumeConfig()
        let out = temporaryFolder()
        let a = try run(trainerBinary, ["--config", cfg, "--out", out, "--quiet", "--max-steps", "3"])
        #expect(a.status == 0, "\(a.error)")
        let ckpt = out + "/" + Checkpoint.fileName(step: 3)
        let weights = out + "/w.safetensors"
        let e = try run(trainerBinary, ["export", "--checkpoint", ckpt, "--out", weights])
        #expect(e.status == 0, "\(e.error)")
        #expect(e.output.contains("22 tensors"), "\(e.output)")
        let file = try SafetensorsFile.read(path: weights)
        let c = try Checkpoint.read(path: ckpt)
        #expect(file.floats("conv1.weight") == Array(c.parameters[0..<150]))
        #expect(file.entries["bn4.running_var"]?.shape == [84])

        let t = try run(trainerBinary, ["--config", cfg, "--out", temporaryFolder(), "--quiet", "--max-steps", "1", "--init-weights", weights])
        #expect(t.status == 0, "\(t.error)")
        let d = try run(trainerBinary, ["debug", "--config", cfg, "--init-weights", weights, "--skip-check", "--steps", "1"])
        #expect(d.status == 0, "\(d.error)")
        let b = try run(trainerBinary, ["bench", "--config", cfg, "--init-weights", weights, "--synthetic", "--warmup", "0", "--steps", "2"])
        #expect(b.status == 0, "\(b.error)")

        let cases: [([String], String)] = [
            (["--config", cfg, "--init-weights", "/no/such.safetensors"], "/no/such.safetensors: no such safetensors file"),
            (["debug", "--config", cfg, "--init-weights", ckpt], "header length says"),
            (["export", "--checkpoint", ckpt, "--out", out + "/p.safetensors", "--names", "peers"], "--names peers"),
            (["export", "--checkpoint", weights, "--out", out + "/q.safetensors"], "not a Tandem checkpoint"),
            (["export", "--checkpoint", ckpt, "--out", out + "/r.safetensors", "--config", packageRoot + "/configs/lenet5.yaml"], "parameters"),
        ]
        for (args, fragment) in cases {
            let r = try run(trainerBinary, args + (args.first == "export" || args.first == "debug" ? [] : ["--out", temporaryFolder()]))
            #expect(r.status == 1, "\(args)")
            #expect(r.error.contains(fragment), "\(args): \(r.error)")
            #expect(r.error.split(separator: "\n").count == 1, "\(args): \(r.error)")
        }
    }

    @Test func unusableCheckpointsAreOneLineErrorsOrSkipped() throws {
        let cfg = try resumeConfig()
        let out = temporaryFolder()
        let a = try run(trainerBinary, ["--config", cfg, "--out", out, "--quiet", "--max-steps", "12"])
        #expect(a.status == 0, "\(a.error)")
        // Checkpoints at the epoch (8) and at the stop (12).
        #expect(Checkpoint.list(in: out).map(\.step) == [8, 12])
        let newest = out + "/" + Checkpoint.fileName(step: 12)
        try flipBit(newest, at: 1000)
        let r = try run(trainerBinary, ["--config", cfg, "--out", temporaryFolder(), "--resume", newest])
        #expect(r.status == 1)
        #expect(r.error.contains(newest) && r.error.contains("checksum mismatch"), "\(r.error)")
        #expect(r.error.split(separator: "\n").count == 1, "\(r.error)")
        let other = try run(trainerBinary, ["--config", cfg, "--out", temporaryFolder(), "--resume", out + "/" + Checkpoint.fileName(step: 8), "--lr", "0.1"])
        #expect(other.status == 1)
        #expect(other.error.contains("was written by a different config (hash"), "\(other.error)")
        // auto: says why the newest is skipped and resumes from the previous one.
        let s = try run(trainerBinary, ["--config", cfg, "--out", out, "--resume", "auto"])
        #expect(s.status == 0, "\(s.error)")
        #expect(s.error.contains("checksum mismatch") && s.error.contains("trying the previous checkpoint"), "\(s.error)")
        #expect(s.output.contains("at step 8"), "\(s.output)")
    }
}
