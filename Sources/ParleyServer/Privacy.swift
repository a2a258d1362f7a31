import CoreMetrics
import Logging
import NIOCore
import ParleyCore
import ParleyStore

/// Records state changes in the store's audit log. The client address is kept only as its keyed
/// hash; a failure to record is logged and does not undo the change it describes.
struct AuditLog: Sendable {
    let store: any PrivacyStore
    let ids: IDGenerator
    let logger: Logger
    private let addresses: KeyedHasher
    private let pseudonyms: KeyedHasher

    init(store: any PrivacyStore, secret: String, ids: IDGenerator, logger: Logger) {
        self.store = store
        self.ids = ids
        self.logger = logger
        addresses = KeyedHasher(secret: secret)
        pseudonyms = KeyedHasher(secret: secret, purpose: "deleted user")
    }

    func record(_ action: String, actor: String, target: String? = nil, ip: String?, detail: [String: String] = [:]) async {
        let event = AuditEvent(
            id: ids.make(.audit), at: Int64(Timestamp.nowMillis()), actor: actor, action: action, target: target,
            ipHash: ip.map(addresses.hash), detail: detail)
        do {
            try await store.appendAudit(event)
        } catch {
            logger.error("audit event not stored", metadata: ["action": "\(action)", "audit": "\(event.id)", "error": "\(error)"])
        }
    }

    /// What a deleted user's ledger rows and audit events are kept under: stable for the same
    /// user on this server, and not reversible without its secret.
    func pseudonym(for user: String) -> String {
        "deleted:" + pseudonyms.hash(user).prefix(32)
    }
}

/// The retention promise: every `interval`, generated content older than `retention` that its
/// owner did not save is deleted, in bounded batches so one pass never holds the store long.
final class RetentionJob: Sendable {
    let store: any PrivacyStore
    /// nil: retention is off (the job does nothing; an admin may still purge by hand).
    let retention: Duration?
    let interval: Duration
    let logger: Logger
    private let purgedMessages: Counter
    private let purgedEntries: Counter
    static let batch = 1_000

    init(store: any PrivacyStore, retention: Duration?, interval: Duration, logger: Logger, metrics: any MetricsFactory) {
        self.store = store
        self.retention = retention
        self.interval = interval
        self.logger = logger
        purgedMessages = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "message")], factory: metrics)
        purgedEntries = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "room_entry")], factory: metrics)
    }

    /// Runs until cancelled: a pass, then a pause of `interval`.
    func run() async {
        guard let retention else { return }
        while !Task.isCancelled {
            do {
                _ = try await purge(olderThan: retention)
            } catch {
                logger.error("retention purge failed; retrying at the next pass", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// One whole pass: deletes everything unsaved created more than `age` ago.
    func purge(olderThan age: Duration, now: Int64 = Int64(Timestamp.nowMillis())) async throws -> PurgeResult {
        let cutoff = now - Timestamp.millis(age)
        var total = PurgeResult()
        while !Task.isCancelled {
            let pass = try await store.purge(createdBefore: cutoff, limit: Self.batch)
            total = total + pass
            purgedMessages.increment(by: pass.messages)
            purgedEntries.increment(by: pass.roomEntries)
            if pass.messages < Self.batch, pass.roomEntries < Self.batch { break }
        }
        if total.total > 0 {
            logger.info(
                "retention purge", metadata: ["messages": "\(total.messages)", "room_entries": "\(total.roomEntries)", "cutoff": "\(cutoff)"])
        }
        return total
    }
}
