// safetensors files (Hugging Face, https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON
//   {"__metadata__": {string: string}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
// padded with spaces, then the raw little-endian tensor bytes; offsets count from the start of
// that data. `ModelWeights` maps a model's parameters and running statistics to PyTorch
// state_dict names and layouts (conv weight [out, in/groups, kh, kw], linear weight [out, in],
// batch norm weight, bias, running_mean, running_var) and back.
import Foundation
import TandemCore

public struct SafetensorsFile {
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var dtype: String
        public var shape: [Int]
        /// Byte range in `data`.
        public var range: Range<Int>
    }
    public var metadata: [String: String] = [:]
    public var entries: [String: Entry] = [:]
    /// The bytes after the header.
    public var data = Data()

    /// Bytes per element of the dtypes the format defines.
    static let dtypeSizes = ["F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1]
    /// Headers larger than this are refused (the reference implementation's limit).
    static let maxHeaderBytes = 100_000_000

    public static func read(path: String) throws(CheckpointError) -> SafetensorsFile {
        guard FileManager.default.fileExists(atPath: path) else { throw CheckpointError("\(path): no such safetensors file") }
        guard let data = FileManager.default.contents(atPath: path) else { throw CheckpointError("\(path): cannot read the file (a folder, or permissions?)") }
        return try decode(data, path: path)
    }

    /// Parses and checks the header: JSON, dtypes, and that every tensor's bytes are inside the file
    /// and match its shape. `path` names the file in errors.
    public static func decode(_ bytes: Data, path: String) throws(CheckpointError) -> SafetensorsFile {
        func fail(_ what: String) -> CheckpointError { CheckpointError("\(path): \(what)") }
        guard bytes.count >= 8 else { throw fail("too short to be a safetensors file (\(bytes.count) bytes)") }
        var r = ByteReader(bytes)
        let n = r.u64()!
        guard n <= UInt64(bytes.count - 8) else {
            throw fail("the header length says \(n) bytes but only \(bytes.count - 8) follow: the file is truncated or not safetensors")
        }
        guard n <= UInt64(maxHeaderBytes) else { throw fail("the header length \(n) is larger than the format allows (\(maxHeaderBytes))") }
        let start = bytes.startIndex
        let json = bytes[(start + 8)..<(start + 8 + Int(n))]
        guard let object = try? JSONSerialization.jsonObject(with: json), let top = object as? [String: Any] else {
            throw fail("the header is not a JSON object")
        }
        var file = SafetensorsFile()
        file.data = bytes.subdata(in: (start + 8 + Int(n))..<bytes.endIndex)
        let size = file.data.count
        for (name, value) in top {
            if name == "__metadata__" {
                guard let m = value as? [String: String] else { throw fail("__metadata__ must map strings to strings") }
                file.metadata = m
                continue
            }
            guard let t = value as? [String: Any], let dtype = t["dtype"] as? String, let shape = t["shape"] as? [Int],
                  let offsets = t["data_offsets"] as? [Int], offsets.count == 2 else {
                throw fail("tensor '\(name)': expected {\"dtype\": string, \"shape\": [integers], \"data_offsets\": [begin, end]}")
            }
            guard let elementSize = dtypeSizes[dtype] else { throw fail("tensor '\(name)': unknown dtype '\(dtype)'") }
            guard shape.allSatisfy({ $0 >= 0 }) else { throw fail("tensor '\(name)': negative size in shape \(shape)") }
            let (begin, end) = (offsets[0], offsets[1])
            guard begin >= 0, begin <= end, end <= size else {
                throw fail("tensor '\(name)': data_offsets [\(begin), \(end)] reach past the end of the data (\(size) bytes): the header lies about the sizes or the file is truncated")
            }
            var elements = 1
            for d in shape {
                let (p, overflow) = elements.multipliedReportingOverflow(by: d)
                guard !overflow else { throw fail("tensor '\(name)': shape \(shape) is too large") }
                elements = p
            }
            let bytesNeeded = elements.multipliedReportingOverflow(by: elementSize)
            guard !bytesNeeded.overflow, bytesNeeded.partialValue == end - begin else {
                throw fail("tensor '\(name)': shape \(shape) of \(dtype) needs \(elements) x \(elementSize) bytes but data_offsets [\(begin), \(end)] hold \(end - begin)")
            }
            file.entries[name] = Entry(name: name, dtype: dtype, shape: shape, range: begin..<end)
        }
        let sorted = file.entries.values.sorted { ($0.range.lowerBound, $0.range.upperBound) < ($1.range.lowerBound, $1.range.upperBound) }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.range.lowerBound < a.range.upperBound {
            throw fail("tensors '\(a.name)' and '\(b.name)' overlap (data_offsets \(a.range) and \(b.range))")
        }
        return file
    }

    /// The values of an F32 tensor (the caller has checked the dtype).
    public func floats(_ name: String) -> [Float] {
        let e = entries[name]!
        precondition(e.dtype == "F32", "SafetensorsFile.floats: '\(name)' is \(e.dtype)")
        var r = ByteReader(data)
        r.offset = e.range.lowerBound
        return r.floats(e.range.count / 4)
    }

    /// A file of F32 tensors, written in the given order.
    public static func encode(_ tensors: [(name: String, shape: [Int], values: [Float])], metadata: [String: String]) -> Data {
        var parts: [String] = []
        if !metadata.isEmpty {
            parts.append("\"__metadata__\":{" + metadata.sorted { $0.key < $1.key }.map { "\(jsonString($0.key)):\(jsonString($0.value))" }.joined(separator: ",") + "}")
        }
        var offset = 0
        for t in tensors {
            precondition(t.shape.reduce(1, *) == t.values.count, "SafetensorsFile.encode: '\(t.name)' has \(t.values.count) values for shape \(t.shape)")
            let end = offset + 4 * t.values.count
            parts.append("\(jsonString(t.name)):{\"dtype\":\"F32\",\"shape\":[\(t.shape.map(String.init).joined(separator: ","))],\"data_offsets\":[\(offset),\(end)]}")
            offset = end
        }
        var header = Array(("{" + parts.joined(separator: ",") + "}").utf8)
        // Pad with spaces so that the data starts 8-byte aligned (as the reference writer does).
        while (8 + header.count) % 8 != 0 { header.append(0x20) }
        var w = ByteWriter()
        w.u64(UInt64(header.count))
        w.bytes(header)
        for t in tensors { w.floats(t.values) }
        return w.data
    }

    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case _ where u.value < 0x20: out += String(format: "\\u%04x", u.value)
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }
}

