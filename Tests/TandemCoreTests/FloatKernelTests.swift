// The Float32 C kernels (CKernels: vector square roots, AVX2 + FMA at run time) against the generic
// Swift path in Double that the gradient checks run: same maxima and argmax for pooling, the same
// LRN forward and backward to Float precision, on shapes that reach every vector and border path.
import CKernels
import Testing
@testable import TandemCore

private func values(_ count: Int, seed: UInt64, zeros: Bool) -> [Double] {
    var rng = SeededGenerator(seed: seed)
    // With zeros (as after a ReLU) ties are common, so the first-maximum rule is exercised.
    return (0..<count).map { _ in zeros && rng.uniform() < 0.4 ? 0.0 : rng.uniform() * 4 - 2 }
}

@Test(arguments: [
    // (height, width, kernel, stride, pad): 8-wide interior (AlexNet pool1), 4-wide (pool2), scalar (pool5),
    // stride 1 and 3, unpadded, non-square windows.
    (28, 28, 3, 2, 1), (14, 14, 3, 2, 1), (7, 7, 3, 2, 1), (15, 15, 3, 2, 0), (20, 11, 3, 1, 1),
    (19, 23, 3, 3, 1), (9, 30, 2, 2, 1), (6, 5, 5, 1, 2),
])
func floatMaxPoolMatchesTheGenericPath(height: Int, width: Int, kernel: Int, stride: Int, pad: Int) {
    let w = Window(kernelH: kernel, kernelW: kernel, strideH: stride, strideW: stride, padH: pad, padW: pad)
    let s = PoolGeometry(input: Shape(3, height, width), window: w)
    let n = 2, count = n * 3 * height * width, out = n * 3 * s.outPlane
    for zeros in [false, true] {
        let xd = values(count, seed: 11, zeros: zeros), xf = xd.map { Float($0) }
        var yf = [Float](repeating: .nan, count: out), yd = [Double](repeating: .nan, count: out)
        var af = [Int32](repeating: -1, count: out), ad = [Int32](repeating: -1, count: out)
        maxPoolForward(&yf, argmax: &af, xf, n: n, s)
        maxPoolForward(&yd, argmax: &ad, xd, n: n, s)
        #expect(af == ad, "argmax \(height)x\(width) k\(kernel) s\(stride) p\(pad)")
        #expect(zip(yf, yd).allSatisfy { Double($0) == Double(Float($1)) })
    }
}

@Test(arguments: [(64, 28, 28, 1, 0.75), (12, 5, 7, 2, 0.75), (6, 3, 3, 1, 0.6), (10, 9, 4, 2, 0.5)])
func floatLRNMatchesTheGenericPath(channels: Int, height: Int, width: Int, groups: Int, beta: Double) {
    let p = LRNParameters(size: 5, alpha: 0.5, beta: beta, k: 2, groups: groups)
    let n = 2, plane = height * width, count = n * channels * plane
    let xd = values(count, seed: 21, zeros: false), dyd = values(count, seed: 22, zeros: false)
    let xf = xd.map { Float($0) }, dyf = dyd.map { Float($0) }
    var yd = [Double](repeating: 0, count: count), sd = yd, dxd = yd, rd = [Double](repeating: 0, count: channels * plane)
    var yf = [Float](repeating: 0, count: count), sf = yf, dxf = yf, rf = [Float](repeating: 0, count: channels * plane)
    lrnForward(&yd, scale: &sd, xd, n: n, channels: channels, plane: plane, p)
    lrnForward(&yf, scale: &sf, xf, n: n, channels: channels, plane: plane, p)
    lrnBackward(&dxd, ratio: &rd, dyd, x: xd, y: yd, scale: sd, n: n, channels: channels, plane: plane, p)
    lrnBackward(&dxf, ratio: &rf, dyf, x: xf, y: yf, scale: sf, n: n, channels: channels, plane: plane, p)
    func worst(_ f: [Float], _ d: [Double]) -> Double {
        let largest = d.map(abs).max() ?? 1
        return zip(f, d).map { abs(Double($0) - $1) }.max()! / largest
    }
    #expect(worst(yf, yd) < 1e-6, "forward")
    #expect(worst(sf, sd) < 1e-6, "scale")
    #expect(worst(dxf, dxd) < 1e-5, "backward")
    // Strong enough that a wrong normalisation shows.
    #expect(zip(yd, xd).map { abs($0 - $1) }.max()! > 0.1)
}

