import Crypto
import NIOCore
import ParleyCore
import Synchronization

/// What Parley keeps instead of a client IP or a deleted user's id: HMAC-SHA256 under a key
/// derived from the server's secret, hex. The same input gives the same hash on this server, and
/// it cannot be read back from it (nor tried against a list without the secret). `purpose`
/// separates the keys, so a pseudonym and an address never hash alike.
struct KeyedHasher: Sendable {
    private let key: SymmetricKey

    init(secret: String, purpose: String = "client ip") {
        key = SymmetricKey(data: SHA256.hash(data: Array("parley \(purpose)\u{0}\(secret)".utf8)))
    }

    func hash(_ value: String) -> String {
        HMAC<SHA256>.authenticationCode(for: Array(value.utf8), using: key).map { byte in (byte < 16 ? "0" : "") + String(byte, radix: 16) }.joined()
    }
}

/// Brute-force protection for authentication (REST tokens and WebSocket handshakes): failed
/// sign-ins are counted per client IP, kept only as a keyed hash, with exponential backoff
/// (`FailureBackoff`); a blocked address is answered 429 with `Retry-After` before its token is
/// even checked. A success forgets the address. Memory is bounded like `RateLimiter`'s.
final class AuthFailureLimiter: Sendable {
    private let hasher: KeyedHasher
    private let entries = Mutex<[String: FailureBackoff]>([:])
    let maxTracked: Int
    /// Loopback peers are a local proxy or a test harness: exempt unless asked.
    let limitsLoopback: Bool

    init(secret: String, maxTracked: Int = 10_000, limitsLoopback: Bool = false) {
        hasher = KeyedHasher(secret: secret)
        self.maxTracked = maxTracked
        self.limitsLoopback = limitsLoopback
    }

    private func key(_ ip: String) -> String? {
        if LoopbackAddress.isExempt(ip, limitsLoopback: limitsLoopback) { return nil }
        return hasher.hash(ip)
    }

    /// How long `ip` must still wait before it may authenticate; nil when it may now.
    func retryAfter(_ ip: String, now: UInt64 = NIODeadline.now().uptimeNanoseconds) -> TimeAmount? {
        guard let key = key(ip) else { return nil }
        return entries.withLock { $0[key]?.retryAfter(now: now) }.map { .nanoseconds(Int64($0)) }
    }

    func failed(_ ip: String, now: UInt64 = NIODeadline.now().uptimeNanoseconds) {
        guard let key = key(ip) else { return }
        entries.withLock { entries in
            var entry = entries.removeValue(forKey: key) ?? FailureBackoff()
            entry.fail(now: now)
            // Never this address's failures; blocked addresses are the last to go.
            entries.sweep(over: maxTracked - 1, dropping: { $0.isForgotten(now: now) }, thenDropping: { $0.retryAfter(now: now) == nil })
            entries[key] = entry
        }
    }

    func succeeded(_ ip: String) {
        guard let key = key(ip) else { return }
        _ = entries.withLock { $0.removeValue(forKey: key) }
    }

    /// What is remembered: hashes only (for tests that no raw address is kept).
    var trackedKeys: [String] { entries.withLock { Array($0.keys) } }
}
