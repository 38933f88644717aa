// What a model is made of, before any memory exists: layer kinds with their settings, and the
// per-sample shapes that flow between them. Shapes are checked here, once, when the model is
// built, never per step.

/// A per-sample activation shape, channels x height x width (the batch dimension N is separate).
public struct Shape: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var channels: Int
    public var height: Int
    public var width: Int
    public init(_ channels: Int, _ height: Int, _ width: Int) {
        self.channels = channels; self.height = height; self.width = width
    }
    public var count: Int { channels * height * width }
    public var plane: Int { height * width }
    public var description: String { height == 1 && width == 1 ? "\(channels)" : "\(channels)x\(height)x\(width)" }
}

/// A 2-D window: kernel, stride and padding, each (height, width).
public struct Window: Equatable, Sendable {
    public var kernelH: Int, kernelW: Int
    public var strideH: Int, strideW: Int
    public var padH: Int, padW: Int
    public init(kernelH: Int, kernelW: Int, strideH: Int = 1, strideW: Int = 1, padH: Int = 0, padW: Int = 0) {
        self.kernelH = kernelH; self.kernelW = kernelW
        self.strideH = strideH; self.strideW = strideW
        self.padH = padH; self.padW = padW
    }
    /// out = floor((in + 2 * pad - kernel) / stride) + 1 (PyTorch's floor mode).
    public func outputSize(height: Int, width: Int) -> (Int, Int) {
        ((height + 2 * padH - kernelH) / strideH + 1, (width + 2 * padW - kernelW) / strideW + 1)
    }
    public var description: String {
        "\(kernelH)x\(kernelW)" + (strideH != 1 || strideW != 1 ? " s\(strideH)" : "") + (padH != 0 || padW != 0 ? " p\(padH)" : "")
    }
}

/// Weight initialisation schemes. Biases start at zero except under `pytorch`.
public enum InitScheme: String, Sendable, CaseIterable {
    /// Glorot and Bengio (2010): U[-sqrt(6/(fan_in+fan_out)), +sqrt(6/(fan_in+fan_out))], variance 2/(fan_in+fan_out).
    case xavier
    /// He et al. (2015): N(0, 2/fan_in), for ReLU networks.
    case he
    /// PyTorch's default for Conv2d/Linear (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)) for
    /// weights and biases; lets a run follow a PyTorch run's curves.
    case pytorch
}

/// Where a layer of a model split into towers takes its input from (AlexNet's two-GPU split).
public enum TowerInput: String, Sendable {
    /// Only the kernel maps of its own tower (AlexNet's conv2, conv4, conv5): no communication.
    case own
    /// All kernel maps of every tower (conv3, fc6, fc7, fc8): towers exchange activations here.
    case all
}

public enum LayerKind: Equatable, Sendable {
    /// Convolution; weight [out, in/groups, kh, kw], optional bias [out].
    case convolution(outChannels: Int, window: Window, groups: Int, bias: Bool)
    case maxPool(Window)
    /// Average pooling; windows that overlap the padding divide by the padded window size (PyTorch's count_include_pad).
    case avgPool(Window)
    case globalAvgPool
    case relu
    case leakyRelu(alpha: Double)
    case sigmoid
    case tanh
    /// Local response normalisation across channels (Krizhevsky et al. 2012), PyTorch's convention:
    /// b_c = a_c / (k + alpha/size * sum over the `size` channels around c of a^2)^beta.
    case lrn(size: Int, alpha: Double, beta: Double, k: Double)
    /// Batch normalisation (Ioffe and Szegedy 2015), per channel; weight (gamma) and bias (beta) are learned.
    case batchNorm(eps: Double, momentum: Double)
    /// Inverted dropout: keeps a unit with probability 1 - rate and scales it by 1/(1 - rate); identity in evaluation.
    case dropout(rate: Double)
    /// Fully connected; weight [out, in] (PyTorch's layout), optional bias [out]. Takes any input shape as a flat vector.
    case linear(outFeatures: Int, bias: Bool)
    case flatten
    /// Concatenation along channels (inception branches).
    case concat
    /// Elementwise sum (residual shortcuts).
    case add
    /// Model parallelism: gathers the slices of a feature map that the towers hold (`slices[u]`
    /// channels on tower u; this is tower `tower`) into the whole map. Backward sums the towers'
    /// input gradients back to their owners (reduce-scatter), or, for the logits that every tower's
    /// loss sees whole (`sumGradients` false), keeps this tower's slice. Inserted by `TowerPlan`.
    case towerGather(tower: Int, slices: [Int], sumGradients: Bool)

    public var typeName: String {
        switch self {
        case .convolution: "conv"
        case .maxPool: "maxpool"
        case .avgPool: "avgpool"
        case .globalAvgPool: "global_avgpool"
        case .relu: "relu"
        case .leakyRelu: "leaky_relu"
        case .sigmoid: "sigmoid"
        case .tanh: "tanh"
        case .lrn: "lrn"
        case .batchNorm: "batchnorm"
        case .dropout: "dropout"
        case .linear: "linear"
        case .flatten: "flatten"
        case .concat: "concat"
        case .add: "add"
        case .towerGather: "tower_gather"
        }
    }
}

/// One layer of a model as the config describes it.
public struct LayerSpec: Sendable {
    public var name: String
    public var kind: LayerKind
    /// Names of the layers this one reads; empty means the previous layer (or the data for the first).
    public var inputs: [String]
    /// For models split into towers: where this layer's input comes from. nil: `own` for layers without
    /// parameters, `all` for parameterised layers unless they are grouped convolutions.
    public var towerInput: TowerInput?
    /// Channel groups of channel-coupled layers without parameters (LRN): its window stays inside
    /// a group, as when the towers of a split model normalise their own maps.
    public var channelGroups = 1
    /// In a tower's share of a split model: the first channel of this layer's slice in the whole layer
    /// (keys dropout masks by global neuron).
    public var channelOffset = 0
    public init(name: String, kind: LayerKind, inputs: [String] = [], towerInput: TowerInput? = nil) {
        self.name = name; self.kind = kind; self.inputs = inputs; self.towerInput = towerInput
    }
}

/// A model that cannot be built, naming the layer and what was expected.
public struct ModelError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
