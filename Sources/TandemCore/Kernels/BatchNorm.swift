import CKernels

// Batch normalisation (Ioffe and Szegedy 2015), per channel over the batch and the plane
// (for vectors the plane is 1x1, so it is per feature). Statistics are accumulated in Double.
// Float runs the C twins in CKernels (sample-major loops, so vectors walk contiguous features).
//
// Training: mean and biased variance over the M = N*H*W values of each channel (summed over
// every part of the batch that shares statistics: threads, and ranks with sync_bn), then
//   xhat = (x - mean) / sqrt(var + eps),   y = gamma * xhat + beta
// and the running averages move towards mean and the unbiased variance var * M/(M-1).
// Evaluation uses the running averages. Backward, with the sums over the same M values:
//   dgamma = sum dy*xhat,  dbeta = sum dy,
//   dx = gamma / sqrt(var + eps) * (dy - dbeta/M - xhat * dgamma/M)

/// Sum of p[0..<n] with eight partial sums (vectorises; the order is fixed, so results repeat exactly).
@inline(__always)
func vectorSum<T: Scalar>(_ p: UnsafePointer<T>, _ n: Int) -> T {
    var acc = SIMD8<T>()
    var i = 0
    while i + 8 <= n { acc += UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<T>.self); i += 8 }
    var s = acc.sum()
    while i < n { s += p[i]; i += 1 }
    return s
}

/// sum of (p[i] - m)^2 and, when `q` is given, also sum of p[i] * q[i].
@inline(__always)
func vectorSquaredDeviation<T: Scalar>(_ p: UnsafePointer<T>, _ n: Int, around m: T) -> T {
    var acc = SIMD8<T>()
    let mv = SIMD8<T>(repeating: m)
    var i = 0
    while i + 8 <= n { let d = UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<T>.self) - mv; acc += d * d; i += 8 }
    var s = acc.sum()
    while i < n { let d = p[i] - m; s += d * d; i += 1 }
    return s
}

@inline(__always)
func vectorDot<T: Scalar>(_ p: UnsafePointer<T>, _ q: UnsafePointer<T>, _ n: Int) -> T {
    var acc = SIMD8<T>()
    var i = 0
    while i + 8 <= n {
        acc += UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<T>.self) * UnsafeRawPointer(q + i).loadUnaligned(as: SIMD8<T>.self)
        i += 8
    }
    var s = acc.sum()
    while i < n { s += p[i] * q[i]; i += 1 }
    return s
}

/// sums[c] = sum of x over the batch and plane of channel c.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func channelSums<T: Scalar>(_ sums: UnsafeMutablePointer<Double>, _ x: UnsafePointer<T>, n: Int, channels: Int, plane: Int) {
    if T.self == Float.self { tandem_bn_sums_f32(sums, floats(x), n, channels, plane); return }
    if plane == 1 {
        // Vectors (after a linear layer): features are contiguous, so walk samples outermost.
        sums.update(repeating: 0, count: channels)
        for b in 0..<n { let r = x + b * channels; for c in 0..<channels { sums[c] += Double(r[c]) } }
        return
    }
    for c in 0..<channels {
        var total = 0.0
        for b in 0..<n { total += Double(vectorSum(x + (b * channels + c) * plane, plane)) }
        sums[c] = total
    }
}

/// sums[c] = sum of (x - mean[c])^2 over channel c.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func channelSquaredDeviations<T: Scalar>(_ sums: UnsafeMutablePointer<Double>, _ x: UnsafePointer<T>, mean: UnsafePointer<Double>, n: Int, channels: Int, plane: Int) {
    if T.self == Float.self { tandem_bn_squared_deviations_f32(sums, floats(x), mean, n, channels, plane); return }
    if plane == 1 {
        sums.update(repeating: 0, count: channels)
        for b in 0..<n { let r = x + b * channels; for c in 0..<channels { let d = Double(r[c]) - mean[c]; sums[c] += d * d } }
        return
    }
    for c in 0..<channels {
        let m = T(mean[c])
        var total = 0.0
        for b in 0..<n { total += Double(vectorSquaredDeviation(x + (b * channels + c) * plane, plane, around: m)) }
        sums[c] = total
    }
}

