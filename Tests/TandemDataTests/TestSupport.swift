// TandemDataTests: shared helpers: a scratch folder per test, byte-level file helpers, and a reference gzip
// through zlib's own gz* API so the reader is checked against an implementation other than ours.

import CZlib
import Foundation
import Testing
import TandemData

/// A fresh folder under the system temp directory, removed when the value goes away.
final class TempDir {
    let path: String

    init() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("tandem-data-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        path = url.path
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// `path/name`.
    func file(_ name: String) -> String { path + "/" + name }

    /// Creates a subfolder and returns its path.
    func folder(_ name: String) throws -> String {
        try FileManager.default.createDirectory(atPath: file(name), withIntermediateDirectories: true)
        return file(name)
    }
}

// MARK: - Bytes on disk

/// Writes `bytes` to `path` exactly.
func writeBytes(_ bytes: [UInt8], to path: String) throws {
    try Data(bytes).write(to: URL(fileURLWithPath: path))
}

/// Reads `path` exactly, without gunzipping.
func readBytes(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
}

/// A big-endian IDX header: the magic then each dimension.
func idxHeader(magic: UInt32, dims: [UInt32]) -> [UInt8] {
    ([magic] + dims).flatMap { value in
        [UInt8(value >> 24), UInt8((value >> 16) & 0xff), UInt8((value >> 8) & 0xff), UInt8(value & 0xff)]
    }
}

/// Deterministic, varied bytes (so that a shifted or reordered copy would not compare equal).
func patternBytes(_ count: Int, seed: Int = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &+ seed) &* 131 &+ ($0 >> 8) &* 7 &+ seed) }
}

// MARK: - Reference gzip (zlib's gz* API)

/// Gzips `bytes` into `path` with zlib's gzopen/gzwrite.
func zlibGzip(_ bytes: [UInt8], to path: String) throws {
    let file = try #require(gzopen(path, "wb"))
    let written = bytes.withUnsafeBytes { gzwrite(file, $0.baseAddress, UInt32($0.count)) }
    let closed = gzclose(file)
    try #require(Int(written) == bytes.count && closed == Z_OK, "gzwrite/gzclose failed for \(path)")
}

/// Gunzips `path` with zlib's gzopen/gzread.
func zlibGunzip(_ path: String) throws -> [UInt8] {
    let file = try #require(gzopen(path, "rb"))
    defer { gzclose(file) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let got = chunk.withUnsafeMutableBytes { gzread(file, $0.baseAddress, UInt32($0.count)) }
        try #require(got >= 0, "gzread failed for \(path)")
        if got == 0 { return result }
        result += chunk[0..<Int(got)]
    }
}

// MARK: - Errors

/// Runs `body`, requires it to throw a `DataError`, and returns the message.
func dataErrorMessage<T>(_ body: () throws -> T, sourceLocation: SourceLocation = #_sourceLocation) -> String {
    do {
        _ = try body()
        Issue.record("expected a DataError, got a result", sourceLocation: sourceLocation)
    } catch let error as DataError {
        #expect(!error.message.contains("\n"), "error message should be one line: \(error.message)", sourceLocation: sourceLocation)
        #expect(error.description == error.message, sourceLocation: sourceLocation)
        return error.message
    } catch {
        Issue.record("expected a DataError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
    return ""
}
