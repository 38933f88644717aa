// The network as a whole: a batch split over parts gives the step of the unsplit batch; dropout
// masks belong to samples, not to parts; evaluation mode; SGD on LeNet-5 learns a fixed batch;
// graph errors name their layer; parameter counts of the reference models.
import CKernels
import Testing
@testable import TandemCore

// MARK: - Support

/// One training step's results, copied out of the network.
private struct StepResult<T: Scalar> {
    var loss: Double
    var correct: Int
    var output: [T]
    var gradients: [T]
    var statistics: [T]
}

/// Builds `layers` with `parts`, initialises it from a fixed seed, fills a random batch and labels
/// (the same for every `parts`) and runs one `trainStep`.
private func trainOnce<T: Scalar>(_: T.Type, input: Shape, _ layers: [LayerSpec], batch: Int, parts: Int, step: Int = 0) throws -> StepResult<T> {
    let graph = try Graph(input: input, layers: layers)
    let net = Network<T>(graph: graph, capacity: batch, parts: parts)
    net.seed = 31
    Initializer.initialize(net, scheme: .xavier, seed: 31)
    var rng = SeededGenerator(seed: 32)
    let classes = graph.outputShape.count
    for i in 0..<(batch * input.count) { net.input[i] = T(rng.uniform() * 2 - 1) }
    for b in 0..<batch { net.labels[b] = Int32(rng.below(classes)) }
    let r = net.trainStep(count: batch, lossScale: 1 / Double(batch), step: step)
    return StepResult(loss: r.loss, correct: r.correct,
                      output: Array(UnsafeBufferPointer(start: net.output, count: batch * classes)),
                      gradients: Array(net.gradients), statistics: Array(net.statistics))
}

/// max |a - b| / max |a| over each parameter tensor, the denominator floored at 1e-3 of the largest
/// gradient of the model (a bias followed by batch norm has a gradient of zero, up to rounding).
private func worstTensorError<T: Scalar>(_ a: [T], _ b: [T], _ infos: [ParameterInfo]) -> (error: Double, tensor: String) {
    let floor = 1e-3 * (a.map { abs(Double($0)) }.max() ?? 0)
    var worst = (0.0, "")
    for info in infos {
        let r = info.offset..<(info.offset + info.count)
        let scale = max(r.map { abs(Double(a[$0])) }.max() ?? 0, floor, 1e-300)
        let diff = r.map { abs(Double(a[$0]) - Double(b[$0])) }.max() ?? 0
        let e = diff / scale
        if !(e <= worst.0) { worst = (e, info.name) }
    }
    return worst
}

/// One Float32 training step against the Float64 step of the same network: every gradient tensor within
/// 1e-4 of its largest value, the outputs within 1e-5.
private func expectFloatStepMatchesDouble(_ input: Shape, _ layers: [LayerSpec], sourceLocation: SourceLocation = #_sourceLocation) throws {
    let graph = try Graph(input: input, layers: layers)
    let f = try trainOnce(Float.self, input: input, layers, batch: 3, parts: 1)
    let d = try trainOnce(Double.self, input: input, layers, batch: 3, parts: 1)
    let g = worstTensorError(d.gradients.map { Float($0) }, f.gradients, graph.parameters)
    #expect(g.error <= 1e-4, "gradient of \(g.tensor) differs by \(g.error)", sourceLocation: sourceLocation)
    #expect(worstArrayError(d.output.map { Float($0) }, f.output) <= 1e-5, "outputs differ", sourceLocation: sourceLocation)
}

/// max |a - b| / max(max |a|, tiny) over the whole array.
private func worstArrayError<T: Scalar>(_ a: [T], _ b: [T]) -> Double {
    guard a.count == b.count else { return .infinity }
    let scale = max(a.map { abs(Double($0)) }.max() ?? 0, 1e-30)
    return (zip(a, b).map { abs(Double($0) - Double($1)) }.max() ?? 0) / scale
}

private func expectSameStep<T: Scalar>(_ one: StepResult<T>, _ two: StepResult<T>, _ graph: Graph, _ what: String,
                                       sourceLocation: SourceLocation = #_sourceLocation) {
    let isDouble = T.self == Double.self
    let lossTolerance = isDouble ? 1e-12 : 1e-6, gradientTolerance = isDouble ? 1e-12 : 1e-5
    #expect(abs(one.loss - two.loss) <= lossTolerance * abs(one.loss), "\(what): loss \(one.loss) vs \(two.loss)", sourceLocation: sourceLocation)
    #expect(one.correct == two.correct, "\(what)", sourceLocation: sourceLocation)
    let g = worstTensorError(one.gradients, two.gradients, graph.parameters)
    #expect(g.error <= gradientTolerance, "\(what): gradient of \(g.tensor) differs by \(g.error)", sourceLocation: sourceLocation)
    #expect(one.gradients.contains { $0 != 0 }, "\(what): gradients are all zero", sourceLocation: sourceLocation)
    let s = worstArrayError(one.statistics, two.statistics)
    #expect(s <= gradientTolerance, "\(what): running statistics differ by \(s)", sourceLocation: sourceLocation)
    #expect(worstArrayError(one.output, two.output) <= gradientTolerance, "\(what): outputs differ", sourceLocation: sourceLocation)
}

private let mnist = Shape(1, 28, 28)

// MARK: - Splitting the batch over parts

@Suite struct PartsEquivalence {
    @Test(arguments: [false, true], [8, 7, 1])
    func lenetTwoPartsEqualsOnePartFloat(batchNorm: Bool, batch: Int) throws {
        let layers = Models.lenet5(batchNorm: batchNorm)
        let graph = try Graph(input: mnist, layers: layers)
        let one = try trainOnce(Float.self, input: mnist, layers, batch: batch, parts: 1)
        let two = try trainOnce(Float.self, input: mnist, layers, batch: batch, parts: 2)
        expectSameStep(one, two, graph, "LeNet-5\(batchNorm ? "-BN" : "") Float batch \(batch)")
        #expect(one.loss.isFinite && one.loss > 0)
    }

