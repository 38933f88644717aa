// Weight initialisation and the seeded generator: the bounds and variances the papers give
// (Glorot and Bengio 2010; He et al. 2015), fixed values for biases and batch norm, bit-exact
// reproducibility from a seed, and the generator against an independent transcription of the
// reference C code (xoshiro256** and SplitMix64 by Blackman and Vigna) and rough uniformity.
import Testing
@testable import TandemCore

// MARK: - Support

/// Parameters and statistics of `graph` after initialisation, starting from NaN so that anything
/// the initialiser leaves unwritten shows.
private func initialized<T: Scalar>(_ graph: Graph, _ scheme: InitScheme, seed: UInt64, as _: T.Type = T.self) -> (parameters: [T], statistics: [T]) {
    var p = [T](repeating: .nan, count: graph.parameterCount)
    var s = [T](repeating: .nan, count: max(graph.statisticsCount, 1))
    p.withUnsafeMutableBufferPointer { pb in
        s.withUnsafeMutableBufferPointer { sb in
            Initializer.initialize(parameters: pb, statistics: sb, graph: graph, scheme: scheme, seed: seed)
        }
    }
    return (p, Array(s.prefix(graph.statisticsCount)))
}

private func tensor<T>(_ values: [T], _ graph: Graph, _ name: String) throws -> [T] {
    let info = try #require(graph.parameters.first { $0.name == name }, "no parameter \(name)")
    return Array(values[info.offset..<(info.offset + info.count)])
}

private func meanAndVariance(_ values: [Double]) -> (mean: Double, variance: Double) {
    let n = Double(values.count)
    let mean = values.reduce(0, +) / n
    return (mean, values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / (n - 1))
}

/// Pearson's chi-square statistic of observed counts against equal expected counts.
private func chiSquare(_ counts: [Int]) -> Double {
    let expected = Double(counts.reduce(0, +)) / Double(counts.count)
    return counts.reduce(0) { $0 + (Double($1) - expected) * (Double($1) - expected) / expected }
}

// MARK: - Schemes

@Suite struct InitializerTests {
    @Test func xavierBoundAndVariance() throws {
        // Linear 1000 -> 500: fan_in 1000, fan_out 500; bound sqrt(6/1500), variance 2/1500.
        let graph = try Graph(input: Shape(1000, 1, 1), layers: [LayerSpec(name: "fc", kind: .linear(outFeatures: 500, bias: true))])
        let info = graph.parameters[0]
        #expect(info.fanIn == 1000 && info.fanOut == 500)
        let p = initialized(graph, .xavier, seed: 7, as: Double.self).parameters
        let w = try tensor(p, graph, "fc.weight")
        #expect(w.count == 500_000)
        let bound = (6.0 / 1500).squareRoot()
        #expect(w.allSatisfy { abs($0) <= bound })
        // The bound is reached: the largest magnitude is within 0.1% of it.
        #expect(w.map(abs).max()! > 0.999 * bound)
        let (mean, variance) = meanAndVariance(w)
        let expected = 2.0 / 1500
        #expect(abs(variance - expected) < 0.05 * expected, "variance \(variance), expected \(expected)")
        // The mean of 500k draws has a standard deviation of 5.2e-5; 3e-4 is about six of them.
        #expect(abs(mean) < 3e-4, "mean \(mean)")
        #expect(try tensor(p, graph, "fc.bias").allSatisfy { $0 == 0 })
    }

    @Test func xavierUsesTheConvolutionReceptiveField() throws {
        // conv 8 -> 16, 3x3: fan_in = 8*9 = 72, fan_out = 16*9 = 144, bound sqrt(6/216).
        let graph = try Graph(input: Shape(8, 6, 6), layers: [conv("c", 16, k: 3)])
        let info = graph.parameters[0]
        #expect(info.fanIn == 72 && info.fanOut == 144)
        let w = try tensor(initialized(graph, .xavier, seed: 3, as: Float.self).parameters, graph, "c.weight")
        let bound = Float((6.0 / 216).squareRoot())
        #expect(w.allSatisfy { abs($0) <= bound })
        #expect(w.map(abs).max()! > 0.98 * bound)
    }

