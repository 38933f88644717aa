// Checkpoints: what a run needs to continue exactly where it stopped, in one binary file that
// rank 0 writes into the output folder as ckpt-step-000123.tandem.
//
// Training is a pure function of (config, seed, epoch, position in the epoch's order, step):
// the epoch's order is drawn from (seed, epoch), augmentation and dropout masks from (seed,
// epoch or step, sample). So the state to save is those counters, the parameters, the SGD
// velocity and the batch-norm running statistics.
//
// Layout, every number little-endian:
//   magic "TANDEMCK"                     8 bytes
//   format version                       UInt32 (1)
//   header                               `Checkpoint.Header.fieldCount` x 8 bytes (UInt64 or Float64)
//   config text                          UInt64 byte count, UTF-8 (so `trainer export` needs no config)
//   parameters                           UInt64 count, count x Float32
//   SGD velocity                         UInt64 count, count x Float32
//   running statistics                   UInt64 count, count x Float32
//   checksum                             UInt64: FNV-1a 64 over every byte before it
import Foundation
import TandemCore
#if canImport(Glibc)
import Glibc
#endif

/// A checkpoint or safetensors file that cannot be used: one line naming the file and what is wrong.
public struct CheckpointError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public struct Checkpoint: Sendable {
    public static let magic = Array("TANDEMCK".utf8)
    public static let version: UInt32 = 1
    /// File names: ckpt-step-<step, at least 6 digits>.tandem.
    public static let prefix = "ckpt-step-", suffix = ".tandem"

    public struct Header: Sendable, Equatable {
        /// `TrainConfig.hash` of the run that wrote it.
        public var configHash: UInt64 = 0
        /// The layout it was written with (a checkpoint does not depend on it).
        public var worldSize = 1, threads = 1
        /// Where training continues: `position` samples into epoch `epoch`'s order, after `step`
        /// optimiser steps; the learning-rate schedule continues at `lrStep`.
        public var epoch = 0, position = 0, step = 0, lrStep = 0
        public var seed: UInt64 = 0
        /// The global batch and the training set's size (both fix how steps map to samples).
        public var batchSize = 0, trainCount = 0
        /// The input shape the graph was built for (export rebuilds the graph from the config text).
        public var input = Shape(1, 1, 1)
        /// Training and wall seconds so far, and training seconds to 90% test accuracy (NaN: not yet).
        public var trainSeconds = 0.0, wallSeconds = 0.0, secondsTo90 = Double.nan
        /// The last step's training loss (for the summary of a run resumed at its end).
        public var lastTrainLoss = Double.nan

        public init() {}

        static let fieldCount = 17
    }

    public var header = Header()
    public var configText = ""
    public var parameters: [Float] = []
    public var velocity: [Float] = []
    public var statistics: [Float] = []

    public init() {}

    /// The file name of the checkpoint after `step` steps.
    public static func fileName(step: Int) -> String { prefix + String(format: "%06d", step) + suffix }

    // MARK: - Encoding

    public func encoded() -> Data {
        var w = ByteWriter()
        w.bytes(Checkpoint.magic)
        w.u32(Checkpoint.version)
        let h = header
        for v in [h.configHash, UInt64(h.worldSize), UInt64(h.threads), UInt64(h.epoch), UInt64(h.position), UInt64(h.step),
                  UInt64(h.lrStep), h.seed, UInt64(h.batchSize), UInt64(h.trainCount),
                  UInt64(h.input.channels), UInt64(h.input.height), UInt64(h.input.width)] { w.u64(v) }
        for v in [h.trainSeconds, h.wallSeconds, h.secondsTo90, h.lastTrainLoss] { w.u64(v.bitPattern) }
        let text = Array(configText.utf8)
        w.u64(UInt64(text.count))
        w.bytes(text)
        for section in [parameters, velocity, statistics] {
            w.u64(UInt64(section.count))
            w.floats(section)
        }
        w.u64(fnv1a64(w.data))
        return w.data
    }

