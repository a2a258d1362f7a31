import Crypto
import Foundation
import ParleyCore
import ParleyStore

/// The payment routes (#27): the signed webhook (credit packs, refunds, subscriptions), the
/// caller's orders, and the admin's orders and delivery log.
extension RESTAPI {
    /// `POST /v1/webhooks/payments`, signed with `X-Parley-Signature: sha256=<hex HMAC-SHA256 of
    /// the raw body>`, the body's `timestamp` (Unix seconds) within the tolerance of now. The body
    /// is an event (`{"event","event_id",…}`: `order.*`, `subscription.*`), or the first version's
    /// `{"order_id","user","credits","timestamp"}`, taken as `order.paid`. Every delivery is logged,
    /// accepted or refused (refusals once per address and reason a minute, so the unauthenticated
    /// route cannot fill the log).
    func paymentWebhook(_ request: HTTPRequest) async throws -> HTTPResponse {
        guard let secret = configuration.credits.paymentsSecret else {
            throw APIError(.notFound, .notFound, "payments are not configured on this server")
        }
        var delivery = WebhookDelivery(
            id: ids.make(.webhook), at: configuration.credits.clock(), event: nil, eventID: nil, user: nil, outcome: "refused", reason: nil)
        do {
            let response = try await deliver(request, secret: secret, &delivery)
            await log(delivery)
            return response
        } catch {
            delivery.outcome = "refused"
            delivery.reason =
                switch error {
                case let error as APIError: error.message
                case let error as ValidationError: error.message
                case let error as FrameError: error.message
                default: "the server failed; deliver again"
                }
            if refusedDeliveries.firstTime("\(request.remoteIP ?? "")\u{0}\(delivery.reason ?? "")", within: .seconds(60)) { await log(delivery) }
            throw error
        }
    }

    private func log(_ delivery: WebhookDelivery) async {
        do {
            try await store.appendWebhookDelivery(delivery)
        } catch {
            logger.error("webhook delivery not logged", metadata: ["delivery": "\(delivery.id)", "error": "\(error)"])
        }
    }

    private func deliver(_ request: HTTPRequest, secret: String, _ delivery: inout WebhookDelivery) async throws -> HTTPResponse {
        let body = request.body.map { Array($0.readableBytesView) } ?? []
        guard let header = request.headers.first(name: "x-parley-signature"), header.hasPrefix("sha256="),
            let signature = Self.hexBytes(header.dropFirst("sha256=".count)),
            HMAC<SHA256>.isValidAuthenticationCode(signature, authenticating: body, using: SymmetricKey(data: Array(secret.utf8)))
        else {
            throw APIError(.unauthorized, .unauthorized, "missing or invalid X-Parley-Signature")
        }
        var reader = try JSONObjectReader(try request.json())
        let event = try reader.string("event")
        delivery.event = event ?? "order.paid"
        delivery.eventID = try reader.string("event_id")
        delivery.user = try reader.string("user")
        guard let timestamp = try reader.int("timestamp") else { throw ValidationError("'timestamp' is a required integer") }
        try checkFreshness(timestamp)
        if let event, event.hasPrefix("subscription.") {
            let (response, applied) = try await subscriptionEvent(event, &reader, timestamp: timestamp, ip: request.remoteIP)
            delivery.outcome = applied ? "applied" : "stale"
            return response
        }
        return try await orderEvent(event, &reader, timestamp: timestamp, ip: request.remoteIP, &delivery)
    }

