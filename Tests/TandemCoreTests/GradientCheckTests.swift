// Every layer's backward against central finite differences in Float64, in several shapes.
// Tolerance: relative error 1e-5 (the denominator's floor is 1e-3 of the largest gradient). A correct layer
// gives 1e-8 or less; a wrong backward gives errors of order 1 (see `brokenBackwardIsCaught`).
import Testing
@testable import TandemCore

let tolerance = 1e-5

func conv(_ name: String, _ out: Int, k: Int, kw: Int? = nil, s: Int = 1, p: Int = 0, groups: Int = 1, bias: Bool = true, inputs: [String] = []) -> LayerSpec {
    LayerSpec(name: name, kind: .convolution(outChannels: out, window: Window(kernelH: k, kernelW: kw ?? k, strideH: s, strideW: s, padH: p, padW: p), groups: groups, bias: bias), inputs: inputs)
}
func layer(_ name: String, _ kind: LayerKind, inputs: [String] = []) -> LayerSpec { LayerSpec(name: name, kind: kind, inputs: inputs) }

/// Runs the checker and expects every tensor within tolerance.
func expectGradients(_ input: Shape, _ layers: [LayerSpec], batch: Int = 3, objective: GradientCheck.Objective = .projection,
                     loss: LossKind = .softmaxCrossEntropy, perTensor: Int = 0, parts: Int = 1,
                     sourceLocation: SourceLocation = #_sourceLocation) throws {
    let graph = try Graph(input: input, layers: layers)
    let results = GradientCheck.run(graph: graph, batch: batch, objective: objective, loss: loss, perTensor: perTensor, parts: parts)
    #expect(!results.isEmpty, sourceLocation: sourceLocation)
    for r in results {
        #expect(r.checked > 0, sourceLocation: sourceLocation)
        // Points on a kink are skipped (conv1 of LeNet-5 touches thousands of ReLU/max-pool units,
        // so up to a quarter of its weights sit within 1e-6 of one); most must be checkable.
        #expect(r.skippedAtKinks <= r.checked, "\(r)", sourceLocation: sourceLocation)
        #expect(r.maxRelativeError < tolerance, "\(r)", sourceLocation: sourceLocation)
    }
}