    /// Decodes and checks a checkpoint's bytes; `path` only names the file in errors.
    public static func decode(_ data: Data, path: String) throws(CheckpointError) -> Checkpoint {
        func fail(_ what: String) -> CheckpointError { CheckpointError("\(path): \(what)") }
        let headerBytes = 8 + 4 + 8 * Header.fieldCount
        guard Array(data.prefix(8)) == magic else {
            throw fail(data.count < 8 ? "not a Tandem checkpoint (only \(data.count) bytes)" : "not a Tandem checkpoint (the file does not start with \"TANDEMCK\")")
        }
        guard data.count >= headerBytes + 8 else { throw fail("truncated: \(data.count) bytes, shorter than the \(headerBytes)-byte header") }
        var r = ByteReader(data)
        r.offset = 8
        let version = r.u32()!
        guard version == Checkpoint.version else {
            throw fail("checkpoint format version \(version), but this trainer reads version \(Checkpoint.version) (written by a different Tandem)")
        }
        var h = Header()
        func int(_ v: UInt64, _ name: String) throws(CheckpointError) -> Int {
            guard v <= UInt64(Int.max >> 8) else { throw fail("corrupt header: \(name) is \(v)") }
            return Int(v)
        }
        h.configHash = r.u64()!
        h.worldSize = try int(r.u64()!, "world size"); h.threads = try int(r.u64()!, "threads")
        h.epoch = try int(r.u64()!, "epoch"); h.position = try int(r.u64()!, "position"); h.step = try int(r.u64()!, "step")
        h.lrStep = try int(r.u64()!, "learning-rate step"); h.seed = r.u64()!
        h.batchSize = try int(r.u64()!, "batch size"); h.trainCount = try int(r.u64()!, "training set size")
        h.input = Shape(try int(r.u64()!, "input channels"), try int(r.u64()!, "input height"), try int(r.u64()!, "input width"))
        h.trainSeconds = Double(bitPattern: r.u64()!); h.wallSeconds = Double(bitPattern: r.u64()!); h.secondsTo90 = Double(bitPattern: r.u64()!)
        h.lastTrainLoss = Double(bitPattern: r.u64()!)
        var c = Checkpoint()
        c.header = h
        // Sections: every count is checked against the bytes left before anything is read.
        func count(_ what: String, elementSize: Int) throws(CheckpointError) -> Int {
            guard let n = r.u64() else { throw fail("truncated: the file ends where the \(what) count should be (\(data.count) bytes)") }
            let left = data.count - r.offset - 8
            guard n <= UInt64(max(0, left) / elementSize) else {
                throw fail("truncated or corrupt: the \(what) section says \(n) values (\(n &* UInt64(elementSize)) bytes) but only \(max(0, left)) bytes remain before the checksum")
            }
            return Int(n)
        }
        let textBytes = try count("config text", elementSize: 1)
        guard let text = String(bytes: data[(data.startIndex + r.offset)..<(data.startIndex + r.offset + textBytes)], encoding: .utf8) else {
            throw fail("corrupt: the config text is not UTF-8")
        }
        r.offset += textBytes
        c.configText = text
        let parameterCount = try count("parameter", elementSize: 4)
        c.parameters = r.floats(parameterCount)
        let velocityCount = try count("velocity", elementSize: 4)
        c.velocity = r.floats(velocityCount)
        let statisticsCount = try count("running-statistics", elementSize: 4)
        c.statistics = r.floats(statisticsCount)
        guard r.offset + 8 == data.count else {
            throw fail("corrupt: \(data.count - r.offset - 8) unexpected bytes after the last section")
        }
        let stored = r.u64()!
        let computed = fnv1a64(data.prefix(r.offset - 8))
        guard stored == computed else {
            throw fail(String(format: "checksum mismatch (stored %016llx, computed %016llx): the file is corrupt", stored, computed))
        }
        guard c.velocity.count == c.parameters.count else {
            throw fail("corrupt: \(c.velocity.count) velocity values for \(c.parameters.count) parameters")
        }
        return c
    }

    // MARK: - Files

