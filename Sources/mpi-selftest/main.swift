// mpi-selftest: runs every collective of MPICommunicator on the world and on split
// communicators and checks the values, as Horovod's parallel tests do: every rank seeds the
// same tensor and expects tensor * size, and rank-dependent inputs have known sums.
//
//   mpirun --allow-run-as-root --oversubscribe -np 4 mpi-selftest    (or run it alone: size 1)
//   mpirun --allow-run-as-root -np 2 mpi-selftest --overlap-bench     (use a release build)
//       For 2 ranks OpenMPI 4.1's libnbc picks a binomial MPI_Iallreduce, about twice as slow as
//       the blocking MPI_Allreduce; `--mca coll_libnbc_iallreduce_algorithm 1` (ring) matches it.
//   mpirun --allow-run-as-root -np 2 mpi-selftest --fail-on-rank 1    (checks the failure path)
//
// Prints "mpi-selftest: OK (size N)" on rank 0 and exits 0; on a failure prints it, naming
// the rank, and ends the job with status 1 (MPI_Abort, so no rank is left waiting).
import Foundation
import TandemComm
import TandemMPI

struct SelfTestFailure: Error, CustomStringConvertible {
    let description: String
}

/// Throws a failure naming what was checked, the communicator and the rank.
func expect(_ condition: Bool, _ what: @autoclosure () -> String) throws {
    if !condition { throw SelfTestFailure(description: what()) }
}

/// Seeds the same values on every rank. Small multiples of 1/4 so that sums stay exact.
func seed(_ count: Int) -> [Float] {
    (0..<count).map { Float($0 % 97) * 0.25 - 3 }
}

// MARK: - Collectives

