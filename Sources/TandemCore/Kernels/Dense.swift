// Fully connected layers, dropout, losses and the shape plumbing (concat, add), NCHW.
import CKernels

/// Products of at most this many rows (parallel.dynamic's chunks, a batch's parts on several threads)
/// take the C kernels' 16-wide fully connected forward and input gradient, which pack nothing:
/// OpenBLAS 0.3.21's SkylakeX kernels pack all of W for each product, and LeNet-5's fc1 (400 -> 120)
/// forward took 0.058-0.061 ms at 32 rows and 0.035-0.041 at 16 against 0.040-0.050 and 0.020 with
/// these; from 64 rows on OpenBLAS is as fast or faster (fc1 0.092-0.099 against 0.096-0.104 ms).
let wideLinearRows = 32
/// The forward's dot products end in a sum across the 16 lanes per output; over fewer than this many
/// inputs those sums cost more than they save (LeNet-5's fc2, 120 -> 84: 0.014-0.016 ms at 32 rows
/// against OpenBLAS's 0.013-0.014).
let wideLinearForwardInputs = 256

/// Fully connected forward: y[n, out] = x[n, in] * W[out, in]^T + b.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func linearForward<T: Scalar>(_ y: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>, weight: UnsafePointer<T>, bias: UnsafePointer<T>?,
                                     n: Int, inFeatures: Int, outFeatures: Int) {
    if T.self == Float.self && n <= wideLinearRows && inFeatures >= wideLinearForwardInputs
        && tandem_linear_forward_f32(floats(y), floats(x), floats(weight), bias.map(floats), n, outFeatures, inFeatures) != 0 { return }
    T.gemm(transA: false, transB: true, m: n, n: outFeatures, k: inFeatures,
           alpha: 1, a: x, lda: inFeatures, b: weight, ldb: inFeatures, beta: 0, c: y, ldc: outFeatures)
    if let bias {
        for b in 0..<n {
            let r = y + b * outFeatures
            for j in 0..<outFeatures { r[j] += bias[j] }
        }
    }
}

/// Fully connected backward: dW += dy^T x, db += column sums of dy, dx = dy W (if non-nil).
@_specialize(where T == Float)
@_specialize(where T == Double)
public func linearBackward<T: Scalar>(_ dx: UnsafeMutablePointer<T>?, dWeight: UnsafeMutablePointer<T>, dBias: UnsafeMutablePointer<T>?,
                                      _ dy: UnsafePointer<T>, x: UnsafePointer<T>, weight: UnsafePointer<T>,
                                      n: Int, inFeatures: Int, outFeatures: Int) {
    T.gemm(transA: true, transB: false, m: outFeatures, n: inFeatures, k: n,
           alpha: 1, a: dy, lda: outFeatures, b: x, ldb: inFeatures, beta: 1, c: dWeight, ldc: inFeatures)
    if let dBias {
        for b in 0..<n {
            let r = dy + b * outFeatures
            for j in 0..<outFeatures { dBias[j] += r[j] }
        }
    }
    if let dx { linearInputGradient(dx, dy, weight: weight, n: n, inFeatures: inFeatures, outFeatures: outFeatures) }
}

/// Fully connected input gradient: dx = dy W.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func linearInputGradient<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>, weight: UnsafePointer<T>,
                                           n: Int, inFeatures: Int, outFeatures: Int) {
    if T.self == Float.self && n <= wideLinearRows
        && tandem_linear_input_grad_f32(floats(dx), floats(dy), floats(weight), n, outFeatures, inFeatures) != 0 { return }
    T.gemm(transA: false, transB: false, m: n, n: inFeatures, k: outFeatures,
           alpha: 1, a: dy, lda: outFeatures, b: weight, ldb: inFeatures, beta: 0, c: dx, ldc: inFeatures)
}

/// Inverted dropout mask for samples [firstSample, firstSample + n) of `features` each (the slice
/// starting at `featureOffset` of a tower-split layer's features): keep with
/// probability 1 - rate and scale by 1/(1 - rate). Each bit depends only on (seed, salt, step,
/// global sample, feature), so the mask of a sample is the same whichever thread or rank holds it.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func dropoutMask<T: Scalar>(_ mask: UnsafeMutablePointer<T>, rate: Double, seed: UInt64, salt: UInt64, step: Int,
                                   firstSample: Int, n: Int, features: Int, featureOffset: Int = 0) {
    let keep = T(1 / (1 - rate))
    let threshold = Float(rate)
    for b in 0..<n {
        let sample = UInt64(firstSample + b)
        let row = mask + b * features
        for j in 0..<features {
            row[j] = counterUniform(seed, salt, UInt64(step), sample &* 0x1_0000_0000 &+ UInt64(featureOffset + j)) < threshold ? 0 : keep
        }
    }
}

@_specialize(where T == Float)
@_specialize(where T == Double)
public func multiply<T: Scalar>(_ y: UnsafeMutablePointer<T>, _ a: UnsafePointer<T>, _ b: UnsafePointer<T>, count: Int) {
    for i in 0..<count { y[i] = a[i] * b[i] }
}

/// Adds `x` into `y`.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func accumulate<T: Scalar>(_ y: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>, count: Int) {
    for i in 0..<count { y[i] += x[i] }
}

/// Softmax cross-entropy over n samples of `classes` logits, with a stable log-sum-exp:
/// loss_b = log sum_j exp(z_bj - m_b) + m_b - z_b,label. Writes dLogits = (softmax - onehot) * scale
/// and returns the summed (unscaled) loss and the number of correct argmax predictions.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func softmaxCrossEntropy<T: Scalar>(_ dLogits: UnsafeMutablePointer<T>?, _ logits: UnsafePointer<T>, labels: UnsafePointer<Int32>,
                                           n: Int, classes: Int, scale: T) -> (loss: Double, correct: Int) {
    var total = 0.0
    var correct = 0
    for b in 0..<n {
        let z = logits + b * classes
        var m = z[0], arg = 0
        for j in 1..<classes where z[j] > m { m = z[j]; arg = j }
        let label = Int(labels[b])
        if arg == label { correct += 1 }
        var sum: T = 0
        for j in 0..<classes { sum += T.exp(z[j] - m) }
        // log(sum) - (z_label - m) rather than (log(sum) + m) - z_label: the latter loses the
        // low bits of the loss in Float when the logits are large.
        total += Double(T.log(sum) - (z[label] - m))
        if let dLogits {
            let d = dLogits + b * classes
            let inv = scale / sum
            for j in 0..<classes { d[j] = T.exp(z[j] - m) * inv }
            d[label] -= scale
        }
    }
    return (total, correct)
}

/// Squared error against one-hot targets: loss_b = 1/2 * sum_j (t_bj - y_bj)^2; dy = (y - t) * scale.
@_specialize(where T == Float)
@_specialize(where T == Double)
public func squaredError<T: Scalar>(_ dOutput: UnsafeMutablePointer<T>?, _ output: UnsafePointer<T>, labels: UnsafePointer<Int32>,
                                    n: Int, classes: Int, scale: T) -> (loss: Double, correct: Int) {
    var total = 0.0
    var correct = 0
    for b in 0..<n {
        let y = output + b * classes
        let label = Int(labels[b])
        var m = y[0], arg = 0
        for j in 1..<classes where y[j] > m { m = y[j]; arg = j }
        if arg == label { correct += 1 }
        var acc: T = 0
        for j in 0..<classes {
            let diff = y[j] - (j == label ? 1 : 0)
            acc += diff * diff
            dOutput?[b * classes + j] = diff * scale
        }
        total += Double(acc) / 2
    }
    return (total, correct)
}