/// How a model's tensors are named in a safetensors file.
public enum TensorNaming: String, Sendable, CaseIterable {
    /// Tandem's names ("conv1.weight", "bn1.running_mean"): PyTorch's state_dict names for models
    /// whose modules are named like the config's layers (the LeNet-5 configs and the peers' LeNet5, LeNet5BN).
    case tandem
    /// The peers' AlexNetSmall (models.py), whose layers sit in two nn.Sequential:
    /// conv1 -> features.0, conv2 -> features.4, ..., fc6 -> classifier.0, fc8 -> classifier.6.
    case peers
}

/// A model's parameters and running statistics as safetensors, with PyTorch names and layouts.
public enum ModelWeights {
    /// The tensors in state_dict order: per layer its parameters, then its running statistics.
    static func layout(_ graph: Graph) -> [(info: ParameterInfo, isStatistic: Bool)] {
        var out: [(ParameterInfo, Bool)] = []
        for node in graph.nodes {
            for p in graph.parameters(of: node.index) { out.append((p, false)) }
            for s in graph.statistics(of: node.index) { out.append((s, true)) }
        }
        return out
    }

    /// Names of the peers' AlexNetSmall for a graph with its layers (any names), or nil for other graphs.
    /// Layers before `flatten` are features.i, after it classifier.i, counted as the Sequential does.
    public static func peerNames(_ graph: Graph) -> [String: String]? {
        let kinds = graph.nodes.dropFirst().map(\.kind)
        let reference = Models.alexnet(classes: graph.outputShape.count).map(\.kind)
        guard kinds.count == reference.count, zip(kinds, reference).allSatisfy({ $0 == $1 }),
              graph.nodes.dropFirst().allSatisfy({ $0.inputs == [$0.index - 1] }),
              let flatten = graph.nodes.firstIndex(where: { $0.kind == .flatten }) else { return nil }
        var names: [String: String] = [:]
        for (info, _) in layout(graph) {
            let node = graph.nodes[info.node]
            let suffix = info.name.dropFirst(node.name.count + 1)
            let module = node.index < flatten ? "features.\(node.index - 1)" : "classifier.\(node.index - flatten - 1)"
            names[info.name] = module + "." + suffix
        }
        return names
    }

