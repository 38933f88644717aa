import CKernels

// Pooling kernels, NCHW. Windows may overlap (AlexNet's 3x3 stride 2) and may hang over the
// padding: for max pooling padding never wins; for average pooling the divisor is the window
// clipped to the padded input (PyTorch's count_include_pad = true).

/// The shape of one pooling layer.
public struct PoolGeometry: Sendable {
    public var channels: Int, inH: Int, inW: Int, outH: Int, outW: Int
    public var window: Window
    public init(input: Shape, window: Window) {
        channels = input.channels; inH = input.height; inW = input.width
        (outH, outW) = window.outputSize(height: input.height, width: input.width)
        self.window = window
    }
    public var inPlane: Int { inH * inW }
    public var outPlane: Int { outH * outW }
}

/// Max pooling forward: y[n, C, Ho, Wo] and the index within the input plane of each maximum
/// (the first one on ties, as PyTorch does).
@_specialize(where T == Float)
@_specialize(where T == Double)
public func maxPoolForward<T: Scalar>(_ y: UnsafeMutablePointer<T>, argmax: UnsafeMutablePointer<Int32>, _ x: UnsafePointer<T>, n: Int, _ s: PoolGeometry) {
    let w = s.window
    if w.kernelH == 2 && w.kernelW == 2 && w.strideH == 2 && w.strideW == 2 && w.padH == 0 && w.padW == 0 {
        if T.self == Float.self {
            tandem_maxpool2x2_forward_f32(floats(y), argmax, floats(x), n * s.channels, s.inH, s.inW, s.outH, s.outW)
        } else {
            maxPool2x2(y, argmax: argmax, x, planes: n * s.channels, s)
        }
        return
    }
    if T.self == Float.self {
        tandem_maxpool_forward_f32(floats(y), argmax, floats(x), n * s.channels, s.inH, s.inW, s.outH, s.outW,
                                   w.kernelH, w.kernelW, w.strideH, w.strideW, w.padH, w.padW)
        return
    }
    for p in 0..<(n * s.channels) {
        let src = x + p * s.inPlane
        let dst = y + p * s.outPlane
        let arg = argmax + p * s.outPlane
        for oh in 0..<s.outH {
            let h0 = max(oh * w.strideH - w.padH, 0), h1 = min(oh * w.strideH - w.padH + w.kernelH, s.inH)
            for ow in 0..<s.outW {
                let w0 = max(ow * w.strideW - w.padW, 0), w1 = min(ow * w.strideW - w.padW + w.kernelW, s.inW)
                var best = h0 * s.inW + w0
                var m = src[best]
                for ih in h0..<h1 {
                    for iw in w0..<w1 {
                        // Branch-free: which element wins is unpredictable.
                        let i = ih * s.inW + iw
                        let v = src[i]
                        let better = v > m
                        m = better ? v : m
                        best = better ? i : best
                    }
                }
                dst[oh * s.outW + ow] = m
                arg[oh * s.outW + ow] = Int32(truncatingIfNeeded: best)
            }
        }
    }
}

/// The common 2x2 stride-2 unpadded case (LeNet) in Double, two input rows at a time (Float: the C
/// kernel, eight or four outputs at a time).
@inline(__always)
func maxPool2x2<T: Scalar>(_ y: UnsafeMutablePointer<T>, argmax: UnsafeMutablePointer<Int32>, _ x: UnsafePointer<T>, planes: Int, _ s: PoolGeometry) {
    let inW = s.inW, outW = s.outW
    let w1 = Int32(truncatingIfNeeded: inW)
    for p in 0..<planes {
        let src = x + p * s.inPlane
        let dst = y + p * s.outPlane
        let arg = argmax + p * s.outPlane
        for oh in 0..<s.outH {
            let r0 = src + 2 * oh * inW, r1 = r0 + inW
            let base = Int32(truncatingIfNeeded: 2 * oh * inW)
            let d = dst + oh * outW, g = arg + oh * outW
            for ow in 0..<outW {
                let a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], e = r1[2 * ow + 1]
                // Branch-free: pairwise maxima and the index of the first maximum in reading order
                // (strict comparisons keep the earlier element on ties, as PyTorch does).
                let top = b > a ? b : a, bottom = e > c ? e : c
                let lower = bottom > top
                d[ow] = lower ? bottom : top
                g[ow] = base &+ Int32(truncatingIfNeeded: 2 * ow) &+ (lower ? (e > c ? w1 &+ 1 : w1) : (b > a ? 1 : 0))
            }
        }
    }
}

