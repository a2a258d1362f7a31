import ParleyCore
import ParleyStore
import Testing

/// Subscriptions (#27) on every backend: the newer event wins whatever the order they arrive
/// in, a replay changes nothing, each user has their own, and deleting a user deletes theirs.
@Suite("Plan conformance") struct PlanConformanceTests {
    @Test(arguments: Backend.all)
    func theNewerSubscriptionEventWinsAndAReplayChangesNothing(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            #expect(try await store.subscription(user: "alice") == nil)
            let activated = Subscription(user: "alice", plan: "pro", status: .active, periodEnd: 50_000, updatedAt: 1_000)
            let cancelled = Subscription(user: "alice", plan: "pro", status: .cancelled, periodEnd: 50_000, updatedAt: 3_000)
            let lateRenewal = Subscription(user: "alice", plan: "pro", status: .active, periodEnd: 90_000, updatedAt: 2_000)
            #expect(try await store.saveSubscription(activated))
            #expect(try await !store.saveSubscription(activated), "a replay")
            #expect(try await store.saveSubscription(cancelled))
            #expect(try await !store.saveSubscription(lateRenewal), "older than what is stored")
            #expect(try await store.subscription(user: "alice") == cancelled)

            // Two events of the same time: the greater id wins in either order, and stays.
            let bobA = Subscription(user: "bob", plan: "plus", status: .active, periodEnd: 7, updatedAt: 1, event: "evt_a")
            let bob = Subscription(user: "bob", plan: "plus", status: .pastDue, periodEnd: 7, updatedAt: 1, event: "evt_b")
            #expect(try await store.saveSubscription(bob))
            #expect(try await !store.saveSubscription(bobA))
            #expect(try await store.subscription(user: "bob") == bob)
            let carolB = Subscription(user: "carol", plan: "plus", status: .pastDue, periodEnd: 7, updatedAt: 1, event: "evt_b")
            #expect(
                try await store.saveSubscription(
                    Subscription(user: "carol", plan: "plus", status: .active, periodEnd: 7, updatedAt: 1, event: "evt_a")))
            #expect(try await store.saveSubscription(carolB))
            #expect(try await store.subscription(user: "carol") == carolB)
            _ = try await store.deleteUser("alice", pseudonym: "deleted:x")
            #expect(try await store.subscription(user: "alice") == nil)
            #expect(try await store.subscription(user: "bob") == bob)
        }
    }
}

/// Payment orders and the webhook log (#27) on every backend.
@Suite("Payment conformance") struct PaymentConformanceTests {
    let ids = IDGenerator()

