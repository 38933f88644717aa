// parallel.head auto: the tuner's schedule and choice, and the trainer running it on every rank alike.
import Testing
@testable import TandemTrain
import TandemComm
import TandemCore

struct HeadTunerTests {
    @Test func everyCandidateTakesItsTurnAndTheFastestIsKept() {
        let tuner = HeadTuner(candidates: [0.25, 0.5, 1.0], blockSteps: 2, rounds: 3, minRounds: 3, maxSeconds: 1e9)
        // Round r starts at candidate r: blocks of 2 steps in the orders 0 1 2, 1 2 0, 2 0 1.
        var order: [Int] = []
        // Candidate 1 is the fastest (2 ms), then 0 (3 ms), then 2 (4 ms).
        let ms = [3.0, 2.0, 4.0]
        while !tuner.done {
            order.append(tuner.current)
            tuner.record(ms[tuner.current] / 1000)
        }
        #expect(order == [0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 0, 0, 2, 2, 0, 0, 1, 1])
        #expect(tuner.chosen == 1 && tuner.fraction == 0.5 && tuner.measured == 18)
        #expect(zip(tuner.scores, ms).allSatisfy { abs($0 * 1000 - $1) < 1e-12 }, "\(tuner.scores)")
        // Once chosen, the steps run at the choice and nothing more is recorded.
        tuner.record(1)
        #expect(tuner.current == 1 && tuner.measured == 18)
    }

    @Test func aBurstOfSlowStepsDoesNotDecide() {
        // Candidate 0 is 5% faster, but 2 of its 20 steps fall in a burst three times as slow (its
        // mean is then the slowest): the trimmed mean drops them and keeps it.
        let tuner = HeadTuner(candidates: [0.375, 0.9], blockSteps: 5, rounds: 4, minRounds: 4, maxSeconds: 1e9)
        var k = 0
        while !tuner.done {
            let c = tuner.current
            var t = c == 0 ? 2.0 : 2.1
            if c == 0 { k += 1; if k == 7 || k == 8 { t = 6.0 } }
            tuner.record(t / 1000)
        }
        #expect(tuner.chosen == 0, "\(tuner.scores)")
        #expect(HeadTuner.score([1, 2, 3, 4, 5, 6, 7, 8, 9, 100]) == 5.5)
        #expect(HeadTuner.score([4]) == 4)
    }

    @Test func slowStepsEndTheTuningAfterTheFewestRounds() {
        // 1 s per step, at most 10 s: the tuning stops at the end of the round that passes 10 s
        // once 2 rounds are done (3 candidates x 2 steps = 6 s a round: after round 2).
        let tuner = HeadTuner(candidates: [0.25, 0.5, 1.0], blockSteps: 2, rounds: 10, minRounds: 2, maxSeconds: 10)
        while !tuner.done { tuner.record(1) }
        #expect(tuner.measured == 12 && tuner.chosen == 0)
    }

    @Test func theTrainerTunesTheSameHeadsOnEveryRank() throws {
        // A model of microseconds per step, so that the tuning's rounds (6 candidates x 5 steps x
        // 20 rounds, from the second step on) run in seconds in a debug build.
        let c = try config(tinyDynamicYAML.replacingOccurrences(of: "parallel: {dynamic: true}", with: "parallel: {dynamic: true, head: auto}"))
        #expect(c.parallel.headAuto && c.parallel.head == 0)
        let steps = 2 + ParallelConfig.headCandidates.count * 5 * 20 + 3
        final class Box: @unchecked Sendable { var chosen: [Double?] = [nil, nil]; var fractions: [Double] = [0, 0]; var heads: [[Int]] = [[], []]; var scores: [[Double]] = [[], []] }
        let box = Box()
        try ThreadCommunicator.run(size: 2) { comm in
            var o = RunOptions()
            o.quiet = true
            let t = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
            t.data.shuffle(epoch: 0, seed: c.seed)
            let perEpoch = t.data.train.count / c.batchSize
            for s in 0..<steps { _ = try t.step(epoch: 0, start: (s % perEpoch) * c.batchSize, globalCount: c.batchSize, step: s, lr: c.lr) }
            let r = comm.rank
            box.chosen[r] = t.headTuner?.chosen.map { t.headTuner!.candidates[$0] }
            box.fractions[r] = t.headFraction
            box.heads[r] = t.heads
            box.scores[r] = t.headTuner?.scores ?? []
        }
        let chosen = try #require(box.chosen[0], "the tuning did not end in \(steps) steps")
        // Both ranks chose from the same sums, and run the choice's heads.
        #expect(box.chosen[1] == chosen && box.scores[0] == box.scores[1] && box.scores[0].count == ParallelConfig.headCandidates.count)
        #expect(ParallelConfig.headCandidates.contains(chosen) && box.fractions == [chosen, chosen])
        #expect(box.heads[0] == box.heads[1] && box.heads[0].allSatisfy { $0 >= 1 })
    }

    @Test func aRankThatGetsNoSampleDoesNotHoldTheTuning() throws {
        // Rank 2 claims only once ranks 0 and 1 have claimed the whole batch (TestHooks), so its
        // speed is never measured: the tuning still ends, on every rank alike.
        let c = try config(tinyDynamicYAML.replacingOccurrences(of: "parallel: {dynamic: true}", with: "parallel: {dynamic: true, head: auto}")
                                          .replacingOccurrences(of: "batch_size: 32", with: "batch_size: 24"))
        let steps = 1 + ParallelConfig.headCandidates.count * 5 * 20
        final class Box: @unchecked Sendable { var done = [false, false, false] }
        let box = Box()
        try ThreadCommunicator.run(size: 3) { comm in
            var o = RunOptions()
            o.quiet = true
            let t = try Trainer(config: c, comm: comm, data: try syntheticData(), options: o)
            t.hooks.lateRank = 2
            t.data.shuffle(epoch: 0, seed: c.seed)
            let perEpoch = t.data.train.count / c.batchSize
            for s in 0..<steps { _ = try t.step(epoch: 0, start: (s % perEpoch) * c.batchSize, globalCount: c.batchSize, step: s, lr: c.lr) }
            box.done[comm.rank] = t.headTuner?.done ?? false
        }
        #expect(box.done == [true, true, true])
    }

    @Test func configKeyAndOption() throws {
        let a = try config(lenetYAML + "\nparallel: {dynamic: true, head: auto}\n")
        #expect(a.parallel.headAuto && a.parallel.head == 0)
        #expect(try !config(lenetYAML + "\nparallel: {dynamic: true, head: 0.5}\n").parallel.headAuto)
        for bad in ["automatic", "0", "2"] {
            #expect(expectError(["parallel.head", "or auto"]) { _ = try config(lenetYAML + "\nparallel: {dynamic: true, head: \(bad)}\n") } == nil, "head: \(bad)")
        }
        let alone = try config(lenetYAML + "\nparallel: {head: auto}\n")
        #expect(expectError(["test.yaml", "parallel.head", "parallel.dynamic"]) { _ = try Trainer.checkLayout(config: alone, data: try syntheticData(), worldSize: 2) } == nil)
    }
}