/// Max pooling backward: writes dx, routing each output gradient to its maximum. With `relu` (the pool's
/// output y), it also applies the ReLU whose output the pool reads: the gradient passes only where
/// y > 0, which is where that ReLU's input was positive (see MaxPoolLayer).
@_specialize(where T == Float)
@_specialize(where T == Double)
public func maxPoolBackward<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>, argmax: UnsafePointer<Int32>, n: Int, _ s: PoolGeometry,
                                       relu y: UnsafePointer<T>? = nil) {
    if T.self == Float.self {
        // Plane by plane, so each plane is zeroed and filled while it is in cache.
        tandem_maxpool_backward_f32(floats(dx), floats(dy), argmax, y.map(floats), n * s.channels, s.inPlane, s.outPlane)
        return
    }
    dx.update(repeating: 0, count: n * s.channels * s.inPlane)
    for p in 0..<(n * s.channels) {
        let d = dx + p * s.inPlane
        let g = dy + p * s.outPlane
        let arg = argmax + p * s.outPlane
        if let y {
            let v = y + p * s.outPlane
            for o in 0..<s.outPlane { d[Int(arg[o])] += v[o] > 0 ? g[o] : 0 }
        } else {
            for o in 0..<s.outPlane { d[Int(arg[o])] += g[o] }
        }
    }
}

@inline(__always)
func avgWindow(_ o: Int, stride: Int, pad: Int, kernel: Int, size: Int) -> (lo: Int, hi: Int, span: Int) {
    let start = o * stride - pad
    let end = min(start + kernel, size + pad)
    return (max(start, 0), min(end, size), end - start)
}

/// Average pooling forward.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func avgPoolForward<T: Scalar>(_ y: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>, n: Int, _ s: PoolGeometry) {
    let w = s.window
    for p in 0..<(n * s.channels) {
        let src = x + p * s.inPlane
        let dst = y + p * s.outPlane
        for oh in 0..<s.outH {
            let hr = avgWindow(oh, stride: w.strideH, pad: w.padH, kernel: w.kernelH, size: s.inH)
            for ow in 0..<s.outW {
                let wr = avgWindow(ow, stride: w.strideW, pad: w.padW, kernel: w.kernelW, size: s.inW)
                var acc: T = 0
                for ih in hr.lo..<hr.hi { for iw in wr.lo..<wr.hi { acc += src[ih * s.inW + iw] } }
                dst[oh * s.outW + ow] = acc / T(hr.span * wr.span)
            }
        }
    }
}

/// Average pooling backward: writes dx.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func avgPoolBackward<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>, n: Int, _ s: PoolGeometry) {
    let w = s.window
    dx.update(repeating: 0, count: n * s.channels * s.inPlane)
    for p in 0..<(n * s.channels) {
        let d = dx + p * s.inPlane
        let g = dy + p * s.outPlane
        for oh in 0..<s.outH {
            let hr = avgWindow(oh, stride: w.strideH, pad: w.padH, kernel: w.kernelH, size: s.inH)
            for ow in 0..<s.outW {
                let wr = avgWindow(ow, stride: w.strideW, pad: w.padW, kernel: w.kernelW, size: s.inW)
                let v = g[oh * s.outW + ow] / T(hr.span * wr.span)
                for ih in hr.lo..<hr.hi { for iw in wr.lo..<wr.hi { d[ih * s.inW + iw] += v } }
            }
        }
    }
}

/// Global average pooling: y[n, C] = mean of each plane of x[n, C, H, W].
@_specialize(where T == Float)
@_specialize(where T == Double)
public func globalAvgPoolForward<T: Scalar>(_ y: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>, planes: Int, plane: Int) {
    let inv = 1 / T(plane)
    for p in 0..<planes {
        var acc: T = 0
        let src = x + p * plane
        for i in 0..<plane { acc += src[i] }
        y[p] = acc * inv
    }
}

@_specialize(where T == Float)
@_specialize(where T == Double)
public func globalAvgPoolBackward<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>, planes: Int, plane: Int) {
    let inv = 1 / T(plane)
    for p in 0..<planes {
        let v = dy[p] * inv
        (dx + p * plane).update(repeating: v, count: plane)
    }
}
