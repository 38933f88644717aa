// Seeded random mutations of the shipped configs: TrainConfig.parse must return or throw, never
// crash. TANDEM_CONFIG_FUZZ_ITERATIONS overrides the count (2,000 here; 100,000 was run by hand).
import Foundation
import Testing
@testable import TandemTrain

/// SplitMix64, so that a failing iteration can be replayed from its seed.
struct ConfigFuzzRandom: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct ConfigFuzzTests {
    /// YAML's syntax characters and a few values that hit the parser's checks.
    static let tokens = [":", "-", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "!!int ", "? ", "|", ">", "#", "'", "\"", "\t", "  ", "\n",
                         "%YAML 1.1", "---", "...", "0", "-1", "1e400", ".nan", "~", "null", "true", "auto", "99999999999999999999", "\u{0}", "é"]

    func mutate(_ text: String, _ rng: inout ConfigFuzzRandom) -> String {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        for _ in 0...(rng.next() % 3) {
            guard !lines.isEmpty else { break }
            let i = Int(rng.next() % UInt64(lines.count))
            switch rng.next() % 7 {
            case 0: lines.remove(at: i)
            case 1: lines.insert(lines[Int(rng.next() % UInt64(lines.count))], at: i)
            case 2: lines.swapAt(i, Int(rng.next() % UInt64(lines.count)))
            case 3:  // a token into the line
                var chars = Array(lines[i])
                chars.insert(contentsOf: Self.tokens[Int(rng.next() % UInt64(Self.tokens.count))], at: Int(rng.next() % UInt64(chars.count + 1)))
                lines[i] = String(chars)
            case 4:  // indentation
                lines[i] = rng.next() % 2 == 0 ? " " + lines[i] : String(lines[i].drop { $0 == " " })
            case 5:  // a character replaced by any byte (decoded as UTF-8 with replacement)
                var bytes = Array(lines[i].utf8)
                if !bytes.isEmpty { bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next()) }
                lines[i] = String(decoding: bytes, as: UTF8.self)
            default:  // a value replaced
                if let colon = lines[i].lastIndex(of: ":") {
                    lines[i] = String(lines[i][...colon]) + " " + Self.tokens[Int(rng.next() % UInt64(Self.tokens.count))]
                }
            }
        }
        var out = lines.joined(separator: "\n")
        if rng.next() % 10 == 0 { out = String(out.prefix(Int(rng.next() % UInt64(out.count + 1)))) }
        return out
    }

    @Test func mutatedShippedConfigsParseOrThrow() throws {
        let iterations = ProcessInfo.processInfo.environment["TANDEM_CONFIG_FUZZ_ITERATIONS"].flatMap { Int($0) } ?? 2000
        let shipped = try ["lenet5.yaml", "lenet5-bn.yaml", "alexnet-2tower.yaml"].map {
            try String(contentsOfFile: packageRoot + "/configs/" + $0, encoding: .utf8)
        }
        var rng = ConfigFuzzRandom(state: 20261123)
        var parsed = 0, thrown = 0
        for _ in 0..<iterations {
            let text = mutate(shipped[Int(rng.next() % UInt64(shipped.count))], &rng)
            do { _ = try TrainConfig.parse(text, source: "fuzz.yaml"); parsed += 1 } catch { thrown += 1 }
        }
        print("ConfigFuzzTests: \(iterations) mutated configs, \(parsed) parsed, \(thrown) threw")
        #expect(parsed + thrown == iterations)
        #expect(parsed > 0 && thrown > 0, "the mutations should both keep and break configs")
    }

    @Test func collectiveTimeoutKey() throws {
        let base = "model: {layers: [{type: linear, out: 10}]}\n"
        #expect(try config(base).parallel.collectiveTimeoutSeconds == 300)
        #expect(try config(base + "parallel: {collective_timeout_seconds: 2.5}").parallel.collectiveTimeoutSeconds == 2.5)
        #expect(try config(base + "parallel: {collective_timeout_seconds: 0}").parallel.collectiveTimeoutSeconds == 0)
        #expect(expectError(["collective_timeout_seconds", "expected seconds >= 0"]) { _ = try config(base + "parallel: {collective_timeout_seconds: -1}") } == nil)
    }
}
