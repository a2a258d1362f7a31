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
    let freshness: Int64
    let capacity: Int
    private let cache = Mutex<[String: (subscription: Subscription?, readAt: Int64)]>([:])
    private let limitsCache = Mutex<[String: (limits: SpendLimits, readAt: Int64)]>([:])
    /// Requests refused with `plan_required`.
    let refusals: CountedCounter
    /// Each user's messages-a-minute bucket (on this node), for plans that set the limit.
    private let messageBuckets = Mutex<[String: TokenBucket]>([:])

    init(
        catalog: PlanCatalog, store: any PlanStore, clock: @escaping @Sendable () -> Int64, freshness: Duration = .seconds(5),
        capacity: Int = 10_000, metrics: any MetricsFactory = MetricsSystem.factory
    ) {
        refusals = CountedCounter(label: "parley_plan_refusals_total", factory: metrics)
        self.catalog = catalog
        self.store = store
        self.clock = clock
        self.freshness = Timestamp.millis(freshness)
        self.capacity = capacity
    }

    func subscription(of user: String) async throws -> Subscription? {
        let now = clock()
        if let cached = cache.withLock({ $0[user] }), now - cached.readAt < freshness { return cached.subscription }
        let subscription = try await store.subscription(user: user)
        cache.withLock { cache in
            if cache.count >= capacity { cache.removeAll(keepingCapacity: true) }
            cache[user] = (subscription, now)
        }
        return subscription
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
        let now = clock()
        if let cached = limitsCache.withLock({ $0[user] }), now - cached.readAt < freshness { return cached.limits }
        let limits = try await store.spendLimits(user: user)
        limitsCache.withLock { cache in
            if cache.count >= capacity { cache.removeAll(keepingCapacity: true) }
            cache[user] = (limits, now)
        }
        return limits
    }

    /// What this node knows of `user` is stale: read it again.
    func forget(_ user: String) {
        _ = cache.withLock { $0.removeValue(forKey: user) }
        _ = limitsCache.withLock { $0.removeValue(forKey: user) }
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
            if buckets.count >= capacity { buckets = buckets.filter { !$0.value.isFull(now: now) } }
            var bucket = buckets[user] ?? TokenBucket(rate: Double(perMinute) / 60, burst: perMinute, now: now)
            if bucket.burst != Double(perMinute) { bucket = TokenBucket(rate: Double(perMinute) / 60, burst: perMinute, now: now) }
            let taken = bucket.take(now: now)
            buckets[user] = bucket
            return taken
        }
        guard !taken else { return }
        throw refusal(perMinute + 1, of: .messagesPerMinute, on: plan, ref: ref, what: "messages a minute")
    }
}
