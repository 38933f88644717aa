import CKernels

// Convolution kernels. Layout NCHW throughout: N samples, C channels, H x W planes.
// A convolution with G groups splits input and output channels into G contiguous halves
// (thirds, ...); output group g sees only input group g (AlexNet's towers are groups).
//
// The general path lowers the whole batch of one group to a matrix (im2col), so that a single
// GEMM computes it: col[K, N*Ho*Wo] with K = C/G * kh * kw, rows ordered (c, ki, kj) and columns
// (n, oh, ow). A 1x1 stride-1 unpadded convolution skips im2col: its input plane already is the
// column matrix of one sample.

/// The shape of one convolution, resolved once when the model is built.
public struct ConvGeometry: Sendable {
    public var inC: Int, inH: Int, inW: Int
    public var outC: Int, outH: Int, outW: Int
    public var window: Window
    public var groups: Int
    public init(input: Shape, outChannels: Int, window: Window, groups: Int) {
        inC = input.channels; inH = input.height; inW = input.width
        (outH, outW) = window.outputSize(height: input.height, width: input.width)
        outC = outChannels; self.window = window; self.groups = groups
    }
    public var inPlane: Int { inH * inW }
    public var outPlane: Int { outH * outW }
    public var inGroup: Int { inC / groups }
    public var outGroup: Int { outC / groups }
    /// Rows of the column matrix of one group.
    public var k: Int { inGroup * window.kernelH * window.kernelW }
    /// The same shape for the C kernels.
    var c: TandemConvShape {
        TandemConvShape(inC: inC, inH: inH, inW: inW, outH: outH, outW: outW, inGroup: inGroup,
                        kH: window.kernelH, kW: window.kernelW, sH: window.strideH, sW: window.strideW, pH: window.padH, pW: window.padW)
    }
    /// Samples per im2col + GEMM for a batch of `n`: as many as keep one chunk's column matrix within
    /// `budget` bytes (a core's L2, so that the GEMM reads it from cache right after im2col wrote it),
    /// at most 8, and only when that still gives the GEMM at least 128 columns; otherwise the whole
    /// batch. Measured (1 thread, batch 64): LeNet-5's conv2 (150 x 100 per sample) best at 8 samples
    /// (0.84-0.90 ms forward, 1.1-1.2 at 16, 1.5 whole); the small AlexNet's conv2 at 4 (13.5 ms forward,
    /// 16-19.5 whole).
    public func chunkSamples(batch n: Int, budget: Int = 1 << 20) -> Int {
        let perSample = max(1, k * outPlane * 4)
        let c = min(8, max(1, budget / perSample))
        return c * outPlane >= 128 && c < n ? c : n
    }

    /// Where the column matrix of group `g`'s chunk starting at sample `s0` lies in `cols` for a batch
    /// of `n`: each group's block holds its chunks' matrices one after another (forward writes them,
    /// backward reads them).
    func columnsOffset(group g: Int, sample s0: Int, batch n: Int) -> Int { (g * n + s0) * k * outPlane }

