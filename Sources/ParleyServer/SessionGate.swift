import Foundation
import Logging
import ParleyStore
import Synchronization

/// Which sessions were signed out (#28), read from the store and kept a few seconds per user, so
/// a sign-out reaches every node that shares the store within `freshness`, and at once on the
/// node that took it (`forget`). At most `capacity` users are kept; when more come, the older
/// half is forgotten.
final class SessionGate: Sendable {
    private let store: any PrivacyStore
    private let logger: Logger
    private let freshness: Duration
    private let capacity: Int
    private let cache = Mutex<[String: (revocations: SessionRevocations, read: ContinuousClock.Instant)]>([:])

    init(store: any PrivacyStore, logger: Logger, freshness: Duration = .seconds(5), capacity: Int = 10_000) {
        self.store = store
        self.logger = logger
        self.freshness = freshness
        self.capacity = capacity
    }

    /// False when the identity's session, or every session issued when it was, was signed out.
    /// A store that cannot answer admits (and says so): a sign-in is not refused for an outage.
    func admits(_ identity: Identity) async -> Bool {
        guard let revocations = await revocations(of: identity.user) else { return true }
        if let session = identity.session, revocations.sessions.contains(session) { return false }
        if let before = revocations.allBefore {
            // A token issued before the sign-out everywhere, or one that does not say when it was.
            guard let issued = identity.issuedAt else { return false }
            return Int64((issued.timeIntervalSince1970 * 1000).rounded(.down)) >= before
        }
        return true
    }

    /// `user`'s signed-out sessions, at most `freshness` old; nil when the store cannot answer.
    private func revocations(of user: String) async -> SessionRevocations? {
        let now = ContinuousClock.now
        if let cached = cache.withLock({ $0[user] }), now - cached.read < freshness { return cached.revocations }
        do {
            let read = try await store.sessionRevocations(user: user)
            cache.withLock { cache in
                cache[user] = (read, now)
                // Full: the older half goes at once, amortised O(1) a read (#26). Finding the
                // oldest at each read scanned them all under this lock: 0.8 ms at 10,000, paid by
                // nearly every token check once a node had seen that many users.
                if cache.count > capacity { cache.keepNewest(max(1, capacity / 2)) { $0.read } }
            }
            return read
        } catch {
            logger.warning("could not read signed-out sessions; admitting", metadata: ["error": "\(error)"])
            return nil
        }
    }

    /// Reads `user`'s signed-out sessions again on the next token (after a sign-out here).
    func forget(_ user: String) {
        _ = cache.withLock { $0.removeValue(forKey: user) }
    }
}
