// TandemDataTests: CIFAR-10 / CIFAR-100 binaries: layout, round trips, size and label checks, folder loading.

import Foundation
import Testing
import TandemData

@Suite("CIFAR")
struct CIFARTests {
    /// A 3x32x32 set of `count` images with varied pixels and the given labels.
    private func makeSet(_ labels: [Int32], classes: Int, seed: Int = 0) -> ImageSet {
        ImageSet(count: labels.count, channels: 3, height: 32, width: 32, classes: classes,
                 pixels: patternBytes(labels.count * 3072, seed: seed), labels: labels)
    }

    @Test("a hand-made CIFAR-10 record maps its R, G, B planes to channels 0, 1, 2")
    func recordLayout() throws {
        let dir = try TempDir()
        let path = dir.file("one.bin")
        var record: [UInt8] = [7]
        for plane in 0..<3 { record += (0..<1024).map { UInt8(truncatingIfNeeded: plane * 50 + $0 % 32) } }
        try writeBytes(record, to: path)
        let set = try CIFAR.read(files: [path], variant: .cifar10)
        #expect(set.count == 1 && set.channels == 3 && set.height == 32 && set.width == 32 && set.classes == 10)
        #expect(set.labels == [7])
        #expect(set.pixels == Array(record.dropFirst()))
        // Green plane, row 5, column 9 (NCHW offset (1 * 32 + 5) * 32 + 9).
        #expect(set.pixels[(1 * 32 + 5) * 32 + 9] == 59)
    }

    @Test("CIFAR-10 round trips, and several files concatenate in order")
    func cifar10RoundTrip() throws {
        let dir = try TempDir()
        let first = makeSet([0, 9, 3], classes: 10, seed: 1), second = makeSet([5, 5], classes: 10, seed: 2)
        try CIFAR.write(dir.file("a.bin"), set: first, variant: .cifar10)
        try CIFAR.write(dir.file("b.bin"), set: second, variant: .cifar10)
        #expect(try readBytes(dir.file("a.bin")).count == 3 * 3073)

        let one = try CIFAR.read(files: [dir.file("a.bin")], variant: .cifar10)
        #expect(one.pixels == first.pixels && one.labels == first.labels)

        let both = try CIFAR.read(files: [dir.file("a.bin"), dir.file("b.bin")], variant: .cifar10)
        #expect(both.count == 5)
        #expect(both.labels == [0, 9, 3, 5, 5])
        #expect(both.pixels == first.pixels + second.pixels)
    }

    @Test("CIFAR-100 round trips with fine and coarse labels")
    func cifar100RoundTrip() throws {
        let dir = try TempDir()
        let fine = makeSet([0, 99, 42, 57], classes: 100, seed: 4)
        try CIFAR.write(dir.file("fine.bin"), set: fine, variant: .cifar100Fine)
        #expect(try readBytes(dir.file("fine.bin")).count == 4 * 3074)

        let asFine = try CIFAR.read(files: [dir.file("fine.bin")], variant: .cifar100Fine)
        #expect(asFine.classes == 100 && asFine.labels == fine.labels && asFine.pixels == fine.pixels)
        let asCoarse = try CIFAR.read(files: [dir.file("fine.bin")], variant: .cifar100Coarse)
        #expect(asCoarse.classes == 20 && asCoarse.labels == [0, 19, 2, 17] && asCoarse.pixels == fine.pixels)

        let coarse = makeSet([19, 0, 7], classes: 20, seed: 6)
        try CIFAR.write(dir.file("coarse.bin"), set: coarse, variant: .cifar100Coarse)
        let back = try CIFAR.read(files: [dir.file("coarse.bin")], variant: .cifar100Coarse)
        #expect(back.labels == coarse.labels && back.pixels == coarse.pixels)
    }

    @Test("a size that is not a whole number of records is an error naming the record size")
    func wrongSize() throws {
        let dir = try TempDir()
        let path = dir.file("bad.bin")
        try writeBytes(patternBytes(2 * 3073 + 5).map { $0 % 10 }, to: path)
        #expect(dataErrorMessage { try CIFAR.read(files: [path], variant: .cifar10) } == "\(path): size 6151 bytes is not "
            + "a multiple of the 3073-byte CIFAR-10 record (1 label byte + 3072 pixel bytes)")

