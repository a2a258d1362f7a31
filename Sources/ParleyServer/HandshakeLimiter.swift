import NIOCore
import ParleyCore
import Synchronization

/// WebSocket handshakes per client IP: a token bucket each, `rate` a second in bursts of twice
/// that. Memory is bounded: past `maxTracked` addresses, idle (full) buckets are forgotten, then
/// arbitrary ones (a limit that leaks under a flood of new addresses beats unbounded memory).
final class HandshakeLimiter: Sendable {
    private let buckets = Mutex<[String: TokenBucket]>([:])
    let rate: Int
    let maxTracked: Int
    /// Loopback peers are a local proxy or a load test, not one client: unlimited unless asked.
    let limitsLoopback: Bool

    init(rate: Int, maxTracked: Int = 10_000, limitsLoopback: Bool = false) {
        self.rate = rate
        self.maxTracked = maxTracked
        self.limitsLoopback = limitsLoopback
    }

    private func exempt(_ ip: String) -> Bool {
        !limitsLoopback && Self.isLoopback(ip)
    }

    /// A loopback peer (IPv4, IPv6, or IPv4 mapped into IPv6).
    static func isLoopback(_ ip: String) -> Bool {
        ip.hasPrefix("127.") || ip == "::1" || ip.hasPrefix("::ffff:127.")
    }

    /// Takes a handshake for `ip`; false when it is over its rate.
    func allow(_ ip: String, now: UInt64 = NIODeadline.now().uptimeNanoseconds) -> Bool {
        if exempt(ip) { return true }
        return buckets.withLock { buckets in
            var bucket = buckets[ip] ?? TokenBucket(rate: Double(rate), burst: 2 * rate, now: now)
            let allowed = bucket.take(now: now)
            buckets[ip] = bucket
            if buckets.count > maxTracked {
                buckets = buckets.filter { !$0.value.isFull(now: now) }
                while buckets.count > maxTracked, let any = buckets.keys.first { buckets.removeValue(forKey: any) }
            }
            return allowed
        }
    }

    /// Whether `ip` is over its rate now (without taking a handshake).
    func isLimited(_ ip: String, now: UInt64 = NIODeadline.now().uptimeNanoseconds) -> Bool {
        if exempt(ip) { return false }
        return buckets.withLock { $0[ip]?.isEmpty(now: now) ?? false }
    }

    var tracked: Int { buckets.withLock { $0.count } }
}