    @Test func heNormalVariance() throws {
        // conv 64 -> 128, 3x3: fan_in = 576, variance 2/576, over 73,728 weights.
        let graph = try Graph(input: Shape(64, 4, 4), layers: [conv("c", 128, k: 3, p: 1)])
        #expect(graph.parameters[0].fanIn == 576)
        let p = initialized(graph, .he, seed: 11, as: Double.self).parameters
        let w = try tensor(p, graph, "c.weight")
        let (mean, variance) = meanAndVariance(w)
        let expected = 2.0 / 576
        #expect(abs(variance - expected) < 0.05 * expected, "variance \(variance), expected \(expected)")
        #expect(abs(mean) < 0.01 * expected.squareRoot(), "mean \(mean)")
        // Normal, not uniform: 68.3% within one standard deviation (a uniform gives 57.7%), and some beyond three.
        let sd = expected.squareRoot()
        let within = Double(w.filter { abs($0) < sd }.count) / Double(w.count)
        #expect(abs(within - 0.6827) < 0.01, "\(within) within one standard deviation")
        #expect(w.contains { abs($0) > 3 * sd })
        #expect(try tensor(p, graph, "c.bias").allSatisfy { $0 == 0 })
    }

    @Test func heUsesFanInOfOneGroup() throws {
        // Groups 2: each output sees 4/2 channels x 3x3 = 18 inputs.
        let graph = try Graph(input: Shape(4, 5, 5), layers: [conv("c", 8, k: 3, groups: 2)])
        #expect(graph.parameters[0].fanIn == 18)
    }

    @Test func pytorchSchemeBoundsWeightsAndBiases() throws {
        // U(+-1/sqrt(fan_in)) for both weight and bias: linear 50 -> 40, bound 1/sqrt(50).
        let graph = try Graph(input: Shape(50, 1, 1), layers: [LayerSpec(name: "fc", kind: .linear(outFeatures: 40, bias: true))])
        let p = initialized(graph, .pytorch, seed: 5, as: Double.self).parameters
        let bound = 1 / 50.0.squareRoot()
        for name in ["fc.weight", "fc.bias"] {
            let t = try tensor(p, graph, name)
            #expect(t.allSatisfy { abs($0) <= bound }, "\(name)")
            #expect(t.map(abs).max()! > 0.8 * bound, "\(name)")
        }
        #expect(try tensor(p, graph, "fc.bias").contains { $0 != 0 })
    }

    @Test(arguments: InitScheme.allCases)
    func batchNormAndBiasesHaveFixedStarts(scheme: InitScheme) throws {
        let graph = try Graph(input: Shape(3, 6, 6), layers: [
            conv("c1", 4, k: 3, p: 1), layer("bn1", .batchNorm(eps: 1e-5, momentum: 0.1)), layer("r", .relu),
            layer("f", .flatten), layer("fc", .linear(outFeatures: 5, bias: true)), layer("bn2", .batchNorm(eps: 1e-5, momentum: 0.1)),
        ])
        let (p, s) = initialized(graph, scheme, seed: 9, as: Float.self)
        #expect(p.allSatisfy { !$0.isNaN }, "every parameter is written")
        #expect(try tensor(p, graph, "bn1.weight") == [1, 1, 1, 1])
        #expect(try tensor(p, graph, "bn1.bias") == [0, 0, 0, 0])
        #expect(try tensor(p, graph, "bn2.weight") == [Float](repeating: 1, count: 5))
        #expect(try tensor(p, graph, "bn2.bias") == [Float](repeating: 0, count: 5))
        if scheme != .pytorch {
            #expect(try tensor(p, graph, "c1.bias").allSatisfy { $0 == 0 })
            #expect(try tensor(p, graph, "fc.bias").allSatisfy { $0 == 0 })
        }
        #expect(graph.statistics.map(\.name) == ["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"])
        #expect(s == [0, 0, 0, 0, 1, 1, 1, 1] + [Float](repeating: 0, count: 5) + [Float](repeating: 1, count: 5))
        #expect(try tensor(p, graph, "c1.weight").contains { $0 != 0 })
    }

    @Test func networkOverloadFillsTheNetworksBuffers() throws {
        let graph = try Graph(input: Shape(2, 5, 5), layers: [conv("c", 3, k: 3), layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1))])
        let net = Network<Double>(graph: graph, capacity: 1)
        Initializer.initialize(net, scheme: .he, seed: 21)
        let (p, s) = initialized(graph, .he, seed: 21, as: Double.self)
        #expect(Array(net.parameters) == p)
        #expect(Array(net.statistics) == s)
    }
}

// MARK: - Reproducibility

@Suite struct InitReproducibility {
    static let layers = [conv("c1", 6, k: 5, p: 2), layer("bn", .batchNorm(eps: 1e-5, momentum: 0.1)), layer("r", .relu),
                         layer("f", .flatten), layer("fc", .linear(outFeatures: 10, bias: true))]