    @Test(arguments: [false, true], [7, 1])
    func lenetTwoPartsEqualsOnePartDouble(batchNorm: Bool, batch: Int) throws {
        let layers = Models.lenet5(batchNorm: batchNorm)
        let graph = try Graph(input: mnist, layers: layers)
        let one = try trainOnce(Double.self, input: mnist, layers, batch: batch, parts: 1)
        let two = try trainOnce(Double.self, input: mnist, layers, batch: batch, parts: 2)
        expectSameStep(one, two, graph, "LeNet-5\(batchNorm ? "-BN" : "") Double batch \(batch)")
    }

    @Test func dagWithConcatAndAddTwoPartsEqualsOnePart() throws {
        let graph = try Graph(input: dagInput, layers: dagLayers)
        let one = try trainOnce(Double.self, input: dagInput, dagLayers, batch: 5, parts: 1)
        let two = try trainOnce(Double.self, input: dagInput, dagLayers, batch: 5, parts: 2)
        expectSameStep(one, two, graph, "concat/add graph")
    }

    @Test func partsAccumulateNotOverwrite() throws {
        // The gradient of the mean loss over 4 samples is the average of the per-sample gradients:
        // the split must sum the parts' gradients, not keep only one part's.
        let layers = Models.lenet5(batchNorm: false)
        let graph = try Graph(input: mnist, layers: layers)
        let whole = try trainOnce(Double.self, input: mnist, layers, batch: 4, parts: 2)
        let net = Network<Double>(graph: graph, capacity: 4, parts: 1)
        net.seed = 31
        Initializer.initialize(net, scheme: .xavier, seed: 31)
        var rng = SeededGenerator(seed: 32)
        let x = (0..<(4 * mnist.count)).map { _ in rng.uniform() * 2 - 1 }
        let labels = (0..<4).map { _ in Int32(rng.below(10)) }
        var sum = [Double](repeating: 0, count: graph.parameterCount)
        for b in 0..<4 {
            net.input.update(from: Array(x[(b * mnist.count)..<((b + 1) * mnist.count)]), count: mnist.count)
            net.labels[0] = labels[b]
            _ = net.trainStep(count: 1, lossScale: 0.25, step: 0)
            for i in 0..<sum.count { sum[i] += net.gradients[i] }
        }
        let e = worstTensorError(whole.gradients, sum, graph.parameters)
        #expect(e.error < 1e-12, "\(e)")
    }

    /// parallel.dynamic's pass in chunks: `trainForward` and `trainBackward` over chunks of a batch
    /// (each keyed by its global offset, so dropout draws the same masks) add up to `trainStep` on
    /// the whole batch, on one part and on two, with the fully connected weight gradients deferred to
    /// the last chunk and without, and the observer hears of the gradients only in the last chunk's
    /// backward.
    /// With `late`, the last chunk's backward runs as if more were to come and `finishChunks` ends the
    /// step (the rank learnt only after that backward that the pool was empty).
    @Test(arguments: [(parts: 1, deferred: false, late: false), (parts: 2, deferred: false, late: false), (parts: 1, deferred: true, late: false),
                      (parts: 2, deferred: false, late: true), (parts: 1, deferred: true, late: true)])
    func chunksAddUpToTheWholeBatch(parts: Int, deferred: Bool, late: Bool) throws {
        final class Watcher: GradientObserver {
            var reports = 0, reportsBeforeLast = 0
            func gradientsReady(from offset: Int) { reports += 1 }
        }
        let input = Shape(1, 12, 12)
        let layers = Models.alexnet(width: 2, hidden: 16, dropout: 0.5)
        let graph = try Graph(input: input, layers: layers)
        let batch = 7
        let whole = try trainOnce(Double.self, input: input, layers, batch: batch, parts: 1, step: 5)
        let net = Network<Double>(graph: graph, capacity: 3, parts: parts)
        if deferred { net.deferWeightGradients(samplesPerStep: batch) }
        #expect(net.deferredSamples == (deferred ? batch : 0))
        net.seed = 31
        Initializer.initialize(net, scheme: .xavier, seed: 31)
        let watcher = Watcher()
        net.observer = watcher
        var rng = SeededGenerator(seed: 32)
        let x = (0..<(batch * input.count)).map { _ in rng.uniform() * 2 - 1 }
        let labels = (0..<batch).map { _ in Int32(rng.below(10)) }
        var loss = 0.0, correct = 0
        // Stale values from an earlier step must not survive the first chunk's zeroing.
        for i in 0..<graph.parameterCount { net.gradients[i] = 1 }
        let chunks = [0..<3, 3..<4, 4..<7]
        for (k, chunk) in chunks.enumerated() {
            net.input.update(from: Array(x[(chunk.lowerBound * input.count)..<(chunk.upperBound * input.count)]), count: chunk.count * input.count)
            for (j, b) in chunk.enumerated() { net.labels[j] = labels[b] }
            net.globalOffset = chunk.lowerBound
            let r = net.trainForward(count: chunk.count, lossScale: 1 / Double(batch), step: 5, accumulate: k > 0)
            loss += r.loss
            correct += r.correct
            let last = k == chunks.count - 1
            if last { watcher.reportsBeforeLast = watcher.reports }
            net.trainBackward(count: chunk.count, step: 5, last: last && !late)
        }
        if late {
            #expect(watcher.reports == 0)
            net.finishChunks(step: 5)
        }
        #expect(watcher.reportsBeforeLast == 0 && watcher.reports > 0)
        #expect(abs(loss - whole.loss) < 1e-12 * abs(whole.loss) && correct == whole.correct)
        let e = worstTensorError(whole.gradients, Array(net.gradients), graph.parameters)
        #expect(e.error < 1e-12, "\(e)")
    }
}

// MARK: - Dropout

@Suite struct DropoutBehaviour {
    static let input = Shape(1, 12, 12)
    static let layers = Models.alexnet(width: 2, hidden: 16, dropout: 0.5)