@Test(arguments: [
    // (channels, height, width, outChannels, kernel, stride, pad, groups)
    (4, 9, 7, 6, 3, 1, 1, 2), (3, 11, 10, 4, 5, 2, 2, 1), (6, 8, 8, 6, 3, 3, 0, 3), (2, 5, 6, 3, 2, 1, 0, 1),
])
func floatIm2colAndCol2imMatchTheGenericPath(channels: Int, height: Int, width: Int, outChannels: Int,
                                              kernel: Int, stride: Int, pad: Int, groups: Int) {
    let w = Window(kernelH: kernel, kernelW: kernel, strideH: stride, strideW: stride, padH: pad, padW: pad)
    let s = ConvGeometry(input: Shape(channels, height, width), outChannels: outChannels, window: w, groups: groups)
    let n = 3, cols = n * s.outPlane, inCount = n * channels * s.inPlane
    let xd = values(inCount, seed: 31, zeros: false), dcold = values(s.k * cols, seed: 32, zeros: false)
    var cd = [Double](repeating: .nan, count: s.k * cols), cf = [Float](repeating: .nan, count: s.k * cols)
    var dxd = [Double](repeating: .nan, count: inCount), dxf = [Float](repeating: .nan, count: inCount)
    for g in 0..<groups {
        im2col(&cd, xd, group: g, n: n, s)
        im2col(&cf, xd.map { Float($0) }, group: g, n: n, s)
        #expect(zip(cf, cd).allSatisfy { Double($0) == Double(Float($1)) }, "im2col group \(g)")
        col2im(&dxd, dcold, group: g, n: n, s)
        col2im(&dxf, dcold.map { Float($0) }, group: g, n: n, s)
    }
    let largest = dxd.map(abs).max()!
    #expect(zip(dxf, dxd).allSatisfy { abs(Double($0) - $1) <= 1e-5 * largest }, "col2im")
}

/// Forward output, weight and bias gradients and input gradient of one convolution, computed with
/// the batch in chunks of `chunk` samples (nil: whole).
private func convStep<T: Scalar>(_: T.Type, _ s: ConvGeometry, n: Int, chunk: Int?) -> (y: [T], dw: [T], dx: [T]) {
    let x: [T] = values(n * s.inC * s.inPlane, seed: 41, zeros: false).map { T($0) }
    let w: [T] = values(s.outC * s.k + s.outC, seed: 42, zeros: false).map { T($0) }
    let dy: [T] = values(n * s.outC * s.outPlane, seed: 43, zeros: false).map { T($0) }
    var y = [T](repeating: 0, count: n * s.outC * s.outPlane), dw = [T](repeating: 0, count: w.count)
    var dx = [T](repeating: .nan, count: x.count)
    var cols = [T](repeating: 0, count: s.groups * s.k * n * s.outPlane), tmp = [T](repeating: 0, count: s.outGroup * n * s.outPlane)
    var dcol = [T](repeating: 0, count: s.k * n * s.outPlane)
    w.withUnsafeBufferPointer { wp in
        convForward(&y, cols: &cols, tmp: &tmp, x, weight: wp.baseAddress!, bias: wp.baseAddress! + s.outC * s.k, n: n, s, chunk: chunk)
        dw.withUnsafeMutableBufferPointer { dwp in
            convBackward(&dx, dWeight: dwp.baseAddress!, dBias: dwp.baseAddress! + s.outC * s.k, tmp: &tmp, dcol: &dcol,
                         dy, x: x, cols: cols, weight: wp.baseAddress!, n: n, s, chunk: chunk)
        }
    }
    return (y, dw, dx)
}

@Test(arguments: [1, 2, 3, 7])
func convolutionInChunksEqualsTheWholeBatch(chunk: Int) {
    let s = ConvGeometry(input: Shape(4, 9, 8), outChannels: 6, window: Window(kernelH: 3, kernelW: 3, padH: 1, padW: 1), groups: 2)
    let whole = convStep(Double.self, s, n: 7, chunk: nil), parts = convStep(Double.self, s, n: 7, chunk: chunk)
    func worst(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).map { abs($0 - $1) }.max()! / a.map(abs).max()! }
    #expect(worst(whole.y, parts.y) < 1e-12 && worst(whole.dw, parts.dw) < 1e-12 && worst(whole.dx, parts.dx) < 1e-12)
    let f = convStep(Float.self, s, n: 7, chunk: chunk)
    #expect(worst(whole.y, f.y.map(Double.init)) < 1e-5 && worst(whole.dw, f.dw.map(Double.init)) < 1e-5 && worst(whole.dx, f.dx.map(Double.init)) < 1e-5)
}

