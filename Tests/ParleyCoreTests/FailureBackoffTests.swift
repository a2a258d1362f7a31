import ParleyCore
import Testing

@Suite struct FailureBackoffTests {
    let second: UInt64 = 1_000_000_000

    @Test func theFirstFailuresAreFreeThenEachBlocksTwiceAsLong() {
        var backoff = FailureBackoff()
        var now: UInt64 = 1_000 * second
        for _ in 0..<FailureBackoff.freeFailures {
            backoff.fail(now: now)
            #expect(backoff.retryAfter(now: now) == nil)
        }
        var waits: [UInt64] = []
        for _ in 0..<4 {
            backoff.fail(now: now)
            let wait = backoff.retryAfter(now: now)!
            waits.append(wait / second)
            now += wait  // the next try comes once the block is over
            #expect(backoff.retryAfter(now: now) == nil)
        }
        #expect(waits == [1, 2, 4, 8])
    }

    @Test func theBlockIsCappedAndOldFailuresAreForgiven() {
        var backoff = FailureBackoff()
        var now: UInt64 = 10 * second
        for _ in 0..<40 {
            backoff.fail(now: now)
            now += backoff.retryAfter(now: now) ?? 0
        }
        backoff.fail(now: now)
        #expect(backoff.retryAfter(now: now) == FailureBackoff.cap)
        now += FailureBackoff.cap + FailureBackoff.forgetAfter + 1
        #expect(backoff.isForgotten(now: now))
        backoff.fail(now: now)
        #expect(backoff.failures == 1 && backoff.retryAfter(now: now) == nil)
    }
}
