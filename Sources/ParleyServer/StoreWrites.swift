import Synchronization

/// What waits for the store to come back (a kept reply, a conversation's release across the
/// cluster) waits out a growing delay, or less: a write the store took on this node (`took`)
/// says it is back, and they try at once rather than up to a minute later.
final class StoreWrites: Sendable {
    private let sleepers = Mutex<[UInt64: CheckedContinuation<Void, Never>]>([:])
    /// How many wait in `sleepers`, so that a write with none waiting costs two atomics.
    private let napping = Atomic<Int>(0)
    /// How many writes the store took: a retry that has not begun its wait yet when one comes
    /// (its task not run yet) finds it moved and does not sleep past it.
    private let taken = Atomic<UInt64>(0)
    private let nextKey = Atomic<UInt64>(0)

    /// The store took a write on this node: every wait that may be cut short ends now.
    func took() {
        // Sequentially consistent, as the sleeper's registration: either this sees it counted
        // in `napping`, or it sees `taken` moved.
        taken.wrappingAdd(1, ordering: .sequentiallyConsistent)
        guard napping.load(ordering: .sequentiallyConsistent) > 0 else { return }
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
    /// every attempt within seconds. A write taken since the backoff was made (for the first
    /// pause) or since the last pause ended (during the attempt) ends the pause at once.
    struct Backoff {
        let writes: StoreWrites
        var delay: Duration
        var wakeable = true
        var seen: UInt64

        /// Waits out the next pause; throws when cancelled.
        mutating func pause() async throws {
            let woken = try await writes.wait(delay, wakeable: wakeable, since: seen)
            seen = writes.taken.load(ordering: .sequentiallyConsistent)
            wakeable = !woken
            delay = min(delay * 2, .seconds(60))
        }
    }

    /// Made where the first attempt is made or has just failed, not in the retry's task: a write
    /// taken before that task begins to wait ends its first pause.
    func backoff(from first: Duration) -> Backoff {
        Backoff(writes: self, delay: first, seen: taken.load(ordering: .sequentiallyConsistent))
    }

    /// Waits `delay`, or until the store takes a write (or has, since `seen`) when `wakeable`;
    /// true when woken. Throws when cancelled.
    private func wait(_ delay: Duration, wakeable: Bool, since seen: UInt64) async throws -> Bool {
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
                await self.sleep(key, since: seen)
                return !Task.isCancelled
            }
            defer { group.cancelAll() }
            let woken = try await group.next() ?? false
            try Task.checkCancellation()  // a cancel ends both: the sleeper may answer first
            return woken
        }
    }

    /// Returns at `took` (at once if the store took a write since `seen`), or once cancelled.
    private func sleep(_ key: UInt64, since seen: UInt64) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (sleeper: CheckedContinuation<Void, Never>) in
                let done = sleepers.withLock { s -> Bool in
                    guard !Task.isCancelled else { return true }
                    napping.add(1, ordering: .sequentiallyConsistent)
                    guard taken.load(ordering: .sequentiallyConsistent) == seen else {
                        napping.subtract(1, ordering: .relaxed)
                        return true
                    }
                    s[key] = sleeper
                    return false
                }
                if done { sleeper.resume() }
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
