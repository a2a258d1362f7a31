import NIOCore
import Synchronization

/// Whether a store lately found no space for a write, for its `ping` (and so `/healthz`): from a
/// write that failed for space until one is stored again, or until `window` has passed since the
/// last such failure. The window matters: a node that balancers stop sending requests to once it
/// says `full` may store nothing more, and would otherwise never be seen healthy again; after it,
/// the next write that finds no space says so again.
public final class SpaceWatch: Sendable {
    /// Nanoseconds since some fixed moment that only moves forward (tests pass their own, so that
    /// "the window passed" is something they do rather than wait for).
    public typealias Clock = @Sendable () -> UInt64
    public static let uptime: Clock = { NIODeadline.now().uptimeNanoseconds }

    /// When the last write found no space (`clock` nanoseconds); 0: none since one was stored.
    private let lastFailure = Atomic<UInt64>(0)
    public let window: Duration
    private let clock: Clock

    public init(window: Duration = .seconds(30), clock: @escaping Clock = SpaceWatch.uptime) {
        self.window = window
        self.clock = clock
    }

    /// A write found no space.
    public func failed() {
        lastFailure.store(max(1, clock()), ordering: .relaxed)
    }

    /// A write was stored: there is space again.
    public func stored() {
        lastFailure.store(0, ordering: .relaxed)
    }

    /// Throws `StoreError.full` while a write's lack of space is recent and no write stored since.
    public func check() throws {
        let last = lastFailure.load(ordering: .relaxed)
        guard last != 0 else { return }
        let ago = Duration.nanoseconds(Int64(clock() &- last))
        guard ago < window else { return }
        throw StoreError.full("a write found no space \(Int64(ago / .milliseconds(1))) ms ago, and none has been stored since")
    }
}
