import ParleyCore

extension SQLiteStore {
    public func subscription(user: String) async throws -> Subscription? {
        try await read { db in
            try db.query("SELECT plan, status, period_end, updated_at, event FROM subscriptions WHERE user = ?", [.text(user)]).first.map { r in
                Subscription(
                    user: user, plan: r["plan"].text ?? "", status: Subscription.Status(rawValue: r["status"].text ?? "") ?? .cancelled,
                    periodEnd: r["period_end"].int ?? 0, updatedAt: r["updated_at"].int ?? 0, event: r["event"].text ?? "")
            }
        }
    }

    public func saveSubscription(_ s: Subscription) async throws -> Bool {
        try await run { db in
            try db.query(
                """
                INSERT INTO subscriptions(user, plan, status, period_end, updated_at, event) VALUES(?, ?, ?, ?, ?, ?)
                ON CONFLICT(user) DO UPDATE SET plan = excluded.plan, status = excluded.status, period_end = excluded.period_end,
                    updated_at = excluded.updated_at, event = excluded.event
                WHERE (excluded.updated_at, excluded.event) > (subscriptions.updated_at, subscriptions.event)
                """,
                [.text(s.user), .text(s.plan), .text(s.status.rawValue), .int(s.periodEnd), .int(s.updatedAt), .text(s.event)])
            return db.changes > 0
        }
    }

    public func spendLimits(user: String) async throws -> SpendLimits {
        try await read { db in
            try db.query("SELECT daily, monthly FROM spend_limits WHERE user = ?", [.text(user)]).first.map {
                SpendLimits(daily: $0["daily"].int, monthly: $0["monthly"].int)
            } ?? SpendLimits()
        }
    }

    public func setSpendLimits(_ limits: SpendLimits, user: String) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO spend_limits(user, daily, monthly) VALUES(?, ?, ?) ON CONFLICT(user) DO UPDATE SET daily = excluded.daily, monthly = excluded.monthly",
                [.text(user), limits.daily.map(SQLValue.int) ?? .null, limits.monthly.map(SQLValue.int) ?? .null])
        }
    }

    public func spent(user: String, windows: [String]) async throws -> [String: Int64] {
        try await read { db in
            var spent: [String: Int64] = [:]
            for window in windows {
                if let row = try db.query("SELECT spent FROM spend_windows WHERE user = ? AND span = ?", [.text(user), .text(window)]).first {
                    spent[window] = row["spent"].int ?? 0
                }
            }
            return spent
        }
    }

    public func purgeSpendWindows(before day: String, _ month: String, limit: Int) async throws -> Int {
        try await run { db in
            try db.query(
                """
                DELETE FROM spend_windows WHERE rowid IN (SELECT rowid FROM spend_windows
                WHERE (span >= 'day:' AND span < ?) OR (span >= 'month:' AND span < ?) LIMIT ?)
                """, [.text(day), .text(month), .int(Int64(limit))])
            return db.changes
        }
    }

    public func persona(user: String) async throws -> Persona? {
        try await read { db in
            try db.query("SELECT name, description FROM personas WHERE user = ?", [.text(user)]).first.map {
                Persona(name: $0["name"].text ?? "", description: $0["description"].text ?? "")
            }
        }
    }

    public func setPersona(_ persona: Persona?, user: String) async throws {
        try await run { db in
            guard let persona else {
                try db.query("DELETE FROM personas WHERE user = ?", [.text(user)])
                return
            }
            try db.query(
                "INSERT INTO personas(user, name, description) VALUES(?, ?, ?) ON CONFLICT(user) DO UPDATE SET name = excluded.name, description = excluded.description",
                [.text(user), .text(persona.name), .text(persona.description)])
        }
    }
}