    /// A training-mode forward of samples [first, first + count) of a fixed batch of 5, keyed by `step`;
    /// returns the output and drop6's output.
    static func forward(parts: Int, first: Int = 0, count: Int = 5, offset: Int? = nil, step: Int = 3, seed: UInt64 = 17,
                        training: Bool = true) throws -> (output: [Float], drop6: [Float]) {
        let graph = try Graph(input: input, layers: layers)
        let net = Network<Float>(graph: graph, capacity: count, parts: parts)
        net.seed = seed
        net.globalOffset = offset ?? first
        Initializer.initialize(net, scheme: .he, seed: 5)
        var rng = SeededGenerator(seed: 6)
        let all = (0..<(5 * input.count)).map { _ in Float(rng.uniform()) }
        net.input.update(from: Array(all[(first * input.count)..<((first + count) * input.count)]), count: count * input.count)
        net.forward(count: count, training: training, step: step)
        let d = try #require(graph.nodes.first { $0.name == "drop6" })
        return (Array(UnsafeBufferPointer(start: net.output, count: count * graph.outputShape.count)),
                Array(UnsafeBufferPointer(start: net.activations[d.index], count: count * d.outputShape.count)))
    }

    private static func zeros(_ a: [Float]) -> [Bool] { a.map { $0 == 0 } }

    @Test func maskDoesNotDependOnTheSplit() throws {
        let one = try Self.forward(parts: 1)
        let two = try Self.forward(parts: 2)
        #expect(Self.zeros(one.drop6) == Self.zeros(two.drop6))
        #expect(worstArrayError(one.drop6, two.drop6) < 1e-5)
        #expect(worstArrayError(one.output, two.output) < 1e-5)
        // And dropout is really active: some units of drop6 are dropped (ReLU zeros alone would not
        // change with the step, see below).
        let other = try Self.forward(parts: 1, step: 4)
        #expect(Self.zeros(other.drop6) != Self.zeros(one.drop6))
        #expect(worstArrayError(one.output, other.output) > 1e-3)
    }

    @Test func maskDoesNotDependOnTheRank() throws {
        // Samples 3 and 4 held by another rank (global offset 3) see the same masks as in the whole batch.
        let whole = try Self.forward(parts: 1)
        let tail = try Self.forward(parts: 1, first: 3, count: 2)
        let per = 16, classes = 10
        #expect(Self.zeros(Array(whole.drop6[(3 * per)...])) == Self.zeros(tail.drop6))
        #expect(worstArrayError(Array(whole.output[(3 * classes)...]), tail.output) < 1e-5)
        // Split over two parts on that rank: still the same.
        let tailTwoParts = try Self.forward(parts: 2, first: 3, count: 2)
        #expect(Self.zeros(tailTwoParts.drop6) == Self.zeros(tail.drop6))
        // Without the offset the samples would get the masks of samples 0 and 1; another run seed, other masks.
        let unshifted = try Self.forward(parts: 1, first: 3, count: 2, offset: 0)
        #expect(Self.zeros(unshifted.drop6) != Self.zeros(tail.drop6), "the global offset keys the mask")
        let reseeded = try Self.forward(parts: 1, first: 3, count: 2, seed: 18)
        #expect(Self.zeros(reseeded.drop6) != Self.zeros(tail.drop6), "the run seed keys the mask")
    }

    @Test func evaluationIsTheIdentity() throws {
        let graph = try Graph(input: Shape(4, 3, 3), layers: [layer("drop", .dropout(rate: 0.5))])
        let batch = 8, n = batch * 36
        let net = Network<Float>(graph: graph, capacity: batch, parts: 2)
        net.seed = 3
        var rng = SeededGenerator(seed: 4)
        let x = (0..<n).map { _ in Float(rng.uniform() + 0.5) }   // no zeros in the input
        net.input.update(from: x, count: n)
        net.forward(count: batch, training: false)
        #expect(Array(UnsafeBufferPointer(start: net.output, count: n)) == x)
        // Training: inverted dropout, each unit 0 or x / (1 - 0.5), about half of them dropped.
        net.forward(count: batch, training: true, step: 1)
        let y = Array(UnsafeBufferPointer(start: net.output, count: n))
        #expect(zip(x, y).allSatisfy { $1 == 0 || $1 == 2 * $0 })
        let dropped = Double(y.filter { $0 == 0 }.count) / Double(n)
        #expect(dropped > 0.4 && dropped < 0.6, "dropped \(dropped)")
    }

    @Test func evaluationOfAlexNetIsDeterministicAndSplitIndependent() throws {
        let one = try Self.forward(parts: 1, training: false)
        let again = try Self.forward(parts: 1, step: 9, seed: 99, training: false)
        let two = try Self.forward(parts: 2, training: false)
        #expect(one.output == again.output, "evaluation ignores step and seed")
        #expect(worstArrayError(one.output, two.output) < 1e-5)
        let training = try Self.forward(parts: 1)
        #expect(worstArrayError(one.output, training.output) > 1e-3)
    }
}

// MARK: - Evaluation mode and batch norm

