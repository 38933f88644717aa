// Model parallelism: a model split into towers (ranks as threads here, processes in MPITests)
// computes what the unsplit model computes, and towers talk only at the all-tower layers.
import Foundation
import Testing
import TandemComm
import TandemCore
@testable import TandemTrain

/// A small AlexNet: LRN, overlapping pooling, grouped convolutions, dropout, two towers.
let smallAlexYAML = """
model:
  layers:
    - {name: conv1, type: conv, out: 8, kernel: 5, pad: 2}
    - {name: relu1, type: relu}
    - {name: lrn1, type: lrn, size: 5, alpha: 0.001, beta: 0.75, k: 2}
    - {name: pool1, type: maxpool, kernel: 3, stride: 2, pad: 1}
    - {name: conv2, type: conv, out: 8, kernel: 3, pad: 1, groups: 2, towers: own}
    - {name: relu2, type: relu}
    - {name: pool2, type: maxpool, kernel: 3, stride: 2, pad: 1}
    - {name: conv3, type: conv, out: 12, kernel: 3, pad: 1, towers: all}
    - {name: relu3, type: relu}
    - {name: conv4, type: conv, out: 8, kernel: 3, pad: 1, groups: 2, towers: own}
    - {name: relu4, type: relu}
    - {name: pool4, type: maxpool, kernel: 3, stride: 2, pad: 1}
    - {name: flatten, type: flatten}
    - {name: fc5, type: linear, out: 32, towers: all}
    - {name: relu5, type: relu}
    - {name: drop5, type: dropout, rate: 0.5}
    - {name: fc6, type: linear, out: 10, towers: all}
train: {batch_size: 16, seed: 5}
optimizer: {lr: 0.02, momentum: 0.9}
parallel: {towers: 2}
"""

/// Four towers and an odd mix: batch norm per tower, an all-tower layer right after pooling,
/// average pooling, leaky ReLU, and 10 logits that four towers split unevenly (3, 2, 3, 2).
let fourTowerYAML = """
model:
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: leaky_relu, alpha: 0.1}
    - {name: p1, type: maxpool, kernel: 2}
    - {name: c2, type: conv, out: 16, kernel: 3, pad: 1, towers: all}
    - {name: t2, type: tanh}
    - {name: a2, type: avgpool, kernel: 3, stride: 2, pad: 1}
    - {name: c3, type: conv, out: 8, kernel: 1, groups: 4, towers: own}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 10}
train: {batch_size: 12, seed: 9}
optimizer: {lr: 0.05, momentum: 0.9}
parallel: {towers: 4, sync_bn: true}
"""

