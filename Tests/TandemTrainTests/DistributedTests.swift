// Data parallelism proven in-process: N ranks as threads (ThreadCommunicator) train exactly what
// one process trains on the same global batch. The tests under mpirun (MPITests) do the same with
// real processes.
import Foundation
import Testing
import TandemComm
import TandemCore
import TandemData
@testable import TandemTrain

let lenetYAML = """
model:
  init: pytorch
  layers:
    - {name: conv1, type: conv, out: 6, kernel: 5, pad: 2}
    - {name: relu1, type: relu}
    - {name: pool1, type: maxpool, kernel: 2}
    - {name: conv2, type: conv, out: 16, kernel: 5}
    - {name: relu2, type: relu}
    - {name: pool2, type: maxpool, kernel: 2}
    - {name: flatten, type: flatten}
    - {name: fc1, type: linear, out: 120}
    - {name: relu3, type: relu}
    - {name: drop, type: dropout, rate: 0.3}
    - {name: fc2, type: linear, out: 10}
train: {batch_size: 32, seed: 3}
optimizer: {lr: 0.05, momentum: 0.9}
"""

let syntheticData: @Sendable () throws -> DataPipeline = {
    try DataPipeline.synthetic(shape: Shape(1, 28, 28), classes: 10, train: 512, test: 64, seed: 11)
}

/// ||a - b|| / ||a||: float rounding differs with the number of ranks (sums in another order) and
/// is amplified by ReLU and max-pool switches over a few steps, so single elements near zero can
/// differ by more than their size while the parameters as a whole agree to 1e-5 or so.
func relativeDifference(_ a: [Float], _ b: [Float]) -> Double {
    var d = 0.0, n = 0.0
    for i in a.indices { let x = Double(a[i]), y = Double(b[i]); d += (x - y) * (x - y); n += x * x }
    return (d / max(n, 1e-30)).squareRoot()
}