@Suite struct EvaluationMode {
    @Test func batchNormUsesRunningStatistics() throws {
        let graph = try Graph(input: mnist, layers: Models.lenet5(batchNorm: true))
        let batch = 6
        let net = Network<Float>(graph: graph, capacity: batch, parts: 2)
        Initializer.initialize(net, scheme: .xavier, seed: 41)
        let initialStatistics = Array(net.statistics)
        var rng = SeededGenerator(seed: 42)
        let x = (0..<(batch * mnist.count)).map { _ in Float(rng.uniform() * 2 - 1) }
        net.input.update(from: x, count: x.count)
        for b in 0..<batch { net.labels[b] = Int32(b % 10) }
        let sgd = SGD<Float>(graph: graph, settings: SGDSettings(momentum: 0.9))
        for step in 0..<3 {
            _ = net.trainStep(count: batch, lossScale: 1.0 / Double(batch), step: step)
            sgd.step(parameters: net.parameters, gradients: net.gradients, lr: 0.05)
        }
        let statistics = Array(net.statistics)
        #expect(statistics != initialStatistics, "three steps moved the running statistics")

        let classes = 10
        let evaluation = net.evaluate(count: batch)
        let batchOutput = Array(UnsafeBufferPointer(start: net.output, count: batch * classes))
        #expect(Array(net.statistics) == statistics, "evaluation leaves the running statistics alone")
        #expect(evaluation.loss.isFinite)
        // Each sample alone gives the same outputs: nothing depends on the rest of the batch.
        for b in [0, 3, 5] {
            net.input.update(from: Array(x[(b * mnist.count)..<((b + 1) * mnist.count)]), count: mnist.count)
            net.forward(count: 1, training: false)
            let alone = Array(UnsafeBufferPointer(start: net.output, count: classes))
            #expect(worstArrayError(Array(batchOutput[(b * classes)..<((b + 1) * classes)]), alone) < 1e-5, "sample \(b)")
        }
        // In training mode, the same sample alone normalises with its own statistics and differs.
        net.input.update(from: x, count: x.count)
        net.forward(count: batch, training: true, updateStatistics: false)
        let trainingOutput = Array(UnsafeBufferPointer(start: net.output, count: batch * classes))
        #expect(worstArrayError(batchOutput, trainingOutput) > 1e-3)
        #expect(Array(net.statistics) == statistics, "updateStatistics: false")
    }
}

// MARK: - Learning

@Suite struct Learning {
    @Test func sgdReducesTheLossOnAFixedBatch() throws {
        let graph = try Graph(input: mnist, layers: Models.lenet5(batchNorm: false))
        let batch = 8
        let net = Network<Float>(graph: graph, capacity: batch)
        Initializer.initialize(net, scheme: .xavier, seed: 51)
        var rng = SeededGenerator(seed: 52)
        for i in 0..<(batch * mnist.count) { net.input[i] = Float(rng.uniform() * 2 - 1) }
        for b in 0..<batch { net.labels[b] = Int32(b % 10) }
        let sgd = SGD<Float>(graph: graph, settings: SGDSettings(momentum: 0.9))
        var losses: [Double] = []
        for step in 0..<50 {
            let r = net.trainStep(count: batch, lossScale: 1.0 / Double(batch), step: step)
            losses.append(r.loss / Double(batch))
            sgd.step(parameters: net.parameters, gradients: net.gradients, lr: 0.01)
        }
        let final = net.evaluate(count: batch).loss / Double(batch)
        #expect(losses[0] > 1.5, "an untrained 10-way classifier starts near log 10: \(losses[0])")
        #expect(final < 0.5 * losses[0], "loss \(losses[0]) -> \(final): \(losses)")
    }
}

// MARK: - Graph errors

@Suite struct GraphErrors {
    /// Expects `layers` to be rejected with a message naming layer `name` (quoted) and containing `detail`.
    private func expectRejected(_ layers: [LayerSpec], input: Shape = Shape(3, 8, 8), naming name: String, _ detail: String,
                                sourceLocation: SourceLocation = #_sourceLocation) {
        let error = #expect(throws: ModelError.self, sourceLocation: sourceLocation) { _ = try Graph(input: input, layers: layers) }
        guard let message = error?.message else { return }
        #expect(message.contains("'\(name)'"), "\(message)", sourceLocation: sourceLocation)
        #expect(message.contains(detail), "\(message)", sourceLocation: sourceLocation)
    }

    @Test func kernelLargerThanInput() {
        expectRejected([conv("ok", 4, k: 3), conv("big", 2, k: 7)], naming: "big", "larger than")
        expectRejected([layer("pool", .maxPool(Window(kernelH: 9, kernelW: 2)))], naming: "pool", "larger than")
        // Padding makes room: a 7x7 kernel with padding 1 on 6x6 is fine.
        #expect(throws: Never.self) { _ = try Graph(input: Shape(3, 6, 6), layers: [conv("fits", 2, k: 7, p: 1)]) }
    }

    @Test func channelsNotDivisibleByGroups() {
        expectRejected([conv("g", 4, k: 3, groups: 2)], input: Shape(3, 8, 8), naming: "g", "divisible")
        expectRejected([conv("g", 5, k: 3, groups: 3)], naming: "g", "divisible")
    }

    @Test func unknownInput() {
        expectRejected([conv("a", 4, k: 3), conv("b", 4, k: 3, inputs: ["nope"])], naming: "b", "'nope'")
        // A later layer is not an input either.
        expectRejected([conv("a", 4, k: 3, inputs: ["b"]), conv("b", 4, k: 3)], naming: "a", "'b'")
    }

    @Test func duplicateName() {
        expectRejected([conv("same", 4, k: 3), layer("same", .relu)], naming: "same", "twice")
    }

    @Test func concatWithMismatchedSpatialSize() {
        expectRejected([conv("a", 2, k: 3, p: 1), conv("b", 2, k: 3, inputs: ["data"]), layer("cat", .concat, inputs: ["a", "b"])],
                       naming: "cat", "'b'")
    }

    @Test func addWithMismatchedShape() {
        expectRejected([conv("a", 2, k: 3, p: 1), conv("b", 4, k: 3, p: 1, inputs: ["data"]), layer("sum", .add, inputs: ["a", "b"])],
                       naming: "sum", "'b'")
    }

    @Test func unusedLayer() {
        expectRejected([conv("dangling", 2, k: 3), conv("main", 2, k: 3, inputs: ["data"]), layer("r", .relu)],
                       naming: "dangling", "used by no other layer")
    }

    @Test func wrongInputCounts() {
        expectRejected([conv("a", 2, k: 1), layer("cat", .concat, inputs: ["a"])], naming: "cat", "two inputs")
        expectRejected([conv("a", 2, k: 1), conv("b", 2, k: 1, inputs: ["a", "data"])], naming: "b", "one input")
    }

