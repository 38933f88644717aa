#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// A model replica in memory: one contiguous buffer of parameters, one of their gradients, one of
// running statistics, activations for a maximum batch, and the parts that run it on threads.
// Layers hold views into these buffers; the optimiser and the communicator work on flat slices.

/// Told, during backward, which gradients are final, so that their allreduce can start while
/// backward goes on with earlier layers.
public protocol GradientObserver: AnyObject {
    /// Every gradient at offset >= `offset` of the flat gradient buffer is final for this step.
    func gradientsReady(from offset: Int)
    /// Called after each layer's backward (when the rank's batch runs on one thread): a chance to
    /// move allreduces in flight on. Must be cheap and must not block.
    func layerBackwardDone()
    /// Called before a training pass zeroes and rewrites the gradient buffer (on the calling thread):
    /// returns once nobody else reads it any more (another rank copying sums out of shared memory).
    func willWriteGradients()
}

extension GradientObserver {
    public func layerBackwardDone() {}
    public func willWriteGradients() {}
}

/// Told each layer's forward and backward begin and end times of part 0 (the trace recorder).
/// Called on part 0's thread, once per layer per pass: it must not allocate or block.
public protocol LayerTimer: AnyObject {
    func layerTimed(node: Int, backward: Bool, start: Double, end: Double)
}

/// The loss at the end of the network.
public enum LossKind: String, Sendable, CaseIterable {
    /// Softmax cross-entropy on the logits (the mean over the batch is the loss).
    case softmaxCrossEntropy = "softmax_cross_entropy"
    /// 1/2 * sum (t - y)^2 against one-hot targets, averaged over the batch.
    case squaredError = "squared_error"
}

public final class Network<T: Scalar>: @unchecked Sendable {
    public let graph: Graph
    /// Largest local batch this network was built for.
    public let capacity: Int
    public let parts: Int
    public let loss: LossKind
    public let parameters: UnsafeMutableBufferPointer<T>
    public let gradients: UnsafeMutableBufferPointer<T>
    /// What owns `gradients` when the network was given them (kept alive with the network).
    private let gradientsOwner: AnyObject?
    public let statistics: UnsafeMutableBufferPointer<T>
    /// Per node, the full-batch activation and its gradient (nil where none is computed: the input's
    /// without an input gradient, an unfused ReLU whose backward its max pool does); `activations[0]`
    /// is the input.
    public let activations: [UnsafeMutablePointer<T>]
    public let activationGradients: [UnsafeMutablePointer<T>?]
    /// ReLU nodes that the convolution or batch norm before them applies as it writes its output (they
    /// share its buffers; their forward does nothing).
    public let fusedReLUs: Set<Int>
    /// ReLUs (node indices) whose backward the max pool that alone reads them does (MaxPoolLayer.masksReLU).
    public let pooledReLUs: Set<Int>
    /// Integer labels of the local batch.
    public let labels: UnsafeMutablePointer<Int32>
    /// The run's seed (keys dropout masks) and the global index of local sample 0.
    public var seed: UInt64 = 0
    public var globalOffset = 0
    /// Summed over parts by BN; `crossRank` can be set for sync_bn.
    public let reducer: PartReducer
    public weak var observer: GradientObserver?
    /// When set (2 per node: forward, backward seconds), part 0 adds each layer's time into it.
    public var profile: UnsafeMutablePointer<Double>?
    /// When set, part 0 also reports each layer's begin and end times to it (`--trace`).
    public weak var layerTimer: LayerTimer?

    private var layers: [[Layer<T>]]          // [part][node - 1]
    private var partGradients: [UnsafeMutablePointer<T>]
    /// Extra gradient buffers where a node feeds several layers: edge (consumer, slot) -> buffer.
    private var edgeBuffers: [[UnsafeMutablePointer<T>]]   // per node: one buffer per consumer edge
    private let pool: WorkerPool
    /// Where the parts meet after backward, before each sums its share of the parts' gradients.
    private let gradientsDone: SpinBarrier
    private var owned: [UnsafeMutableRawPointer] = []