/// Runs every collective once on `comm` and checks the results. `label` names the
/// communicator in failures; `large` adds 4 MB sums (OpenMPI picks other algorithms for them).
func checkCollectives(_ comm: Communicator, label: String, large: Bool = false) throws {
    let size = comm.size, rank = comm.rank
    let where_ = "\(label) (rank \(rank) of \(size))"

    // Same tensor on every rank: expect tensor * size.
    let n = 1031
    var tensor = seed(n)
    try tensor.withUnsafeMutableBufferPointer { try comm.allreduceSum($0.baseAddress!, count: n) }
    let expected = seed(n).map { $0 * Float(size) }
    try expect(tensor == expected, "allreduceSum(Float) on \(where_): got \(tensor.prefix(4)), expected \(expected.prefix(4))")

    // Rank r contributes r + 1: expect size(size+1)/2.
    let triangle = size * (size + 1) / 2
    var ranked = [Float](repeating: Float(rank + 1), count: 17)
    try ranked.withUnsafeMutableBufferPointer { try comm.allreduceSum($0.baseAddress!, count: 17) }
    try expect(ranked.allSatisfy { $0 == Float(triangle) }, "allreduceSum(Float, r+1) on \(where_): got \(ranked[0]), expected \(triangle)")

    var doubles = (0..<33).map { Double($0) / 8 + Double(rank) }
    try doubles.withUnsafeMutableBufferPointer { try comm.allreduceSum($0.baseAddress!, count: 33) }
    let doublesExpected = (0..<33).map { Double($0) / 8 * Double(size) + Double(size * (size - 1) / 2) }
    try expect(doubles == doublesExpected, "allreduceSum(Double) on \(where_): got \(doubles.prefix(3)), expected \(doublesExpected.prefix(3))")

    // Past 2^53, so that a sum done in Double (a wrong datatype) would show.
    let big: Int64 = (1 << 60) / 8
    var longs = (0..<9).map { big + Int64($0) * 1_000_003 + Int64(rank) }
    try longs.withUnsafeMutableBufferPointer { try comm.allreduceSum($0.baseAddress!, count: 9) }
    let longsExpected = (0..<9).map { (big + Int64($0) * 1_000_003) * Int64(size) + Int64(size * (size - 1) / 2) }
    try expect(longs == longsExpected, "allreduceSum(Int64) on \(where_): got \(longs.prefix(2)), expected \(longsExpected.prefix(2))")

    // An empty sum is still a collective call on every rank.
    var empty = [Float](repeating: 1, count: 1)
    try empty.withUnsafeMutableBufferPointer { try comm.allreduceSum($0.baseAddress!, count: 0) }
    try expect(empty == [1], "allreduceSum(count 0) on \(where_) changed the buffer")

    // Non-blocking: poll a few times, then wait.
    let buffer = UnsafeMutablePointer<Float>.allocate(capacity: n)
    defer { buffer.deallocate() }
    buffer.initialize(from: seed(n), count: n)
    let request = try comm.startAllreduceSum(buffer, count: n)
    var polls = 0
    while try !request.test(), polls < 1000 { polls += 1 }
    try request.wait()
    try expect(try request.test(), "startAllreduceSum on \(where_): test() false after wait()")
    try expect(Array(UnsafeBufferPointer(start: buffer, count: n)) == expected, "startAllreduceSum on \(where_): wrong sum")

    // Broadcast from the last rank (non-zero whenever size > 1).
    let root = size - 1
    let bytes = 1000
    var message = [UInt8](repeating: 0, count: bytes)
    if rank == root { for i in 0..<bytes { message[i] = UInt8(truncatingIfNeeded: i * 7 + 3) } }
    try message.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: bytes, root: root) }
    try expect(message == (0..<bytes).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }, "broadcast from root \(root) on \(where_): wrong bytes")

    // Allgather: rank r's 13 bytes land at offset 13 r.
    let piece = 13
    let mine = (0..<piece).map { UInt8(truncatingIfNeeded: rank * 31 + $0) }
    var gathered = [UInt8](repeating: 0, count: piece * size)
    try mine.withUnsafeBytes { send in
        try gathered.withUnsafeMutableBytes { try comm.allgather(send.baseAddress!, bytes: piece, into: $0.baseAddress!) }
    }
    let gatheredExpected = (0..<size).flatMap { r in (0..<piece).map { UInt8(truncatingIfNeeded: r * 31 + $0) } }
    try expect(gathered == gatheredExpected, "allgather on \(where_): got \(gathered.prefix(2 * piece)), expected rank order")

    // Reduce-scatter: rank q sends (q+1) * (global index); rank r receives block r times size(size+1)/2.
    let perRank = 11
    let send = (0..<(size * perRank)).map { Float(rank + 1) * Float($0) }
    var received = [Float](repeating: -1, count: perRank)
    try send.withUnsafeBufferPointer { s in
        try received.withUnsafeMutableBufferPointer { try comm.reduceScatterSum(s.baseAddress!, into: $0.baseAddress!, countPerRank: perRank) }
    }
    let receivedExpected = (0..<perRank).map { Float(triangle) * Float(rank * perRank + $0) }
    try expect(received == receivedExpected, "reduceScatterSum on \(where_): got \(received.prefix(3)), expected \(receivedExpected.prefix(3))")

    if large {
        let count = (1 << 20) + 3
        let big = UnsafeMutablePointer<Float>.allocate(capacity: count)
        defer { big.deallocate() }
        let bigSeed = seed(count)
        big.initialize(from: bigSeed, count: count)
        try comm.allreduceSum(big, count: count)
        try expect((0..<count).allSatisfy { big[$0] == bigSeed[$0] * Float(size) }, "allreduceSum(Float, 4 MB) on \(where_): wrong sum")
        big.update(from: bigSeed, count: count)
        let request = try comm.startAllreduceSum(big, count: count)
        _ = try request.test()
        try request.wait()
        try expect((0..<count).allSatisfy { big[$0] == bigSeed[$0] * Float(size) }, "startAllreduceSum(4 MB) on \(where_): wrong sum")
    }

    try comm.barrier()
}

/// MPI errors come back as CommError naming the call, and the communicator stays usable.
func checkErrors(_ world: MPICommunicator) throws {
    var byte: UInt8 = 0
    do {
        try world.broadcast(&byte, bytes: 1, root: world.size)
        throw SelfTestFailure(description: "broadcast to root \(world.size) of \(world.size) ranks did not throw")
    } catch let error as CommError {
        try expect(error.message.hasPrefix("MPI_Bcast failed: MPI_ERR_ROOT"), "bad root gave \"\(error)\", expected MPI_Bcast failed: MPI_ERR_ROOT ...")
    }
    do {
        _ = try world.split(color: -5, key: 0)
        throw SelfTestFailure(description: "split with color -5 did not throw")
    } catch let error as CommError {
        try expect(error.message == "MPI_Comm_split failed: color -5 is negative (rank \(world.rank))", "negative color gave \"\(error)\"")
    }
    try world.barrier()
}