@Suite struct LayerGradients {
    @Test func convolutionPlain() throws { try expectGradients(Shape(2, 5, 6), [conv("c", 3, k: 3)]) }
    @Test func convolutionStridePadding() throws { try expectGradients(Shape(3, 7, 5), [conv("c", 4, k: 3, s: 2, p: 1)]) }
    @Test func convolutionNonSquareKernel() throws { try expectGradients(Shape(2, 6, 7), [conv("c", 2, k: 2, kw: 3, p: 1)]) }
    @Test func convolutionGroups() throws { try expectGradients(Shape(4, 5, 5), [conv("c", 6, k: 3, p: 1, groups: 2)]) }
    @Test func convolutionGroupsStrideNoBias() throws { try expectGradients(Shape(6, 8, 6), [conv("c", 3, k: 3, s: 2, groups: 3, bias: false)]) }
    @Test func convolutionPointwise() throws { try expectGradients(Shape(4, 3, 5), [conv("c", 6, k: 1, groups: 2)]) }
    @Test func convolutionPointwiseStrided() throws { try expectGradients(Shape(3, 5, 5), [conv("c", 2, k: 1, s: 2)]) }
    @Test func maxPool() throws { try expectGradients(Shape(2, 6, 6), [layer("p", .maxPool(Window(kernelH: 2, kernelW: 2, strideH: 2, strideW: 2)))]) }
    @Test func maxPoolOverlappingPadded() throws {
        try expectGradients(Shape(2, 7, 6), [layer("p", .maxPool(Window(kernelH: 3, kernelW: 3, strideH: 2, strideW: 2, padH: 1, padW: 1)))])
    }
    @Test func avgPoolOverlappingPadded() throws {
        try expectGradients(Shape(2, 7, 5), [layer("p", .avgPool(Window(kernelH: 3, kernelW: 3, strideH: 2, strideW: 2, padH: 1, padW: 1)))])
    }
    @Test func globalAvgPool() throws { try expectGradients(Shape(3, 4, 5), [layer("g", .globalAvgPool)]) }
    @Test func relu() throws { try expectGradients(Shape(3, 4, 4), [layer("a", .relu)]) }
    @Test func leakyRelu() throws { try expectGradients(Shape(3, 4, 4), [layer("a", .leakyRelu(alpha: 0.1))]) }
    @Test func sigmoid() throws { try expectGradients(Shape(3, 4, 4), [layer("a", .sigmoid)]) }
    @Test func tanh() throws { try expectGradients(Shape(3, 4, 4), [layer("a", .tanh)]) }
    @Test func lrnAlexNet() throws { try expectGradients(Shape(7, 3, 4), [layer("n", .lrn(size: 5, alpha: 1e-1, beta: 0.75, k: 2))]) }
    @Test func lrnEvenSizeOtherBeta() throws { try expectGradients(Shape(5, 2, 3), [layer("n", .lrn(size: 4, alpha: 0.5, beta: 0.6, k: 1))]) }
    @Test func batchNormConv() throws { try expectGradients(Shape(3, 4, 5), [layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1))], batch: 4) }
    @Test func batchNormVector() throws { try expectGradients(Shape(6, 1, 1), [layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1))], batch: 5) }
    @Test func batchNormAcrossTwoParts() throws {
        // The batch split over two threads must still normalise with the statistics of the whole batch.
        try expectGradients(Shape(3, 2, 3), [layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1))], batch: 5, parts: 2)
    }
    @Test func dropoutFixedMask() throws { try expectGradients(Shape(4, 3, 3), [layer("d", .dropout(rate: 0.4))]) }
    @Test func linear() throws { try expectGradients(Shape(3, 2, 2), [layer("fc", .linear(outFeatures: 5, bias: true))]) }
    @Test func linearNoBias() throws { try expectGradients(Shape(7, 1, 1), [layer("fc", .linear(outFeatures: 4, bias: false))]) }
    @Test func flatten() throws { try expectGradients(Shape(2, 3, 2), [layer("f", .flatten), layer("fc", .linear(outFeatures: 3, bias: true))]) }
    @Test func concatBranches() throws {
        try expectGradients(Shape(2, 5, 5), [
            conv("a", 3, k: 1), conv("b", 2, k: 3, p: 1, inputs: ["data"]), layer("pool", .maxPool(Window(kernelH: 3, kernelW: 3, padH: 1, padW: 1)), inputs: ["data"]),
            layer("cat", .concat, inputs: ["a", "b", "pool"]),
        ])
    }
    @Test func residualAdd() throws {
        try expectGradients(Shape(3, 4, 4), [
            conv("c1", 3, k: 3, p: 1), layer("r1", .relu), conv("c2", 3, k: 3, p: 1),
            layer("sum", .add, inputs: ["c2", "data"]), layer("r2", .relu),
        ])
    }
    @Test func softmaxCrossEntropyLoss() throws {
        try expectGradients(Shape(6, 1, 1), [layer("fc", .linear(outFeatures: 4, bias: true))], batch: 5, objective: .loss)
    }
    @Test func squaredErrorLoss() throws {
        try expectGradients(Shape(6, 1, 1), [layer("fc", .linear(outFeatures: 4, bias: true)), layer("s", .sigmoid)], batch: 5, objective: .loss, loss: .squaredError)
    }
}

@Suite struct NetworkGradients {
    @Test func lenet5() throws {
        try expectGradients(Shape(1, 28, 28), Models.lenet5(batchNorm: false), batch: 2, objective: .loss, perTensor: 24)
    }
    @Test func lenet5BatchNorm() throws {
        try expectGradients(Shape(1, 28, 28), Models.lenet5(batchNorm: true), batch: 3, objective: .loss, perTensor: 24)
    }
    @Test func smallAlexNetWithGroups() throws {
        // AlexNet's structure at a size a debug build checks in seconds: LRN, overlapping pooling, groups 2, dropout.
        try expectGradients(Shape(1, 12, 12), Models.alexnet(width: 4, hidden: 16, dropout: 0.5), batch: 2, objective: .loss, perTensor: 12)
    }
}

@Test func brokenBackwardIsCaught() throws {
    // The checker must fail when an analytic gradient is wrong: perturb the parameters the
    // analytic pass sees versus the finite differences (by giving it a wrong scale on one tensor).
    let graph = try Graph(input: Shape(2, 4, 4), layers: [conv("c", 2, k: 3)])
    var results = GradientCheck.run(graph: graph, batch: 2)
    #expect(results.allSatisfy { $0.maxRelativeError < tolerance })
    // Now corrupt: a projection check where the analytic gradient of the bias is doubled.
    results = GradientCheck.run(graph: graph, batch: 2, corruptAnalytic: { grads in
        let bias = graph.parameters[1]
        for i in bias.offset..<(bias.offset + bias.count) { grads[i] *= 2 }
    })
    let bias = try #require(results.first { $0.tensor == "c.bias" })
    #expect(bias.maxRelativeError > 0.1)
}
