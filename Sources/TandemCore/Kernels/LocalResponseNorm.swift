import CKernels

// Local response normalisation across channels (Krizhevsky, Sutskever and Hinton 2012, section 3.3),
// in PyTorch's convention where alpha is divided by the window size:
//   scale_c = k + alpha/size * sum_{c' = c - size/2 ... c + (size-1)/2, clipped} x_c'^2
//   y_c     = x_c * scale_c^(-beta)
// Backward (as in Caffe's LRN layer):
//   dx_c = dy_c * scale_c^(-beta) - 2*alpha*beta/size * x_c * sum_{c' whose window holds c} dy_c' * y_c' / scale_c'

public struct LRNParameters: Sendable {
    public var size: Int, alpha: Double, beta: Double, k: Double
    /// Channel groups: the window is clipped to the group of c (the towers of a split model
    /// normalise their own maps, as in cuda-convnet's two-GPU AlexNet).
    public var groups: Int
    public init(size: Int, alpha: Double, beta: Double, k: Double, groups: Int = 1) {
        self.size = size; self.alpha = alpha; self.beta = beta; self.k = k; self.groups = groups
    }
    var before: Int { size / 2 }
    var after: Int { (size - 1) / 2 }
}

@inline(__always)
func powMinusBeta<T: Scalar>(_ s: T, _ beta: T, threeQuarters: Bool) -> T {
    // beta = 0.75 (AlexNet) is by far the common case: s^-0.75 = 1 / (sqrt(s) * sqrt(sqrt(s))).
    if threeQuarters { let r = s.squareRoot(); return 1 / (r * r.squareRoot()) }
    return T.pow(s, -beta)
}

/// Forward over n samples of C x plane (Float: the C kernel, with vector square roots). Keeps `scale`
/// (same shape as x) for backward.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func lrnForward<T: Scalar>(_ y: UnsafeMutablePointer<T>, scale: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>,
                                  n: Int, channels: Int, plane: Int, _ p: LRNParameters) {
    if T.self == Float.self {
        tandem_lrn_forward_f32(floats(y), floats(scale), floats(x), n, channels, plane, p.before, p.after, p.groups,
                               Float(p.alpha / Double(p.size)), Float(p.beta), Float(p.k))
        return
    }
    let a = T(p.alpha / Double(p.size)), k = T(p.k), beta = T(p.beta)
    let quarter = p.beta == 0.75
    for b in 0..<n {
        let xs = x + b * channels * plane, ss = scale + b * channels * plane, ys = y + b * channels * plane
        let groupSize = channels / p.groups
        for c in 0..<channels {
            let g0 = c / groupSize * groupSize
            let lo = max(g0, c - p.before), hi = min(g0 + groupSize - 1, c + p.after)
            let s = ss + c * plane
            s.update(repeating: 0, count: plane)
            for cc in lo...hi {
                let xr = xs + cc * plane
                for i in 0..<plane { s[i] += xr[i] * xr[i] }
            }
            let xr = xs + c * plane, yr = ys + c * plane
            for i in 0..<plane {
                let v = k + a * s[i]
                s[i] = v
                yr[i] = xr[i] * powMinusBeta(v, beta, threeQuarters: quarter)
            }
        }
    }
}

/// Backward: writes dx. `ratio` is a C x plane scratch.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func lrnBackward<T: Scalar>(_ dx: UnsafeMutablePointer<T>, ratio: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>,
                                   x: UnsafePointer<T>, y: UnsafePointer<T>, scale: UnsafePointer<T>,
                                   n: Int, channels: Int, plane: Int, _ p: LRNParameters) {
    if T.self == Float.self {
        tandem_lrn_backward_f32(floats(dx), floats(ratio), floats(dy), floats(x), floats(y), floats(scale), n, channels, plane,
                                p.before, p.after, p.groups, Float(2 * p.alpha * p.beta / Double(p.size)), Float(p.beta))
        return
    }
    let factor = T(2 * p.alpha * p.beta / Double(p.size)), beta = T(p.beta)
    let quarter = p.beta == 0.75
    let m = channels * plane
    for b in 0..<n {
        let off = b * m
        for i in 0..<m { ratio[i] = dy[off + i] * y[off + i] / scale[off + i] }
        let groupSize = channels / p.groups
        for c in 0..<channels {
            // c lies in the window of c' (in the same group) when c' - before <= c <= c' + after.
            let g0 = c / groupSize * groupSize
            let lo = max(g0, c - p.after), hi = min(g0 + groupSize - 1, c + p.before)
            let d = dx + off + c * plane
            let xr = x + off + c * plane, sr = scale + off + c * plane, gr = dy + off + c * plane
            for i in 0..<plane { d[i] = 0 }
            for cc in lo...hi {
                let r = ratio + cc * plane
                for i in 0..<plane { d[i] += r[i] }
            }
            for i in 0..<plane {
                d[i] = gr[i] * powMinusBeta(sr[i], beta, threeQuarters: quarter) - factor * xr[i] * d[i]
            }
        }
    }
}
