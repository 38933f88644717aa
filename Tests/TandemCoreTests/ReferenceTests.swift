// Forward passes of single layers against naive loops written here, straight from each layer's
// definition (PyTorch's conventions), in Float64 and Float32. No expected value comes from the
// code under test: a one-layer graph runs through Network.forward and its output is compared
// with the reference. Tolerance: |got - want| / max(|want|, 1) <= 1e-12 in Double, 1e-5 in Float
// (inputs are of order 1, so this is relative at the data's scale).
import Testing
@testable import TandemCore

// MARK: - Support

/// `count` values uniform in [-scale, scale] (or [lo, lo + 2*scale] with `offset`), rounded to T.
private func referenceRandom<T: Scalar>(_ count: Int, seed: UInt64, scale: Double = 1, offset: Double = 0, as _: T.Type = T.self) -> [T] {
    var rng = SeededGenerator(seed: seed)
    return (0..<count).map { _ in T((rng.uniform() * 2 - 1) * scale + offset) }
}

/// Runs `layers` forward once on a batch `x` with the given parameters and running statistics;
/// returns the output and the running statistics afterwards.
private func referenceRun<T: Scalar>(_ input: Shape, _ layers: [LayerSpec], batch: Int, x: [T], parameters: [T] = [], statistics: [T] = [],
                                     training: Bool, updateStatistics: Bool = true, parts: Int = 1) throws -> (output: [T], statistics: [T]) {
    let graph = try Graph(input: input, layers: layers)
    try #require(parameters.count == graph.parameterCount, "the test gives \(parameters.count) parameters, the graph has \(graph.parameterCount)")
    try #require(statistics.count == graph.statisticsCount)
    try #require(x.count == batch * input.count)
    let net = Network<T>(graph: graph, capacity: batch, parts: parts)
    if !parameters.isEmpty { net.parameters.baseAddress!.update(from: parameters, count: parameters.count) }
    if !statistics.isEmpty { net.statistics.baseAddress!.update(from: statistics, count: statistics.count) }
    net.input.update(from: x, count: x.count)
    net.forward(count: batch, training: training, updateStatistics: updateStatistics)
    return (Array(UnsafeBufferPointer(start: net.output, count: batch * graph.outputShape.count)), Array(net.statistics))
}

/// 1e-12 in Double, 1e-5 in Float.
private func referenceTolerance<T: Scalar>(_: T.Type) -> Double { T.self == Double.self ? 1e-12 : 1e-5 }

private func expectMatches<T: Scalar>(_ got: [T], _ want: [Double], _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(got.count == want.count, "\(what): \(got.count) values, expected \(want.count)", sourceLocation: sourceLocation)
    guard got.count == want.count, !want.isEmpty else { return }
    var worst = -1.0, at = 0
    for i in 0..<want.count {
        let e = abs(Double(got[i]) - want[i]) / max(abs(want[i]), 1)
        if !(e <= worst) { worst = e; at = i }   // also catches NaN
    }
    #expect(worst <= referenceTolerance(T.self),
            "\(what) (\(T.self)): max error \(worst) at \(at): got \(got[at]), expected \(want[at])", sourceLocation: sourceLocation)
}

private func doubles<T: Scalar>(_ a: [T]) -> [Double] { a.map { Double($0) } }

// MARK: - Naive references (NCHW, from the definitions)

