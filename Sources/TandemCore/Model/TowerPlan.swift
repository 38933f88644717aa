// Model parallelism as in AlexNet's two GPUs (Krizhevsky et al. 2012, section 3.2): every
// parameterised layer's output channels (or neurons) are split across T towers, and towers
// communicate only where a layer takes its input from all towers' maps. Layers without
// parameters run per tower on their slice.
//
// Mathematically a split model is a grouped model: a layer that reads only its own tower's maps is
// a convolution with groups (a multiple of T), and LRN normalises within a tower's channels. The
// unsplit `global` graph is that grouped model, which one process runs (`trainer debug`, and any
// run without enough ranks for the towers); `local[t]` is tower t's share, with a gather inserted
// before every all-tower layer and before the loss (which sees all logits).

public struct TowerPlan: Sendable {
    public let towers: Int
    /// The unsplit model (LRN grouped by tower where its input is per tower).
    public let global: Graph
    /// Each tower's share, gathers included.
    public let local: [Graph]

    /// One place where towers exchange activations.
    public struct Exchange: Sendable {
        public var layer: String
        /// Elements each tower receives per sample in the forward allgather (and sends in the backward reduce-scatter).
        public var forwardElementsPerSample: Int
        public var backwardElementsPerSample: Int
    }
    public let exchanges: [Exchange]

    /// The split of `count` channels over the towers: tower t takes [count*t/T, count*(t+1)/T).
    public static func slice(_ count: Int, tower t: Int, of towers: Int) -> Range<Int> {
        (count * t / towers)..<(count * (t + 1) / towers)
    }

    public init(input: Shape, layers: [LayerSpec], towers: Int) throws(ModelError) {
        guard towers >= 1 else { throw ModelError("towers must be positive, got \(towers)") }
        self.towers = towers
        // First the unsplit model, to resolve inputs, shapes and each layer's tower input.
        let plain = try Graph(input: input, layers: layers)
        var specs = layers
        for (i, node) in plain.nodes.dropFirst().enumerated() {
            specs[i].towerInput = node.towerInput
            if towers > 1, case .lrn = node.kind! { specs[i].channelGroups = towers }
        }
        global = try Graph(input: input, layers: specs)
        guard towers > 1 else { local = [global]; exchanges = []; return }

        let nodes = global.nodes
        let last = nodes.count - 1
        // Which layers can be split, and how.
        for node in nodes.dropFirst() {
            let kind = node.kind!
            func fail(_ what: String) -> ModelError { ModelError("layer '\(node.name)' (\(kind.typeName)): \(what) with towers: \(towers)") }
            let readsData = node.inputs == [0]
            switch kind {
            case .concat, .add:
                throw fail("concat and add are not supported")
            case let .convolution(_, _, groups, _):
                if node.towerInput == .own && !readsData && groups % towers != 0 {
                    throw fail("a convolution that reads only its own tower's maps needs groups divisible by the towers, got groups \(groups)")
                }
                if (node.towerInput == .all || readsData) && groups != 1 {
                    throw fail("a grouped convolution must read only its own tower's maps (towers: own)")
                }
            case .linear:
                if node.towerInput == .own && !readsData { throw fail("a fully connected layer takes its input from all towers (towers: all)") }
            default:
                if readsData { throw fail("the first layer must be a convolution or fully connected layer (towers split their outputs)") }
                if node.towerInput == .all { throw fail("only convolutions and fully connected layers can take input from all towers") }
            }
            if node.index != last && node.outputShape.channels % towers != 0 {
                throw fail("the towers do not divide its \(node.outputShape.channels) output channels")
            }
            if node.index == last && node.outputShape.channels < towers {
                throw fail("its \(node.outputShape.channels) outputs are fewer than the towers")
            }
        }

        var locals: [Graph] = []
        var exchanges: [Exchange] = []
        for t in 0..<towers {
            var out: [LayerSpec] = []
            for node in nodes.dropFirst() {
                let kind = node.kind!
                let channels = node.outputShape.channels
                let mine = TowerPlan.slice(channels, tower: t, of: towers)
                var inputs = node.inputs.map { nodes[$0].name }
                let readsData = node.inputs == [0]
                if node.towerInput == .all && !readsData {
                    let source = nodes[node.inputs[0]]
                    let slices = (0..<towers).map { TowerPlan.slice(source.outputShape.channels, tower: $0, of: towers).count }
                    out.append(LayerSpec(name: "\(node.name).gather", kind: .towerGather(tower: t, slices: slices, sumGradients: true), inputs: [source.name]))
                    inputs = ["\(node.name).gather"]
                    if t == 0 {
                        let whole = source.outputShape.count
                        exchanges.append(Exchange(layer: node.name, forwardElementsPerSample: whole - source.outputShape.plane * slices[0],
                                                  backwardElementsPerSample: whole - source.outputShape.plane * slices[0]))
                    }
                }
                var localKind = kind
                switch kind {
                case let .convolution(_, window, groups, bias):
                    localKind = .convolution(outChannels: mine.count, window: window, groups: node.towerInput == .own && !readsData ? groups / towers : 1, bias: bias)
                case let .linear(_, bias):
                    localKind = .linear(outFeatures: mine.count, bias: bias)
                default: break
                }
                var spec = LayerSpec(name: node.name, kind: localKind, inputs: inputs, towerInput: node.towerInput)
                spec.channelOffset = mine.lowerBound
                out.append(spec)
            }
            // The loss sees all logits: gather them; every tower then computes the same loss.
            let logits = nodes[last]
            let slices = (0..<towers).map { TowerPlan.slice(logits.outputShape.channels, tower: $0, of: towers).count }
            out.append(LayerSpec(name: "logits.gather", kind: .towerGather(tower: t, slices: slices, sumGradients: false), inputs: [logits.name]))
            if t == 0 {
                exchanges.append(Exchange(layer: "loss (logits)", forwardElementsPerSample: logits.outputShape.count - slices[0], backwardElementsPerSample: 0))
            }
            locals.append(try Graph(input: input, layers: out))
        }
        local = locals
        self.exchanges = exchanges
    }

