// What synchronous data parallelism can reach on a machine, from two independent processes that
// ran side by side (`trainer bench --trace`, one per core). Two ranks that meet every step each
// wait for the slower one: with the pair's own step times u_i and v_i at the same moment, a step
// in lockstep takes max(u_i, v_i) instead of the two running free. So even a trainer whose
// communication cost nothing reaches only
//   even shares:      2N / sum_i max(u_i, v_i)              (images per step-time unit, per sample)
//   balanced shares:  shares f_i, 1 - f_i from a moving average of past step times (as
//                     parallel.balance does), step i taking max(2 f_i u_i, 2 (1 - f_i) v_i)
// of the pair's N / sum u_i + N / sum v_i. The step time is taken as linear in the samples.
import Foundation

public struct LockstepBound: Sendable, Equatable {
    /// Steps of the two runs that overlap in time (paired at the midpoint of the first's).
    public var pairedSteps: Int
    /// Mean step time of each run over the paired steps, in seconds.
    public var meanA: Double, meanB: Double
    /// Mean |u_i - v_i| over the paired steps, in seconds.
    public var meanDifference: Double
    /// Lockstep throughput as a share of the pair's, with even and with balanced shares.
    public var even: Double, balanced: Double

    /// Pairs each step of `a` with the step of `b` running at its midpoint and computes the bounds.
    /// Steps are (start, duration) in seconds, on one clock (CLOCK_MONOTONIC for Tandem's traces).
    public init(a: [(start: Double, duration: Double)], b: [(start: Double, duration: Double)]) throws {
        let sa = a.sorted { $0.start < $1.start }, sb = b.sorted { $0.start < $1.start }
        var pairs: [(Double, Double)] = []
        var j = 0
        for s in sa {
            let mid = s.start + s.duration / 2
            while j + 1 < sb.count && sb[j + 1].start <= mid { j += 1 }
            guard j < sb.count, sb[j].start <= mid, mid <= sb[j].start + sb[j].duration else { continue }
            pairs.append((s.duration, sb[j].duration))
        }
        guard pairs.count >= 2, pairs.allSatisfy({ $0.0 > 0 && $0.1 > 0 }) else {
            throw ConfigError("the two traces have \(pairs.count) steps that ran at the same time (need at least 2): run the two benches side by side, started together")
        }
        let n = Double(pairs.count)
        pairedSteps = pairs.count
        meanA = pairs.reduce(0) { $0 + $1.0 } / n
        meanB = pairs.reduce(0) { $0 + $1.1 } / n
        meanDifference = pairs.reduce(0) { $0 + abs($1.0 - $1.1) } / n
        // Per step both runs do one batch: the pair's rate is 1/meanA + 1/meanB batches per second;
        // in lockstep the two ranks do two batches per step.
        let pair = 1 / meanA + 1 / meanB
        even = 2 * n / pairs.reduce(0) { $0 + max($1.0, $1.1) } / pair
        // Balanced: per-sample times averaged as parallel.balance does (the first step's own times
        // start the average, from the second step on), shares held within 0.5x and 1.5x of even.
        var ea = 0.0, eb = 0.0, total = 0.0
        for (i, (u, v)) in pairs.enumerated() {
            var f = 0.5
            if i > 0 { f = min(0.75, max(0.25, (1 / ea) / (1 / ea + 1 / eb))) }
            total += max(2 * f * u, 2 * (1 - f) * v)
            let a = Trainer.balanceSmoothing
            if i == 0 { ea = u; eb = v } else { ea = (1 - a) * ea + a * u; eb = (1 - a) * eb + a * v }
        }
        balanced = 2 * n / total / pair
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
