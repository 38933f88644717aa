// Pointwise nonlinearities over `count` elements. Backward writes dx from dy and whichever of
// x (input) or y (output) gives the derivative most cheaply.

public enum Activation: Sendable, Equatable {
    case relu
    case leakyRelu(alpha: Double)
    case sigmoid
    case tanh
}

@_specialize(where T == Float)
@_specialize(where T == Double)
public func activationForward<T: Scalar>(_ y: UnsafeMutablePointer<T>, _ x: UnsafePointer<T>, count: Int, _ f: Activation) {
    switch f {
    case .relu:
        for i in 0..<count { let v = x[i]; y[i] = v > 0 ? v : 0 }
    case let .leakyRelu(alpha):
        let a = T(alpha)
        for i in 0..<count { let v = x[i]; y[i] = v > 0 ? v : a * v }
    case .sigmoid:
        for i in 0..<count {
            // Stable on both sides: never exponentiates a large positive number.
            let v = x[i]
            if v >= 0 { y[i] = 1 / (1 + T.exp(-v)) } else { let e = T.exp(v); y[i] = e / (1 + e) }
        }
    case .tanh:
        for i in 0..<count { y[i] = T.tanh(x[i]) }
    }
}

@_specialize(where T == Float)
@_specialize(where T == Double)
public func activationBackward<T: Scalar>(_ dx: UnsafeMutablePointer<T>, _ dy: UnsafePointer<T>, x: UnsafePointer<T>, y: UnsafePointer<T>, count: Int, _ f: Activation) {
    switch f {
    case .relu:
        // Both values are loaded before the select, so the loop has no branch to mispredict
        // (the sign of x is unpredictable) and vectorises.
        for i in 0..<count { let g = dy[i], v = x[i]; dx[i] = v > 0 ? g : 0 }
    case let .leakyRelu(alpha):
        let a = T(alpha)
        for i in 0..<count { let g = dy[i], v = x[i]; dx[i] = v > 0 ? g : a * g }
    case .sigmoid:
        for i in 0..<count { let s = y[i]; dx[i] = dy[i] * s * (1 - s) }
    case .tanh:
        for i in 0..<count { let t = y[i]; dx[i] = dy[i] * (1 - t * t) }
    }
}