/// y[b,o,i,j] = bias[o] + sum_{c in o's group, ki, kj} x[b, c, i*sh - ph + ki, j*sw - pw + kj] * w[o, c - first channel of the group, ki, kj],
/// with x = 0 outside the input; output size floor((in + 2p - k) / s) + 1.
private func naiveConvolution(_ x: [Double], batch: Int, input: Shape, weight: [Double], bias: [Double]?,
                              outC: Int, window w: Window, groups: Int) -> [Double] {
    let outH = (input.height + 2 * w.padH - w.kernelH) / w.strideH + 1
    let outW = (input.width + 2 * w.padW - w.kernelW) / w.strideW + 1
    let inPerGroup = input.channels / groups, outPerGroup = outC / groups
    var y = [Double](repeating: 0, count: batch * outC * outH * outW)
    for b in 0..<batch {
        for o in 0..<outC {
            let group = o / outPerGroup
            for i in 0..<outH {
                for j in 0..<outW {
                    var acc = bias?[o] ?? 0
                    for c in 0..<inPerGroup {
                        let channel = group * inPerGroup + c
                        for ki in 0..<w.kernelH {
                            for kj in 0..<w.kernelW {
                                let ih = i * w.strideH - w.padH + ki, iw = j * w.strideW - w.padW + kj
                                guard ih >= 0, ih < input.height, iw >= 0, iw < input.width else { continue }
                                let xv = x[((b * input.channels + channel) * input.height + ih) * input.width + iw]
                                let wv = weight[((o * inPerGroup + c) * w.kernelH + ki) * w.kernelW + kj]
                                acc += xv * wv
                            }
                        }
                    }
                    y[((b * outC + o) * outH + i) * outW + j] = acc
                }
            }
        }
    }
    return y
}

/// Max or average pooling over every window position; positions in the padding are skipped
/// by max (padding never wins) and counted as zeros by average (count_include_pad = true: the
/// divisor counts the window's positions inside the padded input).
private func naivePool(_ x: [Double], batch: Int, input: Shape, window w: Window, average: Bool) -> [Double] {
    let outH = (input.height + 2 * w.padH - w.kernelH) / w.strideH + 1
    let outW = (input.width + 2 * w.padW - w.kernelW) / w.strideW + 1
    var y: [Double] = []
    for p in 0..<(batch * input.channels) {
        for i in 0..<outH {
            for j in 0..<outW {
                var best = -Double.infinity, sum = 0.0, divisor = 0
                for ki in 0..<w.kernelH {
                    for kj in 0..<w.kernelW {
                        let ih = i * w.strideH - w.padH + ki, iw = j * w.strideW - w.padW + kj
                        if ih >= -w.padH, ih < input.height + w.padH, iw >= -w.padW, iw < input.width + w.padW { divisor += 1 }
                        guard ih >= 0, ih < input.height, iw >= 0, iw < input.width else { continue }
                        let v = x[(p * input.height + ih) * input.width + iw]
                        best = max(best, v)
                        sum += v
                    }
                }
                y.append(average ? sum / Double(divisor) : best)
            }
        }
    }
    return y
}

/// b_c = a_c / (k + alpha/size * sum_{c' = max(0, c - size/2)}^{min(C-1, c + (size-1)/2)} a_c'^2)^beta, per position.
private func naiveLRN(_ x: [Double], batch: Int, input: Shape, size: Int, alpha: Double, beta: Double, k: Double) -> [Double] {
    let C = input.channels, plane = input.plane
    var y = [Double](repeating: 0, count: x.count)
    for b in 0..<batch {
        for c in 0..<C {
            for i in 0..<plane {
                var sum = 0.0
                for cc in max(0, c - size / 2)...min(C - 1, c + (size - 1) / 2) {
                    let a = x[(b * C + cc) * plane + i]
                    sum += a * a
                }
                y[(b * C + c) * plane + i] = x[(b * C + c) * plane + i] / Double.pow(k + alpha / Double(size) * sum, beta)
            }
        }
    }
    return y
}

/// Per channel c over the batch and the plane: mean, biased variance, unbiased variance.
private func naiveChannelStatistics(_ x: [Double], batch: Int, input: Shape) -> [(mean: Double, biased: Double, unbiased: Double)] {
    (0..<input.channels).map { c in
        var values: [Double] = []
        for b in 0..<batch { for i in 0..<input.plane { values.append(x[(b * input.channels + c) * input.plane + i]) } }
        let m = Double(values.count)
        let mean = values.reduce(0, +) / m
        let squares = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) }
        return (mean, squares / m, squares / (m - 1))
    }
}

/// y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel.
private func naiveNormalize(_ x: [Double], batch: Int, input: Shape, mean: [Double], variance: [Double], gamma: [Double], beta: [Double], eps: Double) -> [Double] {
    var y = x
    for b in 0..<batch {
        for c in 0..<input.channels {
            for i in 0..<input.plane {
                let o = (b * input.channels + c) * input.plane + i
                y[o] = gamma[c] * (x[o] - mean[c]) / (variance[c] + eps).squareRoot() + beta[c]
            }
        }
    }
    return y
}

