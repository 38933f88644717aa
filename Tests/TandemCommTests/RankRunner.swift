// Helpers for running one closure per rank on a ThreadCommunicator and checking the results
// on the test's own task (Swift Testing records #expect only there, not on rank threads).
import Foundation
import TandemComm

/// Runs `body` on `size` ranks as threads and returns each rank's result, indexed by rank.
func runRanks<T: Sendable>(_ size: Int, _ body: @escaping @Sendable (Communicator) throws -> T) throws -> [T] {
    let results = Locked<[Int: T]>([:])
    try ThreadCommunicator.run(size: size) { comm in
        let value = try body(comm)
        results.update { $0[comm.rank] = value }
    }
    let all = results.value
    return (0..<size).map { all[$0]! }
}

/// A value shared between rank threads, guarded by a lock.
final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value

    init(_ value: Value) { stored = value }

    var value: Value {
        lock.lock()
        defer { lock.unlock() }
        return stored
    }

    func update(_ change: (inout Value) -> Void) {
        lock.lock()
        defer { lock.unlock() }
        change(&stored)
    }
}

/// Deterministic, rank-dependent floats that are not exactly representable sums, so that the
/// order of addition shows in the low bits. (A 64-bit LCG, Knuth's MMIX constants.)
func noise(rank: Int, count: Int) -> [Float] {
    var state = UInt64(rank + 1) &* 0x9E37_79B9_7F4A_7C15
    return (0..<count).map { _ in
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Float(Int64(bitPattern: state >> 11) % 2_000_001) / 1_000_003 - 0.999
    }
}