    @Test func badSettings() {
        expectRejected([layer("drop", .dropout(rate: 1))], naming: "drop", "rate")
        expectRejected([layer("bn", .batchNorm(eps: 0, momentum: 0.1))], naming: "bn", "eps")
        expectRejected([layer("p", .avgPool(Window(kernelH: 2, kernelW: 2, padH: 2, padW: 2)))], naming: "p", "padding")
        expectRejected([layer("fc", .linear(outFeatures: 0, bias: true))], naming: "fc", "out_features")
    }
}

// MARK: - Parameter counts

/// data 3x8x8 -> a (1x1, 4) and b (3x3 pad 1, 2, no bias) -> concat (6) -> c (3x3 pad 1, 6, groups 2)
/// -> add(c, cat) -> bn -> relu -> global average pool -> fc (5).
private let dagInput = Shape(3, 8, 8)
private let dagLayers: [LayerSpec] = [
    conv("a", 4, k: 1), conv("b", 2, k: 3, p: 1, bias: false, inputs: ["data"]),
    layer("cat", .concat, inputs: ["a", "b"]),
    conv("c", 6, k: 3, p: 1, groups: 2),
    layer("sum", .add, inputs: ["c", "cat"]),
    layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1)), layer("relu", .relu),
    layer("gap", .globalAvgPool), layer("fc", .linear(outFeatures: 5, bias: true)),
]