    /// Shapes the direct kernel takes: stride 1, one group, at most 4 input channels, kernel width <= 8.
    var allowsDirect: Bool {
        groups == 1 && window.strideH == 1 && window.strideW == 1 && inC <= 4 && window.kernelW <= 8 && !isPointwise
    }
    /// Shapes the channel-vectorised direct kernels take (`tandem_cv_*`): stride 1, padding below the
    /// kernel size, at least 8 output channels per group, planes of at most 4,096 positions and windows
    /// of at most 8,192 taps (their tables live on the stack). Without a column matrix they beat im2col +
    /// GEMM on every convolution of LeNet-5 and the small AlexNet that they take (1 thread, batch 64,
    /// forward): LeNet-5's conv2 1.15 -> 0.38-0.44 ms; the small AlexNet's conv1 5.7 -> 3.0, conv2
    /// 13.6-14.5 -> 11.0-12.3, conv4 15.9 -> 11.9, conv5 12.5 -> 7.7, conv3 17.8 -> 16.9-17.8.
    var allowsChannelDirect: Bool {
        window.strideH == 1 && window.strideW == 1 && !isPointwise && outGroup >= 8 && k <= 8192
            && window.padH < window.kernelH && window.padW < window.kernelW && inPlane <= 4096 && outPlane <= 4096
    }
    /// The input gradient of a stride-1 convolution is itself a stride-1 convolution: of dy (outC
    /// channels, padded by kernel - 1 - pad) with the weights flipped in both axes and in- and output
    /// channels swapped within each group. This is that convolution's geometry, when the
    /// channel-vectorised kernels can run it without convolving mostly padding: padding of at least
    /// half the kernel (AlexNet's 3x3 windows with padding 1: dy padded by 1), at least 8 input
    /// channels per group. LeNet-5's conv2 (5x5, no padding) keeps GEMM + col2im: dy padded by 4,
    /// two thirds of the taps would land on zeros (1.1 ms against 0.7 for GEMM + col2im, session 3).
    public var inputGradientAsConvolution: ConvGeometry? {
        guard allowsChannelDirect, 2 * window.padH >= window.kernelH - 1, 2 * window.padW >= window.kernelW - 1 else { return nil }
        let t = ConvGeometry(input: Shape(outC, outH, outW), outChannels: inC,
                             window: Window(kernelH: window.kernelH, kernelW: window.kernelW,
                                            padH: window.kernelH - 1 - window.padH, padW: window.kernelW - 1 - window.padW),
                             groups: groups)
        return t.allowsChannelDirect && t.outH == inH && t.outW == inW ? t : nil
    }
    public var isPointwise: Bool {
        window.kernelH == 1 && window.kernelW == 1 && window.strideH == 1 && window.strideW == 1 && window.padH == 0 && window.padW == 0
    }
}

/// The range of output positions o (0..<outSize) whose input position o*stride - pad + offset lies in 0..<inSize.
@inline(__always)
func validRange(outSize: Int, inSize: Int, stride: Int, pad: Int, offset: Int) -> Range<Int> {
    // o*stride >= pad - offset  and  o*stride <= inSize - 1 + pad - offset
    let lowNum = pad - offset
    let lo = lowNum <= 0 ? 0 : (lowNum + stride - 1) / stride
    let highNum = inSize - 1 + pad - offset
    let hi = highNum < 0 ? -1 : min(outSize - 1, highNum / stride)
    return lo <= hi ? lo..<(hi + 1) : lo..<lo
}

/// im2col for group `g` over samples 0..<n (Float: the C kernel): col[K, n*Ho*Wo] (row-major), zero where the window
/// covers padding.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func im2col<T: Scalar>(_ col: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>, group g: Int, n: Int, _ s: ConvGeometry) {
    if T.self == Float.self { tandem_im2col_f32(floats(col), floats(x), g, n, s.c); return }
    let w = s.window
    let cols = n * s.outPlane
    for c in 0..<s.inGroup {
        let channel = g * s.inGroup + c
        for ki in 0..<w.kernelH {
            let rowsH = validRange(outSize: s.outH, inSize: s.inH, stride: w.strideH, pad: w.padH, offset: ki)
            for kj in 0..<w.kernelW {
                let row = (c * w.kernelH + ki) * w.kernelW + kj
                let colsW = validRange(outSize: s.outW, inSize: s.inW, stride: w.strideW, pad: w.padW, offset: kj)
                for b in 0..<n {
                    let src = x + (b * s.inC + channel) * s.inPlane
                    let dst = col + row * cols + b * s.outPlane
                    for oh in 0..<s.outH {
                        let d = dst + oh * s.outW
                        if !rowsH.contains(oh) {
                            d.update(repeating: 0, count: s.outW)
                            continue
                        }
                        let ih = oh * w.strideH - w.padH + ki
                        let srow = src + ih * s.inW - w.padW + kj
                        if colsW.lowerBound > 0 { d.update(repeating: 0, count: colsW.lowerBound) }
                        if w.strideW == 1 {
                            (d + colsW.lowerBound).update(from: srow + colsW.lowerBound, count: colsW.count)
                        } else {
                            for ow in colsW { d[ow] = srow[ow * w.strideW] }
                        }
                        if colsW.upperBound < s.outW { (d + colsW.upperBound).update(repeating: 0, count: s.outW - colsW.upperBound) }
                    }
                }
            }
        }
    }
}

