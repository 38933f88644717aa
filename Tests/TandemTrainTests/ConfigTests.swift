import Foundation
import Testing
import TandemCore
@testable import TandemTrain

@Suite struct ConfigTests {
    @Test func builtInDefaultIsTheShippedFile() throws {
        let file = try String(contentsOfFile: packageRoot + "/configs/lenet5-bn.yaml", encoding: .utf8)
        #expect(file == TrainConfig.defaultText, "Sources/TandemTrain/Config/DefaultConfig.swift must embed configs/lenet5-bn.yaml verbatim")
    }

    @Test(arguments: [("lenet5", 61_706, 0), ("lenet5-bn", 61_932, 452), ("alexnet-2tower", 3_694_858, 0)])
    func shippedConfigsMatchThePeerModels(name: String, parameters: Int, statistics: Int) throws {
        let c = try TrainConfig.load(path: packageRoot + "/configs/\(name).yaml")
        let g = try Graph(input: Shape(1, 28, 28), layers: c.layers)
        #expect(g.parameterCount == parameters)
        #expect(g.statisticsCount == statistics)
        let reference: [LayerSpec] = switch name {
        case "lenet5": Models.lenet5(batchNorm: false)
        case "lenet5-bn": Models.lenet5(batchNorm: true)
        default: Models.alexnet()
        }
        let r = try Graph(input: Shape(1, 28, 28), layers: reference)
        #expect(g.nodes.map(\.name) == r.nodes.map(\.name))
        #expect(g.nodes.map(\.outputShape) == r.nodes.map(\.outputShape))
        #expect(g.nodes.map(\.kind) == r.nodes.map(\.kind))
    }

    @Test func alexnetCommunicatesAtAlexNetsLayers() throws {
        let c = try TrainConfig.load(path: packageRoot + "/configs/alexnet-2tower.yaml")
        let g = try Graph(input: Shape(1, 28, 28), layers: c.layers)
        let all = g.nodes.filter { $0.towerInput == .all }.map(\.name)
        #expect(all == ["conv3", "fc6", "fc7", "fc8"])
    }

    static let minimal = "model:\n  layers:\n    - {type: flatten}\n    - {type: linear, out: 10}\n"

    @Test func parsesEveryLayerKind() throws {
        let c = try config("""
        model:
          input: [3, 8, 8]
          init: he
          loss: squared_error
          layers:
            - {name: a, type: conv, out: 4, kernel: [3, 1], stride: [1, 2], pad: [1, 0], groups: 1, bias: false}
            - {name: b, type: maxpool, kernel: 3, stride: 2, pad: 1}
            - {name: c, type: avgpool, kernel: 2}
            - {name: d, type: leaky_relu, alpha: 0.2}
            - {name: e, type: lrn, size: 3, alpha: 0.001, beta: 0.5, k: 1}
            - {name: f, type: batchnorm, eps: 0.001, momentum: 0.2}
            - {name: g, type: dropout, rate: 0.3}
            - {name: h, type: sigmoid}
            - {name: i, type: tanh, inputs: [h]}
            - {name: j, type: concat, inputs: [h, i]}
            - {name: k, type: add, inputs: [j, j]}
            - {name: l, type: global_avgpool}
            - {name: m, type: relu}
            - {name: n, type: flatten}
            - {name: o, type: linear, out: 10, bias: false}
        train: {epochs: 2.5, batch_size: 32, seed: 7, max_steps: 9, eval_every_epochs: 0.5, log_every_steps: 3}
        optimizer:
          type: sgd
          lr: 0.1
          momentum: 0.8
          nesterov: true
          weight_decay: 0.001
          l1: 0.0001
          schedule: {type: step, every_epochs: 2, gamma: 0.5, warmup_epochs: 0.25}
        data: {format: cifar10, path: /x, mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2], crop_padding: 4, flip: true, train_limit: 100, test_limit: 10}
        parallel: {threads: 2, sync_bn: true}
        """)
        #expect(c.layers.count == 15)
        #expect(c.layers[0].kind == .convolution(outChannels: 4, window: Window(kernelH: 3, kernelW: 1, strideH: 1, strideW: 2, padH: 1, padW: 0), groups: 1, bias: false))
        #expect(c.layers[2].kind == .avgPool(Window(kernelH: 2, kernelW: 2, strideH: 2, strideW: 2)))
        #expect(c.input == Shape(3, 8, 8))
        #expect(c.initScheme == .he && c.loss == .squaredError)
        #expect(c.epochs == 2.5 && c.batchSize == 32 && c.seed == 7 && c.maxSteps == 9)
        #expect(c.sgd == SGDSettings(momentum: 0.8, nesterov: true, weightDecay: 0.001, l1: 0.0001))
        #expect(c.schedule.kind == .step && c.schedule.gamma == 0.5)
        #expect(c.data.format == .cifar10 && c.data.cropPadding == 4 && c.data.flip)
        #expect(c.parallel.threads == 2 && c.parallel.syncBN)
        _ = try Graph(input: c.input!, layers: c.layers)
    }

