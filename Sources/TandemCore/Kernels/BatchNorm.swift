// Batch normalisation (Ioffe and Szegedy 2015), per channel over the batch and the plane
// (for vectors the plane is 1x1, so it is per feature). Statistics are accumulated in Double.
//
// Training: mean and biased variance over the M = N*H*W values of each channel (summed over
// every part of the batch that shares statistics: threads, and ranks with sync_bn), then
//   xhat = (x - mean) / sqrt(var + eps),   y = gamma * xhat + beta
// and the running averages move towards mean and the unbiased variance var * M/(M-1).
// Evaluation uses the running averages. Backward, with the sums over the same M values:
//   dgamma = sum dy*xhat,  dbeta = sum dy,
//   dx = gamma / sqrt(var + eps) * (dy - dbeta/M - xhat * dgamma/M)

/// sums[c] = sum of x over the batch and plane of channel c.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func channelSums<T: Scalar>(_ sums: UnsafeMutablePointer<Double>, _ x: UnsafePointer<T>, n: Int, channels: Int, plane: Int) {
    for c in 0..<channels {
        var acc: T = 0
        var total = 0.0
        for b in 0..<n {
            let r = x + (b * channels + c) * plane
            acc = 0
            for i in 0..<plane { acc += r[i] }
            total += Double(acc)
        }
        sums[c] = total
    }
}

/// sums[c] = sum of (x - mean[c])^2 over channel c.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func channelSquaredDeviations<T: Scalar>(_ sums: UnsafeMutablePointer<Double>, _ x: UnsafePointer<T>, mean: UnsafePointer<Double>, n: Int, channels: Int, plane: Int) {
    for c in 0..<channels {
        let m = T(mean[c])
        var total = 0.0
        for b in 0..<n {
            let r = x + (b * channels + c) * plane
            var acc: T = 0
            for i in 0..<plane { let d = r[i] - m; acc += d * d }
            total += Double(acc)
        }
        sums[c] = total
    }
}

/// y = gamma * (x - mean) * invStd + beta; also keeps xhat for backward (when non-nil).
@_specialize(where T == Float)
@_specialize(where T == Double)
public func batchNormApply<T: Scalar>(_ y: UnsafeMutablePointer<T>, xhat: UnsafeMutablePointer<T>?, _ x: UnsafePointer<T>,
                                      mean: UnsafePointer<Double>, invStd: UnsafePointer<Double>,
                                      gamma: UnsafePointer<T>, beta: UnsafePointer<T>, n: Int, channels: Int, plane: Int) {
    for c in 0..<channels {
        let m = T(mean[c]), s = T(invStd[c]), g = gamma[c], bt = beta[c]
        for b in 0..<n {
            let o = (b * channels + c) * plane
            if let xhat {
                for i in 0..<plane { let h = (x[o + i] - m) * s; xhat[o + i] = h; y[o + i] = g * h + bt }
            } else {
                for i in 0..<plane { y[o + i] = g * ((x[o + i] - m) * s) + bt }
            }
        }
    }
}

/// sums[c] = sum of dy, sums[C + c] = sum of dy * xhat, over channel c.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func batchNormGradientSums<T: Scalar>(_ sums: UnsafeMutablePointer<Double>, _ dy: UnsafePointer<T>, xhat: UnsafePointer<T>, n: Int, channels: Int, plane: Int) {
    for c in 0..<channels {
        var s1 = 0.0, s2 = 0.0
        for b in 0..<n {
            let o = (b * channels + c) * plane
            var a1: T = 0, a2: T = 0
            for i in 0..<plane { a1 += dy[o + i]; a2 += dy[o + i] * xhat[o + i] }
            s1 += Double(a1); s2 += Double(a2)
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
    let inv = 1.0 / Double(count)
    for c in 0..<channels {
        let k = T(Double(gamma[c]) * invStd[c])
        let meanDy = T(sums[c] * inv), meanDyXhat = T(sums[channels + c] * inv)
        for b in 0..<n {
            let o = (b * channels + c) * plane
            for i in 0..<plane { dx[o + i] = k * (dy[o + i] - meanDy - xhat[o + i] * meanDyXhat) }
        }
    }
}