    // The current command, read by every part.
    private enum Command { case forward, train, trainForward, backward, finish }
    private var command = Command.forward
    /// `trainForward`: whether the pass adds to the gradients earlier chunks of the step left
    /// (part 0 writes the main buffer, which it does not zero then; the other parts zero theirs).
    private var accumulating = false
    /// `backward`: whether it tells the observer which gradients are final (a step's last chunk).
    private var reporting = true
    /// Deferred weight gradients (`deferWeightGradients`): the most samples a step in chunks may have
    /// (0: not deferred), and how many of the current step's the chunks so far had.
    public private(set) var deferredSamples = 0
    private var stashed = 0
    /// The fully connected layers whose weight gradients wait (part 0's; empty when not deferred).
    private var deferredLayers: [LinearLayer<T>] = []
    private var current = PassContext(start: 0, count: 0, batch: 0, training: false)
    private var lossScale: T = 1
    private let partLoss: UnsafeMutablePointer<Double>
    private let partCorrect: UnsafeMutablePointer<Int>

    /// - Parameters:
    ///   - capacity: the largest local batch; workspaces are sized for it once.
    ///   - parts: threads that split each batch (1 when ranks fill the cores).
    ///   - inputGradient: also compute the gradient of the input (the gradient checker needs it).
    ///   - exchange: where tower gathers meet the other towers (models split into towers only).
    ///   - gradients: memory of `graph.parameterCount` zeroed values to hold the gradient buffer (the
    ///     gradient sync's shared-memory slot), owned by `gradientsOwner`, which the network keeps
    ///     alive; nil: memory of its own.
    ///   - parameters: likewise for the parameters (the replicas' shared copy with a sharded
    ///     update, also owned by `gradientsOwner`); nil: memory of its own.
    public init(graph: Graph, capacity: Int, parts: Int = 1, loss: LossKind = .softmaxCrossEntropy, inputGradient: Bool = false,
                exchange: TowerExchange? = nil, gradients external: UnsafeMutablePointer<T>? = nil, parameters externalParameters: UnsafeMutablePointer<T>? = nil,
                gradientsOwner: AnyObject? = nil) {
        precondition((external == nil && externalParameters == nil) || gradientsOwner != nil, "external buffers need their owner")
        self.gradientsOwner = gradientsOwner
        precondition(capacity > 0 && parts > 0)
        precondition(parts == 1 || !graph.nodes.contains { if case .towerGather? = $0.kind { return true } else { return false } },
                     "a tower of a split model runs on one thread")
        self.graph = graph
        self.capacity = capacity
        self.parts = parts
        self.loss = loss
        func alloc<U>(_ t: U.Type, _ n: Int, into owned: inout [UnsafeMutableRawPointer]) -> UnsafeMutablePointer<U> {
            let p = allocateZeroed(U.self, count: n)
            owned.append(UnsafeMutableRawPointer(p))
            return p
        }
        var owned: [UnsafeMutableRawPointer] = []
        parameters = UnsafeMutableBufferPointer(start: externalParameters ?? alloc(T.self, graph.parameterCount, into: &owned), count: graph.parameterCount)
        gradients = UnsafeMutableBufferPointer(start: external ?? alloc(T.self, graph.parameterCount, into: &owned), count: graph.parameterCount)
        statistics = UnsafeMutableBufferPointer(start: alloc(T.self, graph.statisticsCount, into: &owned), count: graph.statisticsCount)
        labels = alloc(Int32.self, capacity, into: &owned)
        // A ReLU whose input is a convolution or a batch norm that nothing else reads is applied by that
        // layer as it writes its output (saving the ReLU's forward pass); the two nodes share their
        // activation and gradient buffers, and the ReLU's backward masks the gradient in place.
        let fused = Set(graph.nodes.filter { node in
            guard node.kind == .relu, let i = node.inputs.first, i > 0, graph.consumers[i] == [node.index] else { return false }
            switch graph.nodes[i].kind { case .convolution?, .batchNorm?: return true; default: return false }
        }.map(\.index))
        var acts: [UnsafeMutablePointer<T>] = []
        var grads: [UnsafeMutablePointer<T>?] = []
        for node in graph.nodes {
            if fused.contains(node.index) {
                acts.append(acts[node.inputs[0]])
                grads.append(grads[node.inputs[0]])
                continue
            }
            acts.append(alloc(T.self, capacity * node.outputShape.count, into: &owned))
            grads.append(node.index == 0 && !inputGradient ? nil : alloc(T.self, capacity * node.outputShape.count, into: &owned))
        }
        activations = acts
        fusedReLUs = fused
        // A ReLU that only a max pool reads leaves its backward to the pool, which writes the ReLU's input
        // gradient in the same pass (LeNet-5's pools: 0.13 ms of ReLU backward per step of 2.2 ms, 1 thread).
        let pooled = Set(graph.nodes.filter { node in
            guard case .relu? = node.kind, graph.consumers[node.index].count == 1, case .maxPool? = graph.nodes[graph.consumers[node.index][0]].kind
            else { return false }
            return true
        }.map(\.index))
        // Nothing writes the output gradient of such a ReLU unless it shares its convolution's or batch
        // norm's buffer: diagnostics see it as not computed.
        pooledReLUs = pooled
        activationGradients = grads.indices.map { i in pooled.contains(i) && !fused.contains(i) ? nil : grads[i] }
        var edges: [[UnsafeMutablePointer<T>]] = Array(repeating: [], count: graph.nodes.count)
        for node in graph.nodes where graph.consumers[node.index].count > 1 && grads[node.index] != nil {
            edges[node.index] = graph.consumers[node.index].map { _ in alloc(T.self, capacity * node.outputShape.count, into: &owned) }
        }
        edgeBuffers = edges
        partGradients = [gradients.baseAddress!]
        for _ in 1..<parts { partGradients.append(alloc(T.self, graph.parameterCount, into: &owned)) }
        let maxChannels = graph.nodes.map { $0.outputShape.channels }.max() ?? 1
        reducer = PartReducer(parts: parts, capacity: 2 * maxChannels + 1)
        pool = WorkerPool(parts: parts)
        gradientsDone = SpinBarrier(parties: parts)
        partLoss = alloc(Double.self, parts, into: &owned)
        partCorrect = alloc(Int.self, parts, into: &owned)
        layers = []
        self.owned = owned

        // Bind every part's layers to the shared buffers.
        let partCapacity = (capacity + parts - 1) / parts
        for p in 0..<parts {
            var row: [Layer<T>] = []
            for node in graph.nodes.dropFirst() {
                let layer: Layer<T> = makeLayer(node, capacity: partCapacity, reducer: reducer, exchange: exchange)
                if fused.contains(node.index) { (layer as? ActivationLayer<T>)?.fused = true }
                if let r = graph.consumers[node.index].first, fused.contains(r) {
                    (layer as? ConvolutionLayer<T>)?.fusesReLU = true
                    (layer as? BatchNormLayer<T>)?.fusesReLU = true
                }
                layer.x = node.inputs.map { acts[$0] }
                layer.dx = node.inputs.map { input in
                    guard let g = grads[input] else { return nil }
                    if let slot = graph.consumers[input].firstIndex(of: node.index), graph.consumers[input].count > 1 {
                        return edges[input][slot]
                    }
                    return g
                }
                layer.y = acts[node.index]
                layer.dy = grads[node.index]!
                let pr = node.parameterRange
                if !pr.isEmpty {
                    let offset = graph.parameters[pr.lowerBound].offset
                    layer.w = parameters.baseAddress! + offset
                    layer.dw = partGradients[p] + offset
                }
                let sr = node.statisticsRange
                if !sr.isEmpty { layer.stats = statistics.baseAddress! + graph.statistics[sr.lowerBound].offset }
                row.append(layer)
            }
            for r in pooledReLUs {
                guard let relu = row[r - 1] as? ActivationLayer<T>, let pool = row[graph.consumers[r][0] - 1] as? MaxPoolLayer<T> else { continue }
                pool.dx = relu.dx
                pool.masksReLU = true
                relu.backwardInPool = true
            }
            for layer in row { layer.bound() }
            layers.append(row)
        }
        pool.setBody { [unowned self] part in self.runPart(part) }
    }

