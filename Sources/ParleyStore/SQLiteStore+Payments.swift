import ParleyCore

extension SQLiteStore {
    public func recordOrderChange(
        order id: String, user: String, key: String, credits: Int64?, change: PaymentOrder.Change
    ) async throws -> (order: PaymentOrder, applied: Bool) {
        try await run { db in
            try db.transaction {
                let stored = try Self.order(db, id)
                let current =
                    stored
                    ?? PaymentOrder(id: id, key: key, user: user, credits: 0, status: change.status, history: [], createdAt: change.at, updatedAt: 0)
                guard let next = current.applying(change, credits: credits) else { return (current, false) }
                try db.query(
                    """
                    INSERT INTO payment_orders(id, key, user, credits, status, history, created_at, updated_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT(id) DO UPDATE SET credits = excluded.credits, status = excluded.status, history = excluded.history,
                        updated_at = excluded.updated_at
                    """,
                    [
                        .text(next.id), .text(next.key), .text(next.user), .int(next.credits), .text(next.status.rawValue),
                        .text(PaymentOrder.json(next.history).serializedString()), .int(next.createdAt), .int(next.updatedAt),
                    ])
                return (next, true)
            }
        }
    }

    public func paymentOrder(id: String) async throws -> PaymentOrder? {
        try await read { db in try Self.order(db, id) }
    }

    public func paymentOrders(user: String?, limit: Int, before: String?) async throws -> [PaymentOrder] {
        let page = Self.cursor("key", "<", before)
        let whose: (sql: String, params: [SQLValue]) = user.map { (" AND user = ?", [.text($0)]) } ?? ("", [])
        return try await read { db in
            try db.query(
                "SELECT * FROM payment_orders WHERE 1 = 1\(whose.sql)\(page.sql) ORDER BY key DESC LIMIT ?",
                whose.params + page.params + [.int(Int64(limit))]
            ).map(Self.order(from:))
        }
    }

    static func order(_ db: SQLiteConnection, _ id: String) throws -> PaymentOrder? {
        try db.query("SELECT * FROM payment_orders WHERE id = ?", [.text(id)]).first.map(Self.order(from:))
    }

    static func order(from r: SQLRow) -> PaymentOrder {
        PaymentOrder(
            id: r["id"].text ?? "", key: r["key"].text ?? "", user: r["user"].text ?? "", credits: r["credits"].int ?? 0,
            status: PaymentOrder.Status(rawValue: r["status"].text ?? "") ?? .created,
            history: PaymentOrder.history(try? JSONValue.parse(Array((r["history"].text ?? "[]").utf8))),
            createdAt: r["created_at"].int ?? 0, updatedAt: r["updated_at"].int ?? 0)
    }

    public func appendWebhookDelivery(_ d: WebhookDelivery) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO webhook_deliveries(id, at, event, event_id, user, outcome, reason) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [
                    .text(d.id), .int(d.at), Self.optional(d.event), Self.optional(d.eventID), Self.optional(d.user), .text(d.outcome),
                    Self.optional(d.reason),
                ])
        }
    }

    public func webhookDeliveries(limit: Int, before: String?) async throws -> [WebhookDelivery] {
        let page = Self.cursor("id", "<", before)
        return try await read { db in
            try db.query("SELECT * FROM webhook_deliveries WHERE 1 = 1\(page.sql) ORDER BY id DESC LIMIT ?", page.params + [.int(Int64(limit))])
                .map { r in
                    WebhookDelivery(
                        id: r["id"].text ?? "", at: r["at"].int ?? 0, event: r["event"].text, eventID: r["event_id"].text, user: r["user"].text,
                        outcome: r["outcome"].text ?? "", reason: r["reason"].text)
                }
        }
    }

    public func purgePayments(before cutoff: Int64, limit: Int) async throws -> (orders: Int, deliveries: Int) {
        try await run { db in
            let bounds: [SQLValue] = [.int(cutoff), .int(Int64(limit))]
            try db.query(
                "DELETE FROM payment_orders WHERE id IN (SELECT id FROM payment_orders WHERE updated_at < ? ORDER BY updated_at LIMIT ?)", bounds)
            let orders = db.changes
            try db.query("DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries WHERE at < ? ORDER BY at LIMIT ?)", bounds)
            return (orders, db.changes)
        }
    }
}
