// trainer bench --interleave K: the data-parallel job against its ranks training apart, measured in
// one sitting. Blocks of K synced steps alternate with blocks as long in which every rank trains its
// own share of the batch with a trainer of its own (one process's world: no gradient sync, no
// meeting), in the order synced, apart, apart, synced, ... Each rank's rate apart, summed over the
// ranks, is what two separate single-thread processes get side by side (launch/weak-scaling's pinned
// pair); alternating every fraction of a second cancels the host's drift in speed, which moves
// separate runs seconds apart by 10-20%.
import Foundation
import TandemComm
import TandemTrain

/// What the interleaved blocks measured, gathered from every rank.
struct InterleavedResult {
    /// The synced blocks' time, the slowest rank's (the job's images/s is its global batches over this).
    var syncedSeconds: Double
    /// Per rank, images/s apart: its own share's steps over its blocks apart.
    var apartPerRank: [Double]
    /// The blocks of synced steps.
    var blocks: Int
    /// Per rank, steps taken apart.
    var apartSteps: [Int]
    /// Per rank, ms per step apart: data, forward and backward, the rest (finite check), optimizer.
    var apartPhases: [[Double]]

    var apartImagesPerSecond: Double { apartPerRank.reduce(0, +) }

    func json(syncedImagesPerSecond: Double, k: Int) -> [String: Any] {
        ["steps_per_block": k, "blocks": blocks, "synced_images_per_second": syncedImagesPerSecond,
         "apart_images_per_second": apartImagesPerSecond, "apart_per_rank": apartPerRank, "apart_steps": apartSteps,
         "apart_phases_ms": apartPhases.map { Dictionary(uniqueKeysWithValues: zip(["data", "compute", "rest", "optimizer"], $0)) },
         "synced_over_apart": syncedImagesPerSecond / apartImagesPerSecond]
    }
}

/// The trainer each rank trains apart with: the same model and weights at this rank's even share of
/// the global batch, with the replica's threads, in a world of its own.
func apartTrainer(config c: TrainConfig, synced: Trainer, worldSize: Int, data: DataPipeline, initWeights: String?) throws -> Trainer {
    var a = c
    a.batchSize = c.batchSize / worldSize
    a.parallel.towers = 1
    a.parallel.balance = false
    a.parallel.dynamic = false
    a.parallel.head = 0
    a.parallel.headAuto = false
    a.parallel.chunk = 0
    a.parallel.syncBN = false
    a.parallel.threads = synced.threads
    var o = RunOptions()
    o.quiet = true
    o.initWeights = initWeights
    return try Trainer(config: a, comm: SingleProcessCommunicator(), data: data, options: o)
}

/// Runs `steps` synced steps in blocks of `k`, each beside a block apart as long as the last synced
/// block (each rank steps apart until that time has passed, so that both stay busy throughout, as
/// two separate processes do); the barrier before each block keeps the ranks' blocks together.
func runInterleaved(synced: Trainer, apart: Trainer, comm: Communicator, steps: Int, k: Int, globalBatch: Int, timing: StepTiming) throws -> InterleavedResult {
    let share = globalBatch / comm.size
    let perEpoch = max(1, synced.data.train.count / globalBatch), apartPerEpoch = max(1, apart.data.train.count / share)
    var syncedTime = 0.0, apartTime = 0.0, last = 0.0
    var done = 0, apartDone = 0, blocks = 0
    let apartTiming = StepTiming()
    func syncedBlock(_ n: Int) throws {
        try comm.barrier()
        let t0 = Clock.now
        for s in done..<(done + n) {
            _ = try synced.step(epoch: 0, start: (s % perEpoch) * globalBatch, globalCount: globalBatch, step: s, lr: 1e-4, timing: timing)
        }
        last = Clock.now - t0
        syncedTime += last
        done += n
    }
    func apartBlock() throws {
        try comm.barrier()
        let t0 = Clock.now
        var t = t0
        repeat {
            let s = apartDone + comm.rank * apartPerEpoch / max(1, comm.size)
            _ = try apart.step(epoch: 0, start: (s % apartPerEpoch) * share, globalCount: share, step: apartDone, lr: 1e-4, timing: apartTiming)
            apartDone += 1
            t = Clock.now
        } while t - t0 < last
        apartTime += t - t0
    }
    while done < steps {
        let n = min(k, steps - done)
        if blocks % 2 == 0 {
            try syncedBlock(n)
            try apartBlock()
        } else {
            try apartBlock()
            try syncedBlock(n)
        }
        blocks += 1
    }
    try comm.barrier()
    let perStep = 1000 / Double(max(1, apartDone))
    let all = try fromEveryRank([syncedTime, apartTime, Double(apartDone)]
                                + [apartTiming.data, apartTiming.compute, apartTiming.allreduce, apartTiming.optimizer].map { $0 * perStep }, comm: comm)
    return InterleavedResult(syncedSeconds: all.map { $0[0] }.max()!, apartPerRank: all.map { $0[2] * Double(share) / $0[1] },
                             blocks: blocks, apartSteps: all.map { Int($0[2]) }, apartPhases: all.map { Array($0[3...]) })
}
