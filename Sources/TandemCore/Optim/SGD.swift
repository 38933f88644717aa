import CKernels

// Mini-batch stochastic gradient descent with momentum (PyTorch's formulation) on the flat
// parameter buffer:
//   g = grad + l2 * w + l1 * sign(w)        (regularisation on weights only, not biases or BN)
//   v = momentum * v + g
//   w -= lr * (nesterov ? g + momentum * v : v)

public struct SGDSettings: Sendable, Equatable {
    public var momentum: Double
    public var nesterov: Bool
    /// L2 regularisation (weight decay) and L1 regularisation strengths.
    public var weightDecay: Double
    public var l1: Double
    public init(momentum: Double = 0.9, nesterov: Bool = false, weightDecay: Double = 0, l1: Double = 0) {
        self.momentum = momentum; self.nesterov = nesterov; self.weightDecay = weightDecay; self.l1 = l1
    }
}

public final class SGD<T: Scalar> {
    public let settings: SGDSettings
    /// Momentum buffer, one value per parameter (part of the optimiser state in checkpoints).
    public let velocity: UnsafeMutableBufferPointer<T>
    private let ownsVelocity: Bool
    /// Every parameter tensor in buffer order: its start, end and whether it is regularised (conv and
    /// linear weights are; biases and batch norm's scale and shift are not). The steps walk them
    /// without allocating.
    private let tensorCount: Int
    private let tensorStarts: UnsafeMutablePointer<Int>
    private let tensorEnds: UnsafeMutablePointer<Int>
    private let tensorRegularised: UnsafeMutablePointer<Bool>

    /// - Parameter external: memory of `graph.parameterCount` zeroed values to hold the velocity
    ///   (the replicas' shared copy with a sharded update), owned by the caller; nil: its own.
    public init(graph: Graph, settings: SGDSettings, velocity external: UnsafeMutablePointer<T>? = nil) {
        self.settings = settings
        velocity = UnsafeMutableBufferPointer(start: external ?? allocateZeroed(T.self, count: graph.parameterCount), count: graph.parameterCount)
        ownsVelocity = external == nil
        let tensors = graph.parameters.sorted { $0.offset < $1.offset }
        tensorCount = tensors.count
        tensorStarts = .allocate(capacity: max(1, tensors.count))
        tensorEnds = .allocate(capacity: max(1, tensors.count))
        tensorRegularised = .allocate(capacity: max(1, tensors.count))
        for (i, t) in tensors.enumerated() {
            tensorStarts[i] = t.offset
            tensorEnds[i] = t.offset + t.count
            tensorRegularised[i] = t.role == .weight
        }
    }
    deinit {
        if ownsVelocity { velocity.baseAddress!.deallocate() }
        tensorStarts.deallocate(); tensorEnds.deallocate(); tensorRegularised.deallocate()
    }

    /// The update of the parameters in `range` only (a rank's slice of a bucket, with the update
    /// sharded over the replicas; the whole buffer for `step`): each value's update depends on that
    /// value alone, so slices cut anywhere give the bits one whole step gives.
    public func step(range: Range<Int>, parameters: UnsafeMutablePointer<T>, gradients: UnsafePointer<T>, lr: Double) {
        let v = velocity.baseAddress!
        let l2 = T(settings.weightDecay), l1 = T(settings.l1), momentum = T(settings.momentum)
        for i in 0..<tensorCount {
            let lo = max(range.lowerBound, tensorStarts[i]), hi = min(range.upperBound, tensorEnds[i])
            guard lo < hi else { continue }
            let reg = tensorRegularised[i]
            sgdUpdate(parameters + lo, gradients + lo, v + lo, count: hi - lo, lr: T(lr), momentum: momentum,
                      nesterov: settings.nesterov, l2: reg ? l2 : 0, l1: reg ? l1 : 0)
        }
    }

    /// One update of `parameters` from `gradients` with learning rate `lr`.
    public func step(parameters: UnsafeMutableBufferPointer<T>, gradients: UnsafeMutableBufferPointer<T>, lr: Double) {
        step(range: 0..<velocity.count, parameters: parameters.baseAddress!, gradients: UnsafePointer(gradients.baseAddress!), lr: lr)
    }
}

@_specialize(where T == Float)
@_specialize(where T == Double)
public func sgdUpdate<T: Scalar>(_ w: UnsafeMutablePointer<T>, _ g: UnsafePointer<T>, _ v: UnsafeMutablePointer<T>, count: Int,
                                 lr: T, momentum: T, nesterov: Bool, l2: T, l1: T) {
    if T.self == Float.self {
        tandem_sgd_f32(floats(w), floats(g), floats(v), count, Float(lr), Float(momentum), nesterov ? 1 : 0, Float(l2), Float(l1))
        return
    }
    for i in 0..<count {
        var grad = g[i]
        if l2 != 0 { grad += l2 * w[i] }
        if l1 != 0 { grad += l1 * (w[i] > 0 ? 1 : (w[i] < 0 ? -1 : 0)) }
        let vel = momentum * v[i] + grad
        v[i] = vel
        w[i] -= lr * (nesterov ? grad + momentum * vel : vel)
    }
}
