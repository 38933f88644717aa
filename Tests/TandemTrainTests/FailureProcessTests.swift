// Failures of a running job under mpirun, with the release trainer: a rank killed mid-epoch, a
// rank that stops calling collectives (the watchdog), and ranks whose collectives diverge. The
// last two use the test-only hooks of TestHooks.swift (TANDEM_TEST_HANG_RANK, TANDEM_TEST_DIVERGE_RANK).
import Foundation
import Testing
@testable import TandemTrain

/// smallConfig with a checkpoint every 5 steps, no step limit, and a 3 s collective timeout.
func failureConfig() throws -> String {
    let path = try smallConfig()
    var text = try String(contentsOfFile: path, encoding: .utf8)
    text = text.replacingOccurrences(of: "  max_steps: 12\n", with: "  checkpoint_every_steps: 5\n  epochs: 40\n")
    text += "  collective_timeout_seconds: 3\n"
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

/// A process started in the background, its stderr collected.
final class BackgroundProcess: @unchecked Sendable {
    let process = Process()
    private let lock = NSLock()
    private var errorData = Data()

    init(_ executable: String, _ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        err.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            self?.lock.lock(); self?.errorData.append(d); self?.lock.unlock()
        }
        try process.run()
    }

    var error: String { lock.lock(); defer { lock.unlock() }; return String(decoding: errorData, as: UTF8.self) }

    /// Waits up to `timeout` seconds; kills the process if it is still running then. Returns whether it ended by itself.
    func wait(timeout: Double) -> Bool {
        let start = Date()
        while process.isRunning {
            if Date().timeIntervalSince(start) > timeout { kill(process.processIdentifier, SIGKILL); process.waitUntilExit(); return false }
            usleep(20_000)
        }
        usleep(100_000)  // the last of stderr
        return true
    }
}

/// The pid of world rank `rank` among mpirun's children (from OMPI_COMM_WORLD_RANK in their environment).
func pidOfRank(_ rank: Int, mpirun: Int32) throws -> Int32? {
    let children = try run("/usr/bin/pgrep", ["-P", "\(mpirun)"], timeout: 10).output.split(separator: "\n").compactMap { Int32($0) }
    for pid in children {
        guard let environ = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { continue }
        let vars = environ.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        if vars.contains("OMPI_COMM_WORLD_RANK=\(rank)") { return pid }
    }
    return nil
}

/// Checkpoint files of `folder`, oldest first.
func checkpoints(_ folder: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [])
        .filter { $0.hasPrefix("ckpt-step-") && $0.hasSuffix(".tandem") }.sorted().map { folder + "/" + $0 }
}

@Suite(.serialized, .enabled(if: hasMPI && hasData, "needs .build/release/trainer (launch/test builds it), mpirun and Fashion-MNIST"))
struct FailureProcessTests {
    /// OpenMPI's mpirun notices the dead process, names it ("process rank 1 ... exited on signal
    /// 9") and kills the others; the checkpoint written last is whole (written atomically).
    @Test func killedRankEndsTheJobAndKeepsTheCheckpoint() throws {
        let out = temporaryFolder()
        let job = try BackgroundProcess(mpirunPath!, ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", trainerBinary,
                                                      "--config", try failureConfig(), "--out", out, "--quiet"])
        let start = Date()
        while checkpoints(out).isEmpty && job.process.isRunning && Date().timeIntervalSince(start) < 60 { usleep(20_000) }
        #expect(!checkpoints(out).isEmpty, "no checkpoint appeared: \(job.error)")
        let victim = try #require(try pidOfRank(1, mpirun: job.process.processIdentifier), "rank 1's process not found")
        let killed = Date()
        kill(victim, SIGKILL)
        #expect(job.wait(timeout: 30), "the job did not end after rank 1 was killed")
        let seconds = Date().timeIntervalSince(killed)
        print("FailureProcessTests: the job ended \(String(format: "%.2f", seconds)) s after rank 1 was killed")
        #expect(seconds < 15, "the job took \(seconds) s to end")
        #expect(job.process.terminationStatus != 0)
        #expect(job.error.contains("rank 1") && job.error.contains("signal 9"), "\(job.error)")
        let newest = try #require(checkpoints(out).last)
        let c = try Checkpoint.read(path: newest)
        #expect(c.header.step > 0 && c.header.step % 5 == 0)
    }

    // Rank 1 stops after its step-2 backward. After backward, rank 0 waits in the gradient allreduce:
    // with overlap through MPI, rank 1's sync thread has allreduced every bucket but the last, which
    // each rank's training thread allreduces itself after backward. Through shared memory, rank 1
    // may have summed its slice of every bucket before it stopped (its last bucket's release finds
    // rank 0's already posted): then rank 0 completes the gradients and waits in the loss allreduce.
    @Test(arguments: [("after", "auto", ["allreduce of gradients (step 2)"]), ("overlap", "mpi", ["allreduce of gradients (step 2)"]),
                      ("overlap", "auto", ["allreduce of gradients (step 2)", "allreduce of the loss (step 2)"])])
    func hungRankIsEndedByTheWatchdog(mode: String, transport: String, collectives: [String]) throws {
        let r = try run("/usr/bin/env", ["TANDEM_TEST_HANG_RANK=1", "TANDEM_TEST_HANG_STEP=2", mpirunPath!, "--allow-run-as-root", "--oversubscribe",
                                         "--bind-to", "none", "-x", "TANDEM_TEST_HANG_RANK", "-x", "TANDEM_TEST_HANG_STEP", "-np", "2", trainerBinary,
                                         "--config", try failureConfig(), "--out", temporaryFolder(), "--quiet", "--gradient-sync", mode, "--transport", transport], timeout: 60)
        #expect(r.status != 0)
        #expect(r.seconds < 15, "took \(r.seconds) s")
        #expect(collectives.contains { r.error.contains("tandem: rank 0: \($0) did not complete within 3 s; a rank may have died or diverged") }, "\(r.error)")
    }

    @Test func divergedRanksStopNamingRankAndStep() throws {
        let r = try run("/usr/bin/env", ["TANDEM_TEST_DIVERGE_RANK=1", "TANDEM_TEST_DIVERGE_STEP=3", mpirunPath!, "--allow-run-as-root", "--oversubscribe",
                                         "--bind-to", "none", "-x", "TANDEM_TEST_DIVERGE_RANK", "-x", "TANDEM_TEST_DIVERGE_STEP", "-np", "2", trainerBinary,
                                         "--config", try failureConfig(), "--out", temporaryFolder(), "--quiet"], timeout: 60)
        #expect(r.status != 0)
        #expect(r.seconds < 15, "took \(r.seconds) s")
        let lines = r.error.split(separator: "\n").filter { $0.contains("step 3: ranks diverged: the collectives of rank 1 differ from rank 0's") }
        #expect(lines.contains { $0.hasPrefix("tandem: rank 0: ") }, "\(r.error)")
    }
}