@Test func chunkSizesKeepTheColumnMatrixInCache() {
    // LeNet-5's conv2 (K = 150, 10x10 outputs): 8 samples of 60 KB (at most 8); the small AlexNet's conv2
    // (K = 288 per group, 14x14): 4 samples of 226 KB; a 2x2 output plane: too few columns, the whole batch.
    let lenet = ConvGeometry(input: Shape(6, 14, 14), outChannels: 16, window: Window(kernelH: 5, kernelW: 5), groups: 1)
    #expect(lenet.chunkSamples(batch: 64) == 8)
    #expect(lenet.chunkSamples(batch: 5) == 5)
    let alex = ConvGeometry(input: Shape(64, 14, 14), outChannels: 128, window: Window(kernelH: 3, kernelW: 3, padH: 1, padW: 1), groups: 2)
    #expect(alex.chunkSamples(batch: 64) == 4)
    let tiny = ConvGeometry(input: Shape(8, 4, 4), outChannels: 8, window: Window(kernelH: 3, kernelW: 3), groups: 1)
    #expect(tiny.chunkSamples(batch: 64) == 64)
    // The layer sizes its GEMM scratch for the chunk of its capacity: no smaller batch may need more.
    for geometry in [lenet, alex, tiny] {
        for n in 1...64 { #expect(geometry.chunkSamples(batch: n) <= geometry.chunkSamples(batch: 64)) }
    }
}

@Test(arguments: [1, 13, 64])
func floatBatchNormMatchesTheGenericPath(plane: Int) {
    let n = 3, channels = 5, count = n * channels * plane
    let xd = values(count, seed: 51, zeros: false).map { $0 * 3 + 1 }, dyd = values(count, seed: 52, zeros: false)
    let gd = values(channels, seed: 53, zeros: false), bd = values(channels, seed: 54, zeros: false)
    func run<T: Scalar>(_: T.Type) -> (sums: [Double], y: [T], yEval: [T], dx: [T]) {
        let x = xd.map { T($0) }, dy = dyd.map { T($0) }, gamma = gd.map { T($0) }, beta = bd.map { T($0) }
        var s = [Double](repeating: 0, count: 2 * channels), mean = [Double](repeating: 0, count: channels)
        var invStd = mean
        channelSums(&s, x, n: n, channels: channels, plane: plane)
        for c in 0..<channels { mean[c] = s[c] / Double(n * plane) }
        let means = Array(s[0..<channels])
        channelSquaredDeviations(&s, x, mean: mean, n: n, channels: channels, plane: plane)
        for c in 0..<channels { invStd[c] = 1 / (s[c] / Double(n * plane) + 1e-5).squareRoot() }
        let deviations = Array(s[0..<channels])
        var y = [T](repeating: 0, count: count), yEval = y, xhat = y, dx = y
        batchNormApply(&y, xhat: &xhat, x, mean: mean, invStd: invStd, gamma: gamma, beta: beta, n: n, channels: channels, plane: plane)
        batchNormApply(&yEval, xhat: nil, x, mean: mean, invStd: invStd, gamma: gamma, beta: beta, n: n, channels: channels, plane: plane)
        batchNormGradientSums(&s, dy, xhat: xhat, n: n, channels: channels, plane: plane)
        batchNormInputGradient(&dx, dy, xhat: xhat, gamma: gamma, invStd: invStd, sums: s, count: n * plane, n: n, channels: channels, plane: plane)
        return (means + deviations + s, y, yEval, dx)
    }
    let d = run(Double.self), f = run(Float.self)
    func worst(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).map { abs($0 - $1) }.max()! / a.map(abs).max()! }
    #expect(worst(d.sums, f.sums) < 1e-5, "sums")
    #expect(worst(d.y.map { Double($0) }, f.y.map { Double($0) }) < 1e-5, "forward")
    #expect(worst(d.yEval.map { Double($0) }, f.yEval.map { Double($0) }) < 1e-5, "evaluation forward")
    #expect(worst(d.dx.map { Double($0) }, f.dx.map { Double($0) }) < 1e-4, "backward")
}

