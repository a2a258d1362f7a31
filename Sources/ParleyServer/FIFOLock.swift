import NIOCore
import Synchronization

/// Mutual exclusion across suspension points, first come first served: the bodies run through
/// one lock never overlap, and they start in the order `run` was called. (An actor would not do:
/// it lets another call in while a body awaits.)
package final class FIFOLock: Sendable {
    private struct State {
        var busy = false
        var waiting = CircularBuffer<CheckedContinuation<Void, Never>>()
    }

    private let state = Mutex(State())

    package init() {}

    /// Whether a body is running or waiting.
    var isBusy: Bool { state.withLock { $0.busy } }

    /// Bodies waiting for the one running.
    var waitingCount: Int { state.withLock { $0.waiting.count } }

    package func run<T>(_ body: () async throws -> T) async rethrows -> T {
        await withCheckedContinuation { (waiter: CheckedContinuation<Void, Never>) in
            let runNow = state.withLock { s -> Bool in
                guard s.busy else {
                    s.busy = true
                    return true
                }
                s.waiting.append(waiter)
                return false
            }
            if runNow { waiter.resume() }
        }
        defer {
            let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
                guard let next = s.waiting.popFirst() else {
                    s.busy = false
                    return nil
                }
                return next
            }
            next?.resume()
        }
        return try await body()
    }
}

/// FIFO locks for keys (a user's creates, say), spread over a fixed number of locks so memory
/// stays bounded whatever the keys: two keys may share one and wait for each other, which suits
/// work that is rare per key.
package struct StripedLocks: Sendable {
    private let locks: [FIFOLock]

    package init(stripes: Int = 64) {
        locks = (0..<max(1, stripes)).map { _ in FIFOLock() }
    }

    package func run<T>(for key: String, _ body: () async throws -> T) async rethrows -> T {
        var hasher = Hasher()
        hasher.combine(key)
        return try await locks[Int(UInt(bitPattern: hasher.finalize()) % UInt(locks.count))].run(body)
    }
}