// MARK: - Convolution

private func checkConvolution<T: Scalar>(_ type: T.Type, input: Shape, outC: Int, window: Window, groups: Int, bias: Bool, batch: Int = 2,
                                         sourceLocation: SourceLocation = #_sourceLocation) throws {
    let spec = LayerSpec(name: "conv", kind: .convolution(outChannels: outC, window: window, groups: groups, bias: bias))
    let weightCount = outC * (input.channels / groups) * window.kernelH * window.kernelW
    let parameters: [T] = referenceRandom(weightCount + (bias ? outC : 0), seed: 101)
    let x: [T] = referenceRandom(batch * input.count, seed: 102)
    let got = try referenceRun(input, [spec], batch: batch, x: x, parameters: parameters, training: false).output
    let p = doubles(parameters)
    let want = naiveConvolution(doubles(x), batch: batch, input: input, weight: Array(p[0..<weightCount]),
                                bias: bias ? Array(p[weightCount...]) : nil, outC: outC, window: window, groups: groups)
    expectMatches(got, want, "conv \(input) -> \(outC) \(window.description) groups \(groups) bias \(bias)", sourceLocation: sourceLocation)
}

@Suite struct ConvolutionReference {
    @Test func groupsTwoStrideTwoPaddedNonSquare() throws {
        // 4x7x6 input, 3x2 kernel, stride 2, padding 1: output 6x4x4.
        let w = Window(kernelH: 3, kernelW: 2, strideH: 2, strideW: 2, padH: 1, padW: 1)
        try checkConvolution(Double.self, input: Shape(4, 7, 6), outC: 6, window: w, groups: 2, bias: true)
        try checkConvolution(Float.self, input: Shape(4, 7, 6), outC: 6, window: w, groups: 2, bias: true)
    }

    @Test func groupsThreeNoBiasUnevenStrideAndPadding() throws {
        let w = Window(kernelH: 2, kernelW: 3, strideH: 1, strideW: 2, padH: 0, padW: 1)
        try checkConvolution(Double.self, input: Shape(6, 5, 8), outC: 9, window: w, groups: 3, bias: false, batch: 3)
        try checkConvolution(Float.self, input: Shape(6, 5, 8), outC: 9, window: w, groups: 3, bias: false, batch: 3)
    }

    @Test func groupsThreeStrideTwoBias() throws {
        let w = Window(kernelH: 3, kernelW: 3, strideH: 2, strideW: 2, padH: 1, padW: 1)
        try checkConvolution(Double.self, input: Shape(3, 6, 5), outC: 6, window: w, groups: 3, bias: true)
        try checkConvolution(Float.self, input: Shape(3, 6, 5), outC: 6, window: w, groups: 3, bias: true)
    }

    @Test func ungroupedPaddingWiderThanHalfTheKernel() throws {
        let w = Window(kernelH: 3, kernelW: 3, padH: 2, padW: 2)
        try checkConvolution(Double.self, input: Shape(3, 5, 4), outC: 2, window: w, groups: 1, bias: true)
        try checkConvolution(Float.self, input: Shape(3, 5, 4), outC: 2, window: w, groups: 1, bias: true)
        try checkConvolution(Double.self, input: Shape(3, 5, 4), outC: 2, window: w, groups: 1, bias: false, batch: 1)
    }

    @Test func pointwiseWithGroups() throws {
        // 1x1, stride 1, no padding: the path without im2col.
        let w = Window(kernelH: 1, kernelW: 1)
        try checkConvolution(Double.self, input: Shape(4, 3, 5), outC: 6, window: w, groups: 2, bias: true, batch: 3)
        try checkConvolution(Float.self, input: Shape(4, 3, 5), outC: 6, window: w, groups: 2, bias: true, batch: 3)
        try checkConvolution(Double.self, input: Shape(6, 2, 3), outC: 3, window: w, groups: 3, bias: false)
        try checkConvolution(Float.self, input: Shape(6, 2, 3), outC: 3, window: w, groups: 3, bias: false)
    }