        // Three CIFAR-10 records are not a whole number of CIFAR-100 records.
        try CIFAR.write(path, set: makeSet([1, 2, 3], classes: 10), variant: .cifar10)
        #expect(dataErrorMessage { try CIFAR.read(files: [path], variant: .cifar100Fine) }
            .hasPrefix("\(path): size 9219 bytes is not a multiple of the 3074-byte CIFAR-100 record (2 label bytes"))

        try writeBytes([], to: path)
        #expect(dataErrorMessage { try CIFAR.read(files: [path], variant: .cifar10) }.hasPrefix("\(path): file is empty"))
    }

    @Test("labels out of range are named with their record")
    func labelOutOfRange() throws {
        let dir = try TempDir()
        let path = dir.file("labels.bin")
        try CIFAR.write(path, set: makeSet([1, 2, 3, 4], classes: 10), variant: .cifar10)
        var bytes = try readBytes(path)
        bytes[2 * 3073] = 10
        try writeBytes(bytes, to: path)
        #expect(dataErrorMessage { try CIFAR.read(files: [path], variant: .cifar10) }
            == "\(path): label 10 in record 2 is out of range 0..<10")

        try CIFAR.write(path, set: makeSet([1, 2, 3], classes: 100), variant: .cifar100Fine)
        bytes = try readBytes(path)
        bytes[1 * 3074 + 1] = 100
        try writeBytes(bytes, to: path)
        #expect(dataErrorMessage { try CIFAR.read(files: [path], variant: .cifar100Fine) }
            == "\(path): fine label 100 in record 1 is out of range 0..<100")
        bytes[1 * 3074 + 1] = 5
        bytes[2 * 3074] = 20
        try writeBytes(bytes, to: path)
        #expect(dataErrorMessage { try CIFAR.read(files: [path], variant: .cifar100Fine) }
            == "\(path): coarse label 20 in record 2 is out of range 0..<20")
    }

    // MARK: - Folders

    @Test("CIFAR-10 folder in the archive's subfolder, with some batches gzipped")
    func loadDirectory10() throws {
        let dir = try TempDir()
        let folder = try dir.folder("cifar-10-batches-bin")
        var expectedLabels: [Int32] = []
        for batch in 1...5 {
            let labels = (0..<2).map { Int32((batch + $0) % 10) }
            expectedLabels += labels
            try CIFAR.write(folder + "/data_batch_\(batch).bin", set: makeSet(labels, classes: 10, seed: batch), variant: .cifar10)
        }
        // Batch 3 gzipped only (by zlib), to check the .gz fallback.
        let batch3 = folder + "/data_batch_3.bin"
        try zlibGzip(try readBytes(batch3), to: batch3 + ".gz")
        try FileManager.default.removeItem(atPath: batch3)
        try CIFAR.write(folder + "/test_batch.bin", set: makeSet([8], classes: 10, seed: 9), variant: .cifar10)

        let (train, test) = try CIFAR.loadDirectory(dir.path, variant: .cifar10)
        #expect(train.count == 10 && test.count == 1)
        #expect(train.labels == expectedLabels && test.labels == [8])
        #expect(train.pixels == (1...5).flatMap { patternBytes(2 * 3072, seed: $0) })

        // The subfolder itself works too.
        #expect(try CIFAR.loadDirectory(folder, variant: .cifar10).train.count == 10)

        try FileManager.default.removeItem(atPath: folder + "/data_batch_4.bin")
        #expect(dataErrorMessage { try CIFAR.loadDirectory(dir.path, variant: .cifar10) } == "\(folder): no data_batch_4.bin "
            + "(or .gz); CIFAR-10 needs data_batch_1.bin, data_batch_2.bin, data_batch_3.bin, data_batch_4.bin, "
            + "data_batch_5.bin, test_batch.bin")
    }

    @Test("CIFAR-100 folder with the files directly inside")
    func loadDirectory100() throws {
        let dir = try TempDir()
        try CIFAR.write(dir.file("train.bin"), set: makeSet([10, 20, 30], classes: 100), variant: .cifar100Fine)
        try CIFAR.write(dir.file("test.bin"), set: makeSet([99], classes: 100), variant: .cifar100Fine)
        let fine = try CIFAR.loadDirectory(dir.path, variant: .cifar100Fine)
        #expect(fine.train.labels == [10, 20, 30] && fine.test.labels == [99] && fine.train.classes == 100)
        let coarse = try CIFAR.loadDirectory(dir.path, variant: .cifar100Coarse)
        #expect(coarse.train.labels == [10, 0, 10] && coarse.test.labels == [19] && coarse.test.classes == 20)

        try FileManager.default.removeItem(atPath: dir.file("test.bin"))
        #expect(dataErrorMessage { try CIFAR.loadDirectory(dir.path, variant: .cifar100Fine) }
            .hasPrefix("\(dir.path): no test.bin (or .gz)"))
    }

    @Test("a missing or empty CIFAR folder is named")
    func loadDirectoryMissing() throws {
        let dir = try TempDir()
        let nope = dir.file("nope")
        #expect(dataErrorMessage { try CIFAR.loadDirectory(nope, variant: .cifar10) } == "\(nope): dataset folder does not exist")
        #expect(dataErrorMessage { try CIFAR.loadDirectory(dir.path, variant: .cifar100Fine) }
            == "\(dir.path): no train.bin (or .gz) here or in cifar-100-binary/ for CIFAR-100")
    }
}
