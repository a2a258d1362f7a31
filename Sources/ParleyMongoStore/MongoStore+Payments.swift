import ParleyCore
import ParleyStore

extension MongoStore {
    /// Read, change, and write back only if no other writer changed the order in between (its
    /// history's length is the version); a lost race reads again. Each write carries this
    /// call's mark: a read that finds it is a write whose reply was lost (the retry found the
    /// version moved on), this call's, not another writer's.
    public func recordOrderChange(
        order id: String, user: String, key: String, credits: Int64?, change: PaymentOrder.Change
    ) async throws -> (order: PaymentOrder, applied: Bool) {
        let mark = JSONValue.string(Database.callMark())
        return try await run { db in
            for _ in 0..<8 {
                let document = try db.find("payment_orders", filter: .object([("_id", .string(id))]), limit: 1).first
                if let document, document["call"] == mark { return (Self.order(from: document), true) }
                let stored = document.map(Self.order(from:))
                let current =
                    stored
                    ?? PaymentOrder(id: id, key: key, user: user, credits: 0, status: change.status, history: [], createdAt: change.at, updatedAt: 0)
                guard let next = current.applying(change, credits: credits) else { return (current, false) }
                let fields: [(String, JSONValue)] = [
                    ("credits", .long(next.credits)), ("status", .string(next.status.rawValue)), ("history", PaymentOrder.json(next.history)),
                    ("version", .long(Int64(next.history.count))), ("updated_at", .long(next.updatedAt)), ("call", mark),
                ]
                if let stored {
                    let written = try db.update(
                        "payment_orders", query: .object([("_id", .string(id)), ("version", .long(Int64(stored.history.count)))]),
                        update: .object([("$set", .object(fields))]))
                    if written.matched > 0 { return (next, true) }
                } else {
                    do {
                        try db.insert(
                            "payment_orders",
                            .object(
                                [
                                    ("_id", .string(id)), ("key", .string(next.key)), ("user", .string(next.user)),
                                    ("created_at", .long(next.createdAt)),
                                ]
                                    + fields))
                        return (next, true)
                    } catch StoreError.duplicateKey {
                        continue
                    }
                }
            }
            throw StoreError.backend("order \(id) kept changing under this write; try again")
        }
    }

    public func paymentOrder(id: String) async throws -> PaymentOrder? {
        try await run { db in try db.find("payment_orders", filter: .object([("_id", .string(id))]), limit: 1).first.map(Self.order(from:)) }
    }

    public func paymentOrders(user: String?, limit: Int, before: String?) async throws -> [PaymentOrder] {
        try await run { db in
            var filter: [(String, JSONValue)] = []
            if let user { filter.append(("user", .string(user))) }
            if let before { filter.append(("key", .object([("$lt", .string(before))]))) }
            return try db.find("payment_orders", filter: .object(filter), sort: .object([("key", .int(-1))]), limit: limit).map(Self.order(from:))
        }
    }

    static func order(from d: JSONValue) -> PaymentOrder {
        PaymentOrder(
            id: d["_id"]?.stringValue ?? "", key: d["key"]?.stringValue ?? "", user: d["user"]?.stringValue ?? "",
            credits: d["credits"]?.int64 ?? 0, status: PaymentOrder.Status(rawValue: d["status"]?.stringValue ?? "") ?? .created,
            history: PaymentOrder.history(d["history"]), createdAt: d["created_at"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0)
    }

    public func appendWebhookDelivery(_ d: WebhookDelivery) async throws {
        let optional: @Sendable (String?) -> JSONValue = { $0.map(JSONValue.string) ?? .null }
        try await run { db in
            try db.insert(
                "webhook_deliveries",
                .object([
                    ("_id", .string(d.id)), ("at", .long(d.at)), ("event", optional(d.event)), ("event_id", optional(d.eventID)),
                    ("user", optional(d.user)), ("outcome", .string(d.outcome)), ("reason", optional(d.reason)),
                ]))
        }
    }

    public func webhookDeliveries(limit: Int, before: String?) async throws -> [WebhookDelivery] {
        try await run { db in
            let filter: JSONValue = before.map { .object([("_id", .object([("$lt", .string($0))]))]) } ?? .object([])
            return try db.find("webhook_deliveries", filter: filter, sort: .object([("_id", .int(-1))]), limit: limit).map { d in
                WebhookDelivery(
                    id: d["_id"]?.stringValue ?? "", at: d["at"]?.int64 ?? 0, event: d["event"]?.stringValue, eventID: d["event_id"]?.stringValue,
                    user: d["user"]?.stringValue, outcome: d["outcome"]?.stringValue ?? "", reason: d["reason"]?.stringValue)
            }
        }
    }

    public func purgePayments(before cutoff: Int64, limit: Int) async throws -> (orders: Int, deliveries: Int) {
        try await run { db in
            let old: JSONValue = .object([("$lt", .long(cutoff))])
            let orders = try db.find(
                "payment_orders", filter: .object([("updated_at", old)]), sort: .object([("updated_at", .int(1))]),
                projection: .object([("_id", .int(1))]), limit: limit)
            let deliveries = try db.find(
                "webhook_deliveries", filter: .object([("at", old)]), sort: .object([("at", .int(1))]), projection: .object([("_id", .int(1))]),
                limit: limit)
            return (
                try Self.delete(db, "payment_orders", field: "_id", in: orders.compactMap { $0["_id"] }),
                try Self.delete(db, "webhook_deliveries", field: "_id", in: deliveries.compactMap { $0["_id"] })
            )
        }
    }
}