    @Test func unknownKeyNamesFileLineAndKey() {
        let err = expectError(["test.yaml:3", "model.layers[0].kernal", "unknown key", "kernel"]) {
            _ = try config("model:\n  layers:\n    - {type: conv, out: 4, kernal: 3}\n")
        }
        #expect(err == nil, "\(err ?? "")")
    }

    @Test func errorsNameTheKeyAndWhatWasExpected() {
        let cases: [(String, [String])] = [
            (Self.minimal + "train: {batch_size: -4}\n", ["train.batch_size", "positive integer", "-4"]),
            (Self.minimal + "train: {batch_size: many}\n", ["train.batch_size", "expected an integer", "'many'"]),
            (Self.minimal + "train: {epochs: 0}\n", ["train.epochs", "positive"]),
            (Self.minimal + "optimizer: {lr: fast}\n", ["optimizer.lr", "expected a number"]),
            (Self.minimal + "optimizer: {momentum: 1.5}\n", ["optimizer.momentum", "[0, 1)"]),
            (Self.minimal + "optimizer: {schedule: {type: exponential}}\n", ["optimizer.schedule.type", "constant, step, cosine"]),
            (Self.minimal + "data: {flip: maybe}\n", ["data.flip", "true or false"]),
            (Self.minimal + "data: {mean: [0.5]}\n", ["data", "both 'mean' and 'std'"]),
            (Self.minimal + "parallel: {threads: 0}\n", ["parallel.threads", "positive"]),
            (Self.minimal + "colour: blue\n", ["colour", "unknown key", "model, data, train, optimizer, parallel"]),
            ("model:\n  layers:\n    - {type: convolution, out: 3}\n", ["model.layers[0].type", "unknown layer type 'convolution'"]),
            ("model:\n  layers:\n    - {type: conv, kernel: 3}\n", ["model.layers[0]", "needs key 'out'"]),
            ("model:\n  layers:\n    - {type: conv, out: 3, kernel: [1, 2, 3]}\n", ["model.layers[0].kernel", "[height, width]"]),
            ("model:\n  layers:\n    - {type: linear, out: 3, towers: some}\n", ["model.layers[0].towers", "'own' or 'all'"]),
            ("model:\n  init: glorot\n  layers: []\n", ["model.init", "xavier, he, pytorch"]),
            ("model: {layers: []}\n", ["model.layers", "at least one layer"]),
            ("data: {path: /x}\n", ["missing key 'model'"]),
            ("model: [1, 2\n", ["test.yaml", "not valid YAML"]),
        ]
        for (text, fragments) in cases {
            let err = expectError(fragments) { _ = try config(text) }
            #expect(err == nil, "\(text): \(err ?? "")")
        }
    }

    @Test func shapesThatCannotWorkNameTheLayer() throws {
        let cases: [(String, [String])] = [
            ("- {name: big, type: conv, out: 4, kernel: 9}", ["layer 'big'", "larger than its padded input"]),
            ("- {name: g, type: conv, out: 4, kernel: 3, groups: 3}", ["layer 'g'", "not divisible by groups 3"]),
            ("- {name: z, type: conv, out: 0, kernel: 3}", ["layer 'z'", "out_channels must be positive"]),
            ("- {name: s, type: maxpool, kernel: 2, stride: 0}", ["layer 's'", "stride must be positive"]),
            ("- {name: c, type: concat, inputs: [nothere, data]}", ["layer 'c'", "'nothere' is not an earlier layer"]),
        ]
        for (layer, fragments) in cases {
            let c = try config("model:\n  input: [2, 6, 6]\n  layers:\n    \(layer)\n    - {type: flatten}\n    - {type: linear, out: 10}\n")
            let err = expectError(fragments) { _ = try Graph(input: c.input!, layers: c.layers) }
            #expect(err == nil, "\(layer): \(err ?? "")")
        }
    }

    @Test func missingConfigFile() {
        let err = expectError(["/no/such.yaml", "does not exist"]) { _ = try TrainConfig.load(path: "/no/such.yaml") }
        #expect(err == nil, "\(err ?? "")")
    }
}