    /// An order records each event once, moves only forward whatever order events arrive in,
    /// pages newest first per user and for all, moves to the pseudonym with its user, and goes
    /// after 7 years with the log.
    @Test(arguments: Backend.all)
    func aPersonaIsStoredReplacedAndRemovedPerUser(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            #expect(try await store.persona(user: "alice") == nil)
            try await store.setPersona(Persona(name: "Ana", description: "Maps the Rift. «ünïcode» 🗺️"), user: "alice")
            try await store.setPersona(Persona(name: "Bo"), user: "bob")
            #expect(try await store.persona(user: "alice") == Persona(name: "Ana", description: "Maps the Rift. «ünïcode» 🗺️"))
            try await store.setPersona(Persona(name: "Anaïs"), user: "alice")
            #expect(try await store.persona(user: "alice") == Persona(name: "Anaïs", description: ""))
            try await store.setPersona(nil, user: "alice")
            #expect(try await store.persona(user: "alice") == nil)
            try await store.setPersona(nil, user: "alice")
            #expect(try await store.persona(user: "bob") == Persona(name: "Bo"))
        }
    }

    @Test(arguments: Backend.all)
    func ordersRecordEachEventOnceAndMoveOnlyForward(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let key = ids.make(.payment)
            func change(_ status: PaymentOrder.Status, _ at: Int64, _ event: String) -> PaymentOrder.Change {
                PaymentOrder.Change(status: status, at: at, event: event)
            }
            let paid = try await store.recordOrderChange(order: "ord_1", user: "alice", key: key, credits: 500, change: change(.paid, 2_000, "e2"))
            #expect(paid.applied && paid.order.status == .paid && paid.order.credits == 500)
            let replay = try await store.recordOrderChange(
                order: "ord_1", user: "alice", key: "ignored", credits: 500, change: change(.paid, 2_000, "e2"))
            #expect(!replay.applied && replay.order == paid.order)
            // The creation arrives late: recorded first in the history, the order stays paid.
            let late = try await store.recordOrderChange(
                order: "ord_1", user: "alice", key: "ignored", credits: 999, change: change(.created, 1_000, "e1"))
            #expect(late.applied && late.order.status == .paid && late.order.credits == 500 && late.order.key == key)
            #expect(late.order.history.map(\.event) == ["e1", "e2"])
            let refunded = try await store.recordOrderChange(
                order: "ord_1", user: "alice", key: "ignored", credits: nil, change: change(.refunded, 3_000, "e3"))
            #expect(refunded.order.status == .refunded)
            #expect(try await store.paymentOrder(id: "ord_1") == refunded.order)

            let bobs = try await store.recordOrderChange(
                order: "ord_2", user: "bob", key: ids.make(.payment), credits: 100, change: change(.created, 4_000, "e4"))
            let third = try await store.recordOrderChange(
                order: "ord_3", user: "alice", key: ids.make(.payment), credits: 50, change: change(.failed, 5_000, "e5"))
            #expect(try await store.paymentOrders(user: "alice", limit: 10, before: nil).map(\.id) == ["ord_3", "ord_1"])
            #expect(try await store.paymentOrders(user: nil, limit: 2, before: nil).map(\.id) == ["ord_3", "ord_2"])
            #expect(try await store.paymentOrders(user: nil, limit: 2, before: bobs.order.key).map(\.id) == ["ord_1"])

            let deliveries = [
                WebhookDelivery(id: ids.make(.webhook), at: 1_000, event: nil, eventID: nil, user: nil, outcome: "refused", reason: "bad signature"),
                WebhookDelivery(id: ids.make(.webhook), at: 2_000, event: "order.paid", eventID: "e1", user: nil, outcome: "applied", reason: nil),
                WebhookDelivery(
                    id: ids.make(.webhook), at: 3_000, event: "order.paid", eventID: "e2", user: "alice", outcome: "applied", reason: nil),
            ]
            for d in deliveries { try await store.appendWebhookDelivery(d) }
            #expect(try await store.webhookDeliveries(limit: 2, before: nil) == [deliveries[2], deliveries[1]])
            #expect(try await store.webhookDeliveries(limit: 2, before: deliveries[1].id) == [deliveries[0]])

            _ = try await store.deleteUser("alice", pseudonym: "deleted:a")
            #expect(try await store.paymentOrder(id: "ord_1")?.user == "deleted:a", "kept for tax and disputes, under the pseudonym")
            #expect(try await store.webhookDeliveries(limit: 1, before: nil).first?.user == "deleted:a")
            #expect(try await store.paymentOrders(user: "alice", limit: 10, before: nil).isEmpty)

            // Age: orders by their last change, deliveries by their time.
            let purged = try await store.purgePayments(before: 4_500, limit: 10)
            #expect(purged.orders == 2 && purged.deliveries == 3)
            #expect(try await store.paymentOrders(user: nil, limit: 10, before: nil).map(\.id) == [third.order.id])
        }
    }
}

/// Spending caps (#27) on every backend: concurrent debits never take a window past its cap, a
/// settlement's return gives room back, a retried entry counts once, and grants are not capped.
@Suite("Spend cap conformance") struct SpendCapConformanceTests {
    /// Alice's entry `id` of `credits`, one token of stream `st_1`.
    func entry(_ id: String, _ credits: Int64, _ kind: LedgerEntry.Kind = .debit) -> LedgerEntry {
        LedgerEntry(id: id, user: "alice", kind: kind, credits: credits, tokens: 1, stream: "st_1", createdAt: 1)
    }

    /// A day's cap of 10 within a month's of 100.
    static let caps = [SpendCap(window: "day:2026-12-04", max: 10), SpendCap(window: "month:2026-12", max: 100)]

