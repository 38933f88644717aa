// SingleProcessCommunicator: one rank, no communication (llm.c's "with one process every
// collective returns at once").
import Foundation

/// Rank 0 of 1. Sums are identities, broadcast and barrier do nothing, allgather and
/// reduce-scatter copy their one block, and requests are complete when started.
public final class SingleProcessCommunicator: Communicator, @unchecked Sendable {
    public let rank = 0
    public let size = 1

    public init() {}

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws {
        precondition(count >= 0, "allreduceSum: negative count \(count)")
    }

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Double>, count: Int) throws {
        precondition(count >= 0, "allreduceSum: negative count \(count)")
    }

    public func allreduceSum(_ buffer: UnsafeMutablePointer<Int64>, count: Int) throws {
        precondition(count >= 0, "allreduceSum: negative count \(count)")
    }

    public func startAllreduceSum(_ buffer: UnsafeMutablePointer<Float>, count: Int) throws -> CommRequest {
        precondition(count >= 0, "startAllreduceSum: negative count \(count)")
        return CompletedRequest()
    }

    public func broadcast(_ buffer: UnsafeMutableRawPointer, bytes: Int, root: Int) throws {
        precondition(bytes >= 0, "broadcast: negative byte count \(bytes)")
        guard root == 0 else {
            throw CommError(call: "broadcast", reason: "root \(root) is not a rank of a communicator of size 1", rank: 0)
        }
    }

    public func allgather(_ send: UnsafeRawPointer, bytes: Int, into receive: UnsafeMutableRawPointer) throws {
        precondition(bytes >= 0, "allgather: negative byte count \(bytes)")
        if UnsafeRawPointer(receive) != send { receive.copyMemory(from: send, byteCount: bytes) }
    }

    public func reduceScatterSum(_ send: UnsafePointer<Float>, into receive: UnsafeMutablePointer<Float>, countPerRank: Int) throws {
        precondition(countPerRank >= 0, "reduceScatterSum: negative count \(countPerRank)")
        if UnsafePointer(receive) != send { receive.update(from: send, count: countPerRank) }
    }

    public func barrier() throws {}

    public func split(color: Int, key: Int) throws -> Communicator {
        guard color >= 0 else {
            throw CommError(call: "split", reason: "color \(color) is negative", rank: 0)
        }
        return SingleProcessCommunicator()
    }

    public func abort(code: Int32) -> Never {
        exit(code)
    }
}