@Suite struct DistributedTests {
    @Test(arguments: [2, 4])
    func replicasMatchOneProcess(ranks: Int) throws {
        let c = try config(lenetYAML)
        let one = try trainInProcess(c, ranks: 1, steps: 8, data: syntheticData)
        let many = try trainInProcess(c, ranks: ranks, steps: 8, data: syntheticData)
        #expect(one.losses.count == 8 && many.losses.count == 8)
        for (a, b) in zip(one.losses, many.losses) { #expect(abs(a - b) <= 1e-4 * abs(a), "losses \(one.losses) vs \(many.losses)") }
        #expect(relativeDifference(one.parameters, many.parameters) < 1e-4)
    }

    // The shared-memory allreduce sums each slice in rank order 0, 1, 2, ..., as ThreadCommunicator
    // does: the same steps bit for bit as the communicator's allreduce (3 ranks: uneven slices).
    @Test(arguments: [2, 3, 4])
    func sharedMemoryMatchesTheCommunicatorBitForBit(ranks: Int) throws {
        var c = try config(lenetYAML)
        c.batchSize = 48
        nonisolated(unsafe) var used = ""
        let shared = try trainInProcess(c, ranks: ranks, steps: 5, transport: .auto, transportUsed: { used = $0 }, data: syntheticData)
        #expect(used == "shared memory")
        let viaComm = try trainInProcess(c, ranks: ranks, steps: 5, transport: .mpi, transportUsed: { used = $0 }, data: syntheticData)
        #expect(used == "MPI")
        #expect(shared.losses == viaComm.losses)
        #expect(shared.parameters == viaComm.parameters)
    }

    // The sharded update (one copy of the parameters and velocity in shared memory, each rank
    // updating its slices): the same steps bit for bit as every rank updating its own copy, the
    // velocity included: 2 and 3 replicas (3: uneven slices), 2 threads per rank, and 2 replicas of
    // 2 towers (each tower's replicas share their own copy).
    struct ShardedCase: Sendable, CustomStringConvertible {
        let yaml: String, ranks: Int, threads: Int
        var description: String { "\(ranks) ranks, \(threads) thread(s)\(yaml == smallAlexYAML ? ", 2 towers" : "")" }
    }
    @Test(arguments: [ShardedCase(yaml: lenetYAML, ranks: 2, threads: 1), ShardedCase(yaml: lenetYAML, ranks: 3, threads: 1),
                      ShardedCase(yaml: lenetYAML, ranks: 2, threads: 2), ShardedCase(yaml: smallAlexYAML, ranks: 4, threads: 1)])
    func shardedUpdateMatchesReplicatedBitForBit(setup: ShardedCase) throws {
        var c = try config(setup.yaml)
        c.batchSize = 48
        c.sgd = SGDSettings(momentum: 0.9, nesterov: true, weightDecay: 0.01, l1: 0.001)
        final class Box: @unchecked Sendable { var velocity: [[Float]] = [[], []]; var sharded: [Bool] = [false, false] }
        let box = Box()
        func run(_ sharded: Bool) throws -> (losses: [Double], parameters: [Float]) {
            try trainInProcess(c, ranks: setup.ranks, steps: 5, threads: setup.threads, sharded: sharded, finished: { t in
                let v = try! t.wholeModel(t.sgd.velocity, tensors: \.parameters)
                if t.comm.rank == 0 { box.velocity[sharded ? 0 : 1] = v; box.sharded[sharded ? 0 : 1] = t.sync.updatesParameters }
            }, data: syntheticData)
        }
        let sharded = try run(true), replicated = try run(false)
        #expect(box.sharded == [true, false])
        #expect(sharded.losses == replicated.losses)
        #expect(sharded.parameters == replicated.parameters)
        #expect(box.velocity[0] == box.velocity[1] && box.velocity[0].contains { $0 != 0 })
    }

    // A NaN in one rank's gradients only (its loss gradient scaled by NaN, its loss finite): every
    // rank stops at that step naming the same tensor (none hangs), with the update sharded (where
    // each rank holds only its slices' sums) or not.
    @Test(arguments: [true, false])
    func aNaNGradientOnOneRankStopsEveryRank(sharded: Bool) throws {
        let errors = try poisonedRun(sharded: sharded) { t in t.hooks.poisonRank = 1; t.hooks.poisonStep = 2 }
        // Both name the step and tensor; the poisoned rank also says where its own activations went bad.
        for e in errors { #expect(e.hasPrefix("step 2: the gradient of 'conv1.weight' holds NaN or Inf;"), "\(errors)") }
        #expect(errors[1].contains("the activations first went bad in the gradient of layer 'fc2''s output"), "\(errors[1])")
    }

    // One NaN in rank 1's gradient, in its own slice of the last bucket (the model's last value, fc2's
    // bias): with the sharded update only rank 1 holds that sum, and rank 0 learns of it through the
    // loss allreduce; both stop naming fc2.bias.
    @Test(arguments: [true, false])
    func aNaNInOneRanksOwnSliceStopsEveryRank(sharded: Bool) throws {
        final class Keep: @unchecked Sendable { var poison: PoisonLastGradient? }
        let keep = Keep()
        let errors = try poisonedRun(sharded: sharded) { t in
            guard t.comm.rank == 1 else { return }
            let p = PoisonLastGradient(t, step: 2)
            keep.poison = p
            t.net.observer = p
        }
        for e in errors { #expect(e.hasPrefix("step 2: the gradient of 'fc2.bias' holds NaN or Inf"), "\(errors)") }
    }

    // Two towers (one replica): a NaN in the last gradient of tower 1 only, which tower 0 never sees
    // (towers hold different slices of the model): both stop at that step naming tower 1's tensor.
    @Test func aNaNInOneTowersGradientStopsEveryTower() throws {
        var base = try config(smallAlexYAML)
        base.parallel.threads = 1
        let c = base
        final class Box: @unchecked Sendable { var errors = ["", ""]; var name = ""; var poison: PoisonLastGradient? }
        let box = Box()
        try ThreadCommunicator.run(size: 2) { comm in
            let t = try Trainer(config: c, comm: comm, data: try syntheticData(), options: RunOptions())
            if comm.rank == 1 {
                box.name = t.graph.parameters.max { $0.offset < $1.offset }!.name
                let p = PoisonLastGradient(t, step: 2)
                box.poison = p
                t.net.observer = p
            }
            t.data.shuffle(epoch: 0, seed: c.seed)
            do {
                for s in 0..<4 { _ = try t.step(epoch: 0, start: s * c.batchSize, globalCount: c.batchSize, step: s, lr: c.lr) }
            } catch { box.errors[comm.rank] = "\(error)" }
        }
        for e in box.errors { #expect(e.hasPrefix("step 2: the gradient of '\(box.name)' (tower 1) holds NaN or Inf"), "\(box.errors)") }
    }

    /// Four steps of the LeNet on 2 in-process ranks, `prepare` setting each rank up; each rank's
    /// error ("" if none).
    private func poisonedRun(sharded: Bool, prepare: @escaping (Trainer) -> Void) throws -> [String] {
        let c = try config(lenetYAML)
        final class Box: @unchecked Sendable { var errors = ["", ""] }
        let box = Box()
        nonisolated(unsafe) let prepare = prepare
        try ThreadCommunicator.run(size: 2) { comm in
            var o = RunOptions()
            o.quiet = true
            o.bucketKB = 16
            o.shardedUpdate = sharded
            let t = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
            #expect(t.sync.updatesParameters == sharded)
            prepare(t)
            t.data.shuffle(epoch: 0, seed: c.seed)
            do {
                for s in 0..<4 { _ = try t.step(epoch: 0, start: s * c.batchSize, globalCount: c.batchSize, step: s, lr: c.lr) }
            } catch { box.errors[comm.rank] = "\(error)" }
        }
        return box.errors
    }

    // The per-step loss sum through shared memory: exact sums, the same bits on every rank (summed
    // in rank order), call after call with its two buffers in turn, a slow rank now and then, and
    // counts from 1 to the capacity.
    @Test func sharedMemoryScalarSumsAreExactCallAfterCall() throws {
        final class Box: @unchecked Sendable { var results: [[Double]] = [[], [], []] }
        let box = Box()
        try ThreadCommunicator.run(size: 3) { comm in
            let own = UnsafeMutablePointer<Float>.allocate(capacity: 16)
            defer { own.deallocate() }
            guard case .success(let engine) = try SharedMemoryReduce.make(comm: comm, count: 16, buckets: [0..<16], buffer: own, scalars: 7) else {
                Issue.record("no shared memory"); return
            }
            #expect(engine.scalarCapacity == 7)
            var values = [Double](repeating: 0, count: 7)
            var seen: [Double] = []
            for call in 0..<200 {
                let count = 1 + call % 7
                for i in 0..<count { values[i] = Double(comm.rank + 1) * 0.1 + Double(call * 10 + i) }
                if comm.rank == call % 3 && call % 5 == 0 { usleep(500) }
                values.withUnsafeMutableBufferPointer { engine.sumScalars($0.baseAddress!, count: count) }
                for i in 0..<count {
                    // 0.1 + 0.2 + 0.3 in rank order, plus three times the call's part.
                    let expected = ((0.1 + Double(call * 10 + i)) + (0.2 + Double(call * 10 + i))) + (0.30000000000000004 + Double(call * 10 + i))
                    if values[i] != expected { Issue.record("call \(call), rank \(comm.rank), value \(i): \(values[i]) != \(expected)") }
                }
                seen += values[0..<count]
            }
            box.results[comm.rank] = seen
        }
        #expect(box.results[0] == box.results[1] && box.results[1] == box.results[2] && box.results[0].count > 0)
    }

    @Test func ranksWithDifferentSyncOptionsAreRefused() throws {
        let c = try config(lenetYAML)
        #expect {
            try ThreadCommunicator.run(size: 2) { comm in
                var o = RunOptions()
                o.quiet = true
                o.bucketKB = comm.rank == 0 ? 16 : 32
                _ = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
            }
        } throws: { error in
            "\(error)".contains("gradient sync: ranks were started with different options: rank 1 has --gradient-sync overlap --bucket-kb 32 --transport auto --update sharded, rank 0 --gradient-sync overlap --bucket-kb 16")
        }
        #expect {
            try ThreadCommunicator.run(size: 2) { comm in
                var o = RunOptions()
                o.quiet = true
                o.shardedUpdate = comm.rank == 0
                _ = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
            }
        } throws: { error in
            "\(error)".contains("--transport auto --update replicated, rank 0 --gradient-sync overlap --bucket-kb 64 --transport auto --update sharded; every rank needs the same")
        }
    }

    @Test func syncBatchNormMatchesOneProcess() throws {
        var c = try config(lenetYAML.replacingOccurrences(of: "    - {name: relu1, type: relu}", with: "    - {name: bn1, type: batchnorm}\n    - {name: relu1, type: relu}"))
        c.parallel.syncBN = true
        let one = try trainInProcess(c, ranks: 1, steps: 6, data: syntheticData)
        let two = try trainInProcess(c, ranks: 2, steps: 6, data: syntheticData)
        for (a, b) in zip(one.losses, two.losses) { #expect(abs(a - b) <= 1e-5 * abs(a), "losses \(one.losses) vs \(two.losses)") }
        // Parameters after two steps differ only by rounding (measured 1e-8). Later, a ReLU just after
        // batch norm flipping on a rounding difference moves a few weights by 1e-4 (random labels, lr 0.05).
        let oneEarly = try trainInProcess(c, ranks: 1, steps: 2, data: syntheticData)
        let twoEarly = try trainInProcess(c, ranks: 2, steps: 2, data: syntheticData)
        #expect(relativeDifference(oneEarly.parameters, twoEarly.parameters) < 1e-6)
        #expect(relativeDifference(one.parameters, two.parameters) < 1e-3)
    }

    @Test func sameSeedSameWorldIsBitIdentical() throws {
        let c = try config(lenetYAML)
        let a = try trainInProcess(c, ranks: 2, steps: 5, data: syntheticData)
        let b = try trainInProcess(c, ranks: 2, steps: 5, data: syntheticData)
        #expect(a.losses == b.losses)
        #expect(a.parameters == b.parameters)
    }

    @Test func batchNotDivisibleByReplicasIsAnError() throws {
        var c = try config(lenetYAML)
        c.batchSize = 30
        #expect(throws: ConfigError.self) {
            _ = try trainInProcess(c, ranks: 4, steps: 1, data: syntheticData)
        }
    }

    @Test func partialLastBatchIsSharedByEveryRank() throws {
        // 512 samples, batch 96: the sixth global batch has 32 samples; with 4 ranks each takes 8,
        // and a batch smaller than the ranks still enters every collective.
        var base = try config(lenetYAML)
        base.batchSize = 96
        base.epochs = 1
        let c = base
        let out = temporaryFolder()
        try ThreadCommunicator.run(size: 4) { comm in
            var o = RunOptions(); o.quiet = true; o.outDir = out
            var cc = c; cc.parallel.threads = 1
            let t = try Trainer(config: cc, comm: comm, data: try syntheticData(), options: o)
            #expect(t.share(of: 3).count <= 1)
            let s = try t.run()
            #expect(s.steps == 6)
        }
        let summary = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/summary.json"))) as! [String: Any]
        #expect(summary["world_size"] as? Int == 4)
        #expect(FileManager.default.fileExists(atPath: out + "/curves.svg"))
        let csv = try String(contentsOfFile: out + "/metrics.csv", encoding: .utf8)
        #expect(csv.hasPrefix("kind,epoch,step,train_loss"))
        #expect(csv.contains("\neval,1.0000,6,"))
    }

    @Test func differentConfigsOnRanksAreRefused() throws {
        let c = try config(lenetYAML)
        final class Caught: @unchecked Sendable { var messages: [String] = []; let lock = NSLock() }
        let caught = Caught()
        _ = try? ThreadCommunicator.run(size: 2) { comm in
            var cc = c
            if comm.rank == 1 { cc.text += "\n# edited" }
            cc.parallel.threads = 1
            do { _ = try Trainer(config: cc, comm: comm, data: try syntheticData(), options: RunOptions()) } catch {
                caught.lock.lock(); caught.messages.append(String(describing: error)); caught.lock.unlock()
            }
        }
        #expect(caught.messages.count == 2)
        #expect(caught.messages.allSatisfy { $0.contains("rank 1 runs a different config") })
    }
}

@Suite struct DataPipelineTests {
    @Test func shardsOfEveryRankMakeTheGlobalBatch() throws {
        let d = try syntheticData()
        d.shuffle(epoch: 2, seed: 5)
        let all = UnsafeMutablePointer<Float>.allocate(capacity: 40 * 784), labels = UnsafeMutablePointer<Int32>.allocate(capacity: 40)
        defer { all.deallocate(); labels.deallocate() }
        d.loadTrain(100..<140, epoch: 2, seed: 5, input: all, labels: labels)
        let part = UnsafeMutablePointer<Float>.allocate(capacity: 40 * 784), pl = UnsafeMutablePointer<Int32>.allocate(capacity: 40)
        defer { part.deallocate(); pl.deallocate() }
        for r in 0..<4 {
            let lo = 40 * r / 4, hi = 40 * (r + 1) / 4
            d.loadTrain((100 + lo)..<(100 + hi), epoch: 2, seed: 5, input: part, labels: pl)
            for i in 0..<((hi - lo) * 784) { #expect(part[i] == all[lo * 784 + i]) }
            for i in 0..<(hi - lo) { #expect(pl[i] == labels[lo + i]) }
        }
    }

    @Test func shuffleIsSeededAndAPermutation() throws {
        let a = try syntheticData(), b = try syntheticData()
        a.shuffle(epoch: 1, seed: 9); b.shuffle(epoch: 1, seed: 9)
        #expect(a.order == b.order)
        #expect(Set(a.order).count == a.train.count)
        b.shuffle(epoch: 2, seed: 9)
        #expect(a.order != b.order)
    }

    @Test func normalisationAndAugmentation() throws {
        // One 1x4x4 image with pixels 0...15 * 17; mean 0, std 1 so values are byte/255.
        let img = ImageSetFixture.gradient()
        var c = DataConfig(); c.mean = [0]; c.std = [1]
        let plain = try DataPipeline(train: img, test: img, config: c)
        let x = UnsafeMutablePointer<Float>.allocate(capacity: 16), l = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        defer { x.deallocate(); l.deallocate() }
        plain.loadTest(0..<1, input: x, labels: l)
        for i in 0..<16 { #expect(abs(x[i] - Float(i * 17) / 255) < 1e-6) }
        c.flip = true; c.cropPadding = 1
        let aug = try DataPipeline(train: img, test: img, config: c)
        var seen = Set<[Float]>()
        for epoch in 0..<40 {
            aug.loadTrain(0..<1, epoch: epoch, seed: 1, input: x, labels: l)
            let v = Array(UnsafeBufferPointer(start: x, count: 16))
            // Every augmented image is the original shifted by at most one pixel, maybe mirrored.
            #expect(v.allSatisfy { $0 >= 0 && $0 <= 1 })
            seen.insert(v)
        }
        #expect(seen.count > 4)
        let mean = DataPipeline.statistics(img)
        #expect(abs(mean.0[0] - Double(7.5 * 17) / 255) < 1e-9)
    }
}

enum ImageSetFixture {
    static func gradient() -> ImageSet {
        ImageSet(count: 1, channels: 1, height: 4, width: 4, classes: 10, pixels: (0..<16).map { UInt8($0 * 17) }, labels: [3])
    }
}

/// Stands between a trainer's network and its gradient sync: at step `step` it makes the last value
/// of the rank's gradient buffer NaN just before backward posts it.
final class PoisonLastGradient: GradientObserver {
    let inner: GradientObserver
    let gradients: UnsafeMutableBufferPointer<Float>
    unowned let trainer: Trainer
    let step: Int
    init(_ trainer: Trainer, step: Int) {
        inner = trainer.sync; gradients = trainer.net.gradients; self.trainer = trainer; self.step = step
    }
    func gradientsReady(from offset: Int) {
        if trainer.currentStep == step { gradients[gradients.count - 1] = .nan }
        inner.gradientsReady(from: offset)
    }
    func layerBackwardDone() { inner.layerBackwardDone() }
    func willWriteGradients() { inner.willWriteGradients() }
}
