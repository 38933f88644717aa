// What synchronous data parallelism can reach on a machine, from two independent processes that
// ran side by side (`trainer bench --trace`, one per core). Two ranks that meet every step each
// wait for the slower one. The model: each core's speed at time t is what its run showed then (the
// duration of its step in progress at t), and two ranks in lockstep, starting when both runs had
// begun, take steps one after another, a step starting at t taking
//   even shares:      max(u(t), v(t))
//   balanced shares:  max(2 f u(t), 2 (1 - f) v(t)), with f from parallel.balance's moving average
//                     of past step times (the first step not counted, even shares until one is),
//                     held within 0.25 and 0.75
// for two batches, step times taken as linear in the samples (the step as a whole: its data loading
// and optimiser too). The bound is the lockstep pair's batches per second over the two runs' own
// (their steps inside the window where both ran), before any cost of communication.
import Foundation

public struct LockstepBound: Sendable, Equatable {
    /// Lockstep steps that fit in the window where both runs ran, and that window's length in seconds.
    public var lockstepSteps: Int
    public var window: Double
    /// Each run's mean step time inside that window, in seconds.
    public var meanA: Double, meanB: Double
    /// Mean |u(t) - v(t)| at the start of the even-shares lockstep steps, in seconds.
    public var meanDifference: Double
    /// Lockstep throughput as a share of the pair's, with even and with balanced shares.
    public var even: Double, balanced: Double

    /// Steps are (start, duration) in seconds, on one clock (CLOCK_MONOTONIC for Tandem's traces).
    public init(a: [(start: Double, duration: Double)], b: [(start: Double, duration: Double)]) throws {
        let sa = a.sorted { $0.start < $1.start }, sb = b.sorted { $0.start < $1.start }
        guard let a0 = sa.first, let b0 = sb.first, let a1 = sa.last, let b1 = sb.last, (sa + sb).allSatisfy({ $0.duration > 0 }) else {
            throw ConfigError("a trace without steps of positive duration")
        }
        let lo = max(a0.start, b0.start), hi = min(a1.start + a1.duration, b1.start + b1.duration)
        // Each run's own rate inside the window.
        func inside(_ s: [(start: Double, duration: Double)]) -> [Double] { s.filter { $0.start >= lo && $0.start + $0.duration <= hi }.map(\.duration) }
        let da = inside(sa), db = inside(sb)
        guard da.count >= 2 && db.count >= 2 else {
            throw ConfigError("the two traces have \(min(da.count, db.count)) steps that ran at the same time (need at least 2): run the two benches side by side, started together")
        }
        meanA = da.reduce(0, +) / Double(da.count)
        meanB = db.reduce(0, +) / Double(db.count)
        let pair = 1 / meanA + 1 / meanB

        /// The duration of the run's step in progress at t (the next one in a gap between steps).
        func speed(_ s: [(start: Double, duration: Double)], _ cursor: inout Int, at t: Double) -> Double {
            while cursor + 1 < s.count && s[cursor].start + s[cursor].duration <= t { cursor += 1 }
            return s[cursor].duration
        }
        /// Lockstep from `lo` to `hi`: steps taken and the time they took, and the mean difference.
        func lockstep(balanced: Bool) -> (steps: Int, seconds: Double, difference: Double) {
            var ia = 0, ib = 0, t = lo, steps = 0, difference = 0.0
            var ea = 0.0, eb = 0.0, measured = 0
            while true {
                let u = speed(sa, &ia, at: t), v = speed(sb, &ib, at: t)
                var f = 0.5
                if balanced && measured > 0 { f = min(0.75, max(0.25, (1 / ea) / (1 / ea + 1 / eb))) }
                let step = max(2 * f * u, 2 * (1 - f) * v)
                guard t + step <= hi else { break }
                if balanced {
                    // As parallel.balance: the first step is not counted, the second starts the average.
                    let w = Trainer.balanceSmoothing
                    if steps == 1 { ea = u; eb = v; measured = 1 } else if steps > 1 { ea = (1 - w) * ea + w * u; eb = (1 - w) * eb + w * v }
                }
                difference += abs(u - v)
                t += step
                steps += 1
            }
            return (steps, t - lo, difference / Double(max(1, steps)))
        }
        let e = lockstep(balanced: false), bal = lockstep(balanced: true)
        guard e.steps >= 2 else { throw ConfigError("the two traces overlap for less than two steps: run the two benches side by side, started together") }
        lockstepSteps = e.steps
        window = hi - lo
        meanDifference = e.difference
        even = 2 * Double(e.steps) / e.seconds / pair
        balanced = 2 * Double(bal.steps) / bal.seconds / pair
    }

    /// The "step" slices of a Chrome trace written by `trainer bench --trace` (seconds).
    public static func steps(traceJSON data: Data, file: String) throws -> [(start: Double, duration: Double)] {
        guard let root = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let events = root["traceEvents"] as? [[String: Any]] else {
            throw ConfigError("\(file): not a Chrome trace (expected a JSON object with traceEvents)")
        }
        let steps: [(start: Double, duration: Double)] = events.compactMap { e in
            guard e["name"] as? String == "step", e["ph"] as? String == "X", let ts = e["ts"] as? Double, let dur = e["dur"] as? Double else { return nil }
            return (ts * 1e-6, dur * 1e-6)
        }
        guard !steps.isEmpty else { throw ConfigError("\(file): no step events (write it with `trainer bench --trace`)") }
        return steps
    }
}