    /// Reads and checks a checkpoint file (format, sizes and checksum; not whether it fits a model).
    public static func read(path: String) throws(CheckpointError) -> Checkpoint {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { throw CheckpointError("\(path): no such checkpoint file") }
        guard !isDir.boolValue else { throw CheckpointError("\(path): is a folder, not a checkpoint file") }
        guard let data = FileManager.default.contents(atPath: path) else { throw CheckpointError("\(path): cannot read the checkpoint (permissions?)") }
        return try decode(data, path: path)
    }

    /// Writes atomically and durably: a temporary file in the same folder, fsync, rename, fsync of the folder.
    public func write(to path: String) throws {
        try writeDurably(encoded(), to: path)
    }

    /// Checks that this checkpoint continues `config` on `graph`: same experiment (config hash),
    /// same parameter and statistics counts, same training set. `path` names the file in errors.
    public func check(config: TrainConfig, graph: Graph, trainCount: Int, path: String) throws(CheckpointError) {
        func fail(_ what: String) -> CheckpointError { CheckpointError("\(path): \(what)") }
        guard header.configHash == config.hash else {
            throw fail(String(format: "was written by a different config (hash %016llx; this run's is %016llx); resume with the config and options (epochs, batch size, seed, lr) that wrote it, or start a fresh run in another output folder",
                              header.configHash, config.hash))
        }
        guard parameters.count == graph.parameterCount else {
            throw fail("holds \(parameters.count) parameters but the model has \(graph.parameterCount)")
        }
        guard statistics.count == graph.statisticsCount else {
            throw fail("holds \(statistics.count) running statistics but the model has \(graph.statisticsCount)")
        }
        guard header.trainCount == trainCount else {
            throw fail("was written for a training set of \(header.trainCount) images; this one has \(trainCount) (another dataset or data.train_limit)")
        }
        let spe = (trainCount + config.batchSize - 1) / config.batchSize
        guard header.batchSize == config.batchSize, header.position <= trainCount, header.position % config.batchSize == 0,
              header.step == header.epoch * spe + header.position / config.batchSize else {
            throw fail("corrupt: epoch \(header.epoch), position \(header.position), step \(header.step) do not fit batch \(config.batchSize) and \(trainCount) images")
        }
    }

    // MARK: - Folders

    /// The step a checkpoint file name stands for (nil for other names).
    public static func step(ofFileName name: String) -> Int? {
        guard name.hasPrefix(prefix), name.hasSuffix(suffix) else { return nil }
        let digits = name.dropFirst(prefix.count).dropLast(suffix.count)
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        return Int(digits)
    }

    /// Checkpoint files in `folder`, oldest step first.
    public static func list(in folder: String) -> [(step: Int, path: String)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
        return names.compactMap { n in step(ofFileName: n).map { ($0, folder + "/" + n) } }.sorted { $0.step < $1.step }
    }

    /// Deletes older checkpoints in `folder` so that `keep` remain counting the one just written
    /// at `step`. Checkpoints with later steps (left by an earlier run that went further) are not
    /// this run's to judge and are left alone.
    public static func prune(folder: String, keep: Int, writtenStep step: Int) {
        let older = list(in: folder).filter { $0.step < step }
        for old in older.dropLast(max(0, keep - 1)) { unlink(old.path) }
    }

    /// Finds the checkpoint `spec` names: a file, a folder (its newest usable checkpoint) or
    /// "auto" (the newest usable one in `outDir`). In a folder, a checkpoint that is corrupt or
    /// from another config is reported through `warn` and the previous one is tried; a file that
    /// cannot be used is an error. Returns nil only for "auto" with no checkpoint in `outDir`.
    public static func resolve(_ spec: String, outDir: String, warn: (String) -> Void,
                               check: (Checkpoint, String) throws -> Void) throws -> (checkpoint: Checkpoint, path: String)? {
        var isDir: ObjCBool = false
        let folder: String
        if spec == "auto" {
            folder = outDir
        } else if FileManager.default.fileExists(atPath: spec, isDirectory: &isDir), isDir.boolValue {
            folder = spec
        } else {
            let c = try read(path: spec)
            try check(c, spec)
            return (c, spec)
        }
        let candidates = list(in: folder)
        if candidates.isEmpty {
            if spec == "auto" { return nil }
            throw CheckpointError("\(folder): no checkpoints (\(prefix)*\(suffix)) in this folder")
        }
        var reasons: [String] = []
        for (_, path) in candidates.reversed() {
            do {
                let c = try read(path: path)
                try check(c, path)
                return (c, path)
            } catch {
                warn("tandem: cannot resume from \(error); trying the previous checkpoint")
                reasons.append(String(describing: error))
            }
        }
        throw CheckpointError("\(folder): none of the \(candidates.count) checkpoints can be used (the newest: \(reasons[0]))")
    }
}

