// TestHooks: failures the process tests inject through the environment. Test-only: they make a
// rank misbehave on purpose and have no use in a real run.
//
//   TANDEM_TEST_HANG_RANK=r     world rank r stops before the gradient allreduce of step
//                               TANDEM_TEST_HANG_STEP (default 1) and never returns (the watchdog test).
//   TANDEM_TEST_DIVERGE_RANK=r  world rank r records a collective the others do not have, at step
//                               TANDEM_TEST_DIVERGE_STEP (default 1) (the divergence test).
//   TANDEM_TEST_SLOW_RANK=r     world rank r computes slower: after each step's forward and backward
//                               it sleeps TANDEM_TEST_SLOW_US (default 50) microseconds per sample of
//                               its share (the parallel.balance tests); with parallel.dynamic after
//                               each chunk, for the chunk's samples.
//   TANDEM_TEST_LATE_RANK=r     parallel.dynamic: world rank r makes its first claim of every step only
//                               once the other ranks have claimed every sample (so it computes none).
//   TANDEM_TEST_POISON_RANK=r   world rank r scales its loss gradient by NaN at step
//                               TANDEM_TEST_POISON_STEP (default 1): its gradients go NaN, its loss
//                               stays finite (the NaN-gradient report on every rank).
import Foundation

struct TestHooks {
    var hangRank = -1, hangStep = 1
    var divergeRank = -1, divergeStep = 1
    var slowRank = -1, slowMicrosPerSample = 50
    var lateRank = -1
    var poisonRank = -1, poisonStep = 1

    init(environment: [String: String] = ProcessInfo.processInfo.environment) {
        func int(_ key: String) -> Int? { environment[key].flatMap { Int($0) } }
        hangRank = int("TANDEM_TEST_HANG_RANK") ?? -1
        hangStep = int("TANDEM_TEST_HANG_STEP") ?? 1
        divergeRank = int("TANDEM_TEST_DIVERGE_RANK") ?? -1
        divergeStep = int("TANDEM_TEST_DIVERGE_STEP") ?? 1
        slowRank = int("TANDEM_TEST_SLOW_RANK") ?? -1
        slowMicrosPerSample = int("TANDEM_TEST_SLOW_US") ?? 50
        lateRank = int("TANDEM_TEST_LATE_RANK") ?? -1
        poisonRank = int("TANDEM_TEST_POISON_RANK") ?? -1
        poisonStep = int("TANDEM_TEST_POISON_STEP") ?? 1
    }
}