@Test(arguments: [(false, 0.0, 0.0), (true, 0.0, 0.0), (false, 1e-3, 0.0), (true, 1e-3, 0.0), (false, 1e-3, 1e-4), (true, 0.0, 1e-4)])
func floatSGDMatchesTheGenericPath(nesterov: Bool, l2: Double, l1: Double) {
    let n = 37   // a vector tail too; 40% of the weights start at zero, where sign(w) = 0
    var wd = values(n, seed: 61, zeros: true), vd = values(n, seed: 62, zeros: false)
    let gd = values(n, seed: 63, zeros: false)
    var wf = wd.map { Float($0) }, vf = vd.map { Float($0) }
    let gf = gd.map { Float($0) }
    for _ in 0..<3 {
        sgdUpdate(&wd, gd, &vd, count: n, lr: 0.1, momentum: 0.9, nesterov: nesterov, l2: l2, l1: l1)
        sgdUpdate(&wf, gf, &vf, count: n, lr: 0.1, momentum: 0.9, nesterov: nesterov, l2: Float(l2), l1: Float(l1))
    }
    #expect(zip(wf, wd).allSatisfy { abs(Double($0) - $1) < 1e-5 }, "weights")
    #expect(zip(vf, vd).allSatisfy { abs(Double($0) - $1) < 1e-5 }, "velocity")
}

@Test func allFiniteFindsANaNOrInfAnywhere() {
    var x = values(45, seed: 71, zeros: true).map { Float($0) * 1e30 }   // large but finite
    #expect(tandem_all_finite_f32(x, x.count) == 1)
    for bad in [Float.nan, .infinity, -.infinity] {
        for i in [0, 7, 8, 40, 44] {   // vector body and tail
            let keep = x[i]
            x[i] = bad
            #expect(tandem_all_finite_f32(x, x.count) == 0, "\(bad) at \(i)")
            x[i] = keep
        }
    }
}

/// The max pool's backward with the ReLU before it (the ReLU's output y as mask) gives the bits of the
/// ReLU's backward after the pool's, in Float (the C kernel) and Double: windows apart and overlapping,
/// gradients with NaN, infinities and signed zeros, ReLU outputs with many exact zeros.
@Test(arguments: [(2, 2, 0), (3, 2, 1), (2, 1, 0)])
func pooledReLUBackwardGivesTheBitsOfReLUThenPool(kernel: Int, stride: Int, pad: Int) {
    let w = Window(kernelH: kernel, kernelW: kernel, strideH: stride, strideW: stride, padH: pad, padW: pad)
    let s = PoolGeometry(input: Shape(3, 9, 10), window: w)
    let n = 2, count = n * 3 * 90, out = n * 3 * s.outPlane
    func check<T: Scalar>(_: T.Type) -> Bool {
        // The ReLU's output (its input is positive exactly where it is) and the pool's output gradient.
        let x = values(count, seed: 21, zeros: true).map { T(max($0, 0)) }
        var dy = values(out, seed: 22, zeros: true).map { T($0) }
        for (i, v) in [T.nan, T.infinity, -T.infinity, -T(0.0)].enumerated() { dy[5 * i + 1] = v }
        var y = [T](repeating: 0, count: out), argmax = [Int32](repeating: 0, count: out)
        maxPoolForward(&y, argmax: &argmax, x, n: n, s)
        var fused = [T](repeating: .nan, count: count), pooled = [T](repeating: .nan, count: count), plain = [T](repeating: .nan, count: count)
        maxPoolBackward(&fused, dy, argmax: argmax, n: n, s, relu: y)
        maxPoolBackward(&pooled, dy, argmax: argmax, n: n, s)
        activationBackward(&plain, pooled, x: x, y: x, count: count, .relu)
        return zip(fused, plain).allSatisfy { a, b in a.isNaN ? b.isNaN : (a == b && a.sign == b.sign) }
    }
    #expect(check(Float.self), "Float, \(kernel)x\(kernel) stride \(stride) pad \(pad)")
    #expect(check(Double.self), "Double, \(kernel)x\(kernel) stride \(stride) pad \(pad)")
}

