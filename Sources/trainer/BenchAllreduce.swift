// trainer bench-allreduce: what the gradient allreduce costs on this machine, next to what memory
// bandwidth allows. Runs under mpirun (`launch/mpirun -np 2 bench-allreduce`).
//
// Per size (4 KiB .. 16 MiB, doubling), MPI_Allreduce and then, when every rank is on one machine,
// the gradient sync's shared-memory allreduce (SharedMemoryReduce, one bucket): a correctness check (rank r contributes r + 1, expects
// p(p+1)/2), warm-up calls, then single calls, each after a barrier, timed as the slowest rank's
// time (MPI_Allreduce completes on all ranks only when the last has its result); the median is
// reported. Bandwidths as in nccl-tests (PERFORMANCE.md there): algorithm bandwidth N / t, and bus
// bandwidth N / t * 2(p-1)/p, the bytes each rank must send (and receive) in a ring allreduce,
// comparable across rank counts.
//
// The same command measures memcpy bandwidth (rank 0 alone, a 64 MiB buffer, best of 3; bytes
// copied counted once, as the peers' memcpy_bw.c does) and gives the ring bound
// 2(p-1)/p * N / B_memcpy: on shared memory every byte a ring moves is at least one copy, so this
// is what a ring would take with each rank's copies at memcpy speed (it ignores the additions,
// latency and ranks competing for memory bandwidth: an optimistic floor).
import ArgumentParser
import Foundation
import TandemComm
import TandemTrain

