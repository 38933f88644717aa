// TandemDataTests: random byte mutations of valid files must give a consistent result or a DataError, never a crash.

import Foundation
import Testing
import TandemData

/// SplitMix64: a tiny seeded generator so that a failing mutation can be replayed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite("Fuzz")
struct FuzzTests {
    /// Mutates `bytes`: overwrite, header-targeted overwrite, truncate, or append.
    private func mutate(_ bytes: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var out = bytes
        switch rng.next() % 5 {
        case 0, 1:
            for _ in 0...(rng.next() % 4) where !out.isEmpty {
                out[Int(rng.next() % UInt64(out.count))] = UInt8(truncatingIfNeeded: rng.next())
            }
        case 2:
            // Header bytes (IDX header, CIFAR label, gzip header) are where sizes live.
            for _ in 0...(rng.next() % 3) where !out.isEmpty {
                out[Int(rng.next() % UInt64(min(out.count, 20)))] = [0x00, 0xff, 0x7f, 0x80][Int(rng.next() % 4)]
            }
        case 3:
            out.removeLast(Int(rng.next() % UInt64(out.count + 1)))
        default:
            out += (0..<(1 + rng.next() % 8)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        }
        return out
    }

    /// Runs `read` on `iterations` mutations of `original`; it must return something `valid` accepts or throw a DataError.
    private func fuzz<T>(_ original: [UInt8], seed: UInt64, iterations: Int,
                         read: (String) throws -> T, valid: (T) -> Bool) throws {
        let dir = try TempDir()
        let path = dir.file("fuzz")
        var rng = SplitMix64(state: seed)
        for iteration in 0..<iterations {
            let bytes = mutate(original, &rng)
            try writeBytes(bytes, to: path)
            do {
                let result = try read(path)
                #expect(valid(result), "seed \(seed) iteration \(iteration): inconsistent result")
            } catch let error as DataError {
                #expect(error.message.hasPrefix(path + ": "), "seed \(seed) iteration \(iteration): \(error.message)")
            }
        }
    }

    @Test("mutated IDX images, raw and gzip", arguments: [false, true])
    func idxImages(gzip: Bool) throws {
        let dir = try TempDir()
        try IDX.writeImages(dir.file("i"), count: 3, height: 5, width: 4, pixels: patternBytes(60), gzip: gzip)
        try fuzz(readBytes(dir.file("i")), seed: gzip ? 11 : 12, iterations: 400, read: IDX.readImages) { images in
            images.pixels.count == images.count * images.height * images.width && images.count > 0
        }
    }

    @Test("mutated IDX labels, raw and gzip", arguments: [false, true])
    func idxLabels(gzip: Bool) throws {
        let dir = try TempDir()
        try IDX.writeLabels(dir.file("l"), labels: [1, 2, 3, 4, 5], gzip: gzip)
        try fuzz(readBytes(dir.file("l")), seed: gzip ? 21 : 22, iterations: 400, read: IDX.readLabels) { !$0.isEmpty }
    }

    @Test("mutated CIFAR files", arguments: [CIFAR.Variant.cifar10, .cifar100Fine, .cifar100Coarse])
    func cifar(variant: CIFAR.Variant) throws {
        let dir = try TempDir()
        let labels: [Int32] = variant == .cifar100Coarse ? [3, 19] : [9, 0]
        let set = ImageSet(count: 2, channels: 3, height: 32, width: 32, classes: variant == .cifar100Coarse ? 20 : 100,
                           pixels: patternBytes(2 * 3072), labels: labels)
        try CIFAR.write(dir.file("c"), set: set, variant: variant)
        try fuzz(readBytes(dir.file("c")), seed: 31, iterations: 300, read: { try CIFAR.read(files: [$0], variant: variant) }) {
            result in result.pixels.count == result.count * 3072 && result.labels.count == result.count
                && result.labels.allSatisfy { $0 >= 0 && Int($0) < result.classes }
        }
    }
}