    /// An order's event: `order.created`, `order.paid` (credits the pack once, as ledger entry
    /// `order:<id>`), `order.failed`, `order.refunded` (takes the pack's credits back once, as a
    /// `refund` entry `refund:<id>`, even below zero: a user who spent them cannot start replies
    /// until the balance is positive again). Idempotent by `event_id`; the ledger follows the
    /// order's recorded state, so a redelivery after a crash between the two finishes the job.
    private func orderEvent(
        _ event: String?, _ reader: inout JSONObjectReader, timestamp: Int64, ip: String?, _ delivery: inout WebhookDelivery
    ) async throws -> HTTPResponse {
        let order = try reader.requiredString("order_id")
        let user = try reader.requiredString("user")
        let amount = try reader.int("credits")
        try reader.rejectUnknown()
        guard (1...128).contains(order.utf8.count) else { throw ValidationError("'order_id' must be 1-128 bytes") }
        let status: PaymentOrder.Status
        switch event {
        case nil, "order.paid": status = .paid
        case "order.created": status = .created
        case "order.failed": status = .failed
        case "order.refunded": status = .refunded
        case let other?:
            throw ValidationError("unknown event '\(other)' (order.created, order.paid, order.failed, order.refunded, subscription.…)")
        }
        let eventID = delivery.eventID ?? (event == nil ? "order:" + order : nil)
        guard let eventID, (1...128).contains(eventID.utf8.count) else { throw ValidationError("'event_id' must be 1-128 bytes") }
        if let amount {
            try credits.validateGrant(user: user, credits: amount)
        } else if !Authenticator.isValidSubject(user) {
            throw ValidationError("'user' is not a valid user id")
        }
        let stored = try await store.paymentOrder(id: order)
        if let stored, stored.user != user { throw APIError(.conflict, .conflict, "order \(order) belongs to another user") }
        // A paid order must know its pack before anything is recorded: refused, the provider's
        // next delivery of the same event (with credits) is not taken for a replay.
        if status == .paid, amount == nil, (stored?.credits ?? 0) <= 0 {
            throw ValidationError("order \(order) has no credits yet: send 'credits' with its order.created or order.paid")
        }
        let (recorded, applied) = try await store.recordOrderChange(
            order: order, user: user, key: ids.make(.payment), credits: amount,
            change: PaymentOrder.Change(status: status, at: timestamp * 1000, event: eventID))
        let wasPaid = recorded.history.contains { $0.status == .paid }
        var credited = false
        if wasPaid {
            let (_, outcome) = try await credits.grant(id: "order:" + order, user: user, credits: recorded.credits, note: "payment \(order)")
            credited = outcome.isApplied
            if outcome.isApplied {
                await audit.record("credits.paid", actor: "system", target: user, ip: ip, detail: ["credits": "\(recorded.credits)", "order": order])
            }
            if recorded.status == .refunded {
                let (_, refund) = try await credits.refund(order: order, user: user, credits: recorded.credits)
                if refund.isApplied {
                    await audit.record(
                        "credits.refunded", actor: "system", target: user, ip: ip, detail: ["credits": "\(recorded.credits)", "order": order])
                }
            }
        }
        delivery.user = user
        delivery.outcome = applied ? "applied" : "duplicate"
        if event == nil {
            // The first version's answer.
            return HTTPResponse(
                .ok,
                json: .object([
                    ("status", .string(credited ? "credited" : "already_credited")), ("balance", .int(try await store.balance(user: user))),
                ]))
        }
        let now = try await store.balance(user: user)
        return HTTPResponse(
            .ok, json: .object([("status", .string(applied ? "applied" : "duplicate")), ("order", recorded.json), ("balance", .int(now))]))
    }

    /// `GET /v1/payments?limit&before`: the caller's orders with their status history, newest first.
    func listPayments(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        try await ordersPage(request, user: identity.user)
    }

    /// `GET /v1/admin/payments?limit&before` (admin role): everyone's orders, newest first.
    func listAllPayments(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard identity.isAdmin else { throw APIError(.forbidden, .forbidden, "payments of all users need the admin role") }
        return try await ordersPage(request, user: nil)
    }

    private func ordersPage(_ request: HTTPRequest, user: String?) async throws -> HTTPResponse {
        let limit = try Self.limit(request)
        let page = try await store.paymentOrders(user: user, limit: limit + 1, before: request.query["before"])
        return HTTPResponse(.ok, json: .object(Self.page(page, limit: limit, as: "orders", id: \.key, \.json)))
    }

    /// `GET /v1/admin/webhooks?limit&before` (admin role): every delivery to the payment webhook,
    /// accepted or refused with the reason, newest first.
    func listWebhooks(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard identity.isAdmin else { throw APIError(.forbidden, .forbidden, "the webhook log needs the admin role") }
        let limit = try Self.limit(request)
        let page = try await store.webhookDeliveries(limit: limit + 1, before: request.query["before"])
        return HTTPResponse(.ok, json: .object(Self.page(page, limit: limit, as: "deliveries", id: \.id, \.json)))
    }
}