@Suite struct ParameterCounts {
    @Test func dagWithConcatAndAdd() throws {
        let graph = try Graph(input: dagInput, layers: dagLayers)
        // a: 3*4 + 4 = 16; b: 2*3*9 = 54; c: 6 * (6/2) * 9 + 6 = 168; bn: 6 + 6; fc: 6*5 + 5 = 35.
        #expect(graph.parameterCount == 16 + 54 + 168 + 12 + 35)
        #expect(graph.statisticsCount == 12)
        #expect(graph.parameters.map(\.name) == ["a.weight", "a.bias", "b.weight", "c.weight", "c.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"])
        #expect(graph.parameters.map(\.count) == [12, 4, 54, 162, 6, 6, 6, 30, 5])
        #expect(graph.parameters.first { $0.name == "c.weight" }?.shape == [6, 3, 3, 3])
        // Laid out back to back.
        var offset = 0
        for p in graph.parameters { #expect(p.offset == offset, "\(p.name)"); offset += p.count }
        let cat = try #require(graph.nodes.first { $0.name == "cat" })
        #expect(cat.outputShape == Shape(6, 8, 8))
        #expect(graph.consumers[0].count == 2, "data feeds a and b")
        #expect(graph.consumers[cat.index].count == 2, "cat feeds c and sum")
        #expect(graph.outputShape == Shape(5, 1, 1))
    }

    @Test func dagForwardAddsAndConcatenates() throws {
        // sum = c(cat) + cat, cat = [a(x), b(x)] along channels: checked on the activations.
        let graph = try Graph(input: dagInput, layers: dagLayers)
        let net = Network<Double>(graph: graph, capacity: 2)
        Initializer.initialize(net, scheme: .he, seed: 3)
        var rng = SeededGenerator(seed: 4)
        for i in 0..<(2 * dagInput.count) { net.input[i] = rng.uniform() }
        net.forward(count: 2, training: false)
        func act(_ name: String) -> [Double] {
            let node = graph.nodes.first { $0.name == name }!
            return Array(UnsafeBufferPointer(start: net.activations[node.index], count: 2 * node.outputShape.count))
        }
        let a = act("a"), b = act("b"), cat = act("cat"), c = act("c"), sum = act("sum")
        let plane = 64
        for s in 0..<2 {
            #expect(Array(cat[(s * 6 * plane)..<(s * 6 * plane + 4 * plane)]) == Array(a[(s * 4 * plane)..<((s + 1) * 4 * plane)]))
            #expect(Array(cat[(s * 6 * plane + 4 * plane)..<((s + 1) * 6 * plane)]) == Array(b[(s * 2 * plane)..<((s + 1) * 2 * plane)]))
        }
        #expect(zip(sum, zip(c, cat)).allSatisfy { $0 == $1.0 + $1.1 })
    }

    @Test func lenet5() throws {
        let graph = try Graph(input: mnist, layers: Models.lenet5(batchNorm: false))
        // conv1 1*6*25 + 6 = 156; conv2 6*16*25 + 16 = 2,416; fc1 400*120 + 120 = 48,120; fc2 120*84 + 84 = 10,164; fc3 84*10 + 10 = 850.
        #expect(graph.parameterCount == 61_706)
        #expect(graph.statisticsCount == 0)
        #expect(graph.outputShape == Shape(10, 1, 1))
    }

    @Test func lenet5BatchNorm() throws {
        let graph = try Graph(input: mnist, layers: Models.lenet5(batchNorm: true))
        // No bias before BN: 150 + 2,400 + 48,000 + 10,080 + 850 = 61,480, plus BN scale and shift 2 * (6 + 16 + 120 + 84) = 452.
        #expect(graph.parameterCount == 61_932)
        // Running mean and variance: another 452.
        #expect(graph.statisticsCount == 452)
    }

    @Test func alexnet() throws {
        let graph = try Graph(input: mnist, layers: Models.alexnet())
        // conv1 1,664; conv2 36,992; conv3 221,376; conv4 166,080; conv5 110,720; fc6 2,098,176; fc7 1,049,600; fc8 10,250.
        #expect(graph.parameterCount == 3_694_858)
        #expect(graph.nodes.first { $0.name == "pool5" }?.outputShape == Shape(128, 4, 4))
    }
}

// MARK: - ReLU fused into the convolution

/// A ReLU is fused only into a convolution that nothing else reads; the fused network computes the
/// step it would compute unfused (checked against the same graph with a leaky ReLU of slope 0, which
/// is never fused), in Double and in Float, with two parts.
@Test func reluIsFusedOnlyIntoAConvolutionNothingElseReads() throws {
    let input = Shape(2, 9, 8)
    func layers(_ activation: LayerKind) -> [LayerSpec] {
        [conv("c1", 4, k: 3, p: 1), layer("r1", activation),
         conv("c2", 4, k: 3, p: 1), layer("r2", activation), layer("sum", .add, inputs: ["c2", "r2"]),
         layer("f", .flatten), layer("fc", .linear(outFeatures: 3, bias: true))]
    }
    let graph = try Graph(input: input, layers: layers(.relu))
    let net = Network<Double>(graph: graph, capacity: 4)
    let names = Set(net.fusedReLUs.map { graph.nodes[$0].name })
    #expect(names == ["r1"], "c2 is also read by the add, so r2 stays a layer of its own")
    #expect(Network<Double>(graph: try Graph(input: input, layers: layers(.leakyRelu(alpha: 0))), capacity: 4).fusedReLUs.isEmpty)
    for s in try stepsAgainstLeakyReLU(input, layers) {
        #expect(worstArrayError(s.plain.gradients.map { Float($0) }, s.relu.gradients) <= 1e-4)
    }
}

/// One step with ReLUs and one with leaky ReLUs of slope 0 (never fused), with 1 and 2 parts: checks the
/// Double steps agree to 1e-12 and returns, per part count, the Double leaky step and both Float steps.
private func stepsAgainstLeakyReLU(_ input: Shape, _ layers: (LayerKind) -> [LayerSpec], sourceLocation: SourceLocation = #_sourceLocation)
    throws -> [(parts: Int, plain: StepResult<Double>, relu: StepResult<Float>, leaky: StepResult<Float>)] {
    try [1, 2].map { parts in
        let fused = try trainOnce(Double.self, input: input, layers(.relu), batch: 4, parts: parts)
        let plain = try trainOnce(Double.self, input: input, layers(.leakyRelu(alpha: 0)), batch: 4, parts: parts)
        #expect(abs(fused.loss - plain.loss) <= 1e-12 * abs(plain.loss), sourceLocation: sourceLocation)
        #expect(worstArrayError(plain.gradients, fused.gradients) <= 1e-12, sourceLocation: sourceLocation)
        return (parts, plain, try trainOnce(Float.self, input: input, layers(.relu), batch: 4, parts: parts),
                try trainOnce(Float.self, input: input, layers(.leakyRelu(alpha: 0)), batch: 4, parts: parts))
    }
}

/// A ReLU that only a max pool reads is applied by the pool in backward (fused into a convolution or a
/// batch norm, or after an add, windows apart or overlapping); a ReLU read by something else is not. The step is the unfused
/// one: against a leaky ReLU of slope 0 (never fused), in Double to 1e-12 and in Float value for value.
@Test func reluIsAppliedByTheMaxPoolThatAloneReadsIt() throws {
    let input = Shape(2, 12, 11)
    func layers(_ activation: LayerKind) -> [LayerSpec] {
        [conv("c1", 8, k: 3, p: 1), layer("r1", activation), layer("p1", .maxPool(Window(kernelH: 2, kernelW: 2, strideH: 2, strideW: 2))),
         conv("c2", 8, k: 3, p: 1, bias: false), layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1)), layer("r2", activation),
         layer("p2", .maxPool(Window(kernelH: 3, kernelW: 3, strideH: 2, strideW: 2, padH: 1, padW: 1))),
         layer("r3", activation), layer("p3", .maxPool(Window(kernelH: 3, kernelW: 3, strideH: 1, strideW: 1, padH: 1, padW: 1))),
         layer("sum", .add, inputs: ["p3", "r3"]), layer("r4", activation), layer("p4", .maxPool(Window(kernelH: 2, kernelW: 2, strideH: 1, strideW: 1))),
         layer("f", .flatten), layer("fc", .linear(outFeatures: 3, bias: true))]
    }
    let graph = try Graph(input: input, layers: layers(.relu))
    let net = Network<Double>(graph: graph, capacity: 4)
    #expect(Set(net.pooledReLUs.map { graph.nodes[$0].name }) == ["r1", "r2", "r4"], "r3 is also read by the add")
    #expect(Set(net.fusedReLUs.map { graph.nodes[$0].name }) == ["r1", "r2"], "into c1 and into bn; p2 before r3 is a pool, sum before r4 an add")
    // r4 is applied by p4 alone: its output gradient is not computed (p4 writes the add's).
    #expect(net.activationGradients[graph.nodes.first { $0.name == "r4" }!.index] == nil)
    #expect(Network<Double>(graph: try Graph(input: input, layers: layers(.leakyRelu(alpha: 0))), capacity: 4).pooledReLUs.isEmpty)
    for s in try stepsAgainstLeakyReLU(input, layers) {
        let differing = zip(s.relu.gradients, s.leaky.gradients).filter { $0 != $1 }.count
        #expect(differing == 0, "\(s.parts) part(s): \(differing) of \(s.leaky.gradients.count) Float gradients differ")
        #expect(s.relu.gradients.contains { $0 != 0 })
    }
    // Evaluation (batch norm on its running statistics, the ReLU fused into it) gives the unfused outputs.
    func evaluate(_ activation: LayerKind) throws -> [Float] {
        let net = Network<Float>(graph: try Graph(input: input, layers: layers(activation)), capacity: 4)
        Initializer.initialize(net, scheme: .xavier, seed: 5)
        var rng = SeededGenerator(seed: 6)
        for i in 0..<(4 * input.count) { net.input[i] = Float(rng.uniform() * 2 - 1) }
        net.forward(count: 4, training: false)
        return Array(UnsafeBufferPointer(start: net.output, count: 4 * 3))
    }
    #expect(try evaluate(.relu) == evaluate(.leakyRelu(alpha: 0)))
}

// MARK: - Float kernels in a network

