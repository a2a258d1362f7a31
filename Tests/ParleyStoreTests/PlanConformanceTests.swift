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

            let bob = Subscription(user: "bob", plan: "plus", status: .pastDue, periodEnd: 7, updatedAt: 1)
            #expect(try await store.saveSubscription(bob))
            #expect(try await store.subscription(user: "bob") == bob)
            _ = try await store.deleteUser("alice", pseudonym: "deleted:x")
            #expect(try await store.subscription(user: "alice") == nil)
            #expect(try await store.subscription(user: "bob") == bob)
        }
    }
}
