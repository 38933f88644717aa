// Runs the mpi-selftest executable under mpirun (2 and 4 ranks) and alone (a singleton of
// size 1). Skipped when mpirun is not on PATH or mpi-selftest has not been built (`swift test`
// builds every target, so it normally has been).
import Foundation
import Testing

enum MPISelfTest {
    /// The package root: this file is <root>/Tests/TandemCommTests/MPISelfTestTests.swift.
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The newest built mpi-selftest in .build/debug or .build/release.
    static let binary: URL? = {
        let candidates = ["debug", "release"].map {
            packageRoot.appendingPathComponent(".build/\($0)/mpi-selftest")
        }.filter { FileManager.default.isExecutableFile(atPath: $0.path) }
        func modified(_ url: URL) -> Date {
            (try? FileManager.default.attributesOfItem(atPath: url.path)[.modificationDate] as? Date) ?? .distantPast
        }
        return candidates.max { modified($0) < modified($1) }
    }()

    static let mpirun: URL? = {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        return path.split(separator: ":")
            .map { URL(fileURLWithPath: String($0)).appendingPathComponent("mpirun") }
            .first { FileManager.default.isExecutableFile(atPath: $0.path) }
    }()

    static var available: Bool { binary != nil && mpirun != nil }

    /// Runs `executable arguments`, killing it after `timeout` seconds.
    /// - Returns: exit status (nil if it had to be killed) and stdout + stderr.
    static func run(_ executable: URL, _ arguments: [String], timeout: Double = 60) async throws -> (status: Int32?, output: String) {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("mpi-selftest-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: log) }
        let handle = try FileHandle(forWritingTo: log)
        defer { try? handle.close() }

        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        var killed = false
        if process.isRunning {
            killed = true
            process.terminate()   // SIGTERM: mpirun passes it on to its ranks
            try await Task.sleep(for: .seconds(3))
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        return (killed ? nil : process.terminationStatus, output)
    }

    static func mpirun(np: Int, _ arguments: [String] = []) async throws -> (status: Int32?, output: String) {
        try await run(mpirun!, ["--allow-run-as-root", "--oversubscribe", "-np", "\(np)", binary!.path] + arguments)
    }
}

@Suite("mpi-selftest under mpirun", .enabled(if: MPISelfTest.available, "needs mpirun on PATH and a built mpi-selftest"))
struct MPISelfTestTests {
    @Test("every collective on the world and on split communicators", arguments: [2, 4])
    func underMPIRun(np: Int) async throws {
        let (status, output) = try await MPISelfTest.mpirun(np: np)
        #expect(status == 0, "mpirun -np \(np) exited with \(status.map(String.init) ?? "timeout"):\n\(output)")
        #expect(output.contains("mpi-selftest: OK (size \(np))"), "\(output)")
    }

    @Test("started without mpirun it runs as a singleton of size 1")
    func singleton() async throws {
        let (status, output) = try await MPISelfTest.run(MPISelfTest.binary!, [])
        #expect(status == 0, "exited with \(status.map(String.init) ?? "timeout"):\n\(output)")
        #expect(output.contains("mpi-selftest: OK (size 1)"), "\(output)")
    }

    @Test("a failure on one rank ends the whole job with status 1 instead of hanging")
    func failureEndsTheJob() async throws {
        let (status, output) = try await MPISelfTest.mpirun(np: 2, ["--fail-on-rank", "1"])
        #expect(status == 1, "exited with \(status.map(String.init) ?? "timeout"):\n\(output)")
        #expect(output.contains("mpi-selftest: FAILED on rank 1 of 2: failure injected by --fail-on-rank"), "\(output)")
    }
}