/// The Float step (C kernels: direct first convolution, LRN, pooling, im2col/col2im) against the Double
/// step (the generic Swift kernels the gradient checks prove) from the same weights and batch.
@Suite struct FloatAgainstDouble {
    @Test(arguments: ["lenet5", "lenet5-bn", "alexnet"])
    func floatStepMatchesTheDoubleStep(model: String) throws {
        let layers = switch model {
        case "lenet5": Models.lenet5(batchNorm: false)
        case "lenet5-bn": Models.lenet5(batchNorm: true)
        default: Models.alexnet(width: 4, hidden: 16, dropout: 0.5)
        }
        let graph = try Graph(input: mnist, layers: layers)
        let f = try trainOnce(Float.self, input: mnist, layers, batch: 5, parts: 1)
        let d = try trainOnce(Double.self, input: mnist, layers, batch: 5, parts: 1)
        #expect(abs(f.loss - d.loss) <= 1e-5 * abs(d.loss), "loss \(f.loss) vs \(d.loss)")
        let g = worstTensorError(d.gradients.map { Float($0) }, f.gradients, graph.parameters)
        #expect(g.error <= 1e-3, "gradient of \(g.tensor) differs by \(g.error)")
        #expect(worstArrayError(d.output.map { Float($0) }, f.output) <= 1e-5, "outputs differ")
    }

    /// Convolutions the direct kernels do not take (stride 2; fewer than 8 output channels per group
    /// behind another layer) run im2col + GEMM in chunks in Float.
    @Test func im2colConvolutionsInANetworkMatchTheDoubleStep() throws {
        let input = Shape(3, 13, 11)
        let layers = [conv("c1", 12, k: 3, s: 2, p: 1), layer("r1", .relu), conv("c2", 8, k: 3, p: 1, groups: 2), layer("r2", .relu),
                      layer("f", .flatten), layer("fc", .linear(outFeatures: 10, bias: true))]
        let graph = try Graph(input: input, layers: layers)
        for node in graph.nodes {
            guard case let .convolution(outC, window, groups, _)? = node.kind else { continue }
            #expect(!ConvGeometry(input: node.inputShapes[0], outChannels: outC, window: window, groups: groups).allowsChannelDirect)
        }
        let f = try trainOnce(Float.self, input: input, layers, batch: 10, parts: 1)
        let d = try trainOnce(Double.self, input: input, layers, batch: 10, parts: 1)
        let g = worstTensorError(d.gradients.map { Float($0) }, f.gradients, graph.parameters)
        #expect(g.error <= 1e-4, "gradient of \(g.tensor) differs by \(g.error)")
        #expect(worstArrayError(d.output.map { Float($0) }, f.output) <= 1e-5, "outputs differ")
    }

    /// First layers with fewer than 8 output channels take the direct convolution (more take the
    /// channel-vectorised one, below): output channels 1 to 7, kernel widths 3, 5 (specialised) and 7
    /// (generic), padding, bias or none, 1-4 channels.
    @Test(arguments: [(1, 6, 5, 2, true), (3, 7, 3, 1, false), (2, 5, 7, 3, true), (1, 3, 5, 0, true), (4, 1, 3, 0, true)])
    func directFirstConvolutionMatchesTheDoubleStep(channels: Int, outChannels: Int, kernel: Int, pad: Int, bias: Bool) throws {
        let input = Shape(channels, 12, 19)
        let layers = [conv("c", outChannels, k: kernel, p: pad, bias: bias), layer("r", .relu),
                      layer("f", .flatten), layer("fc", .linear(outFeatures: 10, bias: true))]
        try expectFloatStepMatchesDouble(input, layers)
    }

    /// The channel-vectorised direct convolution (stride 1, at least 8 output channels per group), as
    /// a first layer and behind a 1x1 convolution (so that its input gradient is needed): channel
    /// blocks of 16 and a last block of 8, groups, output positions and window taps that leave tiles
    /// partly filled, padding up to kernel - 1, bias or none. 11 x 17 inputs. With the 16-wide tiles
    /// (AVX-512) the last four take their input gradient as a convolution of dy (at least 8 input
    /// channels per group, padding at least half the kernel), the others through GEMM + col2im.
    @Test(arguments: [(1, 64, 5, 2, true, true, 1), (6, 16, 5, 0, true, false, 1), (3, 8, 3, 1, false, false, 1),
                      (5, 24, 3, 2, true, false, 1), (2, 40, 5, 4, false, true, 1), (8, 48, 3, 1, true, false, 2),
                      (6, 24, 3, 1, false, false, 3), (16, 40, 3, 1, true, false, 1), (32, 48, 3, 1, false, false, 2),
                      (24, 16, 5, 2, true, false, 1), (8, 24, 3, 2, false, false, 1)])
    func channelDirectConvolutionMatchesTheDoubleStep(channels: Int, outChannels: Int, kernel: Int, pad: Int, bias: Bool, first: Bool,
                                                      groups: Int) throws {
        let input = Shape(channels, 11, 17)
        let tested = conv("c", outChannels, k: kernel, p: pad, groups: groups, bias: bias)
        let layers = (first ? [] : [conv("pre", channels, k: 1, bias: false)])
            + [tested, layer("r", .relu), layer("f", .flatten), layer("fc", .linear(outFeatures: 10, bias: true))]
        let geometry = ConvGeometry(input: input, outChannels: outChannels,
                                    window: Window(kernelH: kernel, kernelW: kernel, padH: pad, padW: pad), groups: groups)
        #expect(geometry.allowsChannelDirect)
        try expectFloatStepMatchesDouble(input, layers)
    }

    /// The input gradient as a convolution of dy (on CPUs with AVX-512; elsewhere these run GEMM +
    /// col2im) in shapes the test above leaves out: non-square kernels (dy padded differently in height
    /// and width), 40 input channels (a block of 32 and one of 8 in the transposed convolution), groups
    /// of 32, and padding above half the kernel.
    @Test(arguments: [(16, 24, 3, 5, 2, 1), (40, 16, 3, 3, 1, 1), (64, 32, 3, 3, 1, 2), (12, 16, 5, 3, 2, 1), (8, 8, 5, 5, 3, 1)])
    func inputGradientAsAConvolutionMatchesTheDoubleStep(channels: Int, outChannels: Int, kernelH: Int, kernelW: Int, pad: Int,
                                                          groups: Int) throws {
        let input = Shape(channels, 9, 13)
        let layers = [conv("pre", channels, k: 1, bias: false), conv("c", outChannels, k: kernelH, kw: kernelW, p: pad, groups: groups),
                      layer("r", .relu), layer("f", .flatten), layer("fc", .linear(outFeatures: 10, bias: true))]
        let geometry = ConvGeometry(input: input, outChannels: outChannels,
                                    window: Window(kernelH: kernelH, kernelW: kernelW, padH: pad, padW: pad), groups: groups)
        #expect(geometry.inputGradientAsConvolution != nil)
        try expectFloatStepMatchesDouble(input, layers)
    }

