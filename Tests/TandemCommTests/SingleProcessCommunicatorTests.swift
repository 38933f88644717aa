// SingleProcessCommunicator: rank 0 of 1, every collective an identity or a copy.
import Testing
import TandemComm

@Suite("SingleProcessCommunicator")
struct SingleProcessCommunicatorTests {
    let comm = SingleProcessCommunicator()

    @Test func rankAndSize() {
        #expect(comm.rank == 0)
        #expect(comm.size == 1)
    }

    @Test func sumsAreIdentities() throws {
        var floats: [Float] = [1.5, -2, 3]
        try comm.allreduceSum(&floats, count: 3)
        #expect(floats == [1.5, -2, 3])
        var doubles: [Double] = [0.1, 0.2]
        try comm.allreduceSum(&doubles, count: 2)
        #expect(doubles == [0.1, 0.2])
        var longs: [Int64] = [.max, .min]
        try comm.allreduceSum(&longs, count: 2)
        #expect(longs == [.max, .min])
        let request = try comm.startAllreduceSum(&floats, count: 3)
        #expect(try request.test())
        try request.wait()
        #expect(floats == [1.5, -2, 3])
    }

    @Test func broadcastAllgatherReduceScatterCopy() throws {
        var bytes: [UInt8] = [1, 2, 3]
        try bytes.withUnsafeMutableBytes { try comm.broadcast($0.baseAddress!, bytes: 3, root: 0) }
        #expect(bytes == [1, 2, 3])
        var gathered = [UInt8](repeating: 0, count: 3)
        try bytes.withUnsafeBytes { s in try gathered.withUnsafeMutableBytes { try comm.allgather(s.baseAddress!, bytes: 3, into: $0.baseAddress!) } }
        #expect(gathered == [1, 2, 3])
        var received = [Float](repeating: 0, count: 2)
        try comm.reduceScatterSum([4, 5], into: &received, countPerRank: 2)
        #expect(received == [4, 5])
        try comm.barrier()
    }

    @Test func splitAndErrors() throws {
        let child = try comm.split(color: 3, key: 9)
        #expect(child.rank == 0 && child.size == 1)
        #expect(throws: CommError.self) { _ = try comm.split(color: -1, key: 0) }
        var byte: UInt8 = 0
        let error = #expect(throws: CommError.self) { try comm.broadcast(&byte, bytes: 1, root: 1) }
        #expect(error?.description == "broadcast failed: root 1 is not a rank of a communicator of size 1 (rank 0)")
    }

    @Test func commErrorIsOneLineNamingTheCall() {
        let error = CommError(call: "MPI_Allreduce", reason: "MPI_ERR_TRUNCATE: message truncated", rank: 1)
        #expect(error.description == "MPI_Allreduce failed: MPI_ERR_TRUNCATE: message truncated (rank 1)")
        #expect("\(error)" == error.message)
    }
}
