// From dataset bytes to a network's input. Images stay as bytes in memory; each batch is
// converted on the fly through a per-channel lookup table ((byte/255 - mean) / std), with the
// random crop and flip drawn from (seed, epoch, sample) so that a sample is augmented the same
// way whichever rank or thread loads it. The epoch's order is a seeded permutation that every
// rank draws identically; rank r of R takes its slice of every global batch.
import Foundation
import TandemCore
import TandemData

public final class DataPipeline {
    public let train: ImageSet
    public let test: ImageSet
    public let shape: Shape
    public let mean: [Double]
    public let std: [Double]
    public let config: DataConfig
    /// lut[c * 256 + byte] = normalised value.
    private let lut: [Float]
    /// Training samples in this epoch's order.
    public private(set) var order: [Int32]

    /// Loads the dataset the config names.
    public convenience init(config: DataConfig) throws {
        let sets: (train: ImageSet, test: ImageSet)
        switch config.format {
        case .idx: sets = try IDX.loadDirectory(config.path)
        case .cifar10: sets = try CIFAR.loadDirectory(config.path, variant: .cifar10)
        case .cifar100: sets = try CIFAR.loadDirectory(config.path, variant: .cifar100Fine)
        }
        try self.init(train: sets.train, test: sets.test, config: config)
    }

    /// Random images and labels of the given shape (the benchmark's synthetic data).
    public static func synthetic(shape: Shape, classes: Int, train: Int, test: Int, seed: UInt64) throws -> DataPipeline {
        var rng = SeededGenerator(seed: seed)
        func make(_ n: Int) -> ImageSet {
            ImageSet(count: n, channels: shape.channels, height: shape.height, width: shape.width, classes: classes,
                     pixels: (0..<(n * shape.count)).map { _ in UInt8(truncatingIfNeeded: rng.next()) },
                     labels: (0..<n).map { _ in Int32(rng.below(classes)) })
        }
        var c = DataConfig()
        c.mean = Array(repeating: 0.5, count: shape.channels)
        c.std = Array(repeating: 0.29, count: shape.channels)
        c.path = "(synthetic)"
        return try DataPipeline(train: make(train), test: make(test), config: c)
    }

    public init(train trainSet: ImageSet, test testSet: ImageSet, config: DataConfig) throws {
        self.config = config
        train = config.trainLimit > 0 ? trainSet.prefix(config.trainLimit) : trainSet
        test = config.testLimit > 0 ? testSet.prefix(config.testLimit) : testSet
        shape = Shape(train.channels, train.height, train.width)
        guard test.channels == train.channels, test.height == train.height, test.width == train.width else {
            throw DataError("\(config.path): test images are \(test.channels)x\(test.height)x\(test.width) but training images are \(shape)")
        }
        if let m = config.mean, let s = config.std {
            guard m.count == shape.channels, s.count == shape.channels else {
                throw ConfigError("data.mean and data.std: expected \(shape.channels) values (one per channel), got \(m.count) and \(s.count)")
            }
            mean = m; std = s
        } else {
            (mean, std) = DataPipeline.statistics(train)
        }
        var table = [Float](repeating: 0, count: shape.channels * 256)
        for c in 0..<shape.channels {
            for b in 0..<256 { table[c * 256 + b] = Float((Double(b) / 255 - mean[c]) / std[c]) }
        }
        lut = table
        order = (0..<Int32(train.count)).map { $0 }
    }

    /// Per-channel mean and standard deviation of the training pixels (scaled to [0, 1]).
    static func statistics(_ set: ImageSet) -> ([Double], [Double]) {
        let plane = set.height * set.width
        var mean = [Double](repeating: 0, count: set.channels), std = mean
        set.pixels.withUnsafeBufferPointer { px in
            for c in 0..<set.channels {
                var hist = [Int](repeating: 0, count: 256)
                for i in 0..<set.count {
                    let base = (i * set.channels + c) * plane
                    for j in 0..<plane { hist[Int(px[base + j])] += 1 }
                }
                let n = Double(set.count * plane)
                var s = 0.0, s2 = 0.0
                for b in 0..<256 { let v = Double(b) / 255; s += Double(hist[b]) * v; s2 += Double(hist[b]) * v * v }
                mean[c] = s / n
                std[c] = max((s2 / n - mean[c] * mean[c]).squareRoot(), 1e-6)
            }
        }
        return (mean, std)
    }

    /// Draws epoch `epoch`'s order of the training set (Fisher-Yates from the seed; the same on every rank).
    public func shuffle(epoch: Int, seed: UInt64) {
        var rng = SeededGenerator(seed: seed &+ 0x5EED_0000 &+ UInt64(epoch) &* 0x9E37_79B9)
        for i in stride(from: order.count - 1, to: 0, by: -1) {
            let j = rng.below(i + 1)
            order.swapAt(i, j)
        }
    }

    /// Loads training positions `positions` of the current order into `input` / `labels`, augmented.
    public func loadTrain(_ positions: Range<Int>, epoch: Int, seed: UInt64, input: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>) {
        let augment = config.cropPadding > 0 || config.flip
        for (k, pos) in positions.enumerated() {
            let index = Int(order[pos])
            labels[k] = train.labels[index]
            let dst = input + k * shape.count
            if augment {
                let bits = counterRandom(seed, 0xA116, UInt64(epoch), UInt64(index))
                let span = 2 * config.cropPadding + 1
                let dy = Int(bits % UInt64(span)) - config.cropPadding
                let dx = Int((bits >> 16) % UInt64(span)) - config.cropPadding
                let flip = config.flip && (bits >> 40) & 1 == 1
                convert(train, index, dst, dy: dy, dx: dx, flip: flip)
            } else {
                convert(train, index, dst, dy: 0, dx: 0, flip: false)
            }
        }
    }

    /// Loads test samples `indices` (in dataset order, not augmented).
    public func loadTest(_ indices: Range<Int>, input: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>) {
        for (k, index) in indices.enumerated() {
            labels[k] = test.labels[index]
            convert(test, index, input + k * shape.count, dy: 0, dx: 0, flip: false)
        }
    }

    /// Converts one image, shifted by (dy, dx) (pixels shifted in from outside are 0) and optionally mirrored.
    private func convert(_ set: ImageSet, _ index: Int, _ dst: UnsafeMutablePointer<Float>, dy: Int, dx: Int, flip: Bool) {
        let h = shape.height, w = shape.width, plane = h * w
        set.pixels.withUnsafeBufferPointer { px in
            lut.withUnsafeBufferPointer { table in
                let src = px.baseAddress! + index * shape.count
                for c in 0..<shape.channels {
                    let t = table.baseAddress! + c * 256
                    let s = src + c * plane, d = dst + c * plane
                    if dy == 0 && dx == 0 && !flip {
                        for i in 0..<plane { d[i] = t[Int(s[i])] }
                        continue
                    }
                    let zero = t[0]
                    for i in 0..<h {
                        let si = i + dy
                        let row = d + i * w
                        if si < 0 || si >= h { row.update(repeating: zero, count: w); continue }
                        for j in 0..<w {
                            let sj = (flip ? w - 1 - j : j) + dx
                            row[j] = sj < 0 || sj >= w ? zero : t[Int(s[si * w + sj])]
                        }
                    }
                }
            }
        }
    }
}

extension ImageSet {
    /// The first `n` samples (all if n >= count).
    func prefix(_ n: Int) -> ImageSet {
        guard n < count else { return self }
        return ImageSet(count: n, channels: channels, height: height, width: width, classes: classes,
                        pixels: Array(pixels[0..<(n * sampleSize)]), labels: Array(labels[0..<n]))
    }
}
