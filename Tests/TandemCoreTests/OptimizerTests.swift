// SGD and the learning-rate schedules on values computed by hand (each expected number is
// written out with its arithmetic in a comment), in PyTorch's formulation:
//   g = grad + l2 * w + l1 * sign(w) (weights only);  v = mu * v + g;  w -= lr * (nesterov ? g + mu * v : v).
import Testing
@testable import TandemCore

// MARK: - Support

/// A graph whose flat parameter buffer is [w0, w1, b]: linear 2 -> 1 with a bias.
private func tinyLinear() throws -> Graph {
    try Graph(input: Shape(2, 1, 1), layers: [LayerSpec(name: "fc", kind: .linear(outFeatures: 1, bias: true))])
}

/// Runs SGD from `start` through one step per gradient vector; returns the parameters after each step.
private func sgdTrajectory<T: Scalar>(_ graph: Graph, _ settings: SGDSettings, start: [T], gradients: [[T]], lr: [Double]) -> [[T]] {
    let sgd = SGD<T>(graph: graph, settings: settings)
    var w = start
    var out: [[T]] = []
    for (step, g) in gradients.enumerated() {
        var grad = g
        w.withUnsafeMutableBufferPointer { wb in
            grad.withUnsafeMutableBufferPointer { gb in sgd.step(parameters: wb, gradients: gb, lr: lr[step]) }
        }
        out.append(w)
    }
    return out
}

private func expectClose(_ got: [Double], _ want: [Double], _ what: String, tolerance: Double = 1e-12,
                         sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(got.count == want.count && zip(got, want).allSatisfy { abs($0 - $1) <= tolerance * max(1, abs($1)) },
            "\(what): got \(got), expected \(want)", sourceLocation: sourceLocation)
}

// MARK: - SGD

@Suite struct SGDTests {
    // Three steps on w = [1, -1, 0.5] with gradients g1 = [1, 0.5, 1], g2 = [2, 0.5, -1], g3 = [-1, 0, 0.5], lr 0.1, mu 0.9.
    static let start = [1.0, -1, 0.5]
    static let gradients: [[Double]] = [[1, 0.5, 1], [2, 0.5, -1], [-1, 0, 0.5]]

