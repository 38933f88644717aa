// Finite-difference gradient checking in the spirit of Caffe's GradientChecker, run in Float64
// on the same generic kernels that train in Float32: central differences of the objective with
// respect to sampled parameters and inputs, compared with backward's analytic gradients.
// (In Float32, ReLU and max-pool kinks within ~1e-6 of the evaluation point make finite
// differences unreliable; in Float64 a step of 1e-6 stays clear of them almost surely.)

public struct GradientCheckResult: Sendable, CustomStringConvertible {
    /// The tensor ("conv1.weight", "input").
    public var tensor: String
    public var checked: Int
    /// Elements passed over because a ReLU or max-pool kink lay within epsilon.
    public var skippedAtKinks: Int
    /// Largest |analytic - numeric| / max(|analytic|, |numeric|, floor) over the checked elements.
    public var maxRelativeError: Double
    public var worstIndex: Int
    public var analytic: Double
    public var numeric: Double
    public var description: String {
        "\(tensor): \(checked) checked (\(skippedAtKinks) skipped at kinks), max relative error \(maxRelativeError) at \(worstIndex) (analytic \(analytic), numeric \(numeric))"
    }
}

public enum GradientCheck {
    /// What is differentiated.
    public enum Objective: Sendable {
        /// The network's loss against random labels (the output must have `classes` features).
        case loss
        /// sum(output * R) with a fixed random R: checks any layer, whatever its output.
        case projection
    }

    /// Checks the gradients of every parameter tensor and of the input.
    /// - Parameters:
    ///   - perTensor: elements checked per tensor (the largest analytic gradients and random others); 0 checks all.
    ///   - floor: the denominator's floor as a fraction of the largest gradient, so that near-zero
    ///     gradients are compared absolutely against the model's gradient scale.
    ///   - kinkTolerance: how far the one-sided slopes may disagree before the point is taken to sit
    ///     on a kink and is skipped (a smooth objective gives about epsilon * curvature).
    public static func run(graph: Graph, batch: Int, seed: UInt64 = 1, objective: Objective = .projection,
                           loss: LossKind = .softmaxCrossEntropy, scheme: InitScheme = .xavier,
                           perTensor: Int = 0, epsilon: Double = 1e-6, floor: Double = 1e-3, kinkTolerance: Double = 1e-3,
                           parts: Int = 1,
                           corruptAnalytic: ((inout [Double]) -> Void)? = nil) -> [GradientCheckResult] {
        let net = Network<Double>(graph: graph, capacity: batch, parts: parts, loss: loss, inputGradient: true)
        net.seed = seed
        Initializer.initialize(net, scheme: scheme, seed: seed)
        var rng = SeededGenerator(seed: seed &+ 17)
        // Move parameters off their initial values (BN's scale 1 and shift 0, zero biases are too special).
        for i in 0..<net.parameters.count { net.parameters[i] += (rng.uniform() - 0.5) * 0.2 }
        let inputCount = batch * graph.inputShape.count
        for i in 0..<inputCount { net.input[i] = rng.uniform() * 2 - 1 }
        let classes = graph.outputShape.count
        for b in 0..<batch { net.labels[b] = Int32(rng.below(classes)) }
        let outCount = batch * classes
        let projection = (0..<outCount).map { _ in rng.uniform() * 2 - 1 }

        func objectiveValue(withGradient: Bool) -> Double {
            net.forward(count: batch, training: true, step: 3, updateStatistics: false)
            switch objective {
            case .loss:
                return net.computeLoss(count: batch, scale: 1, gradient: withGradient).loss
            case .projection:
                var s = 0.0
                for i in 0..<outCount { s += net.output[i] * projection[i] }
                if withGradient { for i in 0..<outCount { net.outputGradient[i] = projection[i] } }
                return s
            }
        }

        // Analytic gradients.
        net.zeroGradients()
        _ = objectiveValue(withGradient: true)
        net.backward(count: batch, step: 3)
        var analyticParams = Array(net.gradients)
        // A hook for the checker's own test: a wrong analytic gradient must be caught.
        corruptAnalytic?(&analyticParams)
        let analyticInput = Array(UnsafeBufferPointer(start: net.inputGradient!, count: inputCount))

        // Errors are relative, with a floor of `floor` times the largest gradient of the model, so
        // that a near-zero entry is compared absolutely against the model's gradient scale.
        let scale = max(analyticParams.map(abs).max() ?? 0, analyticInput.map(abs).max() ?? 0, 1e-12)
        let denominatorFloor = floor * scale

        func check(_ name: String, values: UnsafeMutablePointer<Double>, analytic: [Double]) -> GradientCheckResult {
            let count = analytic.count
            var candidates: [Int]
            if perTensor == 0 || perTensor >= count {
                candidates = Array(0..<count)
            } else {
                let largest = (0..<count).sorted { abs(analytic[$0]) > abs(analytic[$1]) }.prefix(perTensor / 2)
                candidates = Array(largest)
                while candidates.count < 3 * perTensor { candidates.append(rng.below(count)) }
            }
            let wanted = perTensor == 0 ? count : min(perTensor, count)
            let center = objectiveValue(withGradient: false)
            var result = GradientCheckResult(tensor: name, checked: 0, skippedAtKinks: 0, maxRelativeError: 0, worstIndex: -1, analytic: 0, numeric: 0)
            for i in candidates where result.checked < wanted {
                let saved = values[i]
                values[i] = saved + epsilon
                let plus = objectiveValue(withGradient: false)
                values[i] = saved - epsilon
                let minus = objectiveValue(withGradient: false)
                values[i] = saved
                // A ReLU or max-pool kink within epsilon makes the one-sided slopes disagree far more
                // than curvature can (Caffe's checker skips such points too): skip and count it.
                let right = (plus - center) / epsilon, left = (center - minus) / epsilon
                if abs(right - left) > kinkTolerance * max(abs(right), abs(left), denominatorFloor) {
                    result.skippedAtKinks += 1
                    continue
                }
                let numeric = (plus - minus) / (2 * epsilon)
                let a = analytic[i]
                let err = abs(a - numeric) / max(abs(a), abs(numeric), denominatorFloor)
                result.checked += 1
                if err > result.maxRelativeError || result.worstIndex < 0 {
                    result.maxRelativeError = err; result.worstIndex = i; result.analytic = a; result.numeric = numeric
                }
            }
            return result
        }

        var results: [GradientCheckResult] = []
        for info in graph.parameters {
            let slice = Array(analyticParams[info.offset..<(info.offset + info.count)])
            results.append(check(info.name, values: net.parameters.baseAddress! + info.offset, analytic: slice))
        }
        results.append(check("input", values: net.input, analytic: analyticInput))
        return results
    }
}
