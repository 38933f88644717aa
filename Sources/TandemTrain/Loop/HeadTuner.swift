// parallel.head auto: which head fraction runs this machine's steps fastest, measured on the job's
// own first full batches.
//
// Why measured: the best head differs from machine to machine and from model to model (LeNet-5 at
// batch 128 on two ranks, alternating runs: heads of 3/8 ahead of 3/4 by 4.4% on an AMD Zen 4 in
// session 12, 9/10 ahead of 3/8 by 2.4 points of the ranks apart on an Intel Xeon in session 15;
// the small AlexNet, whose large fully connected layers every chunk reads again, wants large
// heads), and no model of the chunks' cost predicted it. Why interleaved: the host's speed drifts over seconds by more than the heads
// differ, so the candidates take turns in short blocks, each round in another order, and each is
// scored by the mean of its steps without the fastest and slowest tenth (the host slows a few
// steps at a time by a third or more; the trimmed mean keeps what a head does to the common steps).
// On a machine where the heads differ by less than the steps' noise (LeNet-5 on two Zen 4 vCPUs:
// 300 steps of each of the six, six times over, put them within 2-6% of one another, the default
// 3/8 first in 4 of the 6) the choice is close to a coin toss, and costs little either way.
/// Tries each head fraction for `blockSteps` full batches in turn, for `rounds` rounds (round r
/// starts at candidate r mod the count), or fewer once `maxSeconds` of measured steps have passed
/// after at least `minRounds`; then keeps the candidate with the smallest trimmed mean step time
/// (`score`; the first of equals). Fed the same step times on every rank (the trainer's are averaged
/// over the ranks), every rank chooses the same. Stores its samples in a buffer allocated once.
public final class HeadTuner {
    public let candidates: [Double]
    public let blockSteps: Int
    public let rounds: Int
    public let minRounds: Int
    public let maxSeconds: Double
    private let samples: UnsafeMutablePointer<Double>
    /// Steps measured so far, and their seconds summed.
    public private(set) var measured = 0
    public private(set) var seconds = 0.0
    /// The index of the chosen candidate, once the tuning is over.
    public private(set) var chosen: Int?
    /// Per candidate, its score (`score`) in seconds, once the tuning is over.
    public private(set) var scores: [Double] = []

    public init(candidates: [Double], blockSteps: Int = 5, rounds: Int = 20, minRounds: Int = 3, maxSeconds: Double = 30) {
        precondition(!candidates.isEmpty && blockSteps > 0 && rounds > 0 && minRounds > 0)
        self.candidates = candidates
        self.blockSteps = blockSteps
        self.rounds = rounds
        self.minRounds = min(minRounds, rounds)
        self.maxSeconds = maxSeconds
        samples = .allocate(capacity: candidates.count * blockSteps * rounds)
    }

    deinit { samples.deallocate() }

    public var done: Bool { chosen != nil }

    /// Steps in one round (every candidate once).
    public var stepsPerRound: Int { candidates.count * blockSteps }

    /// The candidate the next measured step runs with (the chosen one once done).
    public var current: Int { chosen ?? candidate(ofStep: measured) }

    /// The candidate measured step i (from 0) runs with: blocks of `blockSteps` in turn, round r
    /// starting at candidate r.
    private func candidate(ofStep i: Int) -> Int {
        (i / blockSteps % candidates.count + i / stepsPerRound) % candidates.count
    }

    /// The fraction the next step runs with.
    public var fraction: Double { candidates[current] }

    /// One measured step, run with `current`, that took `stepSeconds`.
    public func record(_ stepSeconds: Double) {
        guard chosen == nil else { return }
        samples[measured] = stepSeconds
        measured += 1
        seconds += stepSeconds
        guard measured % stepsPerRound == 0 else { return }
        let round = measured / stepsPerRound
        if round >= rounds || (round >= minRounds && seconds >= maxSeconds) { choose() }
    }

    /// The mean of `times` without its fastest and slowest tenth (rounded down).
    public static func score(_ times: [Double]) -> Double {
        precondition(!times.isEmpty)
        let sorted = times.sorted()
        let cut = sorted.count / 10
        let kept = sorted[cut..<(sorted.count - cut)]
        return kept.reduce(0, +) / Double(kept.count)
    }

    /// Each candidate's measured step times, in the order they ran.
    public var stepsByCandidate: [[Double]] {
        var own = [[Double]](repeating: [], count: candidates.count)
        for i in 0..<measured { own[candidate(ofStep: i)].append(samples[i]) }
        return own
    }

    private func choose() {
        scores = stepsByCandidate.map(Self.score)
        var best = 0
        for k in scores.indices where scores[k] < scores[best] { best = k }
        chosen = best
    }
}
