// parallel.balance: each replica's share of the global batch follows its measured speed. The
// shares change which rank computes which samples, never which samples a step trains, so a
// balanced run trains what one process trains (to rounding).
import Foundation
import Testing
import TandemComm
import TandemCore
@testable import TandemTrain

@Suite struct BalanceTests {
    /// The cuts for these seconds per sample.
    func cuts(batch: Int, _ perSample: [Double]) -> [Int] {
        let c = UnsafeMutablePointer<Int>.allocate(capacity: perSample.count + 1)
        defer { c.deallocate() }
        perSample.withUnsafeBufferPointer { Trainer.balancedCuts(batch: batch, perSample: $0.baseAddress!, replicas: perSample.count, into: c) }
        return Array(UnsafeBufferPointer(start: c, count: perSample.count + 1))
    }

    @Test func sharesFollowTheSpeedsWithinHalfAndOneAndAHalfTheEvenShare() {
        // Not measured yet (any replica at 0): even.
        #expect(cuts(batch: 128, [0, 0]) == [0, 64, 128])
        #expect(cuts(batch: 128, [1e-5, 0]) == [0, 64, 128])
        #expect(cuts(batch: 96, [2e-5, 2e-5, 2e-5]) == [0, 32, 64, 96])
        // Twice as fast: two thirds of the batch.
        #expect(cuts(batch: 128, [1e-5, 2e-5]) == [0, 85, 128])
        #expect(cuts(batch: 128, [2e-5, 1e-5]) == [0, 43, 128])
        // Ten times as fast: held at 1.5x and 0.5x the even share.
        #expect(cuts(batch: 128, [1e-6, 1e-5]) == [0, 96, 128])
        #expect(cuts(batch: 128, [1e-5, 1e-6]) == [0, 32, 128])

        // Any speeds: the cuts cover the batch in order, and no share exceeds the capacity the
        // network was sized for.
        var rng = SeededGenerator(seed: 7)
        for _ in 0..<2_000 {
            let replicas = 2 + Int(rng.next() % 6)
            let batch = replicas * (1 + Int(rng.next() % 40))
            let speeds = (0..<replicas).map { _ in 1e-6 * (1 + Double(rng.next() % 1000) / 50) }
            let c = cuts(batch: batch, speeds)
            let capacity = Trainer.balancedCapacity(batch: batch, replicas: replicas)
            #expect(c.first == 0 && c.last == batch)
            let even = Double(batch) / Double(replicas)
            for r in 0..<replicas {
                let share = c[r + 1] - c[r]
                #expect(share >= 1 && share <= capacity && Double(share) <= 1.5 * even + 1 && Double(share) >= 0.5 * even - 1,
                        "batch \(batch), speeds \(speeds): cuts \(c), capacity \(capacity)")
            }
            // Faster replicas never get fewer samples (beyond rounding).
            for r in 0..<replicas { for q in 0..<replicas where speeds[r] < speeds[q] { #expect(c[r + 1] - c[r] + 1 >= c[q + 1] - c[q]) } }
        }
    }

    @Test func aSlowRankTakesFewerSamplesAndTheRunTrainsWhatOneProcessTrains() throws {
        let c = try config(lenetYAML)
        let one = try trainInProcess(c, ranks: 1, steps: 8, data: syntheticData)
        var balanced = c
        balanced.parallel.balance = true
        final class Box: @unchecked Sendable { var shares: [Int] = []; var balancing = false }
        let box = Box()
        // Rank 1 sleeps 4 ms per sample after backward: it computes several times slower.
        let two = try trainInProcess(balanced, ranks: 2, steps: 8,
                                     prepare: { t in t.hooks.slowRank = 1; t.hooks.slowMicrosPerSample = 4000 },
                                     finished: { t in if t.comm.rank == 0 { box.shares = t.shares; box.balancing = t.balancing } },
                                     data: syntheticData)
        #expect(box.balancing)
        #expect(box.shares.count == 2 && box.shares.reduce(0, +) == c.batchSize)
        #expect(box.shares[0] > box.shares[1], "shares \(box.shares)")
        for (a, b) in zip(one.losses, two.losses) { #expect(abs(a - b) <= 1e-4 * abs(a), "losses \(one.losses) vs \(two.losses)") }
        #expect(relativeDifference(one.parameters, two.parameters) < 1e-4)
    }

    @Test func withoutBalanceTheSharesStayEven() throws {
        final class Box: @unchecked Sendable { var shares: [Int] = [] }
        let box = Box()
        _ = try trainInProcess(try config(lenetYAML), ranks: 2, steps: 4,
                               prepare: { t in t.hooks.slowRank = 1; t.hooks.slowMicrosPerSample = 4000 },
                               finished: { t in if t.comm.rank == 0 { box.shares = t.shares } },
                               data: syntheticData)
        #expect(box.shares == [16, 16])
    }

    @Test(arguments: ["balance", "dynamic"])
    func ranksStartedWithAndWithoutItAreRefused(mode: String) throws {
        // parallel.balance or parallel.dynamic on one rank only: the per-step allreduce would differ
        // in size and the ranks would meet at different points (a hang or garbage): every rank stops
        // at start-up.
        let c = try config(lenetYAML)
        #expect {
            try startTrainers { rank in
                var mine = c
                if mode == "balance" { mine.parallel.balance = rank == 1 } else { mine.parallel.dynamic = rank == 1 }
                return mine
            }
        } throws: { error in
            "\(error)".contains("rank 1 runs a different config than rank 0 (config hash, batch size, seed, parallel.balance, parallel.dynamic, parallel.chunk or parallel.head differ)")
        }
    }

    @Test func configKeyAndItsErrors() throws {
        #expect(try config(lenetYAML + "\nparallel: {balance: true}\n").parallel.balance)
        #expect(try !config(lenetYAML).parallel.balance)
        #expect(expectError(["parallel.balance"]) { _ = try config(lenetYAML + "\nparallel: {balance: sometimes}\n") } == nil)
        // Towers share their replica's samples: balance needs towers 1.
        let c = try config(smallAlexYAML.replacingOccurrences(of: "parallel: {towers: 2}", with: "parallel: {towers: 2, balance: true}"))
        #expect(expectError(["test.yaml", "parallel.balance", "parallel.towers 1"]) {
            _ = try Trainer.checkLayout(config: c, data: try syntheticData(), worldSize: 2)
        } == nil)
    }
}
