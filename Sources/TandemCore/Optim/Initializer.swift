// Weight initialisation from a seed. Each parameter tensor draws from its own generator, seeded
// from (seed, tensor name), so a tensor's values do not depend on the other tensors of the model,
// on the machine, or on the rank.

public enum Initializer {
    /// Fills parameters (weights by `scheme`, biases zero, or PyTorch's uniform under `.pytorch`;
    /// batch-norm scale 1 and shift 0) and running statistics (mean 0, variance 1).
    public static func initialize<T: Scalar>(_ net: Network<T>, scheme: InitScheme, seed: UInt64) {
        initialize(parameters: net.parameters, statistics: net.statistics, graph: net.graph, scheme: scheme, seed: seed)
    }

    public static func initialize<T: Scalar>(parameters: UnsafeMutableBufferPointer<T>, statistics: UnsafeMutableBufferPointer<T>,
                                             graph: Graph, scheme: InitScheme, seed: UInt64) {
        for info in graph.parameters {
            var rng = SeededGenerator(seed: seed ^ stableHash(info.name))
            let p = parameters.baseAddress! + info.offset
            switch info.role {
            case .weight:
                switch scheme {
                case .xavier:
                    // Glorot and Bengio (2010), eq. 16: U[-sqrt(6/(fan_in+fan_out)), +...], variance 2/(fan_in+fan_out).
                    let bound = (6.0 / Double(info.fanIn + info.fanOut)).squareRoot()
                    for i in 0..<info.count { p[i] = T((2 * rng.uniform() - 1) * bound) }
                case .he:
                    // He et al. (2015): N(0, 2/fan_in).
                    let std = (2.0 / Double(info.fanIn)).squareRoot()
                    for i in 0..<info.count { p[i] = T(rng.normal() * std) }
                case .pytorch:
                    let bound = 1 / Double(info.fanIn).squareRoot()
                    for i in 0..<info.count { p[i] = T((2 * rng.uniform() - 1) * bound) }
                }
            case .bias:
                if scheme == .pytorch {
                    let bound = 1 / Double(info.fanIn).squareRoot()
                    for i in 0..<info.count { p[i] = T((2 * rng.uniform() - 1) * bound) }
                } else {
                    p.update(repeating: 0, count: info.count)
                }
            case .scale: p.update(repeating: 1, count: info.count)
            case .shift, .runningMean, .runningVariance: p.update(repeating: 0, count: info.count)
            }
        }
        for info in graph.statistics {
            let p = statistics.baseAddress! + info.offset
            p.update(repeating: info.role == .runningVariance ? 1 : 0, count: info.count)
        }
    }
}
