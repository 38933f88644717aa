// A model as a directed acyclic graph of layers with resolved shapes and a parameter layout.
// Node 0 is the data; every other node is a layer whose inputs are earlier nodes, so list order
// is a topological order: forward runs nodes 1..<count, backward runs them in reverse.

/// What a parameter tensor is, for initialisation, weight decay and export.
public enum ParameterRole: Sendable, Equatable {
    case weight, bias, scale, shift, runningMean, runningVariance
}

/// One named tensor inside the flat parameter (or running-statistics) buffer.
public struct ParameterInfo: Sendable, Equatable {
    /// PyTorch state_dict style: "conv1.weight", "bn1.running_mean".
    public var name: String
    public var node: Int
    public var shape: [Int]
    public var offset: Int
    public var count: Int
    public var role: ParameterRole
    public var fanIn: Int
    public var fanOut: Int
}

public struct Node: Sendable {
    public var index: Int
    public var name: String
    /// nil for the data node.
    public var kind: LayerKind?
    public var inputs: [Int]
    public var inputShapes: [Shape]
    public var outputShape: Shape
    /// Learnable tensors, in `Graph.parameters`; their offsets are contiguous for one node.
    public var parameterRange: Range<Int>
    /// Running statistics (batch norm), in `Graph.statistics`.
    public var statisticsRange: Range<Int>
    /// Multiply-adds times two, per sample, forward only.
    public var flopsPerSample: Int
    public var towerInput: TowerInput
    /// See `LayerSpec.channelGroups` and `LayerSpec.channelOffset`.
    public var channelGroups: Int
    public var channelOffset: Int
}

public struct Graph: Sendable {
    public let inputShape: Shape
    public let nodes: [Node]
    public let parameters: [ParameterInfo]
    public let statistics: [ParameterInfo]
    public let parameterCount: Int
    public let statisticsCount: Int
    /// For each node, the nodes that read it.
    public let consumers: [[Int]]

    public var outputShape: Shape { nodes[nodes.count - 1].outputShape }
    public var layerCount: Int { nodes.count - 1 }
    public var flopsPerSample: Int { nodes.reduce(0) { $0 + $1.flopsPerSample } }