/// Batch norm's apply with the ReLU fused gives the bits of apply then ReLU, in Float and Double, with
/// and without xhat.
@Test func batchNormApplyWithReLUGivesTheBitsOfApplyThenReLU() {
    let n = 3, channels = 4, plane = 37, count = n * channels * plane
    func check<T: Scalar>(_: T.Type, keepXhat: Bool) -> Bool {
        let x = values(count, seed: 23, zeros: false).map { T($0) }
        let mean: [Double] = [0.1, -0.3, 0.0, 0.7], invStd: [Double] = [1.5, 0.8, 2.0, 1.1]
        let gamma: [T] = [1, -0.5, 0.25, 2], beta: [T] = [0, 0.3, -0.2, -0.1]
        var h1 = [T](repeating: 0, count: count), h2 = [T](repeating: 0, count: count)
        var fused = [T](repeating: .nan, count: count), y = [T](repeating: .nan, count: count), plain = [T](repeating: .nan, count: count)
        h1.withUnsafeMutableBufferPointer { h in
            batchNormApply(&fused, xhat: keepXhat ? h.baseAddress : nil, x, mean: mean, invStd: invStd, gamma: gamma, beta: beta,
                           n: n, channels: channels, plane: plane, relu: true)
        }
        h2.withUnsafeMutableBufferPointer { h in
            batchNormApply(&y, xhat: keepXhat ? h.baseAddress : nil, x, mean: mean, invStd: invStd, gamma: gamma, beta: beta,
                           n: n, channels: channels, plane: plane)
        }
        activationForward(&plain, y, count: count, .relu)
        return fused.map { Double($0).bitPattern } == plain.map { Double($0).bitPattern } && h1 == h2 && fused.contains { $0 == 0 }
    }
    for keep in [false, true] {
        #expect(check(Float.self, keepXhat: keep), "Float, xhat \(keep)")
        #expect(check(Double.self, keepXhat: keep), "Double, xhat \(keep)")
    }
}

@Test(arguments: [(1, 400, 120), (3, 400, 120), (5, 120, 84), (17, 37, 10), (32, 400, 120), (7, 16, 5), (6, 65, 130)])
func wideLinearKernelsMatchDoubleAndDoNotDependOnTheRows(m: Int, k: Int, n: Int) throws {
    // The 16-wide fully connected forward and input gradient (products of at most 32 samples): close to
    // the products in Double, with every tile's row and column tails, and each sample's outputs
    // bit for bit the same as when it is computed alone (a chunk of one).
    let x = values(m * k, seed: 31, zeros: true).map { Float($0) }, w = values(n * k, seed: 32, zeros: false).map { Float($0) }
    let bias = values(n, seed: 33, zeros: false).map { Float($0) }, dy = values(m * n, seed: 34, zeros: false).map { Float($0) }
    var y = [Float](repeating: .nan, count: m * n), dx = [Float](repeating: .nan, count: m * k)
    guard tandem_linear_forward_f32(&y, x, w, bias, m, n, k) != 0 else { return }   // no AVX-512 here: OpenBLAS runs them
    #expect(tandem_linear_input_grad_f32(&dx, dy, w, m, n, k) != 0)
    for b in 0..<m {
        for j in 0..<n {
            var s = Double(bias[j])
            for p in 0..<k { s += Double(x[b * k + p]) * Double(w[j * k + p]) }
            #expect(abs(Double(y[b * n + j]) - s) <= 1e-5 * Double(k), "y[\(b)][\(j)] \(y[b * n + j]) vs \(s)")
        }
        for c in 0..<k {
            var s = 0.0
            for j in 0..<n { s += Double(dy[b * n + j]) * Double(w[j * k + c]) }
            #expect(abs(Double(dx[b * k + c]) - s) <= 1e-5 * Double(n), "dx[\(b)][\(c)] \(dx[b * k + c]) vs \(s)")
        }
        var y1 = [Float](repeating: .nan, count: n), dx1 = [Float](repeating: .nan, count: k)
        _ = tandem_linear_forward_f32(&y1, Array(x[(b * k)..<((b + 1) * k)]), w, bias, 1, n, k)
        _ = tandem_linear_input_grad_f32(&dx1, Array(dy[(b * n)..<((b + 1) * n)]), w, 1, n, k)
        #expect(y1 == Array(y[(b * n)..<((b + 1) * n)]) && dx1 == Array(dx[(b * k)..<((b + 1) * k)]), "sample \(b) of \(m)")
    }
}
