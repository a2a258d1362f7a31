import CoreMetrics
import Logging
import NIOCore
import ParleyCore
import ParleyStore
import Synchronization

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

/// Sign-ins in the audit log (#28): a session's first accepted use from an address
/// (`session.signed_in`, with the session and whether a socket or a request brought it), and
/// refused tokens (`session.refused`, with the reason). A session is recorded once per address
/// for as long as this process remembers it (`capacity` keys, the oldest forgotten first), so
/// a busy client adds no row per request; a refusal once per address and reason per `window`,
/// so a client retrying a bad token cannot fill the log (the failed sign-in backoff slows it
/// further). A request with no token at all is no sign-in and is not recorded.
final class SignInAudit: Sendable {
    let log: AuditLog
    let window: Duration
    private let recorded: RecentKeys

    init(log: AuditLog, capacity: Int = 10_000, window: Duration = .seconds(60)) {
        self.log = log
        self.window = window
        recorded = RecentKeys(capacity: capacity)
    }

    func accepted(_ identity: Identity, ip: String?, via: String) async {
        let session = identity.session ?? identity.issuedAt.map { "iat:\(Int64($0.timeIntervalSince1970))" } ?? "-"
        guard recorded.firstTime("ok\u{0}\(identity.user)\u{0}\(session)\u{0}\(ip ?? "")", within: nil) else { return }
        var detail = ["via": via]
        if let s = identity.session { detail["session"] = s }
        await log.record("session.signed_in", actor: identity.user, target: identity.session, ip: ip, detail: detail)
    }

    func refused(_ error: AuthError, ip: String?) async {
        guard error != .missingToken, recorded.firstTime("no\u{0}\(error)\u{0}\(ip ?? "")", within: window) else { return }
        await log.record("session.refused", actor: "anonymous", ip: ip, detail: ["reason": error.description])
    }
}

/// Keys seen lately, to record something once (or once per window) without a store round trip:
/// at most `capacity` keys, the older half forgotten at once when full (amortised O(1) per key).
final class RecentKeys: Sendable {
    let capacity: Int
    /// Key → when it was last recorded (ms).
    private let recorded = Mutex<[String: Int64]>([:])

    init(capacity: Int) { self.capacity = capacity }

    /// Whether `key` is to be recorded now: never seen, or last recorded longer than `within` ago
    /// (nil: seen once is enough). Marks it recorded.
    func firstTime(_ key: String, within: Duration?, now: Int64 = Int64(Timestamp.nowMillis())) -> Bool {
        recorded.withLock { recorded in
            if let at = recorded[key], within.map({ now - at < Timestamp.millis($0) }) ?? true { return false }
            recorded[key] = now
            if recorded.count > capacity { recorded.keepNewest(capacity / 2) { $0 } }
            return true
        }
    }
}

/// The retention promise: every `interval`, generated content older than `retention` that its
/// owner did not save is deleted, and audit events older than `auditRetention`, in bounded
/// batches so one pass never holds the store long.
final class RetentionJob: Sendable {
    let store: any PrivacyStore & PaymentStore & PlanStore & MediaStore
    /// nil: content retention is off (kept until the user deletes it; an admin may still purge by hand).
    let retention: Duration?
    /// The audit log's promise: "up to 24 months" by default.
    let auditRetention: Duration
    /// Payment orders and webhook deliveries: 7 years by default (tax and disputes).
    let paymentRetention: Duration
    /// Voiced replies' audio the owner did not save: 90 days by default.
    let mediaRetention: Duration
    let interval: Duration
    let logger: Logger
    private let purgedMessages: Counter
    private let purgedEntries: Counter
    private let purgedAudit: Counter
    private let purgedPayments: Counter
    private let purgedClips: Counter
    static let batch = 1_000

