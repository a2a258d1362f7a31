import Synchronization

/// What waits for the store to come back (a kept reply, a conversation's release across the
/// cluster) waits out a growing delay, or less: a write the store took on this node (`took`)
/// says it is back, and they try at once rather than up to a minute later.
final class StoreWrites: Sendable {
    private let sleepers = Mutex<[UInt64: CheckedContinuation<Void, Never>]>([:])
    /// How many wait in `sleepers`, so that a write with none waiting costs one atomic load.
    private let napping = Atomic<Int>(0)
    private let nextKey = Atomic<UInt64>(0)

    /// The store took a write on this node: every wait that may be cut short ends now.
    func took() {
        guard napping.load(ordering: .relaxed) > 0 else { return }
        let woken = sleepers.withLock { s in
            defer { s.removeAll() }
            napping.subtract(s.count, ordering: .relaxed)
            return Array(s.values)
        }
        for sleeper in woken { sleeper.resume() }
    }

    /// A retry's pauses: `first`, doubling up to a minute, each cut short once the store takes a
    /// write, but for the pause after an attempt a write woke: that attempt failed (the store
    /// takes some writes and refuses this one), and a node taking requests would otherwise spend
    /// every attempt within seconds.
    struct Backoff {
        let writes: StoreWrites
        var delay: Duration
        var wakeable = true

        /// Waits out the next pause; throws when cancelled.
        mutating func pause() async throws {
            let woken = try await writes.wait(delay, wakeable: wakeable)
            wakeable = !woken
            delay = min(delay * 2, .seconds(60))
        }
    }

    func backoff(from first: Duration) -> Backoff { Backoff(writes: self, delay: first) }

    /// Waits `delay`, or until the store takes a write when `wakeable`; true when woken. Throws
    /// when cancelled.
    private func wait(_ delay: Duration, wakeable: Bool) async throws -> Bool {
        guard wakeable else {
            try await Task.sleep(for: delay)
            return false
        }
        let key = nextKey.wrappingAdd(1, ordering: .relaxed).newValue
        return try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await Task.sleep(for: delay)
                return false
            }
            group.addTask {
                await self.sleep(key)
                return !Task.isCancelled
            }
            defer { group.cancelAll() }
            let woken = try await group.next() ?? false
            try Task.checkCancellation()  // a cancel ends both: the sleeper may answer first
            return woken
        }
    }

    /// Returns at `took`, or once cancelled.
    private func sleep(_ key: UInt64) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (sleeper: CheckedContinuation<Void, Never>) in
                let cancelled = sleepers.withLock { s -> Bool in
                    guard !Task.isCancelled else { return true }
                    s[key] = sleeper
                    napping.add(1, ordering: .relaxed)
                    return false
                }
                if cancelled { sleeper.resume() }
            }
        } onCancel: {
            let sleeper = sleepers.withLock { s -> CheckedContinuation<Void, Never>? in
                guard let sleeper = s.removeValue(forKey: key) else { return nil }
                napping.subtract(1, ordering: .relaxed)
                return sleeper
            }
            sleeper?.resume()
        }
    }
}
