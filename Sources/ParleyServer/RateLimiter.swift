import Foundation
import NIOCore
import ParleyCore
import Synchronization

/// Events per key (a client IP's WebSocket handshakes, a user's REST requests): a token bucket
/// each, `rate` a second in bursts of twice that. Memory is bounded: past `maxTracked` keys, idle
/// (full) buckets are forgotten, then those with events left, then arbitrary ones, down to three
/// quarters of it (a limit that leaks under a flood of new keys beats unbounded memory).
final class RateLimiter: Sendable {
    private let buckets = Mutex<[String: TokenBucket]>([:])
    let rate: Int
    let maxTracked: Int
    /// Keys never limited.
    private let exempt: @Sendable (String) -> Bool

    init(rate: Int, maxTracked: Int = 10_000, exempting exempt: @escaping @Sendable (String) -> Bool = { _ in false }) {
        self.rate = rate
        self.maxTracked = maxTracked
        self.exempt = exempt
    }

    /// Per client IP, where loopback peers are a local proxy or a load test, not one client:
    /// unlimited unless `limitsLoopback`.
    static func perAddress(rate: Int, maxTracked: Int = 10_000, limitsLoopback: Bool = false) -> RateLimiter {
        RateLimiter(rate: rate, maxTracked: maxTracked) { LoopbackAddress.isExempt($0, limitsLoopback: limitsLoopback) }
    }

    /// Takes an event for `key`; false when it is over its rate.
    func allow(_ key: String, now: UInt64 = NIODeadline.now().uptimeNanoseconds) -> Bool {
        if exempt(key) { return true }
        return buckets.withLock { buckets in
            var bucket = buckets.removeValue(forKey: key) ?? TokenBucket(rate: Double(rate), burst: 2 * rate, now: now)
            let allowed = bucket.take(now: now)
            // Never this key's bucket.
            buckets.sweep(over: maxTracked - 1, dropping: { $0.isFull(now: now) }, thenDropping: { !$0.isEmpty(now: now) })
            buckets[key] = bucket
            return allowed
        }
    }

    /// Whether `key` is over its rate now (without taking an event).
    func isLimited(_ key: String, now: UInt64 = NIODeadline.now().uptimeNanoseconds) -> Bool {
        if exempt(key) { return false }
        return buckets.withLock { $0[key]?.isEmpty(now: now) ?? false }
    }

    var tracked: Int { buckets.withLock { $0.count } }
}

/// Which addresses only this machine has: a peer's address (the limiters exempt it) or one to listen on (`--dev`).
public enum LoopbackAddress {
    /// Whether `host` is an IP literal on the loopback network (127.0.0.0/8, ::1, or IPv4-mapped
    /// 127.x). Names are refused rather than resolved: `127.evil.example` or a `localhost` that
    /// a hosts file or resolver points elsewhere must not pass for loopback.
    public static func isLoopbackLiteral(_ host: String) -> Bool {
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            return UInt32(bigEndian: v4.s_addr) >> 24 == 127
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, host, &v6) == 1 else { return false }
        let bytes = withUnsafeBytes(of: &v6) { Array($0) }
        if bytes == Array(repeating: 0, count: 15) + [1] { return true }
        return bytes.prefix(12) == Array(repeating: 0, count: 10) + [0xFF, 0xFF] && bytes[12] == 127
    }

    /// Whether the per-address limiters leave peer `ip` alone: a loopback peer is a local proxy
    /// or a load test, not one client, unless the operator asked for it to be limited.
    static func isExempt(_ ip: String, limitsLoopback: Bool) -> Bool {
        !limitsLoopback && isLoopbackLiteral(ip)
    }
}
