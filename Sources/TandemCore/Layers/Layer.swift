// A layer bound to memory for one part of the batch. Activations and their gradients are
// full-batch buffers shared by all parts (part k works on its own samples); parameters are
// shared; parameter gradients and workspaces (im2col columns, masks, ...) belong to the part.
//
// Conventions (as in llm.c): forward writes y; backward writes the input gradients dx and
// *adds* into the parameter gradients, which the network zeroes once per step.

/// What one forward or backward pass of a part is working on.
public struct PassContext: Sendable {
    /// First sample of this part within the local batch, and how many it has (may be 0).
    public var start: Int
    public var count: Int
    /// Samples in the whole local batch (all parts).
    public var batch: Int
    public var training: Bool
    /// The optimiser step, the run's seed and the global index of local sample 0: together they
    /// key every random draw, so the draw for a sample does not depend on where it is computed.
    public var step: Int
    public var seed: UInt64
    public var globalOffset: Int
    public var part: Int
    /// Whether batch norm moves its running averages in this pass.
    public var updateStatistics: Bool
    /// A backward in chunks with deferred weight gradients (`Network.deferWeightGradients`): the row
    /// of the step's stash where this chunk's samples go (-1: no deferral, gradients now), and
    /// whether it is the step's last chunk, whose backward computes the deferred gradients.
    public var stashRow = -1
    public var lastChunk = true
    public init(start: Int, count: Int, batch: Int, training: Bool, step: Int = 0, seed: UInt64 = 0,
                globalOffset: Int = 0, part: Int = 0, updateStatistics: Bool = true) {
        self.start = start; self.count = count; self.batch = batch; self.training = training
        self.step = step; self.seed = seed; self.globalOffset = globalOffset; self.part = part
        self.updateStatistics = updateStatistics
    }
}

public class Layer<T: Scalar> {
    public let node: Node
    let inShape: Shape
    let outShape: Shape
    /// Input activations and where to write their gradients (nil: not needed), full-batch bases.
    var x: [UnsafeMutablePointer<T>] = []
    var dx: [UnsafeMutablePointer<T>?] = []
    var y: UnsafeMutablePointer<T>!
    var dy: UnsafeMutablePointer<T>!
    /// This node's parameters, this part's gradients of them, and its running statistics.
    var w: UnsafeMutablePointer<T>!
    var dw: UnsafeMutablePointer<T>!
    var stats: UnsafeMutablePointer<T>!
    /// Largest number of samples this part may be given.
    let capacity: Int

    init(node: Node, capacity: Int) {
        self.node = node
        inShape = node.inputShapes[0]
        outShape = node.outputShape
        self.capacity = capacity
    }

    /// Parts with no samples still take part in reductions across parts (batch norm).
    var reducesAcrossParts: Bool { false }

    func forward(_ c: PassContext) {}
    func backward(_ c: PassContext) {}
    /// Called once the network has bound x, dx, y, dy, w and dw (before any pass).
    func bound() {}

    @inline(__always) func x0(_ c: PassContext) -> UnsafeMutablePointer<T> { x[0] + c.start * inShape.count }
    @inline(__always) func dx0(_ c: PassContext) -> UnsafeMutablePointer<T>? { dx[0].map { $0 + c.start * inShape.count } }
    @inline(__always) func y0(_ c: PassContext) -> UnsafeMutablePointer<T> { y + c.start * outShape.count }
    @inline(__always) func dy0(_ c: PassContext) -> UnsafeMutablePointer<T> { dy + c.start * outShape.count }

    /// Memory this layer owns (workspaces), freed with it.
    var owned: [UnsafeMutableRawPointer] = []
    /// Allocates a zeroed workspace that lives as long as the layer.
    func own<U>(_ p: UnsafeMutablePointer<U>) -> UnsafeMutablePointer<U> {
        owned.append(UnsafeMutableRawPointer(p))
        return p
    }
    deinit { for p in owned { p.deallocate() } }
}

/// Creates the layer object for a node of the graph.
func makeLayer<T: Scalar>(_ node: Node, capacity: Int, reducer: StatisticsReducer?, exchange: TowerExchange?) -> Layer<T> {
    switch node.kind! {
    case let .convolution(outC, window, groups, bias):
        return ConvolutionLayer(node: node, capacity: capacity, geometry: ConvGeometry(input: node.inputShapes[0], outChannels: outC, window: window, groups: groups), bias: bias)
    case let .maxPool(window):
        return MaxPoolLayer(node: node, capacity: capacity, geometry: PoolGeometry(input: node.inputShapes[0], window: window))
    case let .avgPool(window):
        return AvgPoolLayer(node: node, capacity: capacity, geometry: PoolGeometry(input: node.inputShapes[0], window: window))
    case .globalAvgPool:
        return GlobalAvgPoolLayer(node: node, capacity: capacity)
    case .relu:
        return ActivationLayer(node: node, capacity: capacity, function: .relu)
    case let .leakyRelu(alpha):
        return ActivationLayer(node: node, capacity: capacity, function: .leakyRelu(alpha: alpha))
    case .sigmoid:
        return ActivationLayer(node: node, capacity: capacity, function: .sigmoid)
    case .tanh:
        return ActivationLayer(node: node, capacity: capacity, function: .tanh)
    case let .lrn(size, alpha, beta, k):
        return LRNLayer(node: node, capacity: capacity, parameters: LRNParameters(size: size, alpha: alpha, beta: beta, k: k, groups: node.channelGroups))
    case let .batchNorm(eps, momentum):
        return BatchNormLayer(node: node, capacity: capacity, eps: eps, momentum: momentum, reducer: reducer)
    case let .dropout(rate):
        return DropoutLayer(node: node, capacity: capacity, rate: rate)
    case let .linear(outF, bias):
        return LinearLayer(node: node, capacity: capacity, outFeatures: outF, bias: bias)
    case .flatten:
        return FlattenLayer(node: node, capacity: capacity)
    case .concat:
        return ConcatLayer(node: node, capacity: capacity)
    case .add:
        return AddLayer(node: node, capacity: capacity)
    case let .towerGather(tower, slices, sumGradients):
        guard let exchange else { preconditionFailure("layer '\(node.name)': a tower gather needs a TowerExchange") }
        return TowerGatherLayer(node: node, capacity: capacity, tower: tower, slices: slices, sumGradients: sumGradients, exchange: exchange)
    }
}