    @Test func plainMomentumThreeSteps() throws {
        let steps = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0.9), start: Self.start, gradients: Self.gradients, lr: [0.1, 0.1, 0.1])
        // w0: v = 1 -> w = 0.9;  v = 0.9 + 2 = 2.9 -> w = 0.61;  v = 2.61 - 1 = 1.61 -> w = 0.449.
        // w1: v = 0.5 -> -1.05;  v = 0.45 + 0.5 = 0.95 -> -1.145;  v = 0.855 -> -1.2305.
        // b:  v = 1 -> 0.4;      v = 0.9 - 1 = -0.1 -> 0.41;        v = -0.09 + 0.5 = 0.41 -> 0.369.
        expectClose(steps[0], [0.9, -1.05, 0.4], "step 1")
        expectClose(steps[1], [0.61, -1.145, 0.41], "step 2")
        expectClose(steps[2], [0.449, -1.2305, 0.369], "step 3")
    }

    @Test func velocityIsKept() throws {
        let graph = try tinyLinear()
        let sgd = SGD<Double>(graph: graph, settings: SGDSettings(momentum: 0.5))
        var w = [0.0, 0, 0], g = [1.0, 2, 3]
        for _ in 0..<2 {
            w.withUnsafeMutableBufferPointer { wb in g.withUnsafeMutableBufferPointer { gb in sgd.step(parameters: wb, gradients: gb, lr: 1) } }
        }
        // v = g, then 0.5 g + g = 1.5 g; w = -(g + 1.5 g) = -2.5 g.
        expectClose(Array(sgd.velocity), [1.5, 3, 4.5], "velocity")
        expectClose(w, [-2.5, -5, -7.5], "weights")
        // The gradients themselves are left alone.
        #expect(g == [1, 2, 3])
    }

    @Test func noMomentumIsPlainGradientDescent() throws {
        let steps = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0), start: Self.start, gradients: Self.gradients, lr: [0.1, 0.2, 0.5])
        // w -= lr * g each step: w0 = 1 - 0.1 - 0.4 + 0.5 = 1.0; w1 = -1 - 0.05 - 0.1 - 0 = -1.15; b = 0.5 - 0.1 + 0.2 - 0.25 = 0.35.
        expectClose(steps[2], [1.0, -1.15, 0.35], "three steps")
    }

    @Test func nesterovThreeSteps() throws {
        let steps = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0.9, nesterov: true), start: Self.start, gradients: Self.gradients, lr: [0.1, 0.1, 0.1])
        // w0: v = 1, w -= 0.1 (1 + 0.9)         = 0.19   -> 0.81
        //     v = 2.9, w -= 0.1 (2 + 2.61)      = 0.461  -> 0.349
        //     v = 1.61, w -= 0.1 (-1 + 1.449)   = 0.0449 -> 0.3041
        // w1: v = 0.5, w -= 0.1 (0.5 + 0.45)    = 0.095  -> -1.095
        //     v = 0.95, w -= 0.1 (0.5 + 0.855)  = 0.1355 -> -1.2305
        //     v = 0.855, w -= 0.1 (0 + 0.7695)  = 0.07695 -> -1.30745
        // b:  v = 1, w -= 0.1 (1 + 0.9)         = 0.19   -> 0.31
        //     v = -0.1, w -= 0.1 (-1 - 0.09)    = -0.109 -> 0.419
        //     v = 0.41, w -= 0.1 (0.5 + 0.369)  = 0.0869 -> 0.3321
        expectClose(steps[0], [0.81, -1.095, 0.31], "step 1")
        expectClose(steps[1], [0.349, -1.2305, 0.419], "step 2")
        expectClose(steps[2], [0.3041, -1.30745, 0.3321], "step 3")
    }

    @Test func weightDecayOnWeightsNotBiases() throws {
        // l2 = 0.01, lr 0.1, no momentum; w = [2, -4], b = 2, grad 0.5 everywhere.
        // w0: g = 0.5 + 0.02 = 0.52 -> 2 - 0.052 = 1.948;  w1: g = 0.5 - 0.04 = 0.46 -> -4.046;  b: g = 0.5 -> 1.95.
        let steps = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0, weightDecay: 0.01), start: [2.0, -4, 2],
                                  gradients: [[0.5, 0.5, 0.5]], lr: [0.1])
        expectClose(steps[0], [1.948, -4.046, 1.95], "L2")
        // With momentum the decayed gradient enters the velocity: step 2 (grad 0): g = 0.01 * 1.948 = 0.01948,
        // v = 0.9 * 0.52 + 0.01948 = 0.48748 -> 1.948 - 0.048748 = 1.899252; b: v = 0.45 -> 1.95 - 0.045 = 1.905.
        let withMomentum = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0.9, weightDecay: 0.01), start: [2.0, -4, 2],
                                         gradients: [[0.5, 0.5, 0.5], [0, 0, 0]], lr: [0.1, 0.1])
        #expect(abs(withMomentum[1][0] - 1.899252) < 1e-12, "\(withMomentum[1])")
        #expect(abs(withMomentum[1][2] - 1.905) < 1e-12, "\(withMomentum[1])")
    }

    @Test func l1UsesTheSign() throws {
        // l1 = 0.1, lr 0.1, no momentum; w = [2, -2], b = 2, grad 0.5.
        // w0: g = 0.5 + 0.1 = 0.6 -> 1.94;  w1: g = 0.5 - 0.1 = 0.4 -> -2.04;  b: not regularised -> 1.95.
        let steps = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0, l1: 0.1), start: [2.0, -2, 2],
                                  gradients: [[0.5, 0.5, 0.5]], lr: [0.1])
        expectClose(steps[0], [1.94, -2.04, 1.95], "L1")
        // sign(0) = 0: a zero weight feels no L1 pull.
        let zero = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0, l1: 0.1), start: [0.0, 0, 0],
                                 gradients: [[0.5, 0, 0]], lr: [0.1])
        expectClose(zero[0], [-0.05, 0, 0], "L1 at zero")
    }

    @Test func l1AndL2Together() throws {
        // w = 3: g = 1 + 0.1 * 3 + 0.2 * 1 = 1.5 -> 3 - 0.15 = 2.85.
        let steps = sgdTrajectory(try tinyLinear(), SGDSettings(momentum: 0, weightDecay: 0.1, l1: 0.2), start: [3.0, 0, 1],
                                  gradients: [[1, 0, 1]], lr: [0.1])
        expectClose(steps[0], [2.85, 0, 0.9], "L1 + L2")
    }

    @Test func regularisationSkipsBatchNormAndBiases() throws {
        // conv (weight 2, bias 1) then batch norm (scale 1, shift 1): only the two conv weights decay.
        let graph = try Graph(input: Shape(1, 2, 2), layers: [conv("c", 1, k: 1, kw: 2), layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1))])
        #expect(graph.parameters.map(\.role) == [.weight, .bias, .scale, .shift])
        let steps = sgdTrajectory(graph, SGDSettings(momentum: 0, weightDecay: 0.5, l1: 0.5), start: [1.0, 1, 1, 1, 1],
                                  gradients: [[0, 0, 0, 0, 0]], lr: [1])
        // Weights: g = 0.5 * 1 + 0.5 * 1 = 1 -> 0. Everything else untouched.
        expectClose(steps[0], [0, 0, 1, 1, 1], "only weights regularised")
    }

    // The sharded update: each rank updates its slices of each bucket, cut anywhere (across
    // tensors, weights and biases alike): the same bits as one update of the whole buffer.
    @Test func updatesInSlicesMatchTheWholeBitForBit() throws {
        // LeNet-5 without batch norm: weights (regularised) and biases (not) in turn.
        let graph = try Graph(input: Shape(1, 28, 28), layers: Models.lenet5(batchNorm: false))
        let n = graph.parameterCount
        let settings = SGDSettings(momentum: 0.9, nesterov: true, weightDecay: 0.01, l1: 0.001)
        var rng = SeededGenerator(seed: 5)
        var start = [Float](repeating: 0, count: n)
        for i in 0..<n { start[i] = Float(Double(rng.next() % 2001) / 1000 - 1) }
        let whole = SGD<Float>(graph: graph, settings: settings), sliced = SGD<Float>(graph: graph, settings: settings)
        var a = start, b = start
        for step in 0..<3 {
            var g = [Float](repeating: 0, count: n)
            for i in 0..<n { g[i] = Float(Double(rng.next() % 2001) / 1000 - 1) }
            a.withUnsafeMutableBufferPointer { w in g.withUnsafeMutableBufferPointer { whole.step(parameters: w, gradients: $0, lr: 0.1) } }
            // Cuts that move every step, some inside tensors, one empty slice.
            let cuts = [0, 7 + step, 7 + step, n / 3, n / 2 + step, n]
            for k in 0..<(cuts.count - 1) {
                b.withUnsafeMutableBufferPointer { w in
                    g.withUnsafeBufferPointer { sliced.step(range: cuts[k]..<cuts[k + 1], parameters: w.baseAddress!, gradients: $0.baseAddress!, lr: 0.1) }
                }
            }
        }
        #expect(a == b)
        #expect(Array(whole.velocity) == Array(sliced.velocity))
        #expect(a != start)
    }

    @Test func floatMatchesDouble() throws {
        let settings = SGDSettings(momentum: 0.9, nesterov: true, weightDecay: 0.01, l1: 0.001)
        let d = sgdTrajectory(try tinyLinear(), settings, start: Self.start, gradients: Self.gradients, lr: [0.1, 0.05, 0.02])
        let f = sgdTrajectory(try tinyLinear(), settings, start: Self.start.map { Float($0) },
                              gradients: Self.gradients.map { $0.map { Float($0) } }, lr: [0.1, 0.05, 0.02])
        expectClose(f[2].map { Double($0) }, d[2], "Float", tolerance: 1e-6)
    }
}