    @Test(arguments: Backend.all)
    func concurrentDebitsNeverPassACap(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(entry("grant", 1_000, .grant), allowOverdraft: false)
            let caps = Self.caps
            let byID = try await withThrowingTaskGroup(of: (String, LedgerOutcome).self) { group in
                for n in 0..<30 {
                    group.addTask { ("d\(n)", try await store.apply(entry("d\(n)", -1), allowOverdraft: false, caps: caps)) }
                }
                return try await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
            }
            let outcomes = Array(byID.values)
            #expect(outcomes.filter(\.isApplied).count == 10)
            #expect(outcomes.contains(.overLimit(balance: 990, available: 0)))
            let spent = try await store.spent(user: "alice", windows: caps.map(\.window))
            #expect(spent == ["day:2026-12-04": 10, "month:2026-12": 10], "\(spent), \(outcomes)")
            // One that went through, retried: counted once (which ten went through is the scheduler's).
            let applied = try #require(byID.first(where: { $0.value.isApplied })?.key)
            #expect(try await store.apply(entry(applied, -1), allowOverdraft: false, caps: caps) == .alreadyApplied(balance: 990))
            #expect(try await store.apply(entry("back", 3, .settlement), allowOverdraft: false, caps: caps).isApplied)
            #expect(try await store.apply(entry("big", -4), allowOverdraft: false, caps: caps) == .overLimit(balance: 993, available: 3))
            #expect(try await store.apply(entry("fits", -3), allowOverdraft: false, caps: caps) == .applied(balance: 990))
            #expect(try await store.spent(user: "alice", windows: ["day:2026-12-04"]) == ["day:2026-12-04": 10])
            // Another day's window starts empty; the month's goes on counting.
            let tomorrow = [SpendCap(window: "day:2026-12-05", max: 10), SpendCap(window: "month:2026-12", max: 12)]
            #expect(try await store.apply(entry("next", -5), allowOverdraft: false, caps: tomorrow) == .overLimit(balance: 990, available: 2))
            #expect(try await store.apply(entry("next", -2), allowOverdraft: false, caps: tomorrow) == .applied(balance: 988))
        }
    }

    /// A debit with headroom must leave it in every cap's window too; refused, it takes nothing.
    @Test(arguments: Backend.all)
    func aDebitWithHeadroomLeavesItInEveryWindow(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(entry("grant", 1_000, .grant), allowOverdraft: false)
            let caps = Self.caps
            #expect(
                try await store.apply(entry("in", -6), allowOverdraft: false, headroom: 5, caps: caps) == .overLimit(balance: 1_000, available: 10))
            #expect(try await store.spent(user: "alice", windows: caps.map(\.window)).values.allSatisfy { $0 == 0 })
            #expect(try await store.apply(entry("in", -6), allowOverdraft: false, headroom: 4, caps: caps) == .applied(balance: 994))
            #expect(try await store.spent(user: "alice", windows: caps.map(\.window)) == ["day:2026-12-04": 6, "month:2026-12": 6])
        }
    }

    /// Windows that are over are purged: days before the given one, months before the given one.
    @Test(arguments: Backend.all)
    func windowsThatAreOverArePurged(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(
                LedgerEntry(id: "g", user: "alice", kind: .grant, credits: 100, tokens: 0, createdAt: 1), allowOverdraft: false)
            let windows = ["day:2026-12-01", "day:2026-12-04", "month:2026-11", "month:2026-12"]
            for (n, window) in windows.enumerated() {
                let entry = LedgerEntry(id: "d\(n)", user: "alice", kind: .debit, credits: -1, tokens: 1, stream: "st", createdAt: 1)
                #expect(try await store.apply(entry, allowOverdraft: false, caps: [SpendCap(window: window, max: 10)]).isApplied)
            }
            #expect(try await store.purgeSpendWindows(before: "day:2026-12-03", "month:2026-12", limit: 10) == 2)
            #expect(try await store.spent(user: "alice", windows: windows) == ["day:2026-12-04": 1, "month:2026-12": 1])
        }
    }
}
