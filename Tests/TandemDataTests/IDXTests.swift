// TandemDataTests: IDX images and labels: round trips, every header check, and folder loading.

import Foundation
import Testing
import TandemData

@Suite("IDX")
struct IDXTests {
    /// Writes a small images/labels pair (count images of 4x3) and returns the paths and contents.
    private func writePair(in dir: TempDir, count: Int = 6, gzip: Bool, labels: [UInt8]? = nil)
        throws -> (imagesPath: String, labelsPath: String, pixels: [UInt8], labelBytes: [UInt8]) {
        let suffix = gzip ? ".gz" : ""
        let pixels = patternBytes(count * 4 * 3, seed: count)
        let labelBytes = labels ?? (0..<count).map { UInt8($0 % 10) }
        let imagesPath = dir.file("images-idx3-ubyte" + suffix), labelsPath = dir.file("labels-idx1-ubyte" + suffix)
        try IDX.writeImages(imagesPath, count: count, height: 4, width: 3, pixels: pixels, gzip: gzip)
        try IDX.writeLabels(labelsPath, labels: labelBytes, gzip: gzip)
        return (imagesPath, labelsPath, pixels, labelBytes)
    }

    // MARK: - Round trips

    @Test("raw and gzip files round trip through write, read and load", arguments: [false, true])
    func roundTrip(gzip: Bool) throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, count: 7, gzip: gzip)

        let images = try IDX.readImages(pair.imagesPath)
        #expect(images.count == 7 && images.height == 4 && images.width == 3)
        #expect(images.pixels == pair.pixels)
        #expect(try IDX.readLabels(pair.labelsPath) == pair.labelBytes)

        let set = try IDX.load(images: pair.imagesPath, labels: pair.labelsPath)
        #expect(set.count == 7 && set.channels == 1 && set.height == 4 && set.width == 3 && set.classes == 10)
        #expect(set.sampleSize == 12)
        #expect(set.pixels == pair.pixels)
        #expect(set.labels == pair.labelBytes.map { Int32($0) })
    }

    @Test("the raw file is byte-exact IDX and the gzip file is real gzip of it")
    func onDiskFormat() throws {
        let dir = try TempDir()
        let pixels: [UInt8] = [1, 2, 3, 4, 5, 6]
        try IDX.writeImages(dir.file("a"), count: 1, height: 2, width: 3, pixels: pixels, gzip: false)
        try IDX.writeImages(dir.file("a.gz"), count: 1, height: 2, width: 3, pixels: pixels, gzip: true)
        let expected = idxHeader(magic: 0x803, dims: [1, 2, 3]) + pixels
        #expect(try readBytes(dir.file("a")) == expected)
        #expect(try readBytes(dir.file("a.gz")).prefix(2) == [0x1f, 0x8b])
        #expect(try zlibGunzip(dir.file("a.gz")) == expected)

        try IDX.writeLabels(dir.file("l"), labels: [9, 0, 4], gzip: false)
        #expect(try readBytes(dir.file("l")) == idxHeader(magic: 0x801, dims: [3]) + [9, 0, 4])
    }

    @Test("files gzipped by zlib (not by us) load")
    func zlibGzipped() throws {
        let dir = try TempDir()
        let pixels = patternBytes(2 * 5 * 5)
        try zlibGzip(idxHeader(magic: 0x803, dims: [2, 5, 5]) + pixels, to: dir.file("i.gz"))
        try zlibGzip(idxHeader(magic: 0x801, dims: [2]) + [3, 8], to: dir.file("l.gz"))
        let set = try IDX.load(images: dir.file("i.gz"), labels: dir.file("l.gz"))
        #expect(set.pixels == pixels && set.labels == [3, 8])
    }

    // MARK: - Broken files

    @Test("a truncated raw file is an error naming the file and sizes")
    func truncatedRaw() throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, count: 5, gzip: false)
        let whole = try readBytes(pair.imagesPath)  // 16 + 60 bytes
        try writeBytes(Array(whole.dropLast(7)), to: pair.imagesPath)
        #expect(dataErrorMessage { try IDX.readImages(pair.imagesPath) }
            == "\(pair.imagesPath): truncated: header says 5x4x3 images = 76 bytes with the header, file has 69")

        try writeBytes(Array(whole.prefix(10)), to: pair.imagesPath)
        #expect(dataErrorMessage { try IDX.readImages(pair.imagesPath) }.hasPrefix("\(pair.imagesPath): truncated: 10 bytes"))
        try writeBytes([0, 0], to: pair.imagesPath)
        #expect(dataErrorMessage { try IDX.readImages(pair.imagesPath) }.hasPrefix("\(pair.imagesPath): truncated: 2 bytes"))

        let labels = try readBytes(pair.labelsPath)
        try writeBytes(Array(labels.dropLast()), to: pair.labelsPath)
        #expect(dataErrorMessage { try IDX.readLabels(pair.labelsPath) }.hasPrefix("\(pair.labelsPath): truncated: header says 5 labels"))
    }

    @Test("a gzip file cut in half is a truncated-gzip error, not short data")
    func truncatedGzip() throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, count: 300, gzip: true)
        let whole = try readBytes(pair.imagesPath)
        try writeBytes(Array(whole.prefix(whole.count / 2)), to: pair.imagesPath)
        #expect(dataErrorMessage { try IDX.readImages(pair.imagesPath) }.hasPrefix("\(pair.imagesPath): truncated gzip data"))
        #expect(dataErrorMessage { try IDX.load(images: pair.imagesPath, labels: pair.labelsPath) }.hasPrefix("\(pair.imagesPath): "))
    }

    @Test("a complete gzip stream holding a truncated IDX file says so")
    func gzipOfTruncatedIDX() throws {
        let dir = try TempDir()
        let path = dir.file("short.gz")
        try zlibGzip(idxHeader(magic: 0x803, dims: [2, 2, 2]) + [1, 2, 3], to: path)
        #expect(dataErrorMessage { try IDX.readImages(path) }
            == "\(path): truncated: header says 2x2x2 images = 24 bytes with the header, file has 19 after gunzip")
    }

    @Test("a wrong magic is reported in hex with the expected one")
    func wrongMagic() throws {
        let dir = try TempDir()
        let path = dir.file("train-images-idx3-ubyte.gz")
        try zlibGzip([UInt8](repeating: 0, count: 40), to: path)
        #expect(dataErrorMessage { try IDX.readImages(path) }
            == "\(path): bad IDX magic 0x00000000 (expected 0x00000803 for unsigned-byte images)")

        // Labels and images swapped.
        let pair = try writePair(in: dir, gzip: false)
        #expect(dataErrorMessage { try IDX.readLabels(pair.imagesPath) } == "\(pair.imagesPath): bad IDX magic 0x00000803 "
            + "(expected 0x00000801 for unsigned-byte labels; this looks like an IDX images file)")
        #expect(dataErrorMessage { try IDX.load(images: pair.labelsPath, labels: pair.imagesPath) }
            .hasPrefix("\(pair.labelsPath): bad IDX magic 0x00000801"))

        // Float data (type 0x0D) is not accepted either.
        try writeBytes(idxHeader(magic: 0xD03, dims: [1, 1, 1]) + [0, 0, 0, 0], to: path)
        #expect(dataErrorMessage { try IDX.readImages(path) }.contains("bad IDX magic 0x00000D03"))
    }

    @Test("a zero dimension is named", arguments: [(0, "image count"), (1, "rows"), (2, "columns")])
    func zeroDimension(index: Int, field: String) throws {
        let dir = try TempDir()
        var dims: [UInt32] = [2, 3, 4]
        dims[index] = 0
        let path = dir.file("zero-idx3-ubyte")
        try writeBytes(idxHeader(magic: 0x803, dims: dims) + patternBytes(24), to: path)
        #expect(dataErrorMessage { try IDX.readImages(path) } == "\(path): \(field) is 0 in the IDX header")

        try writeBytes(idxHeader(magic: 0x801, dims: [0]), to: path)
        #expect(dataErrorMessage { try IDX.readLabels(path) } == "\(path): label count is 0 in the IDX header")
    }

    @Test("huge dimensions are rejected without overflow")
    func hugeDimensions() throws {
        let dir = try TempDir()
        let path = dir.file("huge")
        for dims: [UInt32] in [[.max, .max, .max], [65536, 65536, 1], [1, 1 << 16, 1 << 15 + 1]] {
            try writeBytes(idxHeader(magic: 0x803, dims: dims) + [1, 2, 3], to: path)
            #expect(dataErrorMessage { try IDX.readImages(path) }.hasSuffix("images, over the 2 GiB limit"))
        }
        try writeBytes(idxHeader(magic: 0x801, dims: [.max]) + [1, 2, 3], to: path)
        #expect(dataErrorMessage { try IDX.readLabels(path) } == "\(path): header says 4294967295 labels, over the 2 GiB limit")
        // Large but under the limit: a plain truncation, without allocating what the header claims.
        try writeBytes(idxHeader(magic: 0x801, dims: [1 << 30]) + [1, 2, 3], to: path)
        #expect(dataErrorMessage { try IDX.readLabels(path) }
            == "\(path): truncated: header says 1073741824 labels = 1073741832 bytes with the header, file has 11")
    }

    @Test("trailing bytes after the payload are an error")
    func trailingData() throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, count: 2, gzip: false)
        try writeBytes(try readBytes(pair.imagesPath) + [0, 0, 0], to: pair.imagesPath)
        #expect(dataErrorMessage { try IDX.readImages(pair.imagesPath) }
            == "\(pair.imagesPath): 3 bytes of trailing data: header says 2x4x3 images = 40 bytes with the header, file has 43")
        try writeBytes(try readBytes(pair.labelsPath) + [7], to: pair.labelsPath)
        #expect(dataErrorMessage { try IDX.readLabels(pair.labelsPath) }.hasPrefix("\(pair.labelsPath): 1 bytes of trailing data"))
    }

    // MARK: - Pairing images with labels

    @Test("image and label counts must agree")
    func countMismatch() throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, count: 6, gzip: false)
        try IDX.writeLabels(pair.labelsPath, labels: [1, 2, 3, 4, 5], gzip: false)
        #expect(dataErrorMessage { try IDX.load(images: pair.imagesPath, labels: pair.labelsPath) }
            == "\(pair.labelsPath): 5 labels but images-idx3-ubyte has 6 images")
    }

    @Test("labels must be below the class count")
    func labelOutOfRange() throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, count: 8, gzip: true, labels: [0, 1, 2, 3, 4, 12, 9, 200])
        #expect(dataErrorMessage { try IDX.load(images: pair.imagesPath, labels: pair.labelsPath) }
            == "\(pair.labelsPath): label 12 at index 5 is out of range 0..<10")
        #expect(dataErrorMessage { try IDX.load(images: pair.imagesPath, labels: pair.labelsPath, classes: 4) }
            == "\(pair.labelsPath): label 4 at index 4 is out of range 0..<4")
        let set = try IDX.load(images: pair.imagesPath, labels: pair.labelsPath, classes: 256)
        #expect(set.classes == 256 && set.labels.last == 200)
    }

    @Test("a missing images or labels file is named")
    func missingFile() throws {
        let dir = try TempDir()
        let pair = try writePair(in: dir, gzip: false)
        let missing = dir.file("missing-labels-idx1-ubyte")
        #expect(dataErrorMessage { try IDX.load(images: pair.imagesPath, labels: missing) } == "\(missing): file does not exist")
        #expect(dataErrorMessage { try IDX.readImages(missing) } == "\(missing): file does not exist")
    }

    // MARK: - Folders

    /// Writes an MNIST-layout folder: 5 train and 3 test images of 2x2, under `names(split, kind)`.
    private func writeFolder(_ folder: String, gzip: Bool, name: (String, String) -> String) throws {
        for (split, count) in [("train", 5), ("t10k", 3)] {
            try IDX.writeImages(folder + "/" + name(split, "images-idx3"), count: count, height: 2, width: 2,
                                pixels: patternBytes(count * 4, seed: count), gzip: gzip)
            try IDX.writeLabels(folder + "/" + name(split, "labels-idx1"), labels: (0..<count).map { UInt8($0) }, gzip: gzip)
        }
    }

    @Test("loadDirectory finds raw, .gz and '.idx'-named files", arguments: [
        (false, false), (true, false), (false, true), (true, true),
    ])
    func loadDirectory(gzip: Bool, dotted: Bool) throws {
        let dir = try TempDir()
        try writeFolder(dir.path, gzip: gzip) { split, kind in
            (dotted ? "\(split)-\(kind.replacingOccurrences(of: "-idx", with: ".idx"))" : "\(split)-\(kind)")
                + "-ubyte" + (gzip ? ".gz" : "")
        }
        let (train, test) = try IDX.loadDirectory(dir.path + "/")
        #expect(train.count == 5 && test.count == 3)
        #expect(train.height == 2 && train.width == 2 && train.channels == 1 && train.classes == 10)
        #expect(train.pixels == patternBytes(20, seed: 5) && test.pixels == patternBytes(12, seed: 3))
        #expect(train.labels == [0, 1, 2, 3, 4] && test.labels == [0, 1, 2])
    }

    @Test("loadDirectory names a missing folder, a file given as folder, and a missing file")
    func loadDirectoryErrors() throws {
        let dir = try TempDir()
        let nope = dir.file("nope")
        #expect(dataErrorMessage { try IDX.loadDirectory(nope) } == "\(nope): dataset folder does not exist")

        try writeBytes([1], to: dir.file("plain"))
        #expect(dataErrorMessage { try IDX.loadDirectory(dir.file("plain")) }
            == "\(dir.file("plain")): is a file, expected a dataset folder")

        try writeFolder(dir.path, gzip: true) { split, kind in "\(split)-\(kind)-ubyte.gz" }
        try FileManager.default.removeItem(atPath: dir.file("t10k-labels-idx1-ubyte.gz"))
        #expect(dataErrorMessage { try IDX.loadDirectory(dir.path) } == "\(dir.path): no t10k-labels-idx1-ubyte or "
            + "t10k-labels-idx1-ubyte.gz in the dataset folder (also tried t10k-labels.idx1-ubyte[.gz])")
    }
}