// MARK: - Schedules

@Suite struct LRScheduleTests {
    @Test func constant() {
        let s = LRSchedule(base: 0.1)
        #expect([0, 1, 99, 10_000].allSatisfy { s.rate(at: $0) == 0.1 })
    }

    @Test func stepDecay() {
        let s = LRSchedule(base: 0.1, kind: .step(every: 10, gamma: 0.5))
        #expect(s.rate(at: 0) == 0.1 && s.rate(at: 9) == 0.1)
        #expect(abs(s.rate(at: 10) - 0.05) < 1e-15 && abs(s.rate(at: 19) - 0.05) < 1e-15)
        #expect(abs(s.rate(at: 20) - 0.025) < 1e-15)
        #expect(abs(s.rate(at: 35) - 0.0125) < 1e-15)
    }

    @Test func cosineEndpointsAndMidpoint() {
        let s = LRSchedule(base: 0.1, kind: .cosine(minimum: 0.001), totalSteps: 100)
        #expect(abs(s.rate(at: 0) - 0.1) < 1e-15)
        #expect(abs(s.rate(at: 50) - 0.0505) < 1e-15)          // (0.1 + 0.001) / 2
        #expect(abs(s.rate(at: 100) - 0.001) < 1e-15)
        #expect(abs(s.rate(at: 150) - 0.001) < 1e-15)         // stays at the minimum past the end
        // A quarter of the way: min + (base - min) * (1 + cos(pi/4)) / 2.
        #expect(abs(s.rate(at: 25) - (0.001 + 0.099 * (1 + 0.5.squareRoot()) / 2)) < 1e-15)
        // Monotone decreasing.
        #expect((0..<100).allSatisfy { s.rate(at: $0 + 1) <= s.rate(at: $0) })
    }

    @Test func linearWarmup() {
        // (step + 1) / warmup * base over the first `warmup` steps, then the schedule.
        let s = LRSchedule(base: 0.1, kind: .constant, warmupSteps: 4)
        #expect(abs(s.rate(at: 0) - 0.025) < 1e-15)
        #expect(abs(s.rate(at: 1) - 0.05) < 1e-15)
        #expect(abs(s.rate(at: 2) - 0.075) < 1e-15)
        #expect(s.rate(at: 3) == 0.1 && s.rate(at: 4) == 0.1 && s.rate(at: 50) == 0.1)
    }

    @Test func warmupThenCosine() {
        // Warm-up 10 of 110 steps: the cosine runs over the remaining 100 and starts at the base rate.
        let s = LRSchedule(base: 0.2, kind: .cosine(minimum: 0), warmupSteps: 10, totalSteps: 110)
        #expect(abs(s.rate(at: 0) - 0.02) < 1e-15)
        #expect(abs(s.rate(at: 9) - 0.2) < 1e-15)
        #expect(abs(s.rate(at: 10) - 0.2) < 1e-15)
        #expect(abs(s.rate(at: 60) - 0.1) < 1e-15)
        #expect(abs(s.rate(at: 110)) < 1e-15)
    }
}
