// safetensors export and import: PyTorch names and layouts, round trip, headers that lie,
// missing or mismatched tensors, --init-weights through the Trainer, a reader written
// independently in Python (stdlib only), and the peers' PyTorch LeNet5BN on the exported file
// (skipped when `import torch` fails).
import Foundation
import Testing
import TandemComm
import TandemCore
@testable import TandemTrain

/// python3 (through /usr/bin/env) with `code` and arguments; nil when python3 cannot be started.
func python(_ code: String, _ arguments: [String] = [], timeout: Double = 120) -> ProcessResult? {
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/env"),
          let r = try? run("/usr/bin/env", ["python3", "-c", code] + arguments, timeout: timeout) else { return nil }
    return r
}

let hasPython = python("import json, struct")?.status == 0
let peersModels = packageRoot + "/../shared/peers/models.py"
let hasTorch = FileManager.default.fileExists(atPath: peersModels) && python("import torch")?.status == 0

/// LeNet-5-BN with initialised weights and non-trivial running statistics.
/// Python that reads the safetensors file argv[1] into `sd` and makes the peers' LeNet5BN `m`
/// (argv[3] is the peers folder); the tests append what they compare.
let torchLoadsLeNet5BN = """
import json, struct, sys
import torch
sys.path.insert(0, sys.argv[3])
from models import LeNet5BN
raw = open(sys.argv[1], 'rb').read()
n, = struct.unpack('<Q', raw[:8])
header = json.loads(raw[8:8 + n]); header.pop('__metadata__', None)
data = raw[8 + n:]
sd = {k: torch.frombuffer(bytearray(data[v['data_offsets'][0]:v['data_offsets'][1]]), dtype=torch.float32).reshape(v['shape']) for k, v in header.items()}
m = LeNet5BN()

"""

func lenetBN(seed: UInt64 = 3) -> (graph: Graph, net: Network<Float>) {
    let graph = try! Graph(input: Shape(1, 28, 28), layers: Models.lenet5(batchNorm: true))
    let net = Network<Float>(graph: graph, capacity: 4)
    Initializer.initialize(net, scheme: .pytorch, seed: seed)
    for s in graph.statistics {
        for i in 0..<s.count {
            let v = Float(i % 7) * 0.05
            net.statistics[s.offset + i] = s.role == .runningMean ? v - 0.1 : 0.5 + v
        }
    }
    return (graph, net)
}

func writeTemporary(_ data: Data, _ name: String = "w.safetensors") throws -> String {
    let path = temporaryFolder() + "/" + name
    try data.write(to: URL(fileURLWithPath: path))
    return path
}

/// A hand-made safetensors file: header JSON as given, then `dataBytes` bytes.
func rawSafetensors(header: String, dataBytes: Int) -> Data {
    var w = ByteWriter()
    let h = Array(header.utf8)
    w.u64(UInt64(h.count))
    w.bytes(h)
    w.bytes([UInt8](repeating: 0, count: dataBytes))
    return w.data
}