    deinit {
        pool.shutdown()
        for p in owned { p.deallocate() }
    }

    public var input: UnsafeMutablePointer<T> { activations[0] }
    public var output: UnsafeMutablePointer<T> { activations[activations.count - 1] }
    /// The gradient of the loss with respect to the output (filled by the loss, or by the caller before `backward`).
    public var outputGradient: UnsafeMutablePointer<T> { activationGradients[activationGradients.count - 1]! }
    public var inputGradient: UnsafeMutablePointer<T>? { activationGradients[0] }

    // MARK: - Passes

    /// Runs forward on the first `count` samples of `input`.
    public func forward(count: Int, training: Bool, step: Int = 0, updateStatistics: Bool = true) {
        start(.forward, count: count, training: training, step: step, updateStatistics: updateStatistics)
    }

    /// Runs backward from `outputGradient` (after `forward` with the same count), adding into the
    /// (zeroed by `zeroGradients`) gradient buffer.
    public func backward(count: Int, step: Int = 0) {
        start(.backward, count: count, training: true, step: step, updateStatistics: false)
        finishGradients()
    }

    /// One training pass: zero gradients, forward, loss against `labels`, backward. The loss
    /// gradient is scaled by `lossScale` (1 / the global batch, so that gradients summed over parts and
    /// ranks are the gradient of the mean loss). Returns the summed loss and correct predictions.
    public func trainStep(count: Int, lossScale: Double, step: Int) -> (loss: Double, correct: Int) {
        observer?.willWriteGradients()
        if parts == 1 { zeroGradients() }   // with several parts each zeroes its own buffer (runPart)
        self.lossScale = T(lossScale)
        start(.train, count: count, training: true, step: step, updateStatistics: true)
        finishGradients()
        var total = 0.0, correct = 0
        for p in 0..<parts { total += partLoss[p]; correct += partCorrect[p] }
        return (total, correct)
    }