/// Splits the world the way the trainer does and runs the collectives inside each group.
func checkSplits(_ world: MPICommunicator) throws {
    let size = world.size, rank = world.rank

    // Key -rank reverses the order.
    let reversed = try world.split(color: 0, key: -rank)
    try expect(reversed.size == size && reversed.rank == size - 1 - rank, "split(key: -rank): rank \(reversed.rank) of \(reversed.size), expected \(size - 1 - rank) of \(size)")
    try checkCollectives(reversed, label: "reversed world")

    // Odd and even ranks: works for any size.
    let parity = try world.split(color: rank % 2, key: rank)
    try expect(parity.rank == rank / 2 && parity.size == (size + 1 - rank % 2) / 2, "split(color: rank % 2): rank \(parity.rank) of \(parity.size)")
    try checkCollectives(parity, label: "parity group \(rank % 2)")

    guard size % 2 == 0 else { return }
    // 2 towers x size/2 replicas: a tower group holds the two towers of one replica,
    // a replica group holds the same tower of every replica.
    let tower = try world.split(color: rank / 2, key: rank)
    let replica = try world.split(color: rank % 2, key: rank)
    try expect(tower.size == 2 && tower.rank == rank % 2, "tower group: rank \(tower.rank) of \(tower.size), expected \(rank % 2) of 2")
    try expect(replica.size == size / 2 && replica.rank == rank / 2, "replica group: rank \(replica.rank) of \(replica.size), expected \(rank / 2) of \(size / 2)")
    try checkCollectives(tower, label: "tower group \(rank / 2)")
    try checkCollectives(replica, label: "replica group \(rank % 2)", large: true)

    // As in training: a gradient sum over replicas in flight while the towers exchange.
    let n = 4099
    let gradients = UnsafeMutablePointer<Float>.allocate(capacity: n)
    defer { gradients.deallocate() }
    gradients.initialize(from: seed(n), count: n)
    let request = try replica.startAllreduceSum(gradients, count: n)
    var activations = [Float](repeating: Float(rank + 1), count: 257)
    try activations.withUnsafeMutableBufferPointer { try tower.allreduceSum($0.baseAddress!, count: 257) }
    _ = try request.test()
    try request.wait()
    let towerSum = Float(rank / 2 * 2 + 1) + Float(rank / 2 * 2 + 2)
    try expect(activations.allSatisfy { $0 == towerSum }, "tower allreduce during replica Iallreduce: got \(activations[0]), expected \(towerSum)")
    let replicaExpected = seed(n).map { $0 * Float(size / 2) }
    try expect(Array(UnsafeBufferPointer(start: gradients, count: n)) == replicaExpected, "replica Iallreduce overlapped with tower allreduce: wrong sum")
}

// MARK: - Overlap benchmark

/// Busy compute that stays in L1 (so it competes for the core, not for memory bandwidth).
@inline(never)
func busyWork(_ scratch: UnsafeMutablePointer<Float>, iterations: Int) {
    for _ in 0..<iterations {
        for i in 0..<256 { scratch[i] = scratch[i] * 0.999_9 + 0.000_1 }
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) * 1e-18
}

func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted[sorted.count / 2]
}

