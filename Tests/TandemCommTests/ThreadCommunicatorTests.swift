// ThreadCommunicator: every collective with 1 to 4 ranks, splits into grids, and failures
// that must throw on every rank instead of hanging.
import Foundation
import Testing
import TandemComm

@Suite("ThreadCommunicator")
struct ThreadCommunicatorTests {
    static let sizes = [1, 2, 3, 4]

    // MARK: - Sums

    @Test("allreduceSum(Float): rank r gives r+1", arguments: sizes)
    func allreduceFloat(size: Int) throws {
        let results = try runRanks(size) { comm in
            var buffer = [Float](repeating: Float(comm.rank + 1), count: 1001)
            try comm.allreduceSum(&buffer, count: buffer.count)
            return buffer
        }
        let expected = Float(size * (size + 1) / 2)
        for (rank, buffer) in results.enumerated() {
            #expect(buffer.allSatisfy { $0 == expected }, "rank \(rank)")
        }
    }

    @Test("allreduceSum(Float) adds in rank order: bit-identical on every rank and across runs", arguments: sizes)
    func allreduceDeterministic(size: Int) throws {
        let count = 4097
        func once() throws -> [[UInt32]] {
            try runRanks(size) { comm in
                var buffer = noise(rank: comm.rank, count: count)
                try comm.allreduceSum(&buffer, count: count)
                return buffer.map(\.bitPattern)
            }
        }
        let first = try once(), second = try once()
        var ordered = noise(rank: 0, count: count)
        for r in 1..<size {
            let next = noise(rank: r, count: count)
            for i in 0..<count { ordered[i] += next[i] }
        }
        for rank in 0..<size {
            #expect(first[rank] == first[0], "rank \(rank) differs from rank 0")
            #expect(second[rank] == first[rank], "rank \(rank) differs between runs")
        }
        #expect(first[0] == ordered.map(\.bitPattern), "not summed in rank order 0, 1, 2, ...")
    }

    @Test("allreduceSum(Double) and allreduceSum(Int64)", arguments: sizes)
    func allreduceDoubleAndInt64(size: Int) throws {
        let results = try runRanks(size) { comm in
            var doubles = (0..<10).map { Double($0) * 0.5 + Double(comm.rank) }
            try comm.allreduceSum(&doubles, count: doubles.count)
            var longs = (0..<10).map { Int64(1) << 55 + Int64($0) + Int64(comm.rank) }
            try comm.allreduceSum(&longs, count: longs.count)
            return (doubles, longs)
        }
        let ranks = size * (size - 1) / 2
        let doubles = (0..<10).map { Double($0) * 0.5 * Double(size) + Double(ranks) }
        let longs = (0..<10).map { (Int64(1) << 55 + Int64($0)) * Int64(size) + Int64(ranks) }
        for (rank, result) in results.enumerated() {
            #expect(result.0 == doubles, "rank \(rank)")
            #expect(result.1 == longs, "rank \(rank)")
        }
    }

    @Test("startAllreduceSum completes however often each rank calls test()", arguments: sizes)
    func nonBlockingAllreduce(size: Int) throws {
        let results = try runRanks(size) { comm in
            let count = 333
            let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
            defer { buffer.deallocate() }
            buffer.initialize(repeating: Float(comm.rank + 1), count: count)
            let request = try comm.startAllreduceSum(buffer, count: count)
            for _ in 0..<(comm.rank * 3) { _ = try request.test() }   // rank 0 never polls
            try request.wait()
            let completed = try request.test()
            return (completed, Array(UnsafeBufferPointer(start: buffer, count: count)))
        }
        for (rank, result) in results.enumerated() {
            #expect(result.0, "rank \(rank): test() false after wait()")
            #expect(result.1.allSatisfy { $0 == Float(size * (size + 1) / 2) }, "rank \(rank)")
        }
    }

    // MARK: - Data movement