    @Test(arguments: InitScheme.allCases)
    func sameSeedSameBits(scheme: InitScheme) throws {
        let graph = try Graph(input: Shape(1, 8, 8), layers: Self.layers)
        let a = initialized(graph, scheme, seed: 1234, as: Float.self)
        let b = initialized(graph, scheme, seed: 1234, as: Float.self)
        #expect(a.parameters.map(\.bitPattern) == b.parameters.map(\.bitPattern))
        #expect(a.statistics.map(\.bitPattern) == b.statistics.map(\.bitPattern))
        let d1 = initialized(graph, scheme, seed: 1234, as: Double.self).parameters
        let d2 = initialized(graph, scheme, seed: 1234, as: Double.self).parameters
        #expect(d1.map(\.bitPattern) == d2.map(\.bitPattern))
        // Float values are the Double draws rounded.
        #expect(a.parameters == d1.map { Float($0) })
    }

    @Test(arguments: InitScheme.allCases)
    func differentSeedDifferentWeights(scheme: InitScheme) throws {
        let graph = try Graph(input: Shape(1, 8, 8), layers: Self.layers)
        let a = try tensor(initialized(graph, scheme, seed: 1234, as: Double.self).parameters, graph, "fc.weight")
        let b = try tensor(initialized(graph, scheme, seed: 1235, as: Double.self).parameters, graph, "fc.weight")
        let same = zip(a, b).filter { $0 == $1 }.count
        #expect(same == 0, "\(same) of \(a.count) weights equal under another seed")
    }

    @Test func tensorsAreIndependentOfTheRestOfTheModel() throws {
        // A tensor's values depend only on (seed, its name, its shape): adding layers elsewhere changes nothing.
        let small = try Graph(input: Shape(1, 8, 8), layers: Self.layers)
        let bigger = try Graph(input: Shape(1, 8, 8), layers: [conv("c0", 1, k: 1)] + Self.layers.map {
            var l = $0
            if l.name == "c1" { l.inputs = ["c0"] }
            return l
        })
        let a = initialized(small, .xavier, seed: 77, as: Double.self).parameters
        let b = initialized(bigger, .xavier, seed: 77, as: Double.self).parameters
        for name in ["c1.weight", "fc.weight"] { #expect(try tensor(a, small, name) == tensor(b, bigger, name), "\(name)") }
        // ... while two tensors of one model differ from each other.
        let c1 = try tensor(a, small, "c1.weight")
        let fc = try tensor(a, small, "fc.weight")
        #expect(Array(c1.prefix(10)) != Array(fc.prefix(10)))
    }
}

// MARK: - SeededGenerator

/// SplitMix64 and xoshiro256**, transcribed independently from Vigna's reference C code
/// (prng.di.unimi.it): the implementation under test must agree bit for bit.
private struct ReferenceXoshiro {
    var s: [UInt64]
    static func splitMix(_ x: inout UInt64) -> UInt64 {
        x = x &+ 0x9e37_79b9_7f4a_7c15
        var z = x
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    init(seed: UInt64) {
        var x = seed
        s = (0..<4).map { _ in Self.splitMix(&x) }
    }
    init(state: [UInt64]) { s = state }
    static func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
    mutating func next() -> UInt64 {
        let result = Self.rotl(s[1] &* 5, 7) &* 9
        let t = s[1] << 17
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]
        s[2] ^= t
        s[3] = Self.rotl(s[3], 45)
        return result
    }
}

@Suite struct SeededGeneratorTests {
    @Test func splitMix64KnownValues() {
        // SplitMix64 from state 0: the published first outputs.
        var s: UInt64 = 0
        #expect(splitMix64(&s) == 0xe220_a839_7b1d_cdaf)
        #expect(splitMix64(&s) == 0x6e78_9e6a_a1b9_65f4)
        #expect(splitMix64(&s) == 0x06c4_5d18_8009_454f)
    }

    @Test func xoshiroFromAKnownState() {
        // xoshiro256** from state (1, 2, 3, 4): 11520, 0, 1509978240, 1215971899390074240.
        var g = SeededGenerator(state: (1, 2, 3, 4))
        #expect((0..<4).map { _ in g.next() } == [11520, 0, 1_509_978_240, 1_215_971_899_390_074_240])
    }

