import Synchronization

/// A clock that moves only when a test moves it (nanoseconds, starting at one second): for
/// windows a test should pass by saying so, not by waiting under a loaded machine's timing.
public final class ManualClock: Sendable {
    private let nanoseconds = Atomic<UInt64>(1_000_000_000)

    public init() {}

    public var now: @Sendable () -> UInt64 { { self.nanoseconds.load(ordering: .relaxed) } }

    public func advance(by duration: Duration) {
        nanoseconds.add(UInt64(duration / .nanoseconds(1)), ordering: .relaxed)
    }
}
