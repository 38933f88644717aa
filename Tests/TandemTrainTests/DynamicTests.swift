// parallel.dynamic: the replicas claim the samples of each global batch from a pool they share,
// in chunks that shrink towards the end of the step. The claims decide which rank computes which
// samples, never which samples a step trains, so a dynamic run trains what one process trains (to
// the rounding of the sums' order).
import CKernels
import Dispatch
import Foundation
import Testing
import TandemComm
import TandemCore
@testable import TandemTrain

/// A model whose compute takes microseconds per sample even in a debug build on a loaded machine, with
/// parallel.dynamic (batch 32).
let tinyDynamicYAML = """
model:
  layers:
    - {name: flatten, type: flatten}
    - {name: fc, type: linear, out: 10}
train: {batch_size: 32, seed: 3}
optimizer: {lr: 0.05, momentum: 0.9}
parallel: {dynamic: true}
"""

@Suite struct DynamicTests {
    /// Claims of one step, one rank after the other in `order` (rank indices, repeated), until the
    /// pool is empty: [(rank, first, size)]. With heads (one for every rank, or `head` for all), each
    /// rank's first claim passes its own, and the samples no head covers stay for the chunks.
    func claims(counter: UnsafeMutablePointer<UInt64>, tag: UInt32, batch: Int, ranks: Int, bounds: (min: Int, max: Int), head: Int = 0,
                heads: [Int]? = nil, order: [Int]) -> [(Int, Int, Int)] {
        let h = heads ?? Array(repeating: head, count: ranks)
        let reserve = batch - h.reduce(0, +)
        var out: [(Int, Int, Int)] = []
        var first = 0
        var claimed = Set<Int>()
        for r in order {
            let n = tandem_claim_samples(counter, tag, batch, ranks, bounds.min, bounds.max, claimed.contains(r) ? 0 : h[r], reserve, &first)
            claimed.insert(r)
            if n == 0 { break }
            out.append((r, first, n))
        }
        return out
    }