/// col2im for group `g` (Float: the C kernel): writes (not adds) the input gradient of the group's channels from
/// dcol[K, n*Ho*Wo], summing the windows that overlap.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func col2im<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dcol: UnsafePointer<T>, group g: Int, n: Int, _ s: ConvGeometry) {
    if T.self == Float.self { tandem_col2im_f32(floats(dx), floats(dcol), g, n, s.c); return }
    let w = s.window
    let cols = n * s.outPlane
    for b in 0..<n {
        (dx + (b * s.inC + g * s.inGroup) * s.inPlane).update(repeating: 0, count: s.inGroup * s.inPlane)
    }
    for c in 0..<s.inGroup {
        let channel = g * s.inGroup + c
        for ki in 0..<w.kernelH {
            let rowsH = validRange(outSize: s.outH, inSize: s.inH, stride: w.strideH, pad: w.padH, offset: ki)
            for kj in 0..<w.kernelW {
                let row = (c * w.kernelH + ki) * w.kernelW + kj
                let colsW = validRange(outSize: s.outW, inSize: s.inW, stride: w.strideW, pad: w.padW, offset: kj)
                for b in 0..<n {
                    let dst = dx + (b * s.inC + channel) * s.inPlane
                    let src = dcol + row * cols + b * s.outPlane
                    for oh in rowsH {
                        let ih = oh * w.strideH - w.padH + ki
                        let drow = dst + ih * s.inW - w.padW + kj
                        let srow = src + oh * s.outW
                        if w.strideW == 1 {
                            for ow in colsW { drow[ow] += srow[ow] }
                        } else {
                            for ow in colsW { drow[ow * w.strideW] += srow[ow] }
                        }
                    }
                }
            }
        }
    }
}

/// Convolution forward over n samples.
/// - Parameters:
///   - y: output [n, outC, outH, outW].
///   - cols: for the im2col path, G column matrices of K x n*Ho*Wo each, kept for backward.
///   - tmp: outGroup x chunk*Ho*Wo scratch (the GEMM result before it is reordered to NCHW).
///   - chunk: samples per im2col + GEMM (nil: the whole batch); see `ConvGeometry.chunkSamples`.
///   - weight: [outC, inC/G, kh, kw]; bias: [outC] or nil.
///   - relu: write max(0, output) (a ReLU fused into the convolution).
@_specialize(where T == Float)
@_specialize(where T == Double)
public func convForward<T: Scalar>(
    _ y: UnsafeMutablePointer<T>, cols: UnsafeMutablePointer<T>, tmp: UnsafeMutablePointer<T>,
    _ x: UnsafePointer<T>, weight: UnsafePointer<T>, bias: UnsafePointer<T>?, n: Int, _ s: ConvGeometry, chunk: Int? = nil,
    relu: Bool = false
) {
    let plane = s.outPlane
    let cg = s.outGroup
    if s.isPointwise {
        for b in 0..<n {
            for g in 0..<s.groups {
                T.gemm(transA: false, transB: false, m: cg, n: plane, k: s.inGroup,
                       alpha: 1, a: weight + g * cg * s.inGroup, lda: s.inGroup,
                       b: x + (b * s.inC + g * s.inGroup) * plane, ldb: plane,
                       beta: 0, c: y + (b * s.outC + g * cg) * plane, ldc: plane)
            }
            if bias != nil || relu {
                for c in 0..<s.outC {
                    let row = y + (b * s.outC + c) * plane
                    let v = bias?[c] ?? 0
                    if relu { for i in 0..<plane { let t = row[i] + v; row[i] = t > 0 ? t : 0 } } else { for i in 0..<plane { row[i] += v } }
                }
            }
        }
        return
    }
    let chunk = max(1, min(chunk ?? n, n))
    for g in 0..<s.groups {
        for s0 in stride(from: 0, to: n, by: chunk) {
            let cs = min(chunk, n - s0), cols1 = cs * plane
            let col = cols + s.columnsOffset(group: g, sample: s0, batch: n)
            im2col(col, x + s0 * s.inC * s.inPlane, group: g, n: cs, s)
            T.gemm(transA: false, transB: false, m: cg, n: cols1, k: s.k,
                   alpha: 1, a: weight + g * cg * s.k, lda: s.k, b: col, ldb: cols1,
                   beta: 0, c: tmp, ldc: cols1)
            // [cg, cs, plane] -> [n, outC, plane], adding the bias (and applying the ReLU) on the way.
            for c in 0..<cg {
                let oc = g * cg + c
                let v = bias?[oc] ?? 0
                for b in 0..<cs {
                    let src = tmp + c * cols1 + b * plane
                    let dst = y + ((s0 + b) * s.outC + oc) * plane
                    if relu { for i in 0..<plane { let t = src[i] + v; dst[i] = t > 0 ? t : 0 } } else { for i in 0..<plane { dst[i] = src[i] + v } }
                }
            }
        }
    }
}