    @Test func oneByOneStridedOrPaddedTakesTheGeneralPath() throws {
        // Strided: every other position. Padded: the border sees only the bias.
        let strided = Window(kernelH: 1, kernelW: 1, strideH: 2, strideW: 2)
        try checkConvolution(Double.self, input: Shape(4, 5, 6), outC: 2, window: strided, groups: 2, bias: true)
        try checkConvolution(Float.self, input: Shape(4, 5, 6), outC: 2, window: strided, groups: 2, bias: true)
        let padded = Window(kernelH: 1, kernelW: 1, padH: 1, padW: 1)
        try checkConvolution(Double.self, input: Shape(2, 3, 4), outC: 4, window: padded, groups: 2, bias: true)
        try checkConvolution(Float.self, input: Shape(2, 3, 4), outC: 4, window: padded, groups: 1, bias: true)
    }

    @Test func referenceAgreesWithAHandComputedValue() {
        // The reference itself, on numbers small enough to check by hand: 1x2x2 input, 2x2 kernel, pad 0.
        let y = naiveConvolution([1, 2, 3, 4], batch: 1, input: Shape(1, 2, 2), weight: [1, 0, -1, 2], bias: [0.5],
                                 outC: 1, window: Window(kernelH: 2, kernelW: 2), groups: 1)
        #expect(y == [6.5])   // 1*1 + 2*0 + 3*(-1) + 4*2 + 0.5
    }
}

// MARK: - Pooling

