// TandemDataTests: readMaybeGzip on raw files, zlib-written gzip, and broken gzip streams.

import Foundation
import Testing
import TandemData

@Suite("readMaybeGzip")
struct GzipTests {
    @Test("raw files come back unchanged, including ones that start like gzip but are not")
    func rawPassthrough() throws {
        let dir = try TempDir()
        let bytes = patternBytes(5000)
        try writeBytes(bytes, to: dir.file("raw.bin"))
        #expect(try readMaybeGzip(dir.file("raw.bin")) == bytes)

        let almost: [UInt8] = [0x1f, 0x8c, 1, 2, 3]
        try writeBytes(almost, to: dir.file("almost.bin"))
        #expect(try readMaybeGzip(dir.file("almost.bin")) == almost)

        try writeBytes([], to: dir.file("empty.bin"))
        #expect(try readMaybeGzip(dir.file("empty.bin")) == [])
    }

    @Test("a file gzipped by zlib's gzwrite is decompressed whatever its name")
    func zlibWritten() throws {
        let dir = try TempDir()
        let bytes = patternBytes(300_000, seed: 3)
        try zlibGzip(bytes, to: dir.file("data.bin"))
        #expect(try readBytes(dir.file("data.bin")).prefix(2) == [0x1f, 0x8b])
        #expect(try readMaybeGzip(dir.file("data.bin")) == bytes)
    }

    @Test("concatenated gzip members decompress to the concatenation; trailing zero padding is ignored")
    func multiMember() throws {
        let dir = try TempDir()
        let first = patternBytes(1000, seed: 1), second = patternBytes(2000, seed: 2)
        try zlibGzip(first, to: dir.file("a.gz"))
        try zlibGzip(second, to: dir.file("b.gz"))
        let joined = try readBytes(dir.file("a.gz")) + readBytes(dir.file("b.gz"))
        try writeBytes(joined, to: dir.file("ab.gz"))
        #expect(try readMaybeGzip(dir.file("ab.gz")) == first + second)

        try writeBytes(joined + [0, 0, 0, 0], to: dir.file("padded.gz"))
        #expect(try readMaybeGzip(dir.file("padded.gz")) == first + second)
    }

    @Test("a gzip stream cut in half is reported as truncated, not returned short")
    func truncatedStream() throws {
        let dir = try TempDir()
        try zlibGzip(patternBytes(200_000, seed: 5), to: dir.file("full.gz"))
        let whole = try readBytes(dir.file("full.gz"))
        let path = dir.file("half.gz")
        try writeBytes(Array(whole.prefix(whole.count / 2)), to: path)
        let message = dataErrorMessage { try readMaybeGzip(path) }
        #expect(message.hasPrefix("\(path): truncated gzip data"))

        // Cutting only the 8-byte CRC/length trailer must be caught too.
        try writeBytes(Array(whole.dropLast(4)), to: path)
        #expect(dataErrorMessage { try readMaybeGzip(path) }.hasPrefix("\(path): truncated gzip data"))

        // Just the magic.
        try writeBytes([0x1f, 0x8b], to: path)
        #expect(dataErrorMessage { try readMaybeGzip(path) }.hasPrefix("\(path): truncated gzip data"))
    }

    @Test("corrupt deflate data or a wrong checksum is reported with zlib's reason")
    func corruptStream() throws {
        let dir = try TempDir()
        try zlibGzip(patternBytes(50_000, seed: 9), to: dir.file("good.gz"))
        var bytes = try readBytes(dir.file("good.gz"))
        let path = dir.file("bad.gz")

        var flipped = bytes
        let tail = flipped.count - 6  // inside the CRC32 of the trailer
        flipped[tail] ^= 0xff
        try writeBytes(flipped, to: path)
        #expect(dataErrorMessage { try readMaybeGzip(path) }.hasPrefix("\(path): corrupt gzip data (zlib: "))

        bytes[3] = 0xe0  // reserved FLG bits must be zero
        try writeBytes(bytes, to: path)
        #expect(dataErrorMessage { try readMaybeGzip(path) }.hasPrefix("\(path): corrupt gzip data (zlib: "))
    }

    @Test("non-gzip bytes after the gzip stream are an error")
    func trailingGarbage() throws {
        let dir = try TempDir()
        try zlibGzip(patternBytes(1000), to: dir.file("x.gz"))
        let path = dir.file("x.gz")
        try writeBytes(try readBytes(path) + [1, 2, 3], to: path)
        #expect(dataErrorMessage { try readMaybeGzip(path) }.contains("3 bytes of trailing data after the gzip stream"))
    }

    @Test("a missing file and a folder are named in the error")
    func missingAndFolder() throws {
        let dir = try TempDir()
        let missing = dir.file("nope.gz")
        #expect(dataErrorMessage { try readMaybeGzip(missing) } == "\(missing): file does not exist")
        #expect(dataErrorMessage { try readMaybeGzip(dir.path) } == "\(dir.path): is a folder, expected a file")
    }
}
