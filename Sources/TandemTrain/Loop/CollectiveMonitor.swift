// CollectiveMonitor: what the training loop knows about its blocking collectives, for the two
// failures MPI itself does not report.
//
// A hang. A rank that dies is noticed by mpirun, which ends the job naming it (see the README's
// "Failures"). A rank that is alive but never enters the next collective (stuck, deadlocked,
// took another branch) leaves the others waiting forever. The loop marks each blocking
// collective it enters (`watch`); a background thread checks the mark and, once one has been in
// progress for `parallel.collective_timeout_seconds`, prints one line naming the collective and
// the step and ends the job through the world communicator (MPI_Abort).
//
// A divergence. Ranks that call the same collectives with different counts may hang, or worse,
// silently combine unrelated buffers. Every watched collective is folded into a 64-bit
// fingerprint of (step, operation, element count); the trainer adds 32 bits of it and their
// squares to the per-step loss allreduce, so that a mismatch is seen by every rank at once
// (all equal iff R * sum(a^2) == (sum a)^2) at the cost of four doubles per step.
import Foundation
import TandemComm

public final class CollectiveMonitor: @unchecked Sendable {
    /// The blocking collectives of the training loop; the raw value enters the fingerprint.
    public enum Operation: UInt64, Sendable {
        case gradients = 1, loss, syncBN, testMetrics, checkpoint, towerExchange, phantom, towerGradientCheck

        var label: String {
            switch self {
            case .gradients: "allreduce of gradients"
            case .loss: "allreduce of the loss"
            case .syncBN: "allreduce of batch-norm statistics (sync_bn)"
            case .testMetrics: "allreduce of test metrics"
            case .checkpoint: "gather of the model for a checkpoint"
            case .towerExchange: "tower exchange"
            case .phantom: "phantom collective (TANDEM_TEST_DIVERGE_RANK)"
            case .towerGradientCheck: "allreduce of the towers' gradient checks"
            }
        }
    }

    /// Seconds a collective may take before the job is ended (0: the watchdog is off).
    public let timeout: Double
    /// FNV-1a over every recorded (step, operation, count), from the start of this run.
    public private(set) var fingerprint: UInt64 = 0xcbf2_9ce4_8422_2325

    private let world: Communicator
    private let lock = NSLock()
    // Guarded by `lock`: the collective in progress and since when (Clock seconds).
    private var since: Double?
    private var operation = Operation.gradients
    private var step = 0

    /// - Parameters:
    ///   - world: the communicator whose `abort` ends the job; its rank prefixes the message.
    ///   - timeout: seconds; the watchdog thread runs only when > 0 and the world has several ranks.
    public init(world: Communicator, timeout: Double) {
        self.world = world
        self.timeout = world.size > 1 ? max(0, timeout) : 0
        if self.timeout > 0 {
            let thread = Thread { [weak self] in
                // Checks a few times per timeout, at least once a second, so the job ends
                // within about timeout + 1 s.
                let interval = min(1.0, (self?.timeout ?? 1) / 4)
                while true {
                    // Not holding the monitor while asleep lets a finished trainer's monitor go away.
                    do {
                        guard let monitor = self else { return }
                        monitor.check()
                    }
                    usleep(useconds_t(interval * 1e6))
                }
            }
            thread.name = "tandem collective watchdog"
            thread.start()
        }
    }

    /// Runs `body`, a blocking collective of `count` elements at `step`, under the watchdog, and
    /// folds it into the fingerprint. Nested calls keep the outer mark.
    public func watch<T>(_ operation: Operation, step: Int, count: Int, _ body: () throws -> T) rethrows -> T {
        record(operation, step: step, count: count)
        guard timeout > 0 else { return try body() }
        lock.lock()
        let outer = since == nil
        if outer { since = Clock.now; self.operation = operation; self.step = step }
        lock.unlock()
        defer {
            if outer { lock.lock(); since = nil; lock.unlock() }
        }
        return try body()
    }

    /// Folds (step, operation, count) into the fingerprint without a collective.
    public func record(_ operation: Operation, step: Int, count: Int) {
        for k in 0..<3 {
            var w = k == 0 ? UInt64(truncatingIfNeeded: step) : (k == 1 ? operation.rawValue : UInt64(truncatingIfNeeded: count))
            for _ in 0..<8 {
                fingerprint = (fingerprint ^ (w & 0xff)) &* 0x100_0000_01b3
                w >>= 8
            }
        }
    }

    /// The fingerprint's low 32 bits as two 16-bit values and their squares, summed exactly in
    /// double precision for up to 2^10 ranks (2^32 * 2^20 < 2^53).
    /// Writes the four comparison slots (two 16-bit halves of the fingerprint and their squares) to `slots`.
    public func writeCheckSlots(_ slots: UnsafeMutablePointer<Double>) {
        let a = Double(fingerprint & 0xffff), b = Double((fingerprint >> 16) & 0xffff)
        slots[0] = a; slots[1] = a * a; slots[2] = b; slots[3] = b * b
    }

    /// True when the summed check slots of `ranks` ranks came from equal fingerprints
    /// (sum of squares times the ranks equals the square of the sum only when all are equal).
    public static func slotsAgree(_ sums: UnsafePointer<Double>, ranks: Int) -> Bool {
        let r = Double(ranks)
        return r * sums[1] == sums[0] * sums[0] && r * sums[3] == sums[2] * sums[2]
    }

    /// Ends the job if the marked collective has run past the timeout.
    private func check() {
        lock.lock()
        let started = since, operation = self.operation, step = self.step
        lock.unlock()
        guard let started, Clock.now - started > timeout else { return }
        let prefix = world.size > 1 ? "tandem: rank \(world.rank): " : "tandem: "
        fputs(prefix + "\(operation.label) (step \(step)) did not complete within \(formatSeconds(timeout)) s; a rank may have died or diverged (parallel.collective_timeout_seconds)\n", stderr)
        world.abort(code: 1)
    }

    private func formatSeconds(_ s: Double) -> String {
        s == s.rounded() ? String(Int(s)) : String(s)
    }
}