    /// A training pass in chunks (parallel.dynamic): the forward and loss of one chunk of the step's
    /// samples, scaled by `lossScale` like `trainStep`'s. The step's first chunk (`accumulate`
    /// false) zeroes the gradients; later ones add to them. Follow it with `trainBackward`.
    public func trainForward(count: Int, lossScale: Double, step: Int, accumulate: Bool) -> (loss: Double, correct: Int) {
        if !accumulate {
            observer?.willWriteGradients()
            if parts == 1 { zeroGradients() }
        }
        accumulating = accumulate
        if !accumulate { stashed = 0 }
        self.lossScale = T(lossScale)
        start(.trainForward, count: count, training: true, step: step, updateStatistics: true)
        var total = 0.0, correct = 0
        for p in 0..<parts { total += partLoss[p]; correct += partCorrect[p] }
        return (total, correct)
    }

    /// The backward of the chunk `trainForward` ran, adding into the gradients. `last`: the step's
    /// last chunk on this rank, whose backward tells the observer as each gradient becomes final;
    /// the earlier chunks' tell it nothing.
    public func trainBackward(count: Int, step: Int, last: Bool) {
        reporting = last
        start(.backward, count: count, training: true, step: step, updateStatistics: false,
              stashRow: deferredSamples > 0 ? stashed : -1, lastChunk: last)
        stashed += count
        reporting = true
        if last { finishGradients() }
    }