    @Test func claimsCoverTheBatchInShrinkingChunksAndANewStepStartsAfresh() {
        let counter = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { counter.deallocate() }
        counter.initialize(to: 0)
        // 128 samples, 2 ranks, chunks of 4 to 32: ceil(left / 4) held within the bounds.
        let c = claims(counter: counter, tag: 1, batch: 128, ranks: 2, bounds: (4, 32), order: Array(repeating: [0, 1], count: 40).flatMap { $0 })
        #expect(c.map(\.2) == [32, 24, 18, 14, 10, 8, 6, 4, 4, 4, 4])
        #expect(c.map(\.1) == [0, 32, 56, 74, 88, 98, 106, 112, 116, 120, 124])
        // The pool is empty for this step; a claim of the next step (tag 2) starts at 0 again.
        var first = -1
        #expect(tandem_claim_samples(counter, 1, 128, 2, 4, 32, 0, 0, &first) == 0)
        #expect(tandem_claim_samples(counter, 2, 128, 2, 4, 32, 0, 0, &first) == 32 && first == 0)
        // A claim that would leave fewer than the smallest chunk takes the rest too (4, then 6, not
        // 4, 4, 2: with batch norm no chunk normalises over fewer than its smallest).
        counter.pointee = 0
        #expect(claims(counter: counter, tag: 3, batch: 10, ranks: 2, bounds: (4, 8), order: [0, 1, 0, 1]).map(\.2) == [4, 6])
        // Batch norm's smallest chunk of 8 after heads of 24 and 23 of 64: 8 and 9, not 8, 8 and 1.
        #expect(claims(counter: counter, tag: 4, batch: 64, ranks: 2, bounds: (8, 16), heads: [24, 23], order: [0, 1, 0, 1, 0, 1]).map(\.2) == [24, 23, 8, 9])

        // Any batch, ranks, bounds and order of claims: the claims tile [0, batch) in order, each
        // within the bounds but for a last one that takes what is left (fewer than the smallest
        // chunk only when that is all the batch had, at most the largest plus the smallest - 1),
        // none but the last growing.
        var rng = SeededGenerator(seed: 5)
        for trial in 0..<2_000 {
            let ranks = 1 + Int(rng.next() % 6)
            let batch = 1 + Int(rng.next() % 300)
            let largest = 1 + Int(rng.next() % 64)
            let bounds = (min: max(1, largest / 16), max: largest)
            let order = (0..<(batch + 1)).map { _ in Int(rng.next() % UInt64(ranks)) }
            let c = claims(counter: counter, tag: UInt32(10 + trial), batch: batch, ranks: ranks, bounds: bounds, order: order)
            var next = 0
            for (k, claim) in c.enumerated() {
                #expect(claim.1 == next)
                let isLast = k == c.count - 1
                if isLast {
                    #expect(claim.2 <= bounds.max + bounds.min - 1 && (claim.2 >= bounds.min || c.count == 1), "batch \(batch) bounds \(bounds): \(c.map(\.2))")
                } else {
                    #expect(claim.2 <= bounds.max && claim.2 >= bounds.min, "batch \(batch) bounds \(bounds): \(c.map(\.2))")
                    if k > 0 { #expect(claim.2 <= c[k - 1].2) }
                }
                next += claim.2
            }
            #expect(next == batch)
        }
    }

    @Test func eachRanksFirstClaimIsItsHeadAndTheRestGoesInShrinkingChunks() {
        let counter = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { counter.deallocate() }
        counter.initialize(to: 0)
        // 128 samples, 2 ranks, heads of 48 (three quarters of 64, as with batch norm): both heads, then the last 32
        // samples in chunks of ceil(left / 4) held within 2...32.
        let c = claims(counter: counter, tag: 1, batch: 128, ranks: 2, bounds: (2, 32), head: 48, order: Array(repeating: [0, 1], count: 40).flatMap { $0 })
        #expect(c.map(\.2) == [48, 48, 8, 6, 5, 4, 3, 2, 2, 2])
        #expect(c.map(\.1) == [0, 48, 96, 104, 110, 115, 119, 122, 124, 126])
        // Rank 1 comes late, after rank 0 has claimed its head and three chunks (95 samples, so that
        // only one of the last 32 is before them): its first claim is a chunk like rank 0's then.
        let late = claims(counter: counter, tag: 2, batch: 128, ranks: 2, bounds: (2, 32), head: 48, order: [0, 0, 0, 0] + Array(repeating: [1, 0], count: 10).flatMap { $0 })
        #expect(late.map(\.2) == [48, 20, 15, 12, 9, 6, 5, 4, 3, 2, 2, 2])
        // Rank 1 a little late, after rank 0's head and one chunk of 20: its head stops at the last 32.
        #expect(claims(counter: counter, tag: 4, batch: 128, ranks: 2, bounds: (2, 32), head: 48, order: [0, 0, 1]).map(\.2) == [48, 20, 28])
        // Four ranks, 256 samples: four heads of 48, then 64 samples in chunks.
        let four = claims(counter: counter, tag: 3, batch: 256, ranks: 4, bounds: (2, 32), head: 48, order: Array(repeating: [0, 1, 2, 3], count: 20).flatMap { $0 })
        #expect(four.prefix(4).map(\.2) == [48, 48, 48, 48] && four[4].2 == 8)

        // Any batch, ranks, bounds, heads (one per rank, as the trainer sizes them from the speeds)
        // and order: the claims tile [0, batch) in order, a rank's first claim at most its head (or,
        // when late, a chunk), every later one within the bounds but for a last that takes what is
        // left, and the later claims but the last never growing. When every rank's first claim comes
        // before any second one and the heads leave at least the smallest chunk, each rank gets
        // exactly its head.
        var rng = SeededGenerator(seed: 6)
        for trial in 0..<2_000 {
            let ranks = 1 + Int(rng.next() % 6)
            let batch = ranks + Int(rng.next() % 300)
            let largest = 1 + Int(rng.next() % 64)
            let bounds = (min: max(1, largest / 16), max: largest)
            let heads = (0..<ranks).map { _ in max(bounds.min, 1 + Int(rng.next() % UInt64(max(1, batch * 3 / (4 * ranks))))) }
            let inTime = trial % 2 == 0
            let order = (inTime ? Array(0..<ranks) : []) + (0..<(batch + ranks)).map { _ in Int(rng.next() % UInt64(ranks)) }
            let c = claims(counter: counter, tag: UInt32(10 + trial), batch: batch, ranks: ranks, bounds: bounds, heads: heads, order: order)
            let leftForChunks = batch - heads.reduce(0, +)
            var next = 0, seen = Set<Int>(), lastLater = Int.max
            for (k, claim) in c.enumerated() {
                #expect(claim.1 == next)
                let isLast = k == c.count - 1
                let slack = isLast ? bounds.min - 1 : 0
                if seen.insert(claim.0).inserted {
                    #expect(claim.2 <= max(heads[claim.0], bounds.max) + slack, "batch \(batch) heads \(heads): \(c.map(\.2))")
                    if inTime && leftForChunks >= bounds.min { #expect(claim.2 == heads[claim.0], "batch \(batch) heads \(heads): \(c.map(\.2))") }
                } else {
                    #expect(claim.2 <= bounds.max + slack && (claim.2 >= bounds.min || isLast), "batch \(batch) bounds \(bounds): \(c.map(\.2))")
                    if !isLast { #expect(claim.2 <= lastLater) }
                    lastLater = claim.2
                }
                next += claim.2
            }
            #expect(next == batch)
        }
    }

    @Test func ranksClaimingAtOnceNeverShareASample() {
        // Threads claim one sample at a time from one counter, all starting each step together
        // (a spinning start line), step after step: every sample of every step is claimed exactly
        // once, and the compare-and-swap is contended all along.
        let counter = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        counter.initialize(to: 0)
        defer { counter.deallocate() }
        let ranks = 3, batch = 256, steps = 300
        // Per rank, how often it claimed each sample of each step (each thread writes its own row).
        let owner = UnsafeMutablePointer<Int32>.allocate(capacity: ranks * steps * batch)
        owner.initialize(repeating: 0, count: ranks * steps * batch)
        defer { owner.deallocate() }
        nonisolated(unsafe) let c = counter, o = owner
        let startLine = SpinBarrier(parties: ranks), finishLine = SpinBarrier(parties: ranks)
        @Sendable func claimSteps(_ r: Int) {
            var first = 0
            for s in 0..<steps {
                startLine.wait()
                while true {
                    let n = tandem_claim_samples(c, UInt32(s + 1), batch, ranks, 1, 1, 0, 0, &first)
                    if n == 0 { break }
                    o[(r * steps + s) * batch + first] += 1
                }
                // As in training: every rank has made its last claim of a step before any claims
                // in the next (the gradient sync orders it there).
                finishLine.wait()
            }
        }
        let done = DispatchGroup()
        for r in 0..<ranks {
            done.enter()
            Thread {
                claimSteps(r)
                done.leave()
            }.start()
        }
        done.wait()
        #expect((0..<(steps * batch)).allSatisfy { i in (0..<ranks).reduce(0) { $0 + owner[$1 * steps * batch + i] } == 1 })
        // More than one thread claimed samples (the claims were not all one thread's). Not every
        // thread: on a machine loaded with other tests a thread can miss every step's few
        // microseconds of claims (seen once in a full `launch/test` run).
        let claimers = (0..<ranks).filter { r in (0..<(steps * batch)).contains { owner[r * steps * batch + $0] > 0 } }
        #expect(claimers.count >= 2, "claimers \(claimers)")
    }

    @Test(arguments: [(threads: 2, transport: GradientSync.Transport.auto), (threads: 1, transport: .mpi)])
    func partialBatchesSeveralThreadsAndMPITrainWhatOneProcessTrains(setup: (threads: Int, transport: GradientSync.Transport)) throws {
        // Full and partial global batches (an epoch's last), with two threads per rank (the parts'
        // buffers add up over the chunks) or with the buckets through the communicator instead of
        // shared memory (the pool is still shared memory).
        let c = try config(lenetYAML)
        let counts = [32, 20, 32, 7, 32]
        let one = try trainInProcess(c, ranks: 1, steps: counts.count, counts: counts, data: syntheticData)
        var dynamic = c
        dynamic.parallel.dynamic = true
        final class Box: @unchecked Sendable { var transport = ""; var threads = 0 }
        let box = Box()
        let two = try trainInProcess(dynamic, ranks: 2, steps: counts.count, threads: setup.threads, counts: counts, transport: setup.transport,
                                     transportUsed: { box.transport = $0 },
                                     finished: { t in if t.comm.rank == 0 { box.threads = t.threads } }, data: syntheticData)
        #expect(box.threads == setup.threads && box.transport == (setup.transport == .mpi ? "MPI" : "shared memory"))
        for (a, b) in zip(one.losses, two.losses) { #expect(abs(a - b) <= 1e-4 * abs(a), "losses \(one.losses) vs \(two.losses)") }
        #expect(relativeDifference(one.parameters, two.parameters) < 1e-4)
    }

    @Test func aSlowRankTakesFewerSamplesAndTheRunTrainsWhatOneProcessTrains() throws {
        let c = try config(lenetYAML)
        let one = try trainInProcess(c, ranks: 1, steps: 8, data: syntheticData)
        var dynamic = c
        dynamic.parallel.dynamic = true
        final class Box: @unchecked Sendable { var shares: [Int] = []; var dynamic = false; var bounds = (0, 0) }
        let box = Box()
        // Rank 1 sleeps 20 ms per sample after each chunk: several times slower than a debug
        // build's compute, even on a machine loaded with other tests.
        let two = try trainInProcess(dynamic, ranks: 2, steps: 8,
                                     prepare: { t in t.hooks.slowRank = 1; t.hooks.slowMicrosPerSample = 20_000 },
                                     finished: { t in if t.comm.rank == 0 { box.shares = t.shares; box.dynamic = t.dynamic; box.bounds = t.chunkBounds } },
                                     data: syntheticData)
        #expect(box.dynamic && box.bounds == (1, 8))
        #expect(box.shares.count == 2 && abs(box.shares.reduce(0, +) - c.batchSize) <= 1)
        #expect(box.shares[0] > box.shares[1], "shares \(box.shares)")
        for (a, b) in zip(one.losses, two.losses) { #expect(abs(a - b) <= 1e-4 * abs(a), "losses \(one.losses) vs \(two.losses)") }
        #expect(relativeDifference(one.parameters, two.parameters) < 1e-4)
    }

    @Test func theHeadsFollowTheRanksSpeeds() throws {
        // A model whose compute takes microseconds per sample even in a debug build on a loaded
        // machine, so that rank 1, slowed by 50 ms per sample, measures by far the slower: rank 0
        // would need a stall of 150 ms in its 9-sample head to come near a third of its speed.
        final class Box: @unchecked Sendable { var heads: [[Int]] = [[], []]; var shares: [Int] = [] }
        let box = Box()
        _ = try trainInProcess(try config(tinyDynamicYAML), ranks: 2, steps: 6,
                               prepare: { t in t.hooks.slowRank = 1; t.hooks.slowMicrosPerSample = 50_000 },
                               finished: { t in box.heads[t.comm.rank] = t.heads; if t.comm.rank == 0 { box.shares = t.shares } },
                               data: syntheticData)
        // Even heads would be 6 and 6 of 32 (3/8 of 16, the default without batch norm). From the
        // measured speeds (the second step's on), rank 1's share is the smallest balancing allows,
        // 8 of 32, and its head 3/8 of it; rank 0's 9 of 24. Both ranks size the same heads. (The
        // shares are not pinned: the slow rank also claims chunks of the rest whenever it gets to
        // the pool before rank 0 has emptied it.)
        #expect(box.heads[0] == [9, 3] && box.heads[1] == [9, 3], "heads \(box.heads)")
        #expect(box.shares.count == 2 && box.shares[0] > box.shares[1], "shares \(box.shares)")
    }

    @Test func threeRanksAndARankThatGetsNoSampleTrainWhatOneProcessTrains() throws {
        // Rank 2 claims only once ranks 0 and 1 have claimed the whole batch (TestHooks): it
        // computes no sample and posts zero gradients. The run still trains one process's steps.
        var c = try config(lenetYAML.replacingOccurrences(of: "batch_size: 32", with: "batch_size: 24"))
        let one = try trainInProcess(c, ranks: 1, steps: 5, data: syntheticData)
        c.parallel.dynamic = true
        final class Box: @unchecked Sendable { var shares: [Int] = [] }
        let box = Box()
        let three = try trainInProcess(c, ranks: 3, steps: 5,
                                       prepare: { t in t.hooks.lateRank = 2 },
                                       finished: { t in if t.comm.rank == 0 { box.shares = t.shares } },
                                       data: syntheticData)
        #expect(box.shares.count == 3 && box.shares[2] == 0, "shares \(box.shares)")
        for (a, b) in zip(one.losses, three.losses) { #expect(abs(a - b) <= 1e-4 * abs(a), "losses \(one.losses) vs \(three.losses)") }
        #expect(relativeDifference(one.parameters, three.parameters) < 1e-4)
    }

    @Test func configKeysAndTheirErrors() throws {
        let d = try config(lenetYAML + "\nparallel: {dynamic: true, chunk: 12}\n")
        #expect(d.parallel.dynamic && d.parallel.chunk == 12)
        #expect(d.parallel.chunkBounds(batch: 128, replicas: 2) == (1, 12))
        #expect(try !config(lenetYAML).parallel.dynamic)
        // The default: half the even share, the smallest a thirty-second of that.
        #expect(ParallelConfig().chunkBounds(batch: 128, replicas: 2) == (1, 32))
        #expect(ParallelConfig().chunkBounds(batch: 512, replicas: 2) == (4, 128))
        #expect(ParallelConfig().chunkBounds(batch: 2, replicas: 2) == (1, 1))
        // The head: a fraction of the even share, rounded down, at least 1; by default 3/8, or 3/4
        // with batch norm; parallel.head sets it.
        #expect(ParallelConfig().headFraction(batchNorm: false) == 0.375 && ParallelConfig().headFraction(batchNorm: true) == 0.75)
        #expect(ParallelConfig.headChunk(batch: 128, replicas: 2, fraction: 0.375) == 24 && ParallelConfig.headChunk(batch: 128, replicas: 2, fraction: 0.75) == 48)
        #expect(ParallelConfig.headChunk(batch: 256, replicas: 4, fraction: 0.75) == 48 && ParallelConfig.headChunk(batch: 7, replicas: 2, fraction: 0.75) == 2)
        #expect(ParallelConfig.headChunk(batch: 2, replicas: 2, fraction: 0.375) == 1 && ParallelConfig.headChunk(batch: 128, replicas: 2, fraction: 1) == 64)
        let h = try config(lenetYAML + "\nparallel: {dynamic: true, head: 0.5}\n")
        #expect(h.parallel.head == 0.5 && h.parallel.headFraction(batchNorm: true) == 0.5)
        for bad in ["0", "1.5", "-0.25", "half"] {
            #expect(expectError(["parallel.head"]) { _ = try config(lenetYAML + "\nparallel: {dynamic: true, head: \(bad)}\n") } == nil, "head: \(bad)")
        }
        #expect(expectError(["parallel.dynamic"]) { _ = try config(lenetYAML + "\nparallel: {dynamic: often}\n") } == nil)
        #expect(expectError(["parallel.chunk", "positive"]) { _ = try config(lenetYAML + "\nparallel: {dynamic: true, chunk: 0}\n") } == nil)
        let data = try syntheticData()
        let chunkAlone = try config(lenetYAML + "\nparallel: {chunk: 8}\n")
        #expect(expectError(["test.yaml", "parallel.chunk", "parallel.dynamic"]) { _ = try Trainer.checkLayout(config: chunkAlone, data: data, worldSize: 1) } == nil)
        let headAlone = try config(lenetYAML + "\nparallel: {head: 0.5}\n")
        #expect(expectError(["test.yaml", "parallel.head", "parallel.dynamic"]) { _ = try Trainer.checkLayout(config: headAlone, data: data, worldSize: 1) } == nil)
        let both = try config(lenetYAML + "\nparallel: {dynamic: true, balance: true}\n")
        #expect(expectError(["test.yaml", "parallel.dynamic and parallel.balance"]) { _ = try Trainer.checkLayout(config: both, data: data, worldSize: 2) } == nil)
        let bn = try config(lenetYAML + "\nparallel: {dynamic: true, sync_bn: true}\n")
        #expect(expectError(["test.yaml", "parallel.dynamic with parallel.sync_bn"]) { _ = try Trainer.checkLayout(config: bn, data: data, worldSize: 2) } == nil)
        // One process has no replicas to share with: sync_bn is harmless there.
        _ = try Trainer.checkLayout(config: bn, data: data, worldSize: 1)
        let towers = try config(smallAlexYAML.replacingOccurrences(of: "parallel: {towers: 2}", with: "parallel: {towers: 2, dynamic: true}"))
        #expect(expectError(["test.yaml", "parallel.dynamic", "parallel.towers 1"]) { _ = try Trainer.checkLayout(config: towers, data: data, worldSize: 2) } == nil)
    }
}