struct BenchAllreduce: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-allreduce",
        abstract: "Time MPI allreduce from 4 KiB to 16 MiB (median, algorithm and bus bandwidth) against memcpy bandwidth and the ring bound.")
    @Option(name: .customLong("min-kb"), help: "Smallest message, in KiB.") var minKB: Int = 4
    @Option(name: .customLong("max-kb"), help: "Largest message, in KiB.") var maxKB: Int = 16 * 1024
    @Option(name: .customLong("seconds-per-size"), help: "Time spent timing each size (at least --min-reps calls).") var secondsPerSize: Double = 0.2
    @Option(name: .customLong("min-reps"), help: "Fewest timed calls per size.") var minReps: Int = 9
    @Option(help: "Write the results as JSON to this file.") var json: String?
    @Option(help: ArgumentHelp("Add key=value to the JSON (repeatable).", valueName: "key=value")) var tag: [String] = []

    mutating func validate() throws {
        if minKB <= 0 || maxKB < minKB { throw ValidationError("--min-kb must be positive and --max-kb at least --min-kb") }
        if !(secondsPerSize > 0) || minReps <= 0 { throw ValidationError("--seconds-per-size and --min-reps must be positive") }
        for t in tag where !t.contains("=") { throw ValidationError("--tag must be key=value, got \(t)") }
    }

    func run() throws {
        runReportingErrors {
            let comm = try makeWorld()
            let p = comm.size
            let maxCount = maxKB * 1024 / 4
            let buffer = UnsafeMutablePointer<Float>.allocate(capacity: maxCount)
            defer { buffer.deallocate() }
            buffer.initialize(repeating: 0, count: maxCount)

            // Memory bandwidth first, while the other ranks wait: rank 0 alone on its core.
            var memcpyGBps = [0.0]
            if comm.rank == 0 { memcpyGBps[0] = measureMemcpy(bytes: 64 << 20) }
            if p > 1 { try comm.allreduceSum(&memcpyGBps, count: 1) }
            let bw = memcpyGBps[0] * 1e9
            let busFactor = p > 1 ? 2 * Double(p - 1) / Double(p) : 0

            let cores = ProcessInfo.processInfo.activeProcessorCount
            let local = ranksOnThisMachine(comm)
            if comm.rank == 0 {
                print("allreduce (in place, float sum) over \(p) rank(s), \(local) on this machine's \(cores) core(s)\(local > cores ? " (oversubscribed)" : ""); memcpy \(String(format: "%.2f", memcpyGBps[0])) GB/s (one rank, 64 MiB)")
                print("     bytes   calls   median us      min us   algbw GB/s   busbw GB/s   ring bound us   bound/median  check   shared memory: median us  busbw GB/s  check")
            }
            var rows: [[String: Any]] = []
            var bytes = minKB * 1024
            while bytes <= maxKB * 1024 {
                let count = bytes / 4
                // Correctness: rank r contributes r + 1.
                buffer.update(repeating: Float(comm.rank + 1), count: count)
                try comm.allreduceSum(buffer, count: count)
                let expect = Float(p * (p + 1) / 2)
                var ok: [Int64] = [(0..<count).allSatisfy { buffer[$0] == expect } ? 0 : 1]
                if p > 1 { try comm.allreduceSum(&ok, count: 1) }
                // Timing on zeros (finite, no denormals).
                buffer.update(repeating: 0, count: count)
                for _ in 0..<3 { try comm.allreduceSum(buffer, count: count) }
                // Calls to make: from a rough estimate, rank 0's count for every rank.
                try comm.barrier()
                let e0 = Clock.now
                for _ in 0..<3 { try comm.allreduceSum(buffer, count: count) }
                var reps = [Double(max(minReps, min(2000, Int(secondsPerSize / max((Clock.now - e0) / 3, 1e-7)))))]
                try comm.broadcast(&reps, bytes: 8, root: 0)
                var times = [Double](repeating: 0, count: Int(reps[0]))
                for i in times.indices {
                    try comm.barrier()
                    let t0 = Clock.now
                    try comm.allreduceSum(buffer, count: count)
                    times[i] = Clock.now - t0
                }
                // Each call's time is the slowest rank's (the communicator has no max-reduction:
                // every rank gathers all ranks' times).
                var all = [Double](repeating: 0, count: times.count * p)
                try times.withUnsafeBytes { src in
                    try all.withUnsafeMutableBytes { dst in try comm.allgather(src.baseAddress!, bytes: src.count, into: dst.baseAddress!) }
                }
                let slowest = (0..<times.count).map { i in (0..<p).map { all[$0 * times.count + i] }.max()! }.sorted()
                let median = slowest[slowest.count / 2], fastest = slowest[0]
                let algbw = Double(bytes) / median / 1e9
                let bound = busFactor * Double(bytes) / bw
                var row: [String: Any] = ["bytes": bytes, "floats": count, "calls": times.count, "median_us": median * 1e6, "min_us": fastest * 1e6,
                                          "algbw_gbps": algbw, "busbw_gbps": algbw * busFactor, "ring_bound_us": bound * 1e6,
                                          "bound_fraction": bound / median, "check": ok[0] == 0]
                // The same size through the gradient sync's shared-memory allreduce (ranks on one machine).
                var shared = ""
                if p > 1, let engine = try SharedMemoryReduce.single(comm: comm, buffer: UnsafeMutableBufferPointer(start: buffer, count: count)) {
                    buffer.update(repeating: Float(comm.rank + 1), count: count)
                    engine.allreduce()
                    var bad: [Int64] = [(0..<count).allSatisfy { buffer[$0] == expect } ? 0 : 1]
                    try comm.allreduceSum(&bad, count: 1)
                    buffer.update(repeating: 0, count: count)
                    for _ in 0..<3 { engine.allreduce() }
                    for i in times.indices {
                        try comm.barrier()
                        let t0 = Clock.now
                        engine.allreduce()
                        times[i] = Clock.now - t0
                    }
                    try times.withUnsafeBytes { src in
                        try all.withUnsafeMutableBytes { dst in try comm.allgather(src.baseAddress!, bytes: src.count, into: dst.baseAddress!) }
                    }
                    let sharedMedian = (0..<times.count).map { i in (0..<p).map { all[$0 * times.count + i] }.max()! }.sorted()[times.count / 2]
                    let sharedBus = Double(bytes) / sharedMedian / 1e9 * busFactor
                    shared = String(format: "   %24.1f %11.3f  %@", sharedMedian * 1e6, sharedBus, bad[0] == 0 ? "ok" : "FAIL")
                    row["shared_memory"] = ["median_us": sharedMedian * 1e6, "busbw_gbps": sharedBus, "check": bad[0] == 0] as [String: Any]
                }
                if comm.rank == 0 {
                    print(String(format: "%10d %7d %11.1f %11.1f %12.3f %12.3f %15.1f %14.2f  %@", bytes, times.count, median * 1e6, fastest * 1e6,
                                 algbw, algbw * busFactor, bound * 1e6, bound / median, ok[0] == 0 ? "ok" : "FAIL") + shared)
                }
                rows.append(row)
                bytes *= 2
            }
            if comm.rank == 0, let json {
                let result: [String: Any] = [
                    "kind": "allreduce", "world_size": p, "cores": cores, "ranks_on_this_machine": local, "oversubscribed": local > cores,
                    "memcpy_gbps": memcpyGBps[0], "memcpy_bytes": 64 << 20, "bus_factor": busFactor, "rows": rows,
                    "tags": tagDictionary(tag),
                ]
                let d = try JSONSerialization.data(withJSONObject: result, options: [.prettyPrinted, .sortedKeys])
                try writeAtomically(d, to: json)
            }
        }
    }
}

/// memcpy bandwidth in GB/s (1e9 bytes copied per second, counted once): best of 3 runs of ~0.1 s.
func measureMemcpy(bytes: Int) -> Double {
    let src = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
    let dst = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
    defer { src.deallocate(); dst.deallocate() }
    memset(src, 1, bytes)
    memset(dst, 2, bytes)
    var best = 0.0
    for _ in 0..<3 {
        var copies = 0
        let t0 = Clock.now
        var t = 0.0
        repeat {
            memcpy(dst, src, bytes)
            copies += 1
            t = Clock.now - t0
        } while t < 0.1
        best = max(best, Double(bytes) * Double(copies) / t / 1e9)
    }
    return best
}