/// Convolution backward over n samples: adds into dWeight and dBias, writes dx (if non-nil).
/// - Parameters:
///   - dWeight: nil for the input gradient alone (`cols` is then not read).
///   - tmp: outGroup x chunk*Ho*Wo scratch; dcol: K x chunk*Ho*Wo scratch; chunk as in forward.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func convBackward<T: Scalar>(
    _ dx: UnsafeMutablePointer<T>?, dWeight: UnsafeMutablePointer<T>?, dBias: UnsafeMutablePointer<T>?,
    tmp: UnsafeMutablePointer<T>, dcol: UnsafeMutablePointer<T>,
    _ dy: UnsafePointer<T>, x: UnsafePointer<T>, cols: UnsafePointer<T>?, weight: UnsafePointer<T>, n: Int, _ s: ConvGeometry, chunk: Int? = nil
) {
    let plane = s.outPlane
    let cg = s.outGroup
    if let dBias {
        for b in 0..<n {
            for c in 0..<s.outC {
                let row = dy + (b * s.outC + c) * plane
                var acc: T = 0
                for i in 0..<plane { acc += row[i] }
                dBias[c] += acc
            }
        }
    }
    if s.isPointwise {
        for b in 0..<n {
            for g in 0..<s.groups {
                let dyg = dy + (b * s.outC + g * cg) * plane
                let xg = x + (b * s.inC + g * s.inGroup) * plane
                // dW[cg, Cg] += dy[cg, plane] x x[Cg, plane]^T
                if let dWeight {
                    T.gemm(transA: false, transB: true, m: cg, n: s.inGroup, k: plane,
                           alpha: 1, a: dyg, lda: plane, b: xg, ldb: plane,
                           beta: 1, c: dWeight + g * cg * s.inGroup, ldc: s.inGroup)
                }
                if let dx {
                    T.gemm(transA: true, transB: false, m: s.inGroup, n: plane, k: cg,
                           alpha: 1, a: weight + g * cg * s.inGroup, lda: s.inGroup, b: dyg, ldb: plane,
                           beta: 0, c: dx + (b * s.inC + g * s.inGroup) * plane, ldc: plane)
                }
            }
        }
        return
    }
    precondition(dWeight == nil || cols != nil, "convBackward: a weight gradient needs the column matrices")
    let chunk = max(1, min(chunk ?? n, n))
    for g in 0..<s.groups {
        for s0 in stride(from: 0, to: n, by: chunk) {
            let cs = min(chunk, n - s0), cols1 = cs * plane
            // [cs, outC, plane] -> [cg, cs, plane]
            for c in 0..<cg {
                let oc = g * cg + c
                for b in 0..<cs {
                    (tmp + c * cols1 + b * plane).update(from: dy + ((s0 + b) * s.outC + oc) * plane, count: plane)
                }
            }
            if let dWeight, let cols {
                T.gemm(transA: false, transB: true, m: cg, n: s.k, k: cols1,
                       alpha: 1, a: tmp, lda: cols1, b: cols + s.columnsOffset(group: g, sample: s0, batch: n), ldb: cols1,
                       beta: 1, c: dWeight + g * cg * s.k, ldc: s.k)
            }
            if let dx {
                // At most 16 output channels per group (LeNet-5's conv2: k = 16) on a CPU with AVX-512,
                // the C kernel's 16-wide tiles (OpenBLAS's AVX2 kernels pack and stream for a product
                // this thin); otherwise OpenBLAS.
                if !(T.self == Float.self
                     && tandem_gemm_tn_smallk_f32(floats(dcol), floats(weight + g * cg * s.k), floats(tmp), s.k, cols1, cg, s.k,
                                                  cols1, cols1) != 0) {
                    T.gemm(transA: true, transB: false, m: s.k, n: cols1, k: cg,
                           alpha: 1, a: weight + g * cg * s.k, lda: s.k, b: tmp, ldb: cols1,
                           beta: 0, c: dcol, ldc: cols1)
                }
                col2im(dx + s0 * s.inC * s.inPlane, dcol, group: g, n: cs, s)
            }
        }
    }
}
