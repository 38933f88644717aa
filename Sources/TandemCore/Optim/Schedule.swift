// Learning-rate schedules, as a pure function of the optimiser step.
import RealModule

public struct LRSchedule: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case constant
        /// Multiply by `gamma` every `every` steps.
        case step(every: Int, gamma: Double)
        /// Cosine from the base rate down to `minimum` at `totalSteps` (Loshchilov and Hutter 2017, without restarts).
        case cosine(minimum: Double)
    }
    public var base: Double
    public var kind: Kind
    /// Linear warm-up from base/warmupSteps to base over the first `warmupSteps` steps.
    public var warmupSteps: Int
    public var totalSteps: Int

    public init(base: Double, kind: Kind = .constant, warmupSteps: Int = 0, totalSteps: Int = 1) {
        self.base = base; self.kind = kind; self.warmupSteps = warmupSteps; self.totalSteps = max(1, totalSteps)
    }

    /// The rate for step `step` (0-based).
    public func rate(at step: Int) -> Double {
        if step < warmupSteps { return base * Double(step + 1) / Double(warmupSteps) }
        switch kind {
        case .constant:
            return base
        case let .step(every, gamma):
            return base * Double.pow(gamma, Double(step / max(1, every)))
        case let .cosine(minimum):
            let span = max(1, totalSteps - warmupSteps)
            let t = min(1, Double(step - warmupSteps) / Double(span))
            return minimum + (base - minimum) * (1 + Double.cos(Double.pi * t)) / 2
        }
    }
}
