@testable import ParleyServer
import ParleyCore
import Testing

@Suite struct AuthFailureLimiterTests {
    @Test func anAddressIsBlockedAfterItsFreeFailuresAndASuccessClearsIt() {
        let limiter = AuthFailureLimiter(secret: String(repeating: "s", count: 32))
        let ip = "203.0.113.9"
        for _ in 0..<5 { limiter.failed(ip, now: 1) }
        #expect(limiter.retryAfter(ip, now: 1) == nil)
        limiter.failed(ip, now: 1)
        #expect(limiter.retryAfter(ip, now: 1) == .seconds(1))
        #expect(limiter.retryAfter("203.0.113.10", now: 1) == nil, "other addresses are not affected")
        limiter.succeeded(ip)
        #expect(limiter.retryAfter(ip, now: 1) == nil)
    }

    @Test func addressesAreKeptOnlyAsKeyedHashes() {
        let a = AuthFailureLimiter(secret: String(repeating: "a", count: 32))
        let b = AuthFailureLimiter(secret: String(repeating: "b", count: 32))
        a.failed("198.51.100.7", now: 1)
        b.failed("198.51.100.7", now: 1)
        let key = a.trackedKeys.first!
        #expect(key.count == 64 && key.allSatisfy(\.isHexDigit))
        #expect(!key.contains("198.51.100.7"))
        #expect(b.trackedKeys.first! != key, "the hash depends on the server's secret")
        #expect(KeyedHasher(secret: String(repeating: "a", count: 32)).hash("198.51.100.7") == key)
    }

    @Test func loopbackIsExemptUnlessAsked() {
        let exempt = AuthFailureLimiter(secret: String(repeating: "s", count: 32))
        let strict = AuthFailureLimiter(secret: String(repeating: "s", count: 32), limitsLoopback: true)
        for _ in 0..<10 {
            exempt.failed("127.0.0.1", now: 1)
            strict.failed("127.0.0.1", now: 1)
        }
        #expect(exempt.retryAfter("127.0.0.1", now: 1) == nil && exempt.trackedKeys.isEmpty)
        #expect(strict.retryAfter("127.0.0.1", now: 1) != nil)
    }

    @Test func loopbackIsTheLoopbackNetworkWrittenAsAnAddress() {
        for peer in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            #expect(LoopbackAddress.isLoopbackLiteral(peer), "\(peer)")
        }
        for other in ["128.0.0.1", "10.0.0.1", "::2", "::ffff:10.0.0.1", "127.evil.example", "localhost", ""] {
            #expect(!LoopbackAddress.isLoopbackLiteral(other), "\(other)")
        }
    }

    @Test func memoryIsBounded() {
        let limiter = AuthFailureLimiter(secret: String(repeating: "s", count: 32), maxTracked: 100)
        var sizes: [Int] = []
        for i in 0..<1_000 {
            limiter.failed("10.0.\(i / 256).\(i % 256)", now: 1)
            sizes.append(limiter.trackedKeys.count)
        }
        // Swept back to three quarters, so not again at every new address; the address failing
        // now is never the one swept away.
        #expect(sizes.max() == 100 && sizes.dropFirst(100).min() == 76)
        for i in 0..<300 {
            limiter.failed("10.2.0.\(i % 200)", now: 1)
            limiter.failed("10.9.9.9", now: 1)
            // Past its free failures it stays blocked: its record outlives every sweep.
            if i >= FailureBackoff.freeFailures { #expect(limiter.retryAfter("10.9.9.9", now: 1) != nil) }
        }
    }
}