/// y = gamma * (x - mean) * invStd + beta, and with `relu` the ReLU of that (the ReLU after the layer,
/// fused); also keeps xhat for backward (when non-nil).
@_specialize(where T == Float)
@_specialize(where T == Double)
public func batchNormApply<T: Scalar>(_ y: UnsafeMutablePointer<T>, xhat: UnsafeMutablePointer<T>?, _ x: UnsafePointer<T>,
                                      mean: UnsafePointer<Double>, invStd: UnsafePointer<Double>,
                                      gamma: UnsafePointer<T>, beta: UnsafePointer<T>, n: Int, channels: Int, plane: Int, relu: Bool = false) {
    if T.self == Float.self {
        tandem_bn_apply_f32(floats(y), xhat.map(floats), floats(x), mean, invStd, floats(gamma), floats(beta), n, channels, plane,
                            relu ? 1 : 0)
        return
    }
    for c in 0..<channels {
        let m = T(mean[c]), s = T(invStd[c]), g = gamma[c], bt = beta[c]
        // y = g * (x - m) * s + bt = x * (g s) + (bt - g m s) when xhat is not needed.
        let scale = g * s, shift = bt - g * m * s
        for b in 0..<n {
            let o = (b * channels + c) * plane
            let xr = x + o, yr = y + o
            if let xhat {
                let hr = xhat + o
                for i in 0..<plane { let h = (xr[i] - m) * s; hr[i] = h; yr[i] = g * h + bt }
            } else {
                for i in 0..<plane { yr[i] = xr[i] * scale + shift }
            }
            if relu { for i in 0..<plane { let v = yr[i]; yr[i] = v > 0 ? v : 0 } }
        }
    }
}

/// sums[c] = sum of dy, sums[C + c] = sum of dy * xhat, over channel c.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func batchNormGradientSums<T: Scalar>(_ sums: UnsafeMutablePointer<Double>, _ dy: UnsafePointer<T>, xhat: UnsafePointer<T>, n: Int, channels: Int, plane: Int) {
    if T.self == Float.self { tandem_bn_gradient_sums_f32(sums, floats(dy), floats(xhat), n, channels, plane); return }
    if plane == 1 {
        sums.update(repeating: 0, count: 2 * channels)
        for b in 0..<n {
            let g = dy + b * channels, h = xhat + b * channels
            for c in 0..<channels { sums[c] += Double(g[c]); sums[channels + c] += Double(g[c] * h[c]) }
        }
        return
    }
    for c in 0..<channels {
        var s1 = 0.0, s2 = 0.0
        for b in 0..<n {
            let o = (b * channels + c) * plane
            s1 += Double(vectorSum(dy + o, plane))
            s2 += Double(vectorDot(dy + o, xhat + o, plane))
        }
        sums[c] = s1
        sums[channels + c] = s2
    }
}

/// dx from dy and the (global) gradient sums; `count` is M, the values per channel behind the statistics.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func batchNormInputGradient<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>, xhat: UnsafePointer<T>,
                                              gamma: UnsafePointer<T>, invStd: UnsafePointer<Double>, sums: UnsafePointer<Double>,
                                              count: Int, n: Int, channels: Int, plane: Int) {
    if T.self == Float.self {
        tandem_bn_input_gradient_f32(floats(dx), floats(dy), floats(xhat), floats(gamma), invStd, sums, count, n, channels, plane)
        return
    }
    let inv = 1.0 / Double(count)
    for c in 0..<channels {
        let k = T(Double(gamma[c]) * invStd[c])
        let meanDy = T(sums[c] * inv), meanDyXhat = T(sums[channels + c] * inv)
        for b in 0..<n {
            let o = (b * channels + c) * plane
            let d = dx + o, g = dy + o, h = xhat + o
            for i in 0..<plane { d[i] = k * (g[i] - meanDy - h[i] * meanDyXhat) }
        }
    }
}