    /// On a CPU with AVX-512 the convolutions run 16-wide tiles (the channel-vectorised one blocks of 32
    /// and 16 channels, a last block of 8 on the 8-wide tile; the direct one 16 output columns); each
    /// output and weight-gradient lane sums the same products in the same order as the 8-wide tiles, so
    /// a step gives the same bits either way. The shapes of the tests above, which cover every block.
    @Test(.enabled(if: tandem_wide_kernels_available() != 0, "needs a CPU with AVX-512"))
    func wideConvolutionTilesGiveTheBitsOfTheNarrowOnes() throws {
        defer { _ = tandem_cv_set_wide(1) }
        // The direct first convolution (fewer than 8 output channels): 16 output columns at a time where
        // they fit in the padded row, the last 8 on the narrow block; 19 columns (one wide chunk, then a
        // narrow one) and 40 (two wide, one narrow).
        for (input, outChannels, kernel, pad, bias) in [
            (Shape(1, 12, 19), 6, 5, 2, true), (Shape(3, 12, 19), 7, 3, 1, false), (Shape(2, 12, 19), 5, 7, 3, true),
            (Shape(1, 9, 40), 6, 5, 2, true), (Shape(4, 9, 40), 1, 3, 0, false),
        ] {
            let layers = [conv("c", outChannels, k: kernel, p: pad, bias: bias), layer("r", .relu), layer("f", .flatten),
                          layer("fc", .linear(outFeatures: 10, bias: true))]
            #expect(tandem_cv_set_wide(1) == 1)
            let wide = try trainOnce(Float.self, input: input, layers, batch: 3, parts: 1)
            #expect(tandem_cv_set_wide(0) == 0)
            let narrow = try trainOnce(Float.self, input: input, layers, batch: 3, parts: 1)
            let same = wide.output.map(\.bitPattern) == narrow.output.map(\.bitPattern)
                && wide.gradients.map(\.bitPattern) == narrow.gradients.map(\.bitPattern)
            #expect(same, "direct convolution \(input) -> \(outChannels), \(kernel)x\(kernel) pad \(pad): the bits differ")
        }
        for (channels, outChannels, kernel, pad, bias, first, groups) in [
            (1, 64, 5, 2, true, true, 1), (6, 16, 5, 0, true, false, 1), (3, 8, 3, 1, false, false, 1), (5, 24, 3, 2, true, false, 1),
            (2, 40, 5, 4, false, true, 1), (8, 48, 3, 1, true, false, 2), (6, 24, 3, 1, false, false, 3), (4, 96, 3, 1, true, false, 1),
            (16, 40, 3, 1, true, false, 1), (32, 48, 3, 1, false, false, 2), (24, 16, 5, 2, true, false, 1), (8, 24, 3, 2, false, false, 1),
            (40, 24, 3, 1, true, false, 1),
        ] {
            let input = Shape(channels, 11, 17)
            let layers = (first ? [] : [conv("pre", channels, k: 1, bias: false)])
                + [conv("c", outChannels, k: kernel, p: pad, groups: groups, bias: bias), layer("r", .relu), layer("f", .flatten),
                   layer("fc", .linear(outFeatures: 10, bias: true))]
            #expect(tandem_cv_set_wide(1) == 1)
            let wide = try trainOnce(Float.self, input: input, layers, batch: 3, parts: 1)
            #expect(tandem_cv_set_wide(0) == 0)
            let narrow = try trainOnce(Float.self, input: input, layers, batch: 3, parts: 1)
            let shape = "\(channels) -> \(outChannels), \(kernel)x\(kernel) pad \(pad), groups \(groups)"
            // The input gradient is taken as a convolution of dy in both runs where it fits (the
            // machine decides that, not the tiles' width), through the same tiles.
            let same = wide.output.map(\.bitPattern) == narrow.output.map(\.bitPattern)
                && wide.gradients.map(\.bitPattern) == narrow.gradients.map(\.bitPattern)
            #expect(same, "\(shape): the bits differ")
        }
        // col2im in registers for rows of at most 16 (GEMM + col2im input gradients: LeNet-5's conv2; few
        // output channels; groups; 16 columns; batches that are not a multiple of its four samples).
        for (input, outChannels, kernel, pad, groups, batch) in [
            (Shape(6, 14, 14), 16, 5, 0, 1, 5), (Shape(3, 9, 16), 8, 3, 1, 1, 3), (Shape(4, 7, 13), 16, 5, 2, 2, 6),
            (Shape(5, 10, 11), 4, 3, 2, 1, 4), (Shape(2, 6, 1), 8, 3, 1, 1, 7),
        ] {
            let layers = [conv("pre", input.channels, k: 1, bias: false), conv("c", outChannels, k: kernel, p: pad, groups: groups, bias: true),
                          layer("r", .relu), layer("f", .flatten), layer("fc", .linear(outFeatures: 10, bias: true))]
            #expect(tandem_cv_set_wide(1) == 1)
            let wide = try trainOnce(Float.self, input: input, layers, batch: batch, parts: 1)
            #expect(tandem_cv_set_wide(0) == 0)
            let narrow = try trainOnce(Float.self, input: input, layers, batch: batch, parts: 1)
            let same = wide.output.map(\.bitPattern) == narrow.output.map(\.bitPattern)
                && wide.gradients.map(\.bitPattern) == narrow.gradients.map(\.bitPattern)
            #expect(same, "col2im \(input) -> \(outChannels), \(kernel)x\(kernel) pad \(pad), groups \(groups), batch \(batch): the bits differ")
        }
    }
}