    /// Ends a step in chunks whose last chunk's backward ran with `last` false (the rank learnt only
    /// afterwards that no chunk was left): what that backward would have done at the end — the
    /// deferred weight gradients, the parts' sum — then every gradient reported final at once.
    public func finishChunks(step: Int) {
        start(.finish, count: 0, training: true, step: step, updateStatistics: false, stashRow: stashed, lastChunk: true)
        finishGradients()
    }

    /// A training pass in chunks then leaves the fully connected layers' weight gradients to the step's
    /// last chunk: each chunk's inputs and output gradients of those layers go to a stash of
    /// `samplesPerStep` rows (allocated here, once), and the last chunk's backward makes one product
    /// over all of them. Each chunk's own product would read and write the whole weight gradient (and
    /// pack its operands) once per chunk: with parallel.dynamic's chunks of 1-8 samples that costs as
    /// much as the chunk's arithmetic. On one part only (the parts split each chunk's samples).
    public func deferWeightGradients(samplesPerStep: Int) {
        precondition(samplesPerStep > 0)
        guard parts == 1, deferredSamples == 0 else { return }
        deferredSamples = samplesPerStep
        deferredLayers = layers[0].compactMap { $0 as? LinearLayer<T> }
        for fc in deferredLayers {
            fc.stashX = allocateZeroed(T.self, count: samplesPerStep * fc.inShape.count)
            fc.stashDY = allocateZeroed(T.self, count: samplesPerStep * fc.outFeatures)
            fc.stashRows = samplesPerStep
            owned.append(UnsafeMutableRawPointer(fc.stashX!))
            owned.append(UnsafeMutableRawPointer(fc.stashDY!))
        }
    }

    /// A step in which this replica computes no sample (parallel.dynamic, where the others claimed
    /// them all): zero gradients, reported final.
    public func contributeNothing() {
        observer?.willWriteGradients()
        zeroGradients()
        finishGradients()
    }

    /// Evaluation on `count` samples: forward in evaluation mode and the loss.
    public func evaluate(count: Int) -> (loss: Double, correct: Int) {
        forward(count: count, training: false, updateStatistics: false)
        return computeLoss(count: count, scale: 0, gradient: false)
    }

    /// The loss of the current output against `labels` (and its gradient into `outputGradient`).
    public func computeLoss(count: Int, scale: Double, gradient: Bool = true) -> (loss: Double, correct: Int) {
        lossFunction(output, gradient ? outputGradient : nil, labels, count, T(scale))
    }

    private func lossFunction(_ out: UnsafeMutablePointer<T>, _ d: UnsafeMutablePointer<T>?, _ l: UnsafeMutablePointer<Int32>, _ n: Int, _ scale: T) -> (loss: Double, correct: Int) {
        let classes = graph.outputShape.count
        switch loss {
        case .softmaxCrossEntropy: return softmaxCrossEntropy(d, out, labels: l, n: n, classes: classes, scale: scale)
        case .squaredError: return squaredError(d, out, labels: l, n: n, classes: classes, scale: scale)
        }
    }

    public func zeroGradients() {
        // Raw bytes: `update(repeating:)` on a generic buffer copies element by element through witnesses.
        for g in partGradients { UnsafeMutableRawPointer(g).initializeMemory(as: UInt8.self, repeating: 0, count: graph.parameterCount * MemoryLayout<T>.stride) }
    }

    private func start(_ cmd: Command, count: Int, training: Bool, step: Int, updateStatistics: Bool, stashRow: Int = -1, lastChunk: Bool = true) {
        precondition(count >= 0 && count <= capacity, "batch \(count) exceeds the capacity \(capacity) this network was built for")
        command = cmd
        current = PassContext(start: 0, count: count, batch: count, training: training, step: step, seed: seed,
                              globalOffset: globalOffset, updateStatistics: updateStatistics)
        current.stashRow = stashRow
        current.lastChunk = lastChunk
        if parts == 1 { runPart(0) } else { pool.run() }
    }

    /// Tells the observer that every gradient is final (the parts summed theirs at the end of runPart).
    private func finishGradients() {
        observer?.gradientsReady(from: 0)
    }

