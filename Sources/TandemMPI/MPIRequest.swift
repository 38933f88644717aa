// MPIRequest: a non-blocking collective in flight (one MPI_Request per chunk).
import CMPI
import TandemComm

/// The request returned by `MPICommunicator.startAllreduceSum`. Keeps its communicator alive
/// until the operation completes.
final class MPIRequest: CommRequest {
    /// One handle per chunk; MPI_Test and MPI_Wait set finished ones to MPI_REQUEST_NULL.
    var handles: [MPI_Request?] = []
    let communicator: MPICommunicator

    init(communicator: MPICommunicator) {
        self.communicator = communicator
    }

    /// Dropping a request in flight would let MPI write into a buffer its owner may have freed,
    /// so finish it (errors can no longer be reported here).
    deinit {
        guard MPIState.isActive else { return }
        for i in handles.indices where handles[i] != tandem_MPI_REQUEST_NULL() {
            _ = MPI_Wait(&handles[i], tandem_MPI_STATUS_IGNORE())
        }
    }

    /// Every handle finished (a request in this state may be reused).
    var isComplete: Bool { handles.allSatisfy { $0 == tandem_MPI_REQUEST_NULL() } }

    func test() throws -> Bool {
        var complete = true
        for i in handles.indices where handles[i] != tandem_MPI_REQUEST_NULL() {
            var flag: Int32 = 0
            try mpiCheck(MPI_Test(&handles[i], &flag, tandem_MPI_STATUS_IGNORE()), "MPI_Test")
            if flag == 0 { complete = false }
        }
        return complete
    }

    func wait() throws {
        for i in handles.indices where handles[i] != tandem_MPI_REQUEST_NULL() {
            try mpiCheck(MPI_Wait(&handles[i], tandem_MPI_STATUS_IGNORE()), "MPI_Wait")
        }
    }
}