    init(
        store: any PrivacyStore & PaymentStore & PlanStore & MediaStore, retention: Duration?, auditRetention: Duration,
        paymentRetention: Duration, mediaRetention: Duration = .seconds(90 * 86_400), interval: Duration, logger: Logger,
        metrics: any MetricsFactory
    ) {
        self.mediaRetention = mediaRetention
        self.store = store
        self.retention = retention
        self.auditRetention = auditRetention
        self.paymentRetention = paymentRetention
        self.interval = interval
        self.logger = logger
        purgedMessages = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "message")], factory: metrics)
        purgedEntries = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "room_entry")], factory: metrics)
        purgedAudit = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "audit")], factory: metrics)
        purgedPayments = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "payment")], factory: metrics)
        purgedClips = Counter(label: "parley_retention_purged_total", dimensions: [("kind", "voice_clip")], factory: metrics)
    }

    /// Runs until cancelled: a minute's wait (at most `interval`), then a pass every `interval`.
    func run() async {
        try? await Task.sleep(for: min(interval, .seconds(60)))
        while !Task.isCancelled {
            do {
                if let retention { _ = try await purge(olderThan: retention) }
                _ = try await purgeAudit()
                _ = try await purgePayments()
                _ = try await purgeClips()
                _ = try await purgeSpendWindows()
            } catch {
                logger.error("retention purge failed; retrying at the next pass", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// Deletes every audit event recorded more than `auditRetention` before `now`; says how many.
    func purgeAudit(now: Int64 = Int64(Timestamp.nowMillis())) async throws -> Int {
        let cutoff = now - Timestamp.millis(auditRetention)
        let total = try await Self.inBatches(counting: purgedAudit) { [store] in [try await store.purgeAudit(before: cutoff, limit: Self.batch)] }
        if total > 0 { logger.info("retention purge", metadata: ["audit_events": "\(total)", "cutoff": "\(cutoff)"]) }
        return total
    }

    /// Deletes payment orders last changed, and webhook deliveries made, more than
    /// `paymentRetention` before `now`; says how many.
    func purgePayments(now: Int64 = Int64(Timestamp.nowMillis())) async throws -> Int {
        let cutoff = now - Timestamp.millis(paymentRetention)
        let total = try await Self.inBatches(counting: purgedPayments) { [store] in
            let deleted = try await store.purgePayments(before: cutoff, limit: Self.batch)
            return [deleted.orders, deleted.deliveries]
        }
        if total > 0 { logger.info("retention purge", metadata: ["payment_records": "\(total)", "cutoff": "\(cutoff)"]) }
        return total
    }

    /// Deletes voiced replies' audio made more than `mediaRetention` before `now` and not saved;
    /// says how many.
    func purgeClips(now: Int64 = Int64(Timestamp.nowMillis())) async throws -> Int {
        let cutoff = now - Timestamp.millis(mediaRetention)
        let total = try await Self.inBatches(counting: purgedClips) { [store] in
            [try await store.purgeClips(createdBefore: cutoff, limit: Self.batch)]
        }
        if total > 0 { logger.info("retention purge", metadata: ["voice_clips": "\(total)", "cutoff": "\(cutoff)"]) }
        return total
    }

    /// Deletes the spending-limit windows that are over (days before yesterday, months before
    /// last month: a day's window is read only on its day); says how many.
    func purgeSpendWindows(now: Int64 = Int64(Timestamp.nowMillis())) async throws -> Int {
        let yesterday = now - 86_400_000
        let day = "day:" + Timestamp.rfc3339(millis: yesterday).prefix(10)
        let month = "month:" + BillingPeriod(containing: BillingPeriod(containing: now).start - 1).id
        return try await Self.inBatches { [store] in [try await store.purgeSpendWindows(before: day, month, limit: Self.batch)] }
    }

    /// Runs `pass` (deleting up to `batch` of each kind it purges, and saying how many of each)
    /// until one deletes fewer than `batch` of every kind, or the job is cancelled; the total,
    /// each pass's also added to `counter`.
    private static func inBatches(counting counter: Counter? = nil, _ pass: () async throws -> [Int]) async throws -> Int {
        var total = 0
        while !Task.isCancelled {
            let deleted = try await pass()
            total += deleted.reduce(0, +)
            counter?.increment(by: deleted.reduce(0, +))
            if deleted.allSatisfy({ $0 < batch }) { break }
        }
        return total
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
