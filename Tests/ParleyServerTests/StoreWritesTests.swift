@testable import ParleyServer
import ParleyTestSupport
import Testing

/// A retry whose attempt the store refused waits for the store to take another write on the node
/// (or for its delay): a write that comes before the retry's task has begun to wait (on a busy
/// node, the task not scheduled yet) must end that wait too. Missed, the retry slept its whole
/// delay: in CI, a refused release waited out an hour's delay set for the test.
@Suite struct StoreWritesTests {
    @Test func aWriteTakenBeforeTheRetryBeginsToWaitEndsItsFirstPause() async throws {
        let writes = StoreWrites()
        let backoff = writes.backoff(from: .seconds(3600))
        writes.took()
        let woken = try await within(.seconds(30), "the first pause") {
            var first = backoff
            return (try? await first.pause()) != nil
        }
        #expect(woken, "not an hour later")
    }

    @Test func aWriteTakenDuringAnAttemptEndsTheNextPauseButAWokenAttemptThatFailsWaitsItsDelay() async throws {
        let writes = StoreWrites()
        var backoff = writes.backoff(from: .milliseconds(1))
        try await backoff.pause()  // the first attempt's delay, nothing taken
        writes.took()  // during the attempt that follows
        backoff.delay = .seconds(3600)
        backoff = try await within(.seconds(30), "the pause after a write during the attempt") { [backoff] in
            var next = backoff
            try? await next.pause()  // woken: the store takes writes again
            return next
        }
        writes.took()
        await #expect(throws: TestTimeout.self, "that attempt failed: its whole delay") {
            try await within(.milliseconds(300), "the pause after a woken attempt") { [backoff] in
                var afterTheWokenAttempt = backoff
                return (try? await afterTheWokenAttempt.pause()) != nil
            }
        }
    }
}
