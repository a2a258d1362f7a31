import ParleyCore
import ParleyStore

extension MongoStore {
    public func subscription(user: String) async throws -> Subscription? {
        try await run { db in
            try db.find("subscriptions", filter: .object([("_id", .string(user))]), limit: 1).first.map { d in
                Subscription(
                    user: user, plan: d["plan"]?.stringValue ?? "",
                    status: Subscription.Status(rawValue: d["status"]?.stringValue ?? "") ?? .cancelled,
                    periodEnd: d["period_end"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0)
            }
        }
    }

    public func saveSubscription(_ s: Subscription) async throws -> Bool {
        try await run { db in
            // Matches only an older state (or none: the upsert inserts); a newer one stored makes
            // the upsert's insert clash on `_id`, which is the answer "not stored".
            do {
                _ = try db.update(
                    "subscriptions", query: .object([("_id", .string(s.user)), ("updated_at", .object([("$lt", .long(s.updatedAt))]))]),
                    update: .object([
                        (
                            "$set",
                            .object([
                                ("plan", .string(s.plan)), ("status", .string(s.status.rawValue)), ("period_end", .long(s.periodEnd)),
                                ("updated_at", .long(s.updatedAt)),
                            ])
                        )
                    ]), upsert: true)
                return true
            } catch StoreError.duplicateKey {
                return false
            }
        }
    }
}