@Suite struct SafetensorsTests {
    @Test func exportUsesPyTorchNamesShapesAndOrder() throws {
        let (graph, net) = lenetBN()
        let bytes = try ModelWeights.encode(graph: graph, parameters: Array(net.parameters), statistics: Array(net.statistics), metadata: ["tandem_step": "7"])
        let n = Int(bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) })
        #expect((8 + n) % 8 == 0)
        let header = String(decoding: bytes[8..<(8 + n)], as: UTF8.self)
        // state_dict order: each layer's weight and bias, then its running statistics.
        let order = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "conv2.weight", "fc1.weight", "bn4.running_var", "fc3.weight", "fc3.bias"]
        let positions = order.map { header.range(of: "\"\($0)\"")!.lowerBound }
        #expect(positions == positions.sorted())
        let file = try SafetensorsFile.decode(bytes, path: "w")
        #expect(file.metadata["tandem_step"] == "7" && file.metadata["format"] == "pt")
        #expect(file.entries.count == graph.parameters.count + graph.statistics.count)
        let shapes: [String: [Int]] = ["conv1.weight": [6, 1, 5, 5], "conv2.weight": [16, 6, 5, 5], "fc1.weight": [120, 400], "fc2.weight": [84, 120],
                                       "fc3.weight": [10, 84], "fc3.bias": [10], "bn1.running_mean": [6], "bn3.running_var": [120], "bn4.weight": [84]]
        for (name, shape) in shapes { #expect(file.entries[name]?.shape == shape, "\(name)") }
        #expect(file.entries["conv1.bias"] == nil)
        #expect(file.entries.values.allSatisfy { $0.dtype == "F32" })
        let conv1 = graph.parameters.first { $0.name == "conv1.weight" }!
        #expect(file.floats("conv1.weight") == Array(net.parameters[conv1.offset..<(conv1.offset + conv1.count)]))
    }

    @Test func roundTripThroughAFile() throws {
        let (graph, net) = lenetBN()
        let path = try writeTemporary(ModelWeights.encode(graph: graph, parameters: Array(net.parameters), statistics: Array(net.statistics)))
        let other = Network<Float>(graph: graph, capacity: 1)
        let naming = try ModelWeights.load(path: path, graph: graph, parameters: other.parameters, statistics: other.statistics)
        #expect(naming == .tandem)
        #expect(Array(other.parameters) == Array(net.parameters))
        #expect(Array(other.statistics) == Array(net.statistics))
    }

    @Test func headersThatLieAreRefused() throws {
        let cases: [(Data, [String])] = [
            (Data([1, 2, 3]), ["too short"]),
            ({ var w = ByteWriter(); w.u64(1000); w.bytes(Array("{}".utf8)); return w.data }(), ["header length says 1000 bytes", "truncated"]),
            (rawSafetensors(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", dataBytes: 8),
             ["tensor 'a'", "data_offsets [0, 16] reach past the end of the data (8 bytes)"]),
            (rawSafetensors(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]}}", dataBytes: 16),
             ["tensor 'a'", "shape [4] of F32 needs 4 x 4 bytes", "hold 12"]),
            (rawSafetensors(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", dataBytes: 12),
             ["overlap"]),
            (rawSafetensors(header: "{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", dataBytes: 8), ["unknown dtype 'Q4'"]),
            (rawSafetensors(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", dataBytes: 8), ["negative size"]),
            (rawSafetensors(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", dataBytes: 8), ["tensor 'a'", "data_offsets"]),
            (rawSafetensors(header: "[1, 2]", dataBytes: 0), ["not a JSON object"]),
            (rawSafetensors(header: "{\"__metadata__\":{\"k\":3}}", dataBytes: 0), ["__metadata__"]),
        ]
        for (data, fragments) in cases {
            let err = expectError(["lie.safetensors: "] + fragments) { _ = try SafetensorsFile.decode(data, path: "lie.safetensors") }
            #expect(err == nil, "\(fragments): \(err ?? "")")
        }
        // Every truncation of a real file is refused.
        let (graph, net) = lenetBN()
        let bytes = try ModelWeights.encode(graph: graph, parameters: Array(net.parameters), statistics: Array(net.statistics))
        for n in stride(from: 0, to: bytes.count, by: 997) {
            #expect(throws: CheckpointError.self) { _ = try SafetensorsFile.decode(bytes.prefix(n), path: "t") }
        }
    }

    @Test func missingOrMismatchedTensorsAreNamed() throws {
        let (graph, net) = lenetBN()
        let p = Array(net.parameters), s = Array(net.statistics)
        func file(dropping drop: String? = nil, replacing: (String, [Int])? = nil, adding extra: [(String, [Int])] = []) throws -> String {
            var tensors: [(name: String, shape: [Int], values: [Float])] = []
            for info in ModelWeights.layout(graph).map(\.info) where info.name != drop {
                let isStat = graph.statistics.contains(info)
                let values = Array((isStat ? s : p)[info.offset..<(info.offset + info.count)])
                if let (name, shape) = replacing, name == info.name {
                    tensors.append((name, shape, [Float](repeating: 0, count: shape.reduce(1, *))))
                } else {
                    tensors.append((info.name, info.shape, values))
                }
            }
            for (name, shape) in extra { tensors.append((name, shape, [Float](repeating: 0, count: shape.reduce(1, *)))) }
            return try writeTemporary(SafetensorsFile.encode(tensors, metadata: [:]))
        }
        let target = Network<Float>(graph: graph, capacity: 1)
        func load(_ path: String) throws { try ModelWeights.load(path: path, graph: graph, parameters: target.parameters, statistics: target.statistics) }

        let missing = try file(dropping: "bn2.running_var")
        var err = expectError([missing, "missing tensor 'bn2.running_var' (shape [16])", "the file has 21"]) { try load(missing) }
        #expect(err == nil, "\(err ?? "")")
        #expect(Array(target.parameters).allSatisfy { $0 == 0 }, "a failed load must not change the weights")
        let shape = try file(replacing: ("fc1.weight", [120, 401]))
        err = expectError([shape, "tensor 'fc1.weight' has shape [120, 401] but the model's is [120, 400]"]) { try load(shape) }
        #expect(err == nil, "\(err ?? "")")
        let extra = try file(adding: [("fc9.weight", [3])])
        err = expectError([extra, "tensor 'fc9.weight' is not a parameter or running statistic"]) { try load(extra) }
        #expect(err == nil, "\(err ?? "")")
        // PyTorch's num_batches_tracked (I64 in a real state_dict) is ignored.
        let tracked = try file(adding: [("bn1.num_batches_tracked", [])])
        try load(tracked)
        #expect(Array(target.parameters) == p)
        // Another dtype is named.
        let f16 = rawSafetensors(header: "{\"conv1.weight\":{\"dtype\":\"F16\",\"shape\":[6,1,5,5],\"data_offsets\":[0,300]}}", dataBytes: 300)
        let f16Path = try writeTemporary(f16)
        let conv1 = LayerSpec(name: "conv1", kind: .convolution(outChannels: 6, window: Window(kernelH: 5, kernelW: 5, padH: 2, padW: 2), groups: 1, bias: false))
        let tiny = try Graph(input: Shape(1, 28, 28), layers: [conv1, LayerSpec(name: "f", kind: .flatten)])
        let t = Network<Float>(graph: tiny, capacity: 1)
        err = expectError([f16Path, "tensor 'conv1.weight' is F16; Tandem reads F32 only"]) {
            try ModelWeights.load(path: f16Path, graph: tiny, parameters: t.parameters, statistics: t.statistics)
        }
        #expect(err == nil, "\(err ?? "")")
    }

    @Test func peersAlexNetNames() throws {
        let graph = try Graph(input: Shape(1, 28, 28), layers: Models.alexnet())
        let map = try #require(ModelWeights.peerNames(graph))
        let expected = ["conv1.weight": "features.0.weight", "conv2.bias": "features.4.bias", "conv3.weight": "features.8.weight",
                        "conv4.weight": "features.10.weight", "conv5.bias": "features.12.bias", "fc6.weight": "classifier.0.weight",
                        "fc7.bias": "classifier.3.bias", "fc8.weight": "classifier.6.weight"]
        for (tandem, peers) in expected { #expect(map[tandem] == peers) }
        #expect(ModelWeights.peerNames(try Graph(input: Shape(1, 28, 28), layers: Models.lenet5(batchNorm: false))) == nil)
        let lenet = lenetBN()
        let err = expectError(["--names peers", "AlexNetSmall"]) {
            _ = try ModelWeights.encode(graph: lenet.graph, parameters: Array(lenet.net.parameters), statistics: Array(lenet.net.statistics), naming: .peers)
        }
        #expect(err == nil, "\(err ?? "")")
        // Written with the peers' names, read back without being told.
        let params = (0..<graph.parameterCount).map { Float($0 % 101) * 0.01 }
        let path = try writeTemporary(ModelWeights.encode(graph: graph, parameters: params, statistics: [], naming: .peers))
        let file = try SafetensorsFile.read(path: path)
        #expect(file.entries["classifier.6.bias"]?.shape == [10] && file.entries["features.4.weight"]?.shape == [128, 32, 3, 3])
        let p = UnsafeMutableBufferPointer<Float>.allocate(capacity: graph.parameterCount)
        defer { p.deallocate() }
        let s = UnsafeMutableBufferPointer<Float>(start: nil, count: 0)
        #expect(try ModelWeights.load(path: path, graph: graph, parameters: p, statistics: s) == .peers)
        #expect(Array(p) == params)
    }

    @Test func initWeightsStartTheTrainer() throws {
        let c = try config(tinyYAML)
        let graph = try Graph(input: Shape(1, 12, 12), layers: c.layers)
        let params = (0..<graph.parameterCount).map { Float($0 % 13) * 0.01 - 0.05 }
        let stats = (0..<graph.statisticsCount).map { Float($0 % 3) * 0.1 + 0.5 }
        let path = try writeTemporary(ModelWeights.encode(graph: graph, parameters: params, statistics: stats))
        final class Box: @unchecked Sendable { var ok = [Bool](repeating: false, count: 2) }
        let box = Box()
        try ThreadCommunicator.run(size: 2) { comm in
            var o = RunOptions()
            o.quiet = true
            o.initWeights = path
            var cc = c
            cc.parallel.threads = 1
            let t = try Trainer(config: cc, comm: comm, data: try tinyData(), options: o)
            box.ok[comm.rank] = Array(t.net.parameters) == params && Array(t.net.statistics) == stats
        }
        #expect(box.ok == [true, true])
        // A file for another model stops every rank.
        let (lenet, net) = lenetBN()
        let wrong = try writeTemporary(ModelWeights.encode(graph: lenet, parameters: Array(net.parameters), statistics: Array(net.statistics)))
        let err = expectError([wrong, "conv1.weight"]) {
            var o = RunOptions()
            o.initWeights = wrong
            _ = try Trainer(config: c, comm: SingleProcessCommunicator(), data: try tinyData(), options: o)
        }
        #expect(err == nil, "\(err ?? "")")
        #expect(throws: (any Error).self) {
            try ThreadCommunicator.run(size: 2) { comm in
                var o = RunOptions()
                o.initWeights = wrong
                var cc = c
                cc.parallel.threads = 1
                _ = try Trainer(config: cc, comm: comm, data: try tinyData(), options: o)
            }
        }
    }

    /// The format as an independent reader sees it: Python's json and struct, nothing of ours.
    @Test(.enabled(if: hasPython, "python3 is not available: skipping the independent safetensors reader"))
    func pythonReadsTheFile() throws {
        let (graph, net) = lenetBN()
        let path = try writeTemporary(ModelWeights.encode(graph: graph, parameters: Array(net.parameters), statistics: Array(net.statistics)))
        let script = """
        import json, struct, sys
        raw = open(sys.argv[1], 'rb').read()
        n, = struct.unpack('<Q', raw[:8])
        header = json.loads(raw[8:8 + n].decode('utf-8'))
        data = raw[8 + n:]
        meta = header.pop('__metadata__', {})
        spans = sorted((v['data_offsets'][0], v['data_offsets'][1], k) for k, v in header.items())
        assert spans[0][0] == 0 and spans[-1][1] == len(data), 'data not covered'
        for (a, b, _), (c, d, _) in zip(spans, spans[1:]): assert b == c, 'hole or overlap'
        out = {}
        for k, v in header.items():
            assert v['dtype'] == 'F32'
            b, e = v['data_offsets']
            count = 1
            for s in v['shape']: count *= s
            assert e - b == 4 * count
            out[k] = [v['shape'], sum(struct.unpack('<%df' % count, data[b:e]))]
        print(json.dumps({'meta': meta, 'tensors': out}))
        """
        let r = try #require(python(script, [path]))
        #expect(r.status == 0, "\(r.error)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [String: Any])
        let tensors = try #require(json["tensors"] as? [String: [Any]])
        #expect(tensors.count == graph.parameters.count + graph.statistics.count)
        for info in graph.parameters {
            let sum = (info.offset..<(info.offset + info.count)).reduce(0.0) { $0 + Double(net.parameters[$1]) }
            let theirs = try #require(tensors[info.name]?[1] as? Double)
            #expect(abs(theirs - sum) <= 1e-9 + 1e-9 * abs(sum), "\(info.name): \(theirs) vs \(sum)")
            #expect(tensors[info.name]?[0] as? [Int] == info.shape)
        }
    }

    /// The peers' PyTorch LeNet5BN loads the exported file and computes Tandem's logits.
    @Test(.enabled(if: hasTorch, "torch is not installed (import torch failed in python3): skipping the comparison with PyTorch"))
    func pytorchComputesTheSameLogits() throws {
        let (graph, net) = lenetBN()
        let folder = temporaryFolder()
        let weights = folder + "/w.safetensors", input = folder + "/x.f32"
        try ModelWeights.encode(graph: graph, parameters: Array(net.parameters), statistics: Array(net.statistics))
            .write(to: URL(fileURLWithPath: weights))
        let x: [Float] = (0..<(4 * 784)).map { (i: Int) -> Float in Float((i * 37) % 255) / 255 - 0.5 }
        var w = ByteWriter()
        w.floats(x)
        try w.data.write(to: URL(fileURLWithPath: input))
        for i in 0..<x.count { net.input[i] = x[i] }
        net.forward(count: 4, training: false, updateStatistics: false)
        let ours = (0..<40).map { Double(net.output[$0]) }
        let script = torchLoadsLeNet5BN + """
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing), (missing, unexpected)
        m.eval()
        x = torch.frombuffer(bytearray(open(sys.argv[2], 'rb').read()), dtype=torch.float32).reshape(4, 1, 28, 28)
        with torch.no_grad():
            print(json.dumps(m(x).flatten().tolist()))
        """
        let r = try #require(python(script, [weights, input, packageRoot + "/../shared/peers"]))
        #expect(r.status == 0, "\(r.error)")
        let theirs = try #require(try JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [Double])
        #expect(theirs.count == 40)
        let worst = zip(ours, theirs).map { abs($0 - $1) }.max() ?? .infinity
        #expect(worst < 1e-4, "max |Tandem - PyTorch| = \(worst)")
    }

    /// The same weights in training mode: PyTorch's loss and every parameter's gradient on a batch
    /// (batch-norm batch statistics included) equal Tandem's.
    @Test(.enabled(if: hasTorch, "torch is not installed (import torch failed in python3): skipping the comparison with PyTorch"))
    func pytorchComputesTheSameLossAndGradients() throws {
        let (graph, net) = lenetBN()
        let folder = temporaryFolder()
        let weights = folder + "/w.safetensors", input = folder + "/x.f32"
        try ModelWeights.encode(graph: graph, parameters: Array(net.parameters), statistics: Array(net.statistics))
            .write(to: URL(fileURLWithPath: weights))
        let n = 4   // lenetBN() is built for 4 samples
        let x: [Float] = (0..<(n * 784)).map { (i: Int) -> Float in Float((i * 53) % 251) / 251 - 0.5 }
        let labels: [Int32] = (0..<n).map { Int32(($0 * 7) % 10) }
        var w = ByteWriter()
        w.floats(x)
        try w.data.write(to: URL(fileURLWithPath: input))
        for i in 0..<x.count { net.input[i] = x[i] }
        for i in 0..<n { net.labels[i] = labels[i] }
        let r0 = net.trainStep(count: n, lossScale: 1 / Double(n), step: 0)
        let ourLoss = r0.loss / Double(n)
        let script = torchLoadsLeNet5BN + """
        import torch.nn.functional as F
        m.load_state_dict(sd, strict=False)
        m.train()
        x = torch.frombuffer(bytearray(open(sys.argv[2], 'rb').read()), dtype=torch.float32).reshape(-1, 1, 28, 28)
        y = torch.tensor(json.loads(sys.argv[4]))
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        print(json.dumps({"loss": loss.item(), "grads": {k: p.grad.flatten().tolist() for k, p in m.named_parameters()}}))
        """
        let labelText = "[" + labels.map { String($0) }.joined(separator: ",") + "]"
        let r = try #require(python(script, [weights, input, packageRoot + "/../shared/peers", labelText]))
        #expect(r.status == 0, "\(r.error)")
        let result = try #require(try JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [String: Any])
        let theirLoss = try #require(result["loss"] as? Double)
        #expect(abs(theirLoss - ourLoss) < 1e-5 * max(1, abs(ourLoss)), "loss: Tandem \(ourLoss), PyTorch \(theirLoss)")
        let grads = try #require(result["grads"] as? [String: [Double]])
        #expect(grads.count == graph.parameters.count)
        for info in graph.parameters {
            let theirs = try #require(grads[info.name], "PyTorch has no gradient for \(info.name)")
            let ours = (0..<info.count).map { Double(net.gradients[info.offset + $0]) }
            #expect(theirs.count == ours.count)
            let scale = max(ours.map(abs).max() ?? 0, 1e-6)
            let worst = zip(ours, theirs).map { abs($0 - $1) }.max() ?? .infinity
            #expect(worst <= 1e-3 * scale, "\(info.name): max |Tandem - PyTorch| = \(worst) (largest gradient \(scale))")
        }
    }
}
