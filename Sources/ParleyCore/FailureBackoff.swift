/// Failed sign-ins from one source, and how long it must wait: the first `freeFailures` cost
/// nothing (typos, an expired token), then each failure blocks the source for twice as long as
/// the one before, from `base` up to `cap`. Failures older than `forgetAfter` are forgiven. Pure
/// (the caller passes the monotonic clock in nanoseconds), so it is tested without waiting.
public struct FailureBackoff: Sendable, Equatable {
    public static let freeFailures = 5
    public static let base: UInt64 = 1_000_000_000
    public static let cap: UInt64 = 300_000_000_000
    public static let forgetAfter: UInt64 = 900_000_000_000

    public private(set) var failures = 0
    private var lastFailure: UInt64 = 0
    private var blockedUntil: UInt64 = 0

    public init() {}

    /// Records a failure at `now`; past the free ones, the source is blocked from now.
    public mutating func fail(now: UInt64) {
        if failures > 0, now > lastFailure, now - lastFailure > Self.forgetAfter { failures = 0 }
        failures += 1
        lastFailure = now
        let over = failures - Self.freeFailures
        if over > 0 {
            let wait = over > 20 ? Self.cap : min(Self.cap, Self.base << UInt64(over - 1))
            blockedUntil = now + wait
        }
    }

    /// Nanoseconds the source must still wait at `now`; nil when it may try.
    public func retryAfter(now: UInt64) -> UInt64? {
        blockedUntil > now ? blockedUntil - now : nil
    }

    /// Nothing left to remember at `now`: not blocked, and its failures are forgiven.
    public func isForgotten(now: UInt64) -> Bool {
        now >= blockedUntil && (now < lastFailure || now - lastFailure > Self.forgetAfter)
    }
}