    /// Part p's share of summing the parts' gradients into the main buffer, once every part is done:
    /// a slice of the parameters, summed in part order (the same sums as one thread would make).
    private func sumGradients(part p: Int) {
        gradientsDone.wait()
        let n = graph.parameterCount
        let lo = n * p / parts, hi = n * (p + 1) / parts
        for q in 1..<parts { accumulate(gradients.baseAddress! + lo, partGradients[q] + lo, count: hi - lo) }
    }

    private func runPart(_ p: Int) {
        var c = current
        let n = c.count
        c.start = n * p / parts
        c.count = n * (p + 1) / parts - c.start
        c.part = p
        let row = layers[p]
        let timed = p == 0 ? profile : nil
        let timer = p == 0 ? layerTimer : nil
        let clocked = timed != nil || timer != nil
        // With several parts each zeroes its own buffer, in a pass in chunks at the step's first
        // chunk only: every part adds its share of each chunk into its own buffer, and the parts'
        // sums meet in the main buffer (part 0's) after the last chunk's backward.
        if parts > 1 && (command == .train || (command == .trainForward && !accumulating)) {
            UnsafeMutableRawPointer(partGradients[p]).initializeMemory(as: UInt8.self, repeating: 0, count: graph.parameterCount * MemoryLayout<T>.stride)
        }
        if command == .finish {
            // Deferred on one part only: then there is no parts' sum.
            for fc in deferredLayers { fc.finishDeferred(rows: c.stashRow) }
            if parts > 1 { sumGradients(part: p) }
            return
        }
        if command == .forward || command == .train || command == .trainForward {
            for layer in row where c.count > 0 || layer.reducesAcrossParts {
                if clocked {
                    let t0 = monotonicSeconds()
                    layer.forward(c)
                    let t1 = monotonicSeconds()
                    timed?[2 * layer.node.index] += t1 - t0
                    timer?.layerTimed(node: layer.node.index, backward: false, start: t0, end: t1)
                } else {
                    layer.forward(c)
                }
            }
        }
        if command == .train || command == .trainForward {
            let off = c.start * graph.outputShape.count
            let r = lossFunction(output + off, outputGradient + off, labels + c.start, c.count, lossScale)
            partLoss[p] = r.loss
            partCorrect[p] = r.correct
        }
        if command == .backward || command == .train {
            let reportEarly = parts == 1 && observer != nil && reporting
            for i in stride(from: row.count - 1, through: 0, by: -1) {
                let layer = row[i]
                let node = i + 1
                if c.count > 0 { sumEdges(node, c) }
                if c.count > 0 || layer.reducesAcrossParts {
                    if clocked {
                        let t0 = monotonicSeconds()
                        layer.backward(c)
                        let t1 = monotonicSeconds()
                        timed?[2 * node + 1] += t1 - t0
                        timer?.layerTimed(node: node, backward: true, start: t0, end: t1)
                    } else {
                        layer.backward(c)
                    }
                }
                if reportEarly {
                    if !layer.node.parameterRange.isEmpty {
                        observer!.gradientsReady(from: graph.parameters[layer.node.parameterRange.lowerBound].offset)
                    }
                    observer!.layerBackwardDone()
                }
            }
            if c.count > 0 { sumEdges(0, c) }
            if parts > 1 && (command == .train || reporting) { sumGradients(part: p) }
        }
    }

    /// A node read by several layers gets the sum of their input gradients.
    @inline(__always)
    private func sumEdges(_ node: Int, _ c: PassContext) {
        let edges = edgeBuffers[node]
        guard !edges.isEmpty, let g = activationGradients[node] else { return }
        let size = graph.nodes[node].outputShape.count
        let off = c.start * size, n = c.count * size
        (g + off).update(from: edges[0] + off, count: n)
        for e in edges.dropFirst() { accumulate(g + off, e + off, count: n) }
    }
}

/// Monotonic clock in seconds (for per-layer profiles).
@inline(__always)
public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}
