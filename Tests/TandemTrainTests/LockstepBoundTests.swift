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
        #expect(b.pairedSteps == 50 && b.meanDifference == 0)
        #expect(abs(b.even - 1) < 1e-12 && abs(b.balanced - 1) < 1e-12)
    }

    @Test func aRankTwiceAsSlowCostsEvenSharesAThirdAndBalancedSharesOneStep() throws {
        // b's steps take 2 s, a's 1 s (a runs 2 steps per b step): pair 1.5 batches/s; even lockstep
        // 2 batches per 2 s; balanced: shares 2/3 and 1/3 from the second step, 4/3 s per step.
        let b = try LockstepBound(a: run(Array(repeating: 1, count: 200)), b: run(Array(repeating: 2, count: 100)))
        #expect(b.pairedSteps == 200)
        #expect(abs(b.even - 1 / 1.5) < 1e-12)
        let n = 200.0
        #expect(abs(b.balanced - 2 * n / (2 + (n - 1) * 4 / 3) / 1.5) < 1e-12, "\(b.balanced)")
    }

    @Test func stepToStepJitterCostsWhatTheSlowerStepTakes() throws {
        // Each step one run is 10% slower than the mean and the other 10% faster, in turn: every
        // lockstep step takes 1.1, and balancing on past steps cannot follow the alternation.
        let a = run((0..<100).map { 1 + 0.1 * ($0 % 2 == 0 ? 1 : -1) })
        let b = run((0..<100).map { 1 - 0.1 * ($0 % 2 == 0 ? 1 : -1) })
        let bound = try LockstepBound(a: a, b: b)
        #expect(abs(bound.meanDifference - 0.2) < 1e-9)
        #expect(abs(bound.even - 1 / 1.1) < 1e-9)
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
