import Synchronization

/// A clock that moves only when a test moves it, set to a moment or advanced by a duration: for
/// billing periods, and for windows a test should pass by saying so, not by waiting under a
/// loaded machine's timing. Read as Unix milliseconds or as nanoseconds.
public final class ManualClock: Sendable {
    private let nanoseconds: Atomic<Int64>

    /// `millis`: where it starts (Unix milliseconds, or any moment for an uptime clock).
    public init(millis: Int64 = 1_000) {
        nanoseconds = Atomic(millis * 1_000_000)
    }

    public var millis: Int64 { nanoseconds.load(ordering: .relaxed) / 1_000_000 }

    /// Read as an uptime clock is (`SpaceWatch.Clock`).
    public var now: @Sendable () -> UInt64 { { UInt64(self.nanoseconds.load(ordering: .relaxed)) } }

    public func set(millis: Int64) {
        nanoseconds.store(millis * 1_000_000, ordering: .relaxed)
    }

    public func advance(by duration: Duration) {
        nanoseconds.add(Int64(duration / .nanoseconds(1)), ordering: .relaxed)
    }
}
