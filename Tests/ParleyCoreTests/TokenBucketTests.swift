import ParleyCore
import Testing

@Suite struct TokenBucketTests {
    /// How many of `count` takes at `now` succeed.
    func takes(_ count: Int, _ bucket: inout TokenBucket, now: UInt64) -> Int {
        (0..<count).reduce(0) { n, _ in n + (bucket.take(now: now) ? 1 : 0) }
    }

    @Test func aBurstPassesThenTheRateHolds() {
        var bucket = TokenBucket(rate: 10, burst: 5, now: 0)
        #expect(takes(6, &bucket, now: 0) == 5, "the burst, then nothing")
        #expect(takes(1, &bucket, now: 50_000_000) == 0, "half a token after 50 ms")
        #expect(takes(2, &bucket, now: 100_000_000) == 1, "one token after 100 ms at 10/s")
        // A long pause refills only up to the burst.
        #expect(takes(6, &bucket, now: 60_000_000_000) == 5)
    }

    @Test func emptyAndFullAreSeenWithoutTaking() {
        var bucket = TokenBucket(rate: 2, burst: 2, now: 0)
        #expect(bucket.isFull(now: 0) && !bucket.isEmpty(now: 0))
        #expect(takes(2, &bucket, now: 0) == 2)
        #expect(bucket.isEmpty(now: 100_000_000) && !bucket.isFull(now: 100_000_000))
        #expect(!bucket.isEmpty(now: 500_000_000), "one token back after 0.5 s at 2/s")
        #expect(bucket.isFull(now: 1_000_000_000))
    }

    @Test func aClockThatGoesBackDoesNotRefill() {
        var bucket = TokenBucket(rate: 1, burst: 1, now: 5_000_000_000)
        #expect(takes(1, &bucket, now: 5_000_000_000) == 1)
        #expect(takes(1, &bucket, now: 1_000_000_000) == 0)
    }
}