private func checkPool<T: Scalar>(_ type: T.Type, input: Shape, window: Window, average: Bool, batch: Int = 2, negative: Bool = false,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws {
    let kind: LayerKind = average ? .avgPool(window) : .maxPool(window)
    // All-negative inputs: a padded zero would win every border window if padding took part.
    let x: [T] = referenceRandom(batch * input.count, seed: 201, scale: negative ? 1 : 2, offset: negative ? -2 : 0)
    let got = try referenceRun(input, [LayerSpec(name: "pool", kind: kind)], batch: batch, x: x, training: true).output
    let want = naivePool(doubles(x), batch: batch, input: input, window: window, average: average)
    expectMatches(got, want, "\(average ? "avg" : "max") pool \(input) \(window.description)", sourceLocation: sourceLocation)
}

@Suite struct PoolingReference {
    @Test func maxPoolTwoByTwoStrideTwo() throws {
        let w = Window(kernelH: 2, kernelW: 2, strideH: 2, strideW: 2)
        try checkPool(Double.self, input: Shape(3, 6, 8), window: w, average: false)
        try checkPool(Float.self, input: Shape(3, 6, 8), window: w, average: false)
        // Odd sizes: floor mode drops the last row and column.
        try checkPool(Double.self, input: Shape(2, 7, 5), window: w, average: false)
        try checkPool(Float.self, input: Shape(2, 7, 5), window: w, average: false)
    }

    @Test func maxPoolOverlappingPaddedPaddingNeverWins() throws {
        let w = Window(kernelH: 3, kernelW: 3, strideH: 2, strideW: 2, padH: 1, padW: 1)
        for negative in [false, true] {
            try checkPool(Double.self, input: Shape(2, 7, 6), window: w, average: false, negative: negative)
            try checkPool(Float.self, input: Shape(2, 7, 6), window: w, average: false, negative: negative)
        }
        // Directly: every value negative, so every output must be negative (a zero means padding won).
        let x = [Double](repeating: -1, count: 2 * 5 * 5).enumerated().map { -1 - Double($0.offset) / 100 }
        let y = try referenceRun(Shape(2, 5, 5), [LayerSpec(name: "pool", kind: .maxPool(w))], batch: 1, x: x, training: false).output
        #expect(y.count == 2 * 3 * 3)
        #expect(y.allSatisfy { $0 < 0 }, "\(y)")
    }

    @Test func avgPoolPaddedCountsPadding() throws {
        // count_include_pad: a corner window of 3x3 pad 1 holds 4 real values and divides by 9.
        let w = Window(kernelH: 3, kernelW: 3, strideH: 2, strideW: 2, padH: 1, padW: 1)
        try checkPool(Double.self, input: Shape(2, 7, 5), window: w, average: true)
        try checkPool(Float.self, input: Shape(2, 7, 5), window: w, average: true)
        let ones = [Double](repeating: 1, count: 5 * 5)
        let y = try referenceRun(Shape(1, 5, 5), [LayerSpec(name: "pool", kind: .avgPool(w))], batch: 1, x: ones, training: false).output
        #expect(abs(y[0] - 4.0 / 9) < 1e-15 && abs(y[1] - 6.0 / 9) < 1e-15 && abs(y[4] - 1) < 1e-15, "\(y)")
    }

    @Test func avgPoolNonSquarePaddedAndUnpadded() throws {
        let padded = Window(kernelH: 2, kernelW: 3, strideH: 1, strideW: 2, padH: 1, padW: 1)
        try checkPool(Double.self, input: Shape(3, 5, 6), window: padded, average: true)
        try checkPool(Float.self, input: Shape(3, 5, 6), window: padded, average: true)
        let plain = Window(kernelH: 2, kernelW: 2, strideH: 2, strideW: 2)
        try checkPool(Double.self, input: Shape(2, 5, 7), window: plain, average: true)
        try checkPool(Float.self, input: Shape(2, 5, 7), window: plain, average: true)
    }

    @Test func globalAveragePool() throws {
        func check<T: Scalar>(_: T.Type) throws {
            let input = Shape(3, 4, 5), batch = 2
            let x: [T] = referenceRandom(batch * input.count, seed: 301)
            let got = try referenceRun(input, [LayerSpec(name: "gap", kind: .globalAvgPool)], batch: batch, x: x, training: false).output
            let xd = doubles(x)
            let want = (0..<(batch * input.channels)).map { p in xd[(p * input.plane)..<((p + 1) * input.plane)].reduce(0, +) / Double(input.plane) }
            expectMatches(got, want, "global average pool")
        }
        try check(Double.self)
        try check(Float.self)
    }
}

// MARK: - Local response normalisation

@Suite struct LRNReference {
    private func check<T: Scalar>(_: T.Type, input: Shape, size: Int, alpha: Double, beta: Double, k: Double,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws {
        let batch = 2
        let x: [T] = referenceRandom(batch * input.count, seed: 401, scale: 2)
        let spec = LayerSpec(name: "lrn", kind: .lrn(size: size, alpha: alpha, beta: beta, k: k))
        let got = try referenceRun(input, [spec], batch: batch, x: x, training: true).output
        let want = naiveLRN(doubles(x), batch: batch, input: input, size: size, alpha: alpha, beta: beta, k: k)
        expectMatches(got, want, "LRN size \(size) beta \(beta)", sourceLocation: sourceLocation)
        // The normalisation must be strong enough that getting it wrong shows.
        let change = zip(want, doubles(x)).map { abs($0 - $1) }.max() ?? 0
        #expect(change > 0.1, sourceLocation: sourceLocation)
    }

    @Test func sizeFiveBetaThreeQuarters() throws {
        try check(Double.self, input: Shape(7, 2, 3), size: 5, alpha: 1, beta: 0.75, k: 2)
        try check(Float.self, input: Shape(7, 2, 3), size: 5, alpha: 1, beta: 0.75, k: 2)
    }

    @Test func evenSizeFourBetaPointSix() throws {
        // Even size: the window is c-2...c+1 (size/2 before, (size-1)/2 after).
        try check(Double.self, input: Shape(6, 3, 2), size: 4, alpha: 0.5, beta: 0.6, k: 1)
        try check(Float.self, input: Shape(6, 3, 2), size: 4, alpha: 0.5, beta: 0.6, k: 1)
    }

    @Test func windowWiderThanTheChannels() throws {
        try check(Double.self, input: Shape(3, 2, 2), size: 9, alpha: 2, beta: 0.75, k: 1)
        try check(Float.self, input: Shape(2, 1, 3), size: 4, alpha: 2, beta: 0.6, k: 1)
    }
}

// MARK: - Batch normalisation

@Suite struct BatchNormReference {
    static let eps = 1e-5
    static let spec = LayerSpec(name: "bn", kind: .batchNorm(eps: eps, momentum: 0.1))

    /// Parameters gamma (around 1) and beta, running mean and a positive running variance.
    private func setup<T: Scalar>(_: T.Type, _ input: Shape, batch: Int) -> (x: [T], parameters: [T], statistics: [T]) {
        let C = input.channels
        let x: [T] = referenceRandom(batch * input.count, seed: 501, scale: 2, offset: 0.5)
        let gamma: [T] = referenceRandom(C, seed: 502, scale: 0.5, offset: 1)
        let beta: [T] = referenceRandom(C, seed: 503)
        let runningMean: [T] = referenceRandom(C, seed: 504)
        let runningVar: [T] = referenceRandom(C, seed: 505, scale: 0.5, offset: 1.5)
        return (x, gamma + beta, runningMean + runningVar)
    }

    private func checkTraining<T: Scalar>(_: T.Type, _ input: Shape, batch: Int, parts: Int = 1,
                                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        let C = input.channels
        let (x, parameters, statistics) = setup(T.self, input, batch: batch)
        let (got, newStatistics) = try referenceRun(input, [Self.spec], batch: batch, x: x, parameters: parameters,
                                                     statistics: statistics, training: true, parts: parts)
        let p = doubles(parameters), s = doubles(statistics)
        let batchStatistics = naiveChannelStatistics(doubles(x), batch: batch, input: input)
        let want = naiveNormalize(doubles(x), batch: batch, input: input, mean: batchStatistics.map(\.mean),
                                  variance: batchStatistics.map(\.biased), gamma: Array(p[0..<C]), beta: Array(p[C...]), eps: Self.eps)
        expectMatches(got, want, "batch norm training \(input) x\(batch) parts \(parts)", sourceLocation: sourceLocation)
        // running = 0.9 * running + 0.1 * batch statistic, the variance unbiased (m / (m - 1)).
        let wantMean = (0..<C).map { 0.9 * s[$0] + 0.1 * batchStatistics[$0].mean }
        let wantVar = (0..<C).map { 0.9 * s[C + $0] + 0.1 * batchStatistics[$0].unbiased }
        expectMatches(newStatistics, wantMean + wantVar, "running statistics \(input) x\(batch) parts \(parts)", sourceLocation: sourceLocation)
    }

    @Test func trainingUsesBatchStatisticsAndBiasedVariance() throws {
        try checkTraining(Double.self, Shape(3, 2, 3), batch: 4)
        try checkTraining(Float.self, Shape(3, 2, 3), batch: 4)
        // Vectors (after a linear layer): per feature over the batch only.
        try checkTraining(Double.self, Shape(5, 1, 1), batch: 6)
        try checkTraining(Float.self, Shape(5, 1, 1), batch: 6)
    }

    @Test func trainingSplitOverTwoPartsUsesWholeBatchStatistics() throws {
        try checkTraining(Double.self, Shape(3, 2, 3), batch: 5, parts: 2)
        try checkTraining(Float.self, Shape(4, 1, 1), batch: 7, parts: 2)
    }

    @Test func evaluationUsesRunningStatisticsAndLeavesThem() throws {
        func check<T: Scalar>(_: T.Type, _ input: Shape, batch: Int) throws {
            let C = input.channels
            let (x, parameters, statistics) = setup(T.self, input, batch: batch)
            let (got, after) = try referenceRun(input, [Self.spec], batch: batch, x: x, parameters: parameters,
                                                 statistics: statistics, training: false)
            let p = doubles(parameters), s = doubles(statistics)
            let want = naiveNormalize(doubles(x), batch: batch, input: input, mean: Array(s[0..<C]), variance: Array(s[C...]),
                                      gamma: Array(p[0..<C]), beta: Array(p[C...]), eps: Self.eps)
            expectMatches(got, want, "batch norm evaluation \(input)")
            #expect(after == statistics)
        }
        try check(Double.self, Shape(3, 2, 3), batch: 3)
        try check(Float.self, Shape(3, 2, 3), batch: 3)
        try check(Double.self, Shape(4, 1, 1), batch: 1)
    }

    @Test func runningStatisticsOverSeveralSteps() throws {
        // Two training passes on different batches: the averages compound (0.81 * initial + ...).
        let input = Shape(2, 1, 3), batch = 3, C = 2
        let graph = try Graph(input: input, layers: [Self.spec])
        let net = Network<Double>(graph: graph, capacity: batch)
        Initializer.initialize(net, scheme: .xavier, seed: 1)
        #expect(Array(net.statistics) == [0, 0, 1, 1])
        var mean = [0.0, 0.0], variance = [1.0, 1.0]
        for step in 0..<2 {
            let x: [Double] = referenceRandom(batch * input.count, seed: 600 + UInt64(step), scale: 3)
            net.input.update(from: x, count: x.count)
            net.forward(count: batch, training: true, step: step)
            let stats = naiveChannelStatistics(x, batch: batch, input: input)
            for c in 0..<C {
                mean[c] = 0.9 * mean[c] + 0.1 * stats[c].mean
                variance[c] = 0.9 * variance[c] + 0.1 * stats[c].unbiased
            }
        }
        expectMatches(Array(net.statistics), mean + variance, "running statistics after two steps")
    }

    @Test func noUpdateWhenAskedNot() throws {
        let input = Shape(3, 2, 2)
        let (x, parameters, statistics) = setup(Double.self, input, batch: 2)
        let after = try referenceRun(input, [Self.spec], batch: 2, x: x, parameters: parameters, statistics: statistics,
                                     training: true, updateStatistics: false).statistics
        #expect(after == statistics)
    }
}

// MARK: - Softmax cross-entropy

@Suite struct SoftmaxCrossEntropyReference {
    /// loss_b = -log softmax(z_b)[label] = log sum_j exp(z_bj) - z_b,label, naively (no max shift).
    private func naive(_ z: [Double], labels: [Int32], classes: Int) -> (losses: [Double], softmax: [Double]) {
        var losses: [Double] = [], softmax: [Double] = []
        for b in 0..<labels.count {
            let row = z[(b * classes)..<((b + 1) * classes)]
            let sum = row.reduce(0) { $0 + Double.exp($1) }
            losses.append(-Double.log(Double.exp(row[b * classes + Int(labels[b])]) / sum))
            softmax += row.map { Double.exp($0) / sum }
        }
        return (losses, softmax)
    }

    private func check<T: Scalar>(_: T.Type) {
        let n = 4, classes = 5
        let z: [T] = referenceRandom(n * classes, seed: 701, scale: 3)
        let labels: [Int32] = [0, 4, 2, 2]
        let scale = 0.25
        var d = [T](repeating: .nan, count: n * classes)
        let r = softmaxCrossEntropy(&d, z, labels: labels, n: n, classes: classes, scale: T(scale))
        let (losses, softmax) = naive(doubles(z), labels: labels, classes: classes)
        expectMatches([T(r.loss)], [losses.reduce(0, +)], "summed loss")
        var wantGradient = softmax.map { $0 * scale }
        for b in 0..<n { wantGradient[b * classes + Int(labels[b])] -= scale }
        expectMatches(d, wantGradient, "loss gradient")
        let zd = doubles(z)
        let argmax = (0..<n).map { b in (0..<classes).max { zd[b * classes + $0] < zd[b * classes + $1] }! }
        #expect(r.correct == (0..<n).filter { argmax[$0] == Int(labels[$0]) }.count)
    }

    @Test func matchesNaiveLogSoftmax() {
        check(Double.self)
        check(Float.self)
    }

    @Test func matchesThroughTheNetwork() throws {
        // A linear layer with identity weights passes the logits through; computeLoss must agree.
        let classes = 3, n = 2
        let graph = try Graph(input: Shape(classes, 1, 1), layers: [LayerSpec(name: "fc", kind: .linear(outFeatures: classes, bias: false))])
        let net = Network<Double>(graph: graph, capacity: n)
        for i in 0..<classes { net.parameters[i * classes + i] = 1 }
        let z: [Double] = [1, 2, 3, -1, 0.5, 0]
        net.input.update(from: z, count: z.count)
        net.labels[0] = 2; net.labels[1] = 0
        net.forward(count: n, training: false)
        let r = net.computeLoss(count: n, scale: 1)
        let want = naive(z, labels: [2, 0], classes: classes).losses.reduce(0, +)
        #expect(abs(r.loss - want) < 1e-12)
        #expect(r.correct == 1)
        // evaluate() gives the same loss.
        #expect(abs(net.evaluate(count: n).loss - want) < 1e-12)
    }

    /// Logits of +-1000 (exp overflows both types) in rows whose exact losses are known:
    /// log(1 + e^-1 + e^-2); log 4; log(3 + e) - 1; and 2000 + log(1 + e^-1 + e^-2) for the -1000 label.
    private static let largeLogits: [Double] = [1000, 999, 998, -1000,   1000, 1000, 1000, 1000,   -1000, -1000, -999, -1000]
    private static let largeLabels: [Int32] = [0, 3, 2, 3]
    private static let largeRows = [0, 1, 2, 0]
    private static let tail = Double.log(1 + Double.exp(-1) + Double.exp(-2))
    private static let largeLosses = [tail, Double.log(4), Double.log(3 + Double.exp(1)) - 1, 2000 + tail]

    /// Runs each large-logit case alone; returns (loss, gradient) per case.
    private func largeLogitCases<T: Scalar>(_: T.Type) -> [(loss: Double, gradient: [T])] {
        let z = Self.largeLogits.map { T($0) }
        return (0..<Self.largeLabels.count).map { i in
            var d = [T](repeating: .nan, count: 4)
            let r = z.withUnsafeBufferPointer { zp in
                softmaxCrossEntropy(&d, zp.baseAddress! + Self.largeRows[i] * 4, labels: [Self.largeLabels[i]], n: 1, classes: 4, scale: 1)
            }
            return (r.loss, d)
        }
    }

    @Test func stableWithLargeLogits() {
        func check<T: Scalar>(_: T.Type, absolute: Double) {
            for (i, r) in largeLogitCases(T.self).enumerated() {
                #expect(r.loss.isFinite && r.gradient.allSatisfy { $0.isFinite }, "\(T.self) case \(i): loss \(r.loss), gradient \(r.gradient)")
                #expect(abs(r.loss - Self.largeLosses[i]) <= absolute * max(1, abs(Self.largeLosses[i]) / 1000),
                        "\(T.self) case \(i): loss \(r.loss), expected \(Self.largeLosses[i])")
                // softmax - onehot: each row of the gradient sums to zero.
                #expect(abs(r.gradient.reduce(0.0) { $0 + Double($1) }) <= 2 * absolute, "\(T.self) case \(i): \(r.gradient)")
            }
            // The whole batch at once.
            let z = Self.largeLogits.map { T($0) }
            var d = [T](repeating: .nan, count: z.count)
            let all = softmaxCrossEntropy(&d, z, labels: Array(Self.largeLabels.prefix(3)), n: 3, classes: 4, scale: 1)
            #expect(all.loss.isFinite && d.allSatisfy { $0.isFinite })
            #expect(abs(all.loss - Self.largeLosses.prefix(3).reduce(0, +)) <= 3 * absolute)
            #expect(all.correct == 2)   // rows 0 and 2; row 1 ties, and the first maximum (class 0) is not its label 3
        }
        check(Double.self, absolute: 1e-12)
        // The loss is log(sum) - (z_label - max), so large logits cost no precision (see the next test).
        check(Float.self, absolute: 1e-5)
    }

    @Test
    func floatLossKeepsRelativePrecisionWithLargeLogits() {
        for (i, r) in largeLogitCases(Float.self).enumerated() {
            #expect(abs(r.loss - Self.largeLosses[i]) <= 1e-5 * max(abs(Self.largeLosses[i]), 1), "case \(i): \(r.loss) vs \(Self.largeLosses[i])")
        }
    }
}
