// Reference definitions of the networks in ../shared/peers/models.py, layer for layer. The shipped
// configs (configs/*.yaml) describe the same graphs; a test checks that they agree.

public enum Models {
    static func conv(_ name: String, _ out: Int, _ k: Int, stride: Int = 1, pad: Int = 0, groups: Int = 1, bias: Bool = true) -> LayerSpec {
        LayerSpec(name: name, kind: .convolution(outChannels: out, window: Window(kernelH: k, kernelW: k, strideH: stride, strideW: stride, padH: pad, padW: pad), groups: groups, bias: bias))
    }
    static func pool(_ name: String, _ k: Int, _ s: Int, pad: Int = 0) -> LayerSpec {
        LayerSpec(name: name, kind: .maxPool(Window(kernelH: k, kernelW: k, strideH: s, strideW: s, padH: pad, padW: pad)))
    }
    static func op(_ name: String, _ kind: LayerKind) -> LayerSpec { LayerSpec(name: name, kind: kind) }

    /// LeNet-5 (LeCun et al. 1998) as in the peers' models.py: conv 1->6 5x5 pad 2, ReLU, maxpool 2;
    /// conv 6->16 5x5, ReLU, maxpool 2; fc 400->120->84->10. With `batchNorm`, BN before each ReLU and
    /// no bias on the layers it follows (LeNet5BN).
    public static func lenet5(batchNorm: Bool, classes: Int = 10) -> [LayerSpec] {
        let bn = { (n: String) in op(n, .batchNorm(eps: 1e-5, momentum: 0.1)) }
        var l: [LayerSpec] = [conv("conv1", 6, 5, pad: 2, bias: !batchNorm)]
        if batchNorm { l.append(bn("bn1")) }
        l += [op("relu1", .relu), pool("pool1", 2, 2), conv("conv2", 16, 5, bias: !batchNorm)]
        if batchNorm { l.append(bn("bn2")) }
        l += [op("relu2", .relu), pool("pool2", 2, 2), op("flatten", .flatten),
              op("fc1", .linear(outFeatures: 120, bias: !batchNorm))]
        if batchNorm { l.append(bn("bn3")) }
        l += [op("relu3", .relu), op("fc2", .linear(outFeatures: 84, bias: !batchNorm))]
        if batchNorm { l.append(bn("bn4")) }
        l += [op("relu4", .relu), op("fc3", .linear(outFeatures: classes, bias: true))]
        return l
    }

    /// AlexNet's structure (Krizhevsky et al. 2012) scaled to 28x28, as alexnet_small in models.py:
    /// conv1-conv5 with LRN and overlapping 3x3/2 max pooling; conv2, conv4, conv5 grouped in two
    /// (each tower sees only its own maps); conv3 and the fully connected layers see all maps.
    /// `width` scales the channel counts (16 gives 64-128-192-192-128), `hidden` the fc width.
    public static func alexnet(width: Int = 16, hidden: Int = 1024, dropout: Double = 0.5, lrn: Bool = true, classes: Int = 10) -> [LayerSpec] {
        let norm = { (n: String) in op(n, .lrn(size: 5, alpha: 1e-4, beta: 0.75, k: 2)) }
        var l: [LayerSpec] = [conv("conv1", 4 * width, 5, pad: 2), op("relu1", .relu)]
        if lrn { l.append(norm("lrn1")) }
        l += [pool("pool1", 3, 2, pad: 1), conv("conv2", 8 * width, 3, pad: 1, groups: 2), op("relu2", .relu)]
        if lrn { l.append(norm("lrn2")) }
        l += [pool("pool2", 3, 2, pad: 1),
              conv("conv3", 12 * width, 3, pad: 1), op("relu3", .relu),
              conv("conv4", 12 * width, 3, pad: 1, groups: 2), op("relu4", .relu),
              conv("conv5", 8 * width, 3, pad: 1, groups: 2), op("relu5", .relu),
              pool("pool5", 3, 2, pad: 1), op("flatten", .flatten),
              op("fc6", .linear(outFeatures: hidden, bias: true)), op("relu6", .relu), op("drop6", .dropout(rate: dropout)),
              op("fc7", .linear(outFeatures: hidden, bias: true)), op("relu7", .relu), op("drop7", .dropout(rate: dropout)),
              op("fc8", .linear(outFeatures: classes, bias: true))]
        return l
    }
}
