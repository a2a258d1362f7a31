import ParleyCore
import ParleyStore

extension MongoStore {
    public func subscription(user: String) async throws -> Subscription? {
        try await run { db in
            try db.find("subscriptions", filter: .object([("_id", .string(user))]), limit: 1).first.map { d in
                Subscription(
                    user: user, plan: d["plan"]?.stringValue ?? "",
                    status: Subscription.Status(rawValue: d["status"]?.stringValue ?? "") ?? .cancelled,
                    periodEnd: d["period_end"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0, event: d["event"]?.stringValue ?? "")
            }
        }
    }

    public func saveSubscription(_ s: Subscription) async throws -> Bool {
        try await run { db in
            // Matches only an older state (or none: the upsert inserts); a newer one stored makes
            // the upsert's insert clash on `_id`, which is the answer "not stored".
            do {
                _ = try db.update(
                    "subscriptions",
                    query: .object([
                        ("_id", .string(s.user)),
                        (
                            "$or",
                            .array([
                                .object([("updated_at", .object([("$lt", .long(s.updatedAt))]))]),
                                .object([("updated_at", .long(s.updatedAt)), ("event", .object([("$lt", .string(s.event))]))]),
                            ])
                        ),
                    ]),
                    update: .object([
                        (
                            "$set",
                            .object([
                                ("plan", .string(s.plan)), ("status", .string(s.status.rawValue)), ("period_end", .long(s.periodEnd)),
                                ("updated_at", .long(s.updatedAt)), ("event", .string(s.event)),
                            ])
                        )
                    ]), upsert: true)
                return true
            } catch StoreError.duplicateKey {
                return false
            }
        }
    }

    public func spendLimits(user: String) async throws -> SpendLimits {
        try await run { db in
            try db.find("spend_limits", filter: .object([("_id", .string(user))]), limit: 1).first.map {
                SpendLimits(daily: $0["daily"]?.int64, monthly: $0["monthly"]?.int64)
            } ?? SpendLimits()
        }
    }

    public func setSpendLimits(_ limits: SpendLimits, user: String) async throws {
        try await run { db in
            _ = try db.update(
                "spend_limits", query: .object([("_id", .string(user))]),
                update: .object([
                    (
                        "$set",
                        .object([("daily", limits.daily.map(JSONValue.long) ?? .null), ("monthly", limits.monthly.map(JSONValue.long) ?? .null)])
                    )
                ]), upsert: true)
        }
    }

    public func spent(user: String, windows: [String]) async throws -> [String: Int64] {
        try await run { db in
            var spent: [String: Int64] = [:]
            for window in windows {
                if let doc = try db.find("spend_windows", filter: .object([("_id", Self.windowID(user, window))]), limit: 1).first {
                    spent[window] = doc["spent"]?.int64 ?? 0
                }
            }
            return spent
        }
    }

    public func purgeSpendWindows(before day: String, _ month: String, limit: Int) async throws -> Int {
        try await run { db in
            let over = try db.find(
                "spend_windows",
                filter: .object([
                    (
                        "$or",
                        .array([
                            .object([("span", .object([("$gte", .string("day:")), ("$lt", .string(day))]))]),
                            .object([("span", .object([("$gte", .string("month:")), ("$lt", .string(month))]))]),
                        ])
                    )
                ]), projection: .object([("_id", .int(1))]), limit: limit)
            return try Self.delete(db, "spend_windows", field: "_id", in: over.compactMap { $0["_id"] })
        }
    }

    public func persona(user: String) async throws -> Persona? {
        try await run { db in
            try db.find("personas", filter: .object([("_id", .string(user))]), limit: 1).first.map {
                Persona(name: $0["name"]?.stringValue ?? "", description: $0["description"]?.stringValue ?? "")
            }
        }
    }

    public func setPersona(_ persona: Persona?, user: String) async throws {
        try await run { db in
            guard let persona else {
                _ = try db.delete("personas", query: .object([("_id", .string(user))]))
                return
            }
            _ = try db.update(
                "personas", query: .object([("_id", .string(user))]),
                update: .object([("$set", .object([("name", .string(persona.name)), ("description", .string(persona.description))]))]),
                upsert: true)
        }
    }
}