    @Test func seedFortyTwo() {
        // Computed once (and by ReferenceXoshiro): the first outputs for seed 42.
        var g = SeededGenerator(seed: 42)
        #expect((0..<4).map { _ in g.next() } == [0x1578_0b2e_0c2e_c716, 0x6104_d986_6d11_3a7e, 0xae17_5332_39e4_99a1, 0xecb8_ad47_03b3_60a1])
    }

    @Test(arguments: [0, 1, 42, 0xdead_beef, UInt64.max])
    func agreesWithTheReference(seed: UInt64) {
        var g = SeededGenerator(seed: seed)
        var r = ReferenceXoshiro(seed: seed)
        #expect(g.state.0 == r.s[0] && g.state.1 == r.s[1] && g.state.2 == r.s[2] && g.state.3 == r.s[3])
        let mismatches = (0..<1000).filter { _ in g.next() != r.next() }.count
        #expect(mismatches == 0)
    }

    @Test func reproducibleAndSeedDependent() {
        var a = SeededGenerator(seed: 99), b = SeededGenerator(seed: 99), c = SeededGenerator(seed: 100)
        let xa = (0..<100).map { _ in a.next() }, xb = (0..<100).map { _ in b.next() }, xc = (0..<100).map { _ in c.next() }
        #expect(xa == xb)
        #expect(zip(xa, xc).allSatisfy { $0 != $1 })
        // A copied generator continues identically.
        var d = a
        #expect(d.next() == a.next())
    }

    @Test func uniformIsUniformInUnitInterval() {
        var g = SeededGenerator(seed: 2024)
        let n = 100_000
        var bins = [Int](repeating: 0, count: 10)
        var sum = 0.0, sumSquares = 0.0, outside = 0
        for _ in 0..<n {
            let u = g.uniform()
            if !(u >= 0 && u < 1) { outside += 1; continue }
            bins[min(9, Int(u * 10))] += 1
            sum += u; sumSquares += u * u
        }
        #expect(outside == 0)
        // Chi-square with 9 degrees of freedom: 27.9 is its 99.9% quantile.
        #expect(chiSquare(bins) < 27.9, "\(bins)")
        let mean = sum / Double(n), variance = sumSquares / Double(n) - mean * mean
        #expect(abs(mean - 0.5) < 0.005 && abs(variance - 1.0 / 12) < 0.002, "mean \(mean), variance \(variance)")
        // Uses the top 53 bits: uniform() = (next() >> 11) * 2^-53.
        var h = SeededGenerator(seed: 2024), k = SeededGenerator(seed: 2024)
        #expect(h.uniform() == Double(k.next() >> 11) / 9_007_199_254_740_992)
    }

    @Test func belowIsUniformAndInRange() {
        var g = SeededGenerator(seed: 5)
        var counts = [Int](repeating: 0, count: 7)
        for _ in 0..<70_000 { counts[g.below(7)] += 1 }
        // 6 degrees of freedom: 22.5 is the 99.9% quantile.
        #expect(chiSquare(counts) < 22.5, "\(counts)")
        #expect((0..<100).allSatisfy { _ in g.below(1) == 0 })
        let big = 1 << 62 + 12345
        #expect((0..<100).allSatisfy { _ in (0..<big).contains(g.below(big)) })
    }

    @Test func normalHasUnitVariance() {
        var g = SeededGenerator(seed: 8)
        let x = (0..<50_000).map { _ in g.normal() }
        let (mean, variance) = meanAndVariance(x)
        #expect(abs(mean) < 0.02 && abs(variance - 1) < 0.03, "mean \(mean), variance \(variance)")
        #expect(x.allSatisfy { $0.isFinite })
    }

    @Test func counterRandomIsAPureFunctionOfItsKey() {
        #expect(counterRandom(1, 2, 3, 4) == counterRandom(1, 2, 3, 4))
        #expect(counterRandom(1, 2, 3, 4) != counterRandom(1, 2, 3, 5))
        #expect(counterRandom(1, 2, 3, 4) != counterRandom(2, 1, 3, 4))
        var bins = [Int](repeating: 0, count: 10), outside = 0
        for i in 0..<20_000 {
            let u = counterUniform(7, 0, 3, UInt64(i))
            if !(u >= 0 && u < 1) { outside += 1; continue }
            bins[min(9, Int(u * 10))] += 1
        }
        #expect(outside == 0)
        #expect(chiSquare(bins) < 27.9, "\(bins)")
        // FNV-1a of the empty string and of "a" (published test values).
        #expect(stableHash("") == 0xcbf2_9ce4_8422_2325)
        #expect(stableHash("a") == 0xaf63_dc4c_8601_ec8c)
    }
}
