import CoreMetrics
import Logging
import NIOCore
import ParleyCore
import ParleyStore
import Synchronization

/// Which plan each user is on and what it lets them do (#27). A user's subscription is read
/// from the store and kept `freshness` (a change made on another node is seen here within it;
/// one made here, at once); a subscription whose period ended, or whose plan left the catalog,
/// puts the user on the default plan.
final class PlanBook: Sendable {
    let catalog: PlanCatalog
    let store: any PlanStore
    /// Unix ms now; tests move it to cross a billing period.
    let clock: @Sendable () -> Int64
    let capacity: Int
    private let subscriptions: FreshValues<Subscription?>
    private let limits: FreshValues<SpendLimits>
    /// Requests refused with `plan_required`.
    let refusals: CountedCounter
    /// Each user's messages-a-minute bucket (on this node), for plans that set the limit.
    private let messageBuckets: Mutex<MessageBuckets>

    /// Buckets by user, swept of the full ones (which hold nothing a new bucket would not) when
    /// they reach `sweepAt`. The others are kept, since dropping one would refill it; the next
    /// sweep waits until they have doubled, so a sweep costs O(1) a message amortised (#26: a
    /// sweep at every message once the active buckets reached the capacity, each a copy of them
    /// all under this lock).
    private struct MessageBuckets {
        var byUser: [String: TokenBucket] = [:]
        var sweepAt: Int
        /// Sweeps so far, for tests.
        var sweeps = 0
    }

    /// The message buckets kept, and the sweeps they took (for tests).
    var messageBucketCounts: (kept: Int, sweeps: Int) { messageBuckets.withLock { ($0.byUser.count, $0.sweeps) } }

    init(
        catalog: PlanCatalog, store: any PlanStore, clock: @escaping @Sendable () -> Int64, freshness: Duration = .seconds(5),
        capacity: Int = 10_000, metrics: any MetricsFactory = MetricsSystem.factory
    ) {
        refusals = CountedCounter(label: "parley_plan_refusals_total", factory: metrics)
        self.catalog = catalog
        self.store = store
        self.clock = clock
        self.capacity = capacity
        messageBuckets = Mutex(MessageBuckets(sweepAt: capacity))
        subscriptions = FreshValues(freshness: Timestamp.millis(freshness), capacity: capacity)
        limits = FreshValues(freshness: Timestamp.millis(freshness), capacity: capacity)
    }

    func subscription(of user: String) async throws -> Subscription? {
        try await subscriptions.value(of: user, now: clock()) { [store] in try await store.subscription(user: user) }
    }

    /// The plan `user` is on now.
    func plan(of user: String) async throws -> Plan {
        Self.plan(catalog, try await subscription(of: user), now: clock())
    }

    static func plan(_ catalog: PlanCatalog, _ subscription: Subscription?, now: Int64) -> Plan {
        guard let subscription, now < subscription.periodEnd, let plan = catalog.plan(subscription.plan) else { return catalog.defaultPlan }
        return plan
    }

    /// The limits `user` set on their own spending, kept `freshness` like the subscription (a
    /// change made on another node applies here within it; one made here, at once).
    func spendLimits(of user: String) async throws -> SpendLimits {
        try await limits.value(of: user, now: clock()) { [store] in try await store.spendLimits(user: user) }
    }

    /// What this node knows of `user` is stale: read it again.
    func forget(_ user: String) {
        subscriptions.forget(user)
        limits.forget(user)
    }

    /// Throws `plan_required` unless the user's plan allows `feature`.
    func require(_ feature: PlanFeature, user: String, ref: String?, what: String) async throws {
        let plan = try await plan(of: user)
        guard !plan.features.contains(feature) else { return }
        refusals.increment()
        throw Self.refusal(ref: ref, "\(what) is not in the \(plan.name) plan", catalog.first(allowing: feature))
    }

    /// Throws `plan_required` unless the user's plan lets them have `count` of `kind`.
    func require(_ count: Int, of kind: PlanLimits.Kind, user: String, ref: String?, what: String) async throws {
        let plan = try await plan(of: user)
        guard !plan.allows(count, of: kind) else { return }
        throw refusal(count, of: kind, on: plan, ref: ref, what: what)
    }

    /// `plan_required` for a user on `plan` who would have `count` of `kind`.
    func refusal(_ count: Int, of kind: PlanLimits.Kind, on plan: Plan, ref: String?, what: String) -> FrameError {
        refusals.increment()
        return Self.refusal(ref: ref, "the \(plan.name) plan allows \(plan.limits[kind] ?? 0) \(what)", catalog.first(allowing: count, of: kind))
    }

    static func refusal(ref: String?, _ reason: String, _ allowing: Plan?) -> FrameError {
        FrameError(
            ref: ref, code: .planRequired,
            message: reason + (allowing.map { "; the \($0.name) plan ('\($0.id)') allows it" } ?? "; no plan on this server does"),
            plan: allowing?.id)
    }

    /// Takes one message from `user`'s messages-a-minute bucket when their plan sets the limit;
    /// `plan_required` when it is empty. Per node: behind a balancer a user may get up to that
    /// many a minute from each node.
    func takeMessage(user: String, ref: String?, now: UInt64 = NIODeadline.now().uptimeNanoseconds) async throws {
        let plan = try await plan(of: user)
        guard let perMinute = plan.limits.messagesPerMinute else { return }
        let taken = messageBuckets.withLock { buckets in
            if buckets.byUser.count >= buckets.sweepAt {
                buckets.byUser = buckets.byUser.filter { !$0.value.isFull(now: now) }
                buckets.sweepAt = max(capacity, 2 * buckets.byUser.count)
                buckets.sweeps += 1
            }
            var bucket = buckets.byUser[user] ?? TokenBucket(rate: Double(perMinute) / 60, burst: perMinute, now: now)
            if bucket.burst != Double(perMinute) { bucket = TokenBucket(rate: Double(perMinute) / 60, burst: perMinute, now: now) }
            let taken = bucket.take(now: now)
            buckets.byUser[user] = bucket
            return taken
        }
        guard !taken else { return }
        throw refusal(perMinute + 1, of: .messagesPerMinute, on: plan, ref: ref, what: "messages a minute")
    }
}

/// Per-user values read from the store and kept `freshness` ms; at most `capacity` users. Full,
/// it keeps the newer half (the stale ones go first), so a sweep is half the capacity of new
/// users away and the users read lately keep their values: emptied at once, as it was, every
/// active user's next check went to the store together.
final class FreshValues<Value: Sendable>: Sendable {
    let freshness: Int64
    let capacity: Int
    private let values = Mutex<[String: (value: Value, readAt: Int64)]>([:])

    init(freshness: Int64, capacity: Int) {
        self.freshness = freshness
        self.capacity = capacity
    }

    func value(of user: String, now: Int64, read: () async throws -> Value) async throws -> Value {
        if let cached = values.withLock({ $0[user] }), now - cached.readAt < freshness { return cached.value }
        let value = try await read()
        values.withLock { values in
            if values.count >= capacity { values.keepNewest(capacity / 2) { $0.readAt } }
            values[user] = (value, now)
        }
        return value
    }

    func forget(_ user: String) {
        _ = values.withLock { $0.removeValue(forKey: user) }
    }
}