    /// The elements [lo, hi) of a global tensor (split along its first dimension) that tower t holds.
    public func elements(of info: ParameterInfo, tower t: Int) -> Range<Int> {
        let rows = info.shape[0]
        let rowSize = info.count / rows
        let r = TowerPlan.slice(rows, tower: t, of: towers)
        return (info.offset + r.lowerBound * rowSize)..<(info.offset + r.upperBound * rowSize)
    }

    /// Copies tower t's slices of the global buffers into its local buffers (`global` laid out as
    /// `global.parameters` or `global.statistics`, `local` as the same list of tower t's graph).
    public func scatter<T>(_ whole: UnsafePointer<T>, into part: UnsafeMutablePointer<T>, tensors: KeyPath<Graph, [ParameterInfo]>, tower t: Int) {
        let localInfo = Dictionary(uniqueKeysWithValues: local[t][keyPath: tensors].map { ($0.name, $0) })
        for info in global[keyPath: tensors] {
            let r = elements(of: info, tower: t)
            (part + localInfo[info.name]!.offset).update(from: whole + r.lowerBound, count: r.count)
        }
    }

    /// The inverse of `scatter` for one tower's slices.
    public func gather<T>(_ part: UnsafePointer<T>, into whole: UnsafeMutablePointer<T>, tensors: KeyPath<Graph, [ParameterInfo]>, tower t: Int) {
        let localInfo = Dictionary(uniqueKeysWithValues: local[t][keyPath: tensors].map { ($0.name, $0) })
        for info in global[keyPath: tensors] {
            let r = elements(of: info, tower: t)
            (whole + r.lowerBound).update(from: part + localInfo[info.name]!.offset, count: r.count)
        }
    }
}