@Suite struct TowerTests {
    func compare(_ yaml: String, ranks: Int, steps: Int = 4) throws {
        let c = try config(yaml)
        let whole = try trainInProcess(c, ranks: 1, steps: steps, data: syntheticData)
        let split = try trainInProcess(c, ranks: ranks, steps: steps, data: syntheticData)
        #expect(whole.parameters.count == split.parameters.count)
        for (a, b) in zip(whole.losses, split.losses) { #expect(abs(a - b) <= 1e-5 * abs(a), "losses \(whole.losses) vs \(split.losses)") }
        #expect(relativeDifference(whole.parameters, split.parameters) < 1e-5)
    }

    @Test func twoTowersMatchTheUnsplitModel() throws { try compare(smallAlexYAML, ranks: 2) }
    @Test func twoReplicasOfTwoTowersMatchTheUnsplitModel() throws { try compare(smallAlexYAML, ranks: 4) }
    @Test func fourTowersWithAnOddLayerMix() throws { try compare(fourTowerYAML, ranks: 4) }

    @Test func towersTalkOnlyAtAllTowerLayers() throws {
        let c = try config(smallAlexYAML)
        let plan = try TowerPlan(input: Shape(1, 28, 28), layers: c.layers, towers: 2)
        #expect(plan.exchanges.map(\.layer) == ["conv3", "fc5", "fc6", "loss (logits)"])
        // What one tower receives per sample: the other tower's half of pool2 (4x7x7), of pool4's flatten, of relu5, of the logits.
        #expect(plan.exchanges.map(\.forwardElementsPerSample) == [4 * 7 * 7, 4 * 4 * 4, 16, 5])
        final class Counts: @unchecked Sendable { var bytes: [Int] = [] ; let lock = NSLock() }
        let counts = Counts()
        try ThreadCommunicator.run(size: 2) { comm in
            var cc = c; cc.parallel.threads = 1
            let t = try Trainer(config: cc, comm: comm, data: try syntheticData(), options: RunOptions())
            t.data.shuffle(epoch: 0, seed: cc.seed)
            t.exchange!.resetCounts()
            _ = try t.step(epoch: 0, start: 0, globalCount: cc.batchSize, step: 0, lr: cc.lr)
            counts.lock.lock(); counts.bytes.append(t.exchange!.allgatherBytes + t.exchange!.reduceScatterBytes); counts.lock.unlock()
            #expect(t.exchange!.calls == 4 + 3)   // 4 gathers forward, 3 reduce-scatters backward (none for the logits)
        }
        let perSample = plan.exchanges.reduce(0) { $0 + $1.forwardElementsPerSample + $1.backwardElementsPerSample }
        #expect(counts.bytes == [perSample * 16 * 4, perSample * 16 * 4])
    }

    @Test func layoutErrorsNameTheProblem() throws {
        var c = try config(smallAlexYAML)
        c.parallel.towers = 3
        #expect(throws: ModelError.self) { _ = try TowerPlan(input: Shape(1, 28, 28), layers: c.layers, towers: 3) }
        let lrn = expectError(["layer 'lrn1'", "8 channels are not divisible into 3 groups"]) {
            _ = try TowerPlan(input: Shape(1, 28, 28), layers: c.layers, towers: 3)
        }
        #expect(lrn == nil, "\(lrn ?? "")")
        let divide = expectError(["layer 'conv1'", "the towers do not divide its 8 output channels", "towers: 3"]) {
            _ = try TowerPlan(input: Shape(1, 28, 28), layers: c.layers.filter { $0.name != "lrn1" }, towers: 3)
        }
        #expect(divide == nil, "\(divide ?? "")")
        let err = expectError(["layer 'conv2'", "groups divisible by the towers", "towers: 4"]) {
            _ = try TowerPlan(input: Shape(1, 28, 28), layers: c.layers, towers: 4)
        }
        #expect(err == nil, "\(err ?? "")")
        let world = expectError(["world size 3 does not fit parallel.towers 2"]) {
            try ThreadCommunicator.run(size: 3) { comm in
                _ = try Trainer(config: try config(smallAlexYAML), comm: comm, data: try syntheticData(), options: RunOptions())
            }
        }
        #expect(world == nil, "\(world ?? "")")
    }
}

/// Runs `Trainer.run()` of `cfg` on `ranks` thread-ranks with synthetic data; rank 0's whole-model parameters.
func runWhole(_ cfg: TrainConfig, ranks: Int, out: String, maxSteps: Int = 0, resume: String? = nil) throws -> (parameters: [Float], steps: Int) {
    final class Box: @unchecked Sendable { var parameters: [Float] = []; var steps = 0 }
    let box = Box()
    try ThreadCommunicator.run(size: ranks) { comm in
        var o = RunOptions(); o.quiet = true; o.outDir = out; o.resume = resume
        var c = cfg; c.parallel.threads = 1; c.maxSteps = maxSteps
        let t = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
        let s = try t.run()
        let whole = try t.wholeModel(t.net.parameters, tensors: \.parameters)
        if comm.rank == 0 { box.parameters = whole; box.steps = s.steps }
    }
    return (box.parameters, box.steps)
}

@Suite struct TowerCheckpointTests {
    @Test func aCheckpointOfTowersResumesAsOneProcess() throws {
        var c = try config(smallAlexYAML)
        c.epochs = 0.25   // 8 steps of 16 of the 512 synthetic images
        let uninterrupted = try runWhole(c, ranks: 1, out: temporaryFolder())
        let out = temporaryFolder()
        _ = try runWhole(c, ranks: 2, out: out, maxSteps: 4)                 // 1 replica x 2 towers
        let resumed = try runWhole(c, ranks: 1, out: out, resume: "auto")    // the whole model in one process
        #expect(resumed.steps == 8 && uninterrupted.steps == 8)
        #expect(relativeDifference(resumed.parameters, uninterrupted.parameters) < 1e-5)
        // And back: a one-process checkpoint resumes as 2x2.
        let out2 = temporaryFolder()
        _ = try runWhole(c, ranks: 1, out: out2, maxSteps: 4)
        let hybrid = try runWhole(c, ranks: 4, out: out2, resume: "auto")
        #expect(relativeDifference(hybrid.parameters, uninterrupted.parameters) < 1e-5)
    }
}
