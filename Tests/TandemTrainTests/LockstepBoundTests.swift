// The lockstep bound (trainer bench-lockstep): what ranks meeting every step keep of two free
// runs' throughput, for step times whose answer is known.
import Foundation
import Testing
@testable import TandemTrain

@Suite struct LockstepBoundTests {
    /// Back-to-back steps of the given durations from time `t0`.
    func run(_ durations: [Double], from t0: Double = 100) -> [(start: Double, duration: Double)] {
        var t = t0
        return durations.map { d in defer { t += d }; return (t, d) }
    }

    @Test func equalStepsLoseNothing() throws {
        let b = try LockstepBound(a: run(Array(repeating: 0.01, count: 50)), b: run(Array(repeating: 0.01, count: 50)))
        #expect((49...50).contains(b.lockstepSteps) && b.meanDifference == 0)
        #expect(abs(b.even - 1) < 1e-9 && abs(b.balanced - 1) < 1e-9)
    }

    @Test func aRankTwiceAsSlowCostsEvenSharesAThirdAndBalancedSharesTwoSteps() throws {
        // b's steps take 2 s, a's 1 s, for 200 s: pair 1.5 batches/s; even lockstep 2 batches per 2 s;
        // balanced as parallel.balance: even shares for two steps (the first is not measured), then
        // shares 2/3 and 1/3, 4/3 s per step: 2 + 147 steps in 200 s.
        let b = try LockstepBound(a: run(Array(repeating: 1, count: 200)), b: run(Array(repeating: 2, count: 100)))
        #expect(b.lockstepSteps == 100 && abs(b.window - 200) < 1e-9 && b.meanA == 1 && b.meanB == 2)
        #expect(abs(b.even - 1 / 1.5) < 1e-12)
        #expect(abs(b.balanced - 2 * 149 / 200 / 1.5) < 1e-3, "\(b.balanced)")
    }

    @Test func thePairsRateIsEachRunsOwnNotTimeWeighted() throws {
        // b alternates 0.5 s and 1.5 s steps (1 step per second, as a): the pair makes 2 batches per
        // second. In lockstep a step takes the slower of the steps in progress, 1.5 s for 3/4 of the time.
        let bound = try LockstepBound(a: run(Array(repeating: 1, count: 100)), b: run((0..<100).map { $0 % 2 == 0 ? 0.5 : 1.5 }))
        #expect(abs(bound.meanA - 1) < 1e-12 && abs(bound.meanB - 1) < 1e-3)
        #expect(bound.even > 0.6 && bound.even < 0.8, "\(bound.even)")
    }

    @Test func stepToStepJitterCostsWhatTheSlowerStepTakes() throws {
        // Each step one run is 10% slower than the mean and the other 10% faster, in turn: every
        // lockstep step takes 1.1, and balancing on past steps cannot follow the alternation.
        let a = run((0..<100).map { 1 + 0.1 * ($0 % 2 == 0 ? 1 : -1) })
        let b = run((0..<100).map { 1 - 0.1 * ($0 % 2 == 0 ? 1 : -1) })
        let bound = try LockstepBound(a: a, b: b)
        // (Where a's long step overlaps b's, both are 1.1: a tenth of the time the two agree.)
        #expect(bound.meanDifference > 0.15 && bound.meanDifference <= 0.2 + 1e-9, "\(bound.meanDifference)")
        #expect(abs(bound.even - 1 / 1.1) < 2e-3, "\(bound.even)")
        #expect(bound.balanced < 0.93)
    }

    @Test func tracesThatDidNotRunTogetherAreAnError() {
        #expect(expectError(["ran at the same time"]) {
            _ = try LockstepBound(a: run([1, 1, 1], from: 0), b: run([1, 1, 1], from: 10))
        } == nil)
    }

    @Test func stepsAreReadFromATrace() throws {
        let json = """
        {"displayTimeUnit":"ms","traceEvents":[
        {"name":"conv1 forward","ph":"X","ts":1000,"dur":200,"pid":0,"tid":0},
        {"name":"step","ph":"X","ts":1000,"dur":5000,"pid":0,"tid":0},
        {"name":"step","ph":"X","ts":6000,"dur":4000.5,"pid":0,"tid":0}]}
        """
        let steps = try LockstepBound.steps(traceJSON: Data(json.utf8), file: "t.json")
        #expect(steps.count == 2 && steps[0].start == 1e-3 && steps[1].duration == 4000.5e-6)
        #expect(expectError(["t.json", "no step events"]) { _ = try LockstepBound.steps(traceJSON: Data("{\"traceEvents\":[]}".utf8), file: "t.json") } == nil)
        #expect(expectError(["t.json", "not a Chrome trace"]) { _ = try LockstepBound.steps(traceJSON: Data("[1,2]".utf8), file: "t.json") } == nil)
    }
}