    /// Resolves inputs and shapes and lays out parameters. Throws a `ModelError` naming the layer
    /// for anything that cannot work: unknown inputs, shapes that do not fit, a kernel larger
    /// than its (padded) input, channels not divisible by groups, zero or negative sizes.
    public init(input: Shape, layers: [LayerSpec]) throws(ModelError) {
        guard input.channels > 0, input.height > 0, input.width > 0 else {
            throw ModelError("input shape \(input) must have positive channels, height and width")
        }
        guard !layers.isEmpty else { throw ModelError("the model has no layers") }
        inputShape = input
        var nodes = [Node(index: 0, name: "data", kind: nil, inputs: [], inputShapes: [], outputShape: input,
                          parameterRange: 0..<0, statisticsRange: 0..<0, flopsPerSample: 0, towerInput: .own,
                          channelGroups: 1, channelOffset: 0)]
        var byName = ["data": 0]
        var params: [ParameterInfo] = []
        var stats: [ParameterInfo] = []
        var pOffset = 0, sOffset = 0

        for spec in layers {
            let index = nodes.count
            let name = spec.name
            func fail(_ what: String) -> ModelError { ModelError("layer '\(name)' (\(spec.kind.typeName)): \(what)") }
            guard !name.isEmpty else { throw ModelError("layer \(index) (\(spec.kind.typeName)) has an empty name") }
            guard byName[name] == nil else { throw fail("the name is used twice") }
            var inputs: [Int] = []
            if spec.inputs.isEmpty {
                inputs = [index - 1]
            } else {
                for i in spec.inputs {
                    guard let j = byName[i] else { throw fail("input '\(i)' is not an earlier layer") }
                    inputs.append(j)
                }
            }
            let inShapes = inputs.map { nodes[$0].outputShape }
            let multiInput: Bool
            switch spec.kind { case .concat, .add: multiInput = true; default: multiInput = false }
            guard spec.channelGroups >= 1 else { throw fail("channel groups must be positive") }
            if !multiInput && inputs.count != 1 { throw fail("takes exactly one input, got \(inputs.count)") }
            if multiInput && inputs.count < 2 { throw fail("needs at least two inputs") }
            let x = inShapes[0]
            var out = x
            var flops = 0
            var newParams: [(String, [Int], ParameterRole, Int, Int)] = []
            var newStats: [(String, [Int], ParameterRole)] = []
            var hasParameters = false

            func checkWindow(_ w: Window) throws(ModelError) -> (Int, Int) {
                guard w.kernelH > 0, w.kernelW > 0 else { throw fail("kernel \(w.kernelH)x\(w.kernelW) must be positive") }
                guard w.strideH > 0, w.strideW > 0 else { throw fail("stride must be positive") }
                guard w.padH >= 0, w.padW >= 0 else { throw fail("padding must not be negative") }
                guard w.kernelH <= x.height + 2 * w.padH, w.kernelW <= x.width + 2 * w.padW else {
                    throw fail("kernel \(w.kernelH)x\(w.kernelW) is larger than its padded input \(x.height + 2 * w.padH)x\(x.width + 2 * w.padW) (input \(x))")
                }
                return w.outputSize(height: x.height, width: x.width)
            }

            switch spec.kind {
            case let .convolution(outC, w, groups, bias):
                guard outC > 0 else { throw fail("out_channels must be positive, got \(outC)") }
                guard groups > 0 else { throw fail("groups must be positive, got \(groups)") }
                guard x.channels % groups == 0 else { throw fail("input channels \(x.channels) are not divisible by groups \(groups)") }
                guard outC % groups == 0 else { throw fail("out_channels \(outC) are not divisible by groups \(groups)") }
                let (oh, ow) = try checkWindow(w)
                out = Shape(outC, oh, ow)
                let k = x.channels / groups * w.kernelH * w.kernelW
                flops = 2 * outC * oh * ow * k
                // Fans as PyTorch computes them from the weight's shape: fan_out = out * kh * kw, also for groups.
                newParams.append(("weight", [outC, x.channels / groups, w.kernelH, w.kernelW], .weight, k, outC * w.kernelH * w.kernelW))
                if bias { newParams.append(("bias", [outC], .bias, k, outC)) }
                hasParameters = true
            case let .maxPool(w), let .avgPool(w):
                guard w.padH * 2 <= w.kernelH, w.padW * 2 <= w.kernelW else {
                    throw fail("padding \(w.padH) must be at most half the kernel \(w.kernelH)x\(w.kernelW)")
                }
                let (oh, ow) = try checkWindow(w)
                out = Shape(x.channels, oh, ow)
                flops = out.count * w.kernelH * w.kernelW
            case .globalAvgPool:
                out = Shape(x.channels, 1, 1)
                flops = x.count
            case .relu, .sigmoid, .tanh:
                flops = x.count
            case let .leakyRelu(alpha):
                guard alpha.isFinite else { throw fail("alpha must be finite") }
                flops = x.count
            case let .lrn(size, alpha, beta, k):
                guard size > 0 else { throw fail("size must be positive, got \(size)") }
                guard x.channels % spec.channelGroups == 0 else { throw fail("\(x.channels) channels are not divisible into \(spec.channelGroups) groups") }
                guard alpha >= 0, beta >= 0, k > 0 else { throw fail("needs alpha >= 0, beta >= 0 and k > 0") }
                flops = x.count * (size + 4)
            case let .batchNorm(eps, momentum):
                guard eps > 0 else { throw fail("eps must be positive") }
                guard momentum >= 0, momentum <= 1 else { throw fail("momentum must be in [0, 1], got \(momentum)") }
                newParams.append(("weight", [x.channels], .scale, 1, 1))
                newParams.append(("bias", [x.channels], .shift, 1, 1))
                newStats.append(("running_mean", [x.channels], .runningMean))
                newStats.append(("running_var", [x.channels], .runningVariance))
                flops = 4 * x.count
                hasParameters = true
            case let .dropout(rate):
                guard rate >= 0, rate < 1 else { throw fail("rate must be in [0, 1), got \(rate)") }
                flops = x.count
            case let .linear(outF, bias):
                guard outF > 0 else { throw fail("out_features must be positive, got \(outF)") }
                out = Shape(outF, 1, 1)
                flops = 2 * x.count * outF
                newParams.append(("weight", [outF, x.count], .weight, x.count, outF))
                if bias { newParams.append(("bias", [outF], .bias, x.count, outF)) }
                hasParameters = true
            case .flatten:
                out = Shape(x.count, 1, 1)
            case .concat:
                for (i, s) in inShapes.enumerated() where s.height != x.height || s.width != x.width {
                    throw fail("input '\(nodes[inputs[i]].name)' is \(s), but concat needs the same height and width as \(x)")
                }
                out = Shape(inShapes.reduce(0) { $0 + $1.channels }, x.height, x.width)
            case .add:
                for (i, s) in inShapes.enumerated() where s != x {
                    throw fail("input '\(nodes[inputs[i]].name)' is \(s), but add needs every input to be \(x)")
                }
                flops = x.count * (inputs.count - 1)
            case let .towerGather(tower, slices, _):
                guard slices.indices.contains(tower), slices[tower] == x.channels else {
                    throw fail("tower \(tower) holds \(x.channels) channels, not the \(slices) the gather expects")
                }
                out = Shape(slices.reduce(0, +), x.height, x.width)
            }
            guard out.count > 0 else { throw fail("output shape \(out) is empty") }

            let pStart = params.count
            for (suffix, shape, role, fanIn, fanOut) in newParams {
                let n = shape.reduce(1, *)
                params.append(ParameterInfo(name: "\(name).\(suffix)", node: index, shape: shape, offset: pOffset,
                                            count: n, role: role, fanIn: fanIn, fanOut: fanOut))
                pOffset += n
            }
            let sStart = stats.count
            for (suffix, shape, role) in newStats {
                let n = shape.reduce(1, *)
                stats.append(ParameterInfo(name: "\(name).\(suffix)", node: index, shape: shape, offset: sOffset,
                                           count: n, role: role, fanIn: 0, fanOut: 0))
                sOffset += n
            }
            // Default: a parameterised layer reads all towers' maps, except grouped convolutions and
            // batch norm (per channel), and layers that read the data, which every tower holds whole.
            var tower = spec.towerInput ?? .own
            if spec.towerInput == nil, hasParameters, inputs != [0] {
                if case let .convolution(_, _, groups, _) = spec.kind, groups > 1 { tower = .own } else if case .batchNorm = spec.kind { tower = .own } else { tower = .all }
            }
            nodes.append(Node(index: index, name: name, kind: spec.kind, inputs: inputs, inputShapes: inShapes,
                              outputShape: out, parameterRange: pStart..<params.count, statisticsRange: sStart..<stats.count,
                              flopsPerSample: flops, towerInput: tower, channelGroups: spec.channelGroups, channelOffset: spec.channelOffset))
            byName[name] = index
        }

        var consumers = Array(repeating: [Int](), count: nodes.count)
        for node in nodes { for i in node.inputs { consumers[i].append(node.index) } }
        for node in nodes.dropLast() where consumers[node.index].isEmpty && node.index != 0 {
            throw ModelError("layer '\(node.name)' (\(node.kind?.typeName ?? "data")): its output is used by no other layer (only the last layer may be unused)")
        }
        self.nodes = nodes
        self.parameters = params
        self.statistics = stats
        self.parameterCount = pOffset
        self.statisticsCount = sOffset
        self.consumers = consumers
    }

    /// Parameter tensors of one node.
    public func parameters(of node: Int) -> ArraySlice<ParameterInfo> { parameters[nodes[node].parameterRange] }
    public func statistics(of node: Int) -> ArraySlice<ParameterInfo> { statistics[nodes[node].statisticsRange] }
}