// MARK: - Durable writes

/// Writes `data` to `path` so that a crash leaves either the old file or the new one, never half
/// of one: a temporary file in the same folder, fsync, rename over `path`, fsync of the folder
/// (so that the rename itself survives a power loss).
public func writeDurably(_ data: Data, to path: String) throws {
    let url = URL(fileURLWithPath: path)
    let folder = url.deletingLastPathComponent().path
    let tmp = folder + "/." + url.lastPathComponent + ".tmp-\(getpid())"
    func failure(_ what: String) -> CheckpointError {
        CheckpointError("\(path): cannot write (\(what): \(String(cString: strerror(errno))))")
    }
    let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw failure("creating \(tmp)") }
    var ok = true
    data.withUnsafeBytes { raw in
        var done = 0
        while done < raw.count {
            let n = write(fd, raw.baseAddress! + done, raw.count - done)
            if n < 0 { if errno == EINTR { continue }; ok = false; return }
            done += n
        }
    }
    if !ok { let e = failure("writing"); close(fd); unlink(tmp); throw e }
    if fsync(fd) != 0 { let e = failure("fsync"); close(fd); unlink(tmp); throw e }
    close(fd)
    if rename(tmp, path) != 0 { let e = failure("rename"); unlink(tmp); throw e }
    let dfd = open(folder, O_RDONLY | O_DIRECTORY)
    if dfd >= 0 { _ = fsync(dfd); close(dfd) }
}

// MARK: - Bytes

/// FNV-1a, 64 bits (the same function as `stableHash`), over raw bytes.
func fnv1a64<D: DataProtocol>(_ data: D) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for region in data.regions {
        region.withUnsafeBytes { raw in
            for b in raw { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        }
    }
    return h
}

/// Appends little-endian numbers to a byte buffer.
struct ByteWriter {
    var data = Data()
    mutating func bytes(_ b: [UInt8]) { data.append(contentsOf: b) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
    mutating func floats(_ values: [Float]) {
        #if _endian(little)
        values.withUnsafeBytes { data.append(contentsOf: $0) }
        #else
        for v in values { u32(v.bitPattern) }
        #endif
    }
}

/// Reads little-endian numbers from a byte buffer; nil past the end.
struct ByteReader {
    let data: Data
    var offset = 0
    init(_ data: Data) { self.data = data }

    mutating func u32() -> UInt32? {
        guard offset + 4 <= data.count else { return nil }
        defer { offset += 4 }
        return data.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }

    mutating func u64() -> UInt64? {
        guard offset + 8 <= data.count else { return nil }
        defer { offset += 8 }
        return data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }

    /// `n` Float32 values (the caller has checked that they are there).
    mutating func floats(_ n: Int) -> [Float] {
        precondition(offset + 4 * n <= data.count, "ByteReader.floats: \(n) values past the end")
        defer { offset += 4 * n }
        return data.withUnsafeBytes { raw in
            [Float](unsafeUninitializedCapacity: n) { buffer, initialized in
                #if _endian(little)
                if n > 0 { UnsafeMutableRawBufferPointer(buffer).copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + 4 * n)])) }
                #else
                for i in 0..<n { buffer[i] = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 4 * i, as: UInt32.self))) }
                #endif
                initialized = n
            }
        }
    }
}
