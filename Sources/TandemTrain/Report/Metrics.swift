// What a run writes to its output folder (rank 0 only): metrics.csv, summary.json, curves.svg.
// Files are written to a temporary name and renamed, so a reader never sees half a file.
import Foundation

/// One row of metrics.csv. Step rows carry the training loss and rate; eval rows the epoch's
/// train and test loss and accuracy. Empty cells where a column does not apply.
public struct MetricsRow: Sendable {
    public enum Kind: String, Sendable { case step, eval }
    public var kind: Kind
    public var epoch: Double
    public var step: Int
    public var trainLoss: Double?
    public var trainAccuracy: Double?
    public var testLoss: Double?
    public var testAccuracy: Double?
    public var lr: Double?
    public var imagesPerSecond: Double?
    public var wallSeconds: Double

    static let header = "kind,epoch,step,train_loss,train_accuracy,test_loss,test_accuracy,lr,images_per_second,wall_seconds"

    var csv: String {
        func f(_ v: Double?, _ digits: Int = 6) -> String { v.map { String(format: "%.\(digits)g", $0) } ?? "" }
        return [kind.rawValue, String(format: "%.4f", epoch), "\(step)", f(trainLoss), f(trainAccuracy), f(testLoss), f(testAccuracy),
                f(lr), f(imagesPerSecond, 5), String(format: "%.3f", wallSeconds)].joined(separator: ",")
    }
}

/// Writes a file atomically: temporary file in the same folder, fsync, rename.
public func writeAtomically(_ data: Data, to path: String) throws {
    let tmp = path + ".tmp-\(getpid())"
    guard FileManager.default.createFile(atPath: tmp, contents: data) else {
        throw ConfigError("\(path): cannot write (is the folder writable?)")
    }
    if let h = FileHandle(forWritingAtPath: tmp) { try? h.synchronize(); try? h.close() }
    if rename(tmp, path) != 0 {
        let reason = String(cString: strerror(errno))
        unlink(tmp)
        throw ConfigError("\(path): cannot write: \(reason)")
    }
}

/// The metrics log: appended as the run goes (so a crash keeps what was measured), one line per row.
public final class MetricsLog {
    public let path: String
    private let handle: FileHandle
    public private(set) var rows: [MetricsRow] = []

    public init(path: String) throws {
        self.path = path
        guard FileManager.default.createFile(atPath: path, contents: Data((MetricsRow.header + "\n").utf8)),
              let h = FileHandle(forWritingAtPath: path) else {
            throw ConfigError("\(path): cannot create the metrics file (is the output folder writable?)")
        }
        handle = h
        handle.seekToEndOfFile()
    }

    public func append(_ row: MetricsRow) {
        rows.append(row)
        handle.write(Data((row.csv + "\n").utf8))
    }

    deinit { try? handle.close() }
}

/// summary.json: the run's results, documented in the README.
public struct RunSummary: Codable, Sendable {
    public var config: String
    public var test_accuracy: Double
    public var test_loss: Double
    public var final_train_loss: Double
    public var epochs: Double
    public var steps: Int
    public var images_per_second: Double
    public var train_seconds: Double
    public var wall_seconds: Double
    public var world_size: Int
    public var threads: Int
    public var batch_size: Int
    public var param_norm: Double
    public var parameters: Int
    public var seed: UInt64
    /// Training seconds (evaluation excluded) when test accuracy first reached 90%, if it did.
    public var seconds_to_90: Double?
    /// With parallel.balance: each replica's share of a full global batch at the end.
    public var shares: [Int]? = nil
    /// With parallel.dynamic: the head fraction the steps ran with at the end (parallel.head auto's
    /// choice, once tuned).
    public var head_fraction: Double? = nil

    public func write(to path: String) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try writeAtomically(try enc.encode(self), to: path)
    }
}