/// Times a blocking allreduce of 4 MB against MPI_Iallreduce overlapped with about as much
/// compute, once without touching MPI during the compute and once polling MPI_Test every
/// ~0.5 ms. The variants take turns within each repetition, so that load from elsewhere on
/// the machine hits them alike. Reports medians over the repetitions, averaged over ranks.
func overlapBench(_ world: MPICommunicator) throws {
    let count = 1 << 20, repeats = 50
    let clock = ContinuousClock()
    let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
    defer { buffer.deallocate() }
    buffer.initialize(repeating: 1, count: count)
    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 256)
    defer { scratch.deallocate() }
    scratch.initialize(repeating: 0.5, count: 256)

    /// Seconds `body` takes on this rank, starting together after a barrier.
    func time(_ body: () throws -> Void) throws -> Double {
        try world.barrier()
        let start = clock.now
        try body()
        return seconds(clock.now - start)
    }
    /// Mean over ranks of this rank's median.
    func summary(_ times: [Double]) throws -> Double {
        var value = median(times)
        try world.allreduceSum(&value, count: 1)
        return value / Double(world.size)
    }

    /// Iallreduce started, `iterations` of compute with MPI_Test after every `slice` of them
    /// (never if nil), then MPI_Wait. Returns total and final-wait seconds and the polls made.
    func overlapped(iterations: Int, slice: Int?) throws -> (total: Double, wait: Double, polls: Int) {
        var wait = 0.0, polls = 0
        let total = try time {
            let request = try world.startAllreduceSum(buffer, count: count)
            var done = 0
            while done < iterations {
                let n = min(slice ?? iterations, iterations - done)
                busyWork(scratch, iterations: n)
                done += n
                if slice != nil { _ = try request.test(); polls += 1 }
            }
            let waitStart = clock.now
            try request.wait()
            wait = seconds(clock.now - waitStart)
        }
        return (total, wait, polls)
    }

    // Calibrate the compute to take about as long as the blocking allreduce, measured as in
    // the timed loop (interleaved with compute); every rank uses rank 0's figures so that all
    // ranks compute the same amount.
    for _ in 0..<10 { try world.allreduceSum(buffer, count: count) }
    var probe = [Double](repeating: 0, count: 2)
    var blockingProbe: [Double] = [], computeProbe: [Double] = []
    for _ in 0..<15 {
        blockingProbe.append(try time { try world.allreduceSum(buffer, count: count) })
        computeProbe.append(try time { busyWork(scratch, iterations: 20_000) })
    }
    probe = [median(blockingProbe), median(computeProbe) / 20_000]
    try world.broadcast(&probe, bytes: 2 * MemoryLayout<Double>.size, root: 0)
    let iterations = max(1, Int(probe[0] / probe[1]))
    let slices: [(label: String, iterations: Int?)] = [
        ("no MPI_Test          ", nil),
        ("MPI_Test every 0.5 ms", max(1, Int(0.000_5 / probe[1]))),
        ("MPI_Test every 50 us ", max(1, Int(0.000_05 / probe[1]))),
    ]

    var blocking: [Double] = [], compute: [Double] = [], iallreduce: [Double] = []
    var totals = [[Double]](repeating: [], count: slices.count), waits = totals
    var polls = [Int](repeating: 0, count: slices.count)
    for _ in 0..<repeats {
        blocking.append(try time { try world.allreduceSum(buffer, count: count) })
        compute.append(try time { busyWork(scratch, iterations: iterations) })
        iallreduce.append(try time { try world.startAllreduceSum(buffer, count: count).wait() })
        for (k, slice) in slices.enumerated() {
            let run = try overlapped(iterations: iterations, slice: slice.iterations)
            totals[k].append(run.total)
            waits[k].append(run.wait)
            polls[k] += run.polls
        }
    }
    let a = try summary(blocking), c = try summary(compute), i = try summary(iallreduce)
    let rows = try slices.indices.map { (try summary(totals[$0]), try summary(waits[$0]), polls[$0] / repeats) }

    guard world.rank == 0 else { return }
    func ms(_ s: Double) -> String { String(format: "%6.3f ms", s * 1000) }
    func percent(_ x: Double) -> String { String(format: "%6.1f%%", 100 * x) }
    print("overlap-bench: \(world.size) ranks, \(count * 4 / 1_000_000) MB float sum; medians of \(repeats), mean over ranks")
    print("  A  blocking MPI_Allreduce                       \(ms(a))")
    print("  I  MPI_Iallreduce, MPI_Wait at once              \(ms(i))")
    print("  C  compute alone (\(iterations) x 256 multiply-adds)  \(ms(c))")
    for (k, row) in rows.enumerated() {
        print("  Iallreduce + C, \(slices[k].label)  \(ms(row.0))  final wait \(ms(row.1))  hidden \(percent((a + c - row.0) / a)) of A, \(percent((i + c - row.0) / i)) of I, \(row.2) polls")
    }
    print("  hidden = (A + C - overlapped) / A (and with I for A): 100% = the sum cost nothing on top of C")
}

// MARK: - Main

func main() -> Int32 {
    let world: MPICommunicator
    do {
        world = try MPICommunicator.initialize()
    } catch {
        print("mpi-selftest: FAILED: \(error)")
        return 1
    }
    do {
        try expect(try MPICommunicator.initialize() === world, "a second initialize() returned another world")
        try expect(MPICommunicator.launchedByMPI || world.size == 1, "launchedByMPI is false in a world of \(world.size)")
        if CommandLine.arguments.contains("--overlap-bench") {
            try overlapBench(world)
        } else {
            try checkCollectives(world, label: "world", large: true)
            if let flag = CommandLine.arguments.firstIndex(of: "--fail-on-rank"), flag + 1 < CommandLine.arguments.count,
               Int(CommandLine.arguments[flag + 1]) == world.rank {
                throw SelfTestFailure(description: "failure injected by --fail-on-rank")
            }
            world.maxCountPerCall = 5   // every collective in chunks
            try checkCollectives(world, label: "world in chunks of 5")
            world.maxCountPerCall = Int(Int32.max)
            try checkErrors(world)
            try checkSplits(world)
            try world.barrier()
            if world.rank == 0 { print("mpi-selftest: OK (size \(world.size))") }
        }
    } catch {
        print("mpi-selftest: FAILED on rank \(world.rank) of \(world.size): \(error)")
        fflush(nil)   // MPI_Abort does not flush stdio
        world.abort(code: 1)
    }
    MPICommunicator.finalize()
    return 0
}

exit(main())