    static func names(_ graph: Graph, _ naming: TensorNaming) throws(CheckpointError) -> [String] {
        let infos = layout(graph).map(\.info)
        switch naming {
        case .tandem: return infos.map(\.name)
        case .peers:
            guard let map = peerNames(graph) else {
                throw CheckpointError("--names peers maps the peers' AlexNetSmall (configs/alexnet-2tower.yaml) only; this model is not it (use --names tandem)")
            }
            return infos.map { map[$0.name]! }
        }
    }

    /// The safetensors bytes of `parameters` and `statistics` laid out as `graph` says.
    public static func encode(graph: Graph, parameters: [Float], statistics: [Float], naming: TensorNaming = .tandem,
                              metadata: [String: String] = [:]) throws -> Data {
        precondition(parameters.count == graph.parameterCount && statistics.count == graph.statisticsCount)
        let names = try names(graph, naming)
        var tensors: [(name: String, shape: [Int], values: [Float])] = []
        for (i, (info, isStatistic)) in layout(graph).enumerated() {
            let source = isStatistic ? statistics : parameters
            tensors.append((names[i], info.shape, Array(source[info.offset..<(info.offset + info.count)])))
        }
        var m = metadata
        m["format"] = "pt"
        return SafetensorsFile.encode(tensors, metadata: m)
    }

    /// Loads a safetensors file into `parameters` and `statistics` (all or nothing): every tensor of
    /// the model must be there, F32, with the model's shape; names are Tandem's or, for the peers'
    /// AlexNet, the peers'. `num_batches_tracked` is ignored; any other extra tensor is an error.
    /// Returns the naming the file used.
    @discardableResult
    public static func load(path: String, graph: Graph, parameters: UnsafeMutableBufferPointer<Float>,
                            statistics: UnsafeMutableBufferPointer<Float>) throws -> TensorNaming {
        precondition(parameters.count == graph.parameterCount && statistics.count == graph.statisticsCount)
        let file = try SafetensorsFile.read(path: path)
        func fail(_ what: String) -> CheckpointError { CheckpointError("\(path): \(what)") }
        let tandem = try names(graph, .tandem)
        var naming = TensorNaming.tandem
        var expected = tandem
        if let peers = try? names(graph, .peers),
           peers.filter({ file.entries[$0] != nil }).count > tandem.filter({ file.entries[$0] != nil }).count {
            naming = .peers
            expected = peers
        }
        let present = file.entries.keys.sorted()
        for (name, (info, _)) in zip(expected, layout(graph)) {
            guard let e = file.entries[name] else {
                let list = present.prefix(8).joined(separator: ", ") + (present.count > 8 ? ", ..." : "")
                throw fail("missing tensor '\(name)' (shape \(info.shape)); the file has \(present.count): \(list.isEmpty ? "none" : list)")
            }
            guard e.dtype == "F32" else { throw fail("tensor '\(name)' is \(e.dtype); Tandem reads F32 only") }
            guard e.shape == info.shape else { throw fail("tensor '\(name)' has shape \(e.shape) but the model's is \(info.shape)") }
        }
        let known = Set(expected)
        for name in present where !known.contains(name) && !name.hasSuffix(".num_batches_tracked") {
            throw fail("tensor '\(name)' is not a parameter or running statistic of this model (\(naming.rawValue) names, e.g. '\(expected.first ?? "")')")
        }
        for (name, (info, isStatistic)) in zip(expected, layout(graph)) {
            let values = file.floats(name)
            let target = isStatistic ? statistics : parameters
            for i in 0..<info.count { target[info.offset + i] = values[i] }
        }
        return naming
    }
}
