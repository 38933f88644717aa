import RealModule

// Randomness that is the same on every machine and rank. Two generators:
// - `SeededGenerator` (xoshiro256**, seeded through SplitMix64) for sequential draws such as
//   weight initialisation and the per-epoch shuffle;
// - `counterRandom` (a stateless hash of a key) for draws that must not depend on how samples
//   are spread over threads or ranks: a dropout mask bit is a function of
//   (seed, layer, step, global sample, global feature) only.

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    public private(set) var state: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var s = seed
        state = (splitMix64(&s), splitMix64(&s), splitMix64(&s), splitMix64(&s))
    }

    public init(state: (UInt64, UInt64, UInt64, UInt64)) { self.state = state }

    @inline(__always)
    public mutating func next() -> UInt64 {
        let result = rotl(state.1 &* 5, 7) &* 9
        let t = state.1 << 17
        state.2 ^= state.0
        state.3 ^= state.1
        state.1 ^= state.2
        state.0 ^= state.3
        state.2 ^= t
        state.3 = rotl(state.3, 45)
        return result
    }

    /// Uniform in [0, 1) with 53 random bits.
    @inline(__always)
    public mutating func uniform() -> Double { Double(next() >> 11) * 0x1.0p-53 }

    /// Standard normal by Box-Muller (one value per call; simple and reproducible).
    public mutating func normal() -> Double {
        let u1 = max(uniform(), 0x1.0p-60)
        let u2 = uniform()
        return (-2 * Double.log(u1)).squareRoot() * Double.cos(2 * Double.pi * u2)
    }

    /// Uniform integer in 0..<bound without modulo bias (Lemire's method).
    public mutating func below(_ bound: Int) -> Int {
        precondition(bound > 0)
        let b = UInt64(bound)
        var m = next().multipliedFullWidth(by: b)
        if m.low < b {
            let t = (0 &- b) % b
            while m.low < t { m = next().multipliedFullWidth(by: b) }
        }
        return Int(m.high)
    }
}

@inline(__always) private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }

@inline(__always)
public func splitMix64(_ s: inout UInt64) -> UInt64 {
    s &+= 0x9E37_79B9_7F4A_7C15
    var z = s
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// A stateless 64-bit hash of a key: the same inputs give the same bits everywhere.
@inline(__always)
public func counterRandom(_ a: UInt64, _ b: UInt64, _ c: UInt64, _ d: UInt64) -> UInt64 {
    var s = a ^ 0x243F_6A88_85A3_08D3
    var h = splitMix64(&s)
    s = h ^ b; h = splitMix64(&s)
    s = h ^ c; h = splitMix64(&s)
    s = h ^ d; h = splitMix64(&s)
    return h
}

/// A uniform draw in [0, 1) from a stateless key (24 bits, enough for a dropout threshold).
@inline(__always)
public func counterUniform(_ a: UInt64, _ b: UInt64, _ c: UInt64, _ d: UInt64) -> Float {
    Float(counterRandom(a, b, c, d) >> 40) * 0x1.0p-24
}

/// A stable 64-bit hash of a string (FNV-1a), for salting random streams by layer name and
/// fingerprinting configs; Swift's own `hashValue` changes from run to run.
public func stableHash(_ s: String) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    return h
}
