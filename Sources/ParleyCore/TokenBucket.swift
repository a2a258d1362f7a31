/// A token bucket: `rate` tokens a second refill it up to `burst`; each event takes one. Pure
/// (the caller passes the clock), so limits are tested without waiting.
public struct TokenBucket: Sendable, Equatable {
    public let rate: Double
    public let burst: Double
    private var tokens: Double
    private var last: UInt64

    /// `now` is monotonic nanoseconds.
    public init(rate: Double, burst: Int, now: UInt64) {
        self.rate = rate
        self.burst = Double(burst)
        tokens = Double(burst)
        last = now
    }

    /// The tokens there are at `now` (a clock that went back refills nothing).
    private func level(at now: UInt64) -> Double {
        min(burst, tokens + Double(now > last ? now - last : 0) / 1e9 * rate)
    }

    /// Whether the bucket would be full at `now` (an idle client: its bucket can be forgotten).
    public func isFull(now: UInt64) -> Bool { level(at: now) >= burst }

    /// Whether a take at `now` would fail, without taking.
    public func isEmpty(now: UInt64) -> Bool { level(at: now) < 1 }

    /// Takes one token if there is one.
    public mutating func take(now: UInt64) -> Bool {
        tokens = level(at: now)
        last = max(last, now)
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
