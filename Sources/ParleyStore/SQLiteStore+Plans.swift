import ParleyCore

extension SQLiteStore {
    public func subscription(user: String) async throws -> Subscription? {
        try await read { db in
            try db.query("SELECT plan, status, period_end, updated_at FROM subscriptions WHERE user = ?", [.text(user)]).first.map { r in
                Subscription(
                    user: user, plan: r["plan"].text ?? "", status: Subscription.Status(rawValue: r["status"].text ?? "") ?? .cancelled,
                    periodEnd: r["period_end"].int ?? 0, updatedAt: r["updated_at"].int ?? 0)
            }
        }
    }

    public func saveSubscription(_ s: Subscription) async throws -> Bool {
        try await run { db in
            try db.query(
                """
                INSERT INTO subscriptions(user, plan, status, period_end, updated_at) VALUES(?, ?, ?, ?, ?)
                ON CONFLICT(user) DO UPDATE SET plan = excluded.plan, status = excluded.status, period_end = excluded.period_end,
                    updated_at = excluded.updated_at
                WHERE excluded.updated_at > subscriptions.updated_at
                """,
                [.text(s.user), .text(s.plan), .text(s.status.rawValue), .int(s.periodEnd), .int(s.updatedAt)])
            return db.changes > 0
        }
    }
}