    @Test("broadcast from the last rank", arguments: sizes)
    func broadcastFromNonZeroRoot(size: Int) throws {
        let root = size - 1
        let results = try runRanks(size) { comm in
            var bytes = [UInt8](repeating: 0, count: 77)
            if comm.rank == root { for i in bytes.indices { bytes[i] = UInt8(i + 100) } }
            try bytes.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: 77, root: root) }
            return bytes
        }
        for (rank, bytes) in results.enumerated() {
            #expect(bytes == (0..<77).map { UInt8($0 + 100) }, "rank \(rank)")
        }
    }

    @Test("allgather puts rank r's bytes at offset r * bytes", arguments: sizes)
    func allgatherOrder(size: Int) throws {
        let results = try runRanks(size) { comm in
            let send = (0..<5).map { UInt8(comm.rank * 10 + $0) }
            var receive = [UInt8](repeating: 0, count: 5 * comm.size)
            try send.withUnsafeBytes { s in
                try receive.withUnsafeMutableBytes { try comm.allgather(s.baseAddress!, bytes: 5, into: $0.baseAddress!) }
            }
            return receive
        }
        let expected = (0..<size).flatMap { r in (0..<5).map { UInt8(r * 10 + $0) } }
        for (rank, received) in results.enumerated() {
            #expect(received == expected, "rank \(rank)")
        }
    }

    @Test("reduceScatterSum gives rank r the sum of block r", arguments: sizes)
    func reduceScatter(size: Int) throws {
        let perRank = 6
        let results = try runRanks(size) { comm in
            let send = (0..<(comm.size * perRank)).map { Float($0) * Float(comm.rank + 1) }
            var receive = [Float](repeating: -1, count: perRank)
            try comm.reduceScatterSum(send, into: &receive, countPerRank: perRank)
            return receive
        }
        for (rank, received) in results.enumerated() {
            let expected = (0..<perRank).map { Float(rank * perRank + $0) * Float(size * (size + 1) / 2) }
            #expect(received == expected, "rank \(rank)")
        }
    }

    @Test("barrier: nobody leaves before everyone arrived", arguments: sizes)
    func barrier(size: Int) throws {
        let arrived = Locked(0)
        let seen = try runRanks(size) { comm in
            var counts: [Int] = []
            for round in 1...20 {
                if comm.rank == round % comm.size { Thread.sleep(forTimeInterval: 0.001) }   // a late rank
                arrived.update { $0 += 1 }
                try comm.barrier()
                counts.append(arrived.value)
                try comm.barrier()   // nobody starts the next round before all have read
            }
            return counts
        }
        for (rank, counts) in seen.enumerated() {
            #expect(counts == (1...20).map { $0 * size }, "rank \(rank)")
        }
    }

    // MARK: - Split

    @Test("split 4 ranks into a 2x2 grid; collectives in both groups run concurrently")
    func splitGrid() throws {
        let results = try runRanks(4) { comm in
            let tower = try comm.split(color: comm.rank / 2, key: comm.rank)     // {0,1} {2,3}
            let replica = try comm.split(color: comm.rank % 2, key: comm.rank)   // {0,2} {1,3}
            var towerSums: [Float] = [], replicaSums: [Float] = []
            for step in 0..<50 {
                var a = [Float](repeating: Float(comm.rank + 1 + step), count: 64)
                try tower.allreduceSum(&a, count: a.count)
                var b = [Float](repeating: Float(10 * (comm.rank + 1) + step), count: 64)
                let request = try replica.startAllreduceSum(&b, count: b.count)
                try tower.barrier()
                try request.wait()
                try replica.barrier()
                towerSums.append(a[63])
                replicaSums.append(b[0])
            }
            return [tower.rank, tower.size, replica.rank, replica.size].map(Float.init) + towerSums + replicaSums
        }
        for rank in 0..<4 {
            let r = results[rank]
            #expect(Array(r[0..<4]) == [Float(rank % 2), 2, Float(rank / 2), 2], "rank \(rank): group ranks and sizes")
            let towerMates = [rank / 2 * 2, rank / 2 * 2 + 1], replicaMates = [rank % 2, rank % 2 + 2]
            for step in 0..<50 {
                #expect(r[4 + step] == Float(towerMates.map { $0 + 1 + step }.reduce(0, +)), "rank \(rank) tower step \(step)")
                #expect(r[54 + step] == Float(replicaMates.map { 10 * ($0 + 1) + step }.reduce(0, +)), "rank \(rank) replica step \(step)")
            }
        }
    }

    @Test("split orders by key, ties by rank, and nests")
    func splitOrderAndNesting() throws {
        let results = try runRanks(3) { comm in
            let reversed = try comm.split(color: 7, key: -comm.rank)
            let tied = try comm.split(color: 0, key: 0)
            let parity = try comm.split(color: comm.rank % 2, key: comm.rank)
            let nested = try reversed.split(color: 0, key: reversed.rank)
            var sum = [Int64(comm.rank)]
            try nested.allreduceSum(&sum, count: 1)
            return [reversed.rank, reversed.size, tied.rank, parity.rank, parity.size, nested.rank, Int(sum[0])]
        }
        #expect(results[0] == [2, 3, 0, 0, 2, 2, 3])
        #expect(results[1] == [1, 3, 1, 0, 1, 1, 3])
        #expect(results[2] == [0, 3, 2, 1, 2, 0, 3])
    }

    // MARK: - Failures

    @Test("ranks calling different collectives all throw")
    func mismatchThrows() throws {
        let outcomes = try runRanks(2) { comm -> String in
            do {
                if comm.rank == 0 {
                    var x: Float = 1
                    try comm.allreduceSum(&x, count: 1)
                } else {
                    try comm.barrier()
                }
                return "no error"
            } catch let error as CommError {
                return error.message
            }
        }
        #expect(outcomes[0].contains("ranks called different collectives"))
        #expect(outcomes[1].contains("ranks called different collectives"))
    }

    @Test("different counts, a bad root and a negative color throw on every rank")
    func badArgumentsThrow() throws {
        let outcomes = try runRanks(2) { comm -> [String] in
            var messages: [String] = []
            var buffer = [Float](repeating: 1, count: 4)
            do { try comm.allreduceSum(&buffer, count: 2 + comm.rank) } catch let e as CommError { messages.append(e.message) }
            do { try comm.broadcast(&buffer, bytes: 4, root: 5) } catch let e as CommError { messages.append(e.message) }
            do { _ = try comm.split(color: comm.rank - 1, key: 0) } catch let e as CommError { messages.append(e.message) }
            try comm.barrier()   // still usable
            return messages
        }
        for (rank, messages) in outcomes.enumerated() {
            #expect(messages.count == 3, "rank \(rank): \(messages)")
            #expect(messages.first?.contains("different counts [2, 3]") == true, "rank \(rank)")
            #expect(messages.dropFirst().first?.hasPrefix("broadcast failed: root 5 is not a rank") == true, "rank \(rank)")
            #expect(messages.last == "split failed: rank 0 passed negative color -1 (rank \(rank))", "rank \(rank)")
        }
    }

    @Test("a rank that throws stops the others instead of leaving them waiting; run rethrows its error")
    func failingRankStopsTheJob() {
        struct Boom: Error {}
        #expect(throws: Boom.self) {
            try ThreadCommunicator.run(size: 4) { comm in
                let pair = try comm.split(color: comm.rank / 2, key: 0)
                if comm.rank == 3 {
                    Thread.sleep(forTimeInterval: 0.05)   // let the others block first
                    throw Boom()
                }
                try pair.barrier()   // rank 2 waits here for rank 3
                try comm.barrier()   // ranks 0 and 1 wait here
            }
        }
    }

    @Test("group(size:) ranks can be driven from threads of your own")
    func groupWithOwnThreads() throws {
        let ranks = ThreadCommunicator.group(size: 3)
        #expect(ranks.map(\.rank) == [0, 1, 2])
        #expect(ranks.allSatisfy { $0.size == 3 })
        let sums = Locked<[Int: Double]>([:])
        let done = DispatchGroup()
        for comm in ranks {
            done.enter()
            Thread {
                var x = Double(comm.rank) + 0.25
                try? comm.allreduceSum(&x, count: 1)
                sums.update { $0[comm.rank] = x }
                done.leave()
            }.start()
        }
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(sums.value == [0: 3.75, 1: 3.75, 2: 3.75])
    }
}
