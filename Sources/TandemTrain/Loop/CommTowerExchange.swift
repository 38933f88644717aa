// The towers of one replica exchange activations through their communicator. Counts what each
// collective moves, so that a test can check that towers talk only at the all-tower layers.
import Foundation
import TandemComm
import TandemCore

public final class CommTowerExchange: TowerExchange {
    let comm: Communicator
    /// Bytes received by this rank in allgathers, and sent (each tower's share of the sum) in reduce-scatters.
    public private(set) var allgatherBytes = 0
    public private(set) var reduceScatterBytes = 0
    public private(set) var calls = 0

    public init(comm: Communicator) { self.comm = comm }

    public func allgather(_ send: UnsafeRawPointer, bytes: Int, into receive: UnsafeMutableRawPointer) {
        calls += 1
        allgatherBytes += bytes * (comm.size - 1)
        do { try comm.allgather(send, bytes: bytes, into: receive) } catch { fail(error) }
    }

    public func reduceScatter(_ send: UnsafePointer<Float>, into receive: UnsafeMutablePointer<Float>, count: Int) {
        calls += 1
        reduceScatterBytes += count * MemoryLayout<Float>.stride * (comm.size - 1)
        do { try comm.reduceScatterSum(send, into: receive, countPerRank: count) } catch { fail(error) }
    }

    public func resetCounts() { allgatherBytes = 0; reduceScatterBytes = 0; calls = 0 }

    /// A failed collective inside a layer cannot be thrown through the network: end the job.
    private func fail(_ error: Error) -> Never {
        fputs("tandem: rank \(comm.rank) of a tower group: \(error)\n", stderr)
        comm.abort(code: 1)
    }
}
