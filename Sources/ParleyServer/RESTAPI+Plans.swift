import Foundation
import ParleyCore
import ParleyStore

/// The plan routes (#27): the caller's account with their plan, and the payment provider's
/// subscription events.
extension RESTAPI {
    /// `GET /v1/me`: the caller, their plan, subscription and billing period, and their balance
    /// (after what they are due this period was applied).
    func me(_ identity: Identity) async throws -> HTTPResponse {
        try await credits.ensureGrants(identity.user)
        let now = configuration.credits.clock()
        let subscription = try await credits.plans?.subscription(of: identity.user)
        let plan = PlanBook.plan(configuration.credits.plans, subscription, now: now)
        let period = BillingPeriod(containing: now)
        return HTTPResponse(
            .ok,
            json: .object([
                ("user", .string(identity.user)), ("plan", plan.json),
                ("subscription", subscription.map(\.json) ?? .null),
                (
                    "period",
                    .object([
                        ("id", .string(period.id)), ("start", .string(Timestamp.rfc3339(millis: period.start))),
                        ("end", .string(Timestamp.rfc3339(millis: period.end))),
                    ])
                ),
                ("balance", .int(try await store.balance(user: identity.user))),
                ("limits", try await store.spendLimits(user: identity.user).json),
                ("persona", try await personas.persona(of: identity.user)?.json ?? .null),
            ]))
    }

    /// `GET /v1/me/persona`: 200 with the caller's persona, 404 when they set none.
    func persona(_ identity: Identity) async throws -> HTTPResponse {
        guard let persona = try await personas.persona(of: identity.user) else {
            throw APIError(.notFound, .notFound, "no persona set: replies call you '\(Persona.defaultName)'")
        }
        return HTTPResponse(.ok, json: persona.json)
    }

    /// `PUT /v1/me/persona {"name", "description"?}`: who the caller is to their clones, from
    /// their next reply on (on another node of a cluster within 5 s) → 200 with it.
    func setPersona(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let persona = try Persona.parse(try request.json())
        _ = try await store.ensureUser(identity.user, now: Int64(Timestamp.nowMillis()))
        try await personas.set(persona, user: identity.user)
        return HTTPResponse(.ok, json: persona.json)
    }

    /// `DELETE /v1/me/persona`: 204; replies call the caller "User" again.
    func deletePersona(_ identity: Identity) async throws -> HTTPResponse {
        try await personas.set(nil, user: identity.user)
        return HTTPResponse(.noContent)
    }

    /// `PUT /v1/me/limits {"daily"?, "monthly"?}`: the caller's own spending limits in credits
    /// (a missing or null one: none). Replies stop at the last token within them (`spend_limit`).
    func setLimits(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var reader = try JSONObjectReader(try request.json())
        func limit(_ name: String) throws -> Int64? {
            guard let value = try reader.value(name), value != .null else { return nil }
            guard let n = value.intValue, (0...1_000_000_000_000).contains(n) else {
                throw ValidationError("'\(name)' must be null or an integer from 0 to 1000000000000 (credits)")
            }
            return n
        }
        let limits = SpendLimits(daily: try limit("daily"), monthly: try limit("monthly"))
        try reader.rejectUnknown()
        try await store.setSpendLimits(limits, user: identity.user)
        credits.plans?.forget(identity.user)
        return HTTPResponse(.ok, json: limits.json)
    }

    /// A signed subscription event (the webhook's body has `event`):
    /// `{"event","event_id","user","plan"?,"period_end"?,"timestamp"}`, times in Unix seconds.
    /// `subscription.activated` puts the user on `plan` until `period_end`; `renewed` moves
    /// `period_end` on (and makes a past-due subscription active); `cancelled` and `past_due`
    /// keep the plan until the period ends. Events are ordered by their time, then their id: one
    /// not after the last applied for the user changes nothing (`"status": "stale"`): a replay or
    /// a late delivery.
    func subscriptionEvent(
        _ event: String, _ reader: inout JSONObjectReader, timestamp: Int64, ip: String?
    ) async throws -> (response: HTTPResponse, applied: Bool) {
        guard let plans = credits.plans else { throw APIError(.notFound, .notFound, "plans are not configured on this server") }
        let eventID = try reader.requiredString("event_id")
        let user = try reader.requiredString("user")
        let planID = try reader.string("plan")
        let periodEnd = try reader.int("period_end")
        try reader.rejectUnknown()
        guard (1...128).contains(eventID.utf8.count) else { throw ValidationError("'event_id' must be 1-128 bytes") }
        guard Authenticator.isValidSubject(user) else { throw ValidationError("'user' is not a valid user id") }
        if let planID, plans.catalog.plan(planID) == nil {
            throw ValidationError("no plan '\(planID)' on this server (GET /v1/plans lists them)")
        }
        let stored = try await store.subscription(user: user)
        let at = timestamp * 1000
        var next: Subscription
        switch event {
        case "subscription.activated":
            guard let planID, let periodEnd else { throw ValidationError("subscription.activated needs 'plan' and 'period_end'") }
            next = Subscription(user: user, plan: planID, status: .active, periodEnd: periodEnd * 1000, updatedAt: at, event: eventID)
        case "subscription.renewed", "subscription.cancelled", "subscription.past_due":
            guard var current = stored ?? planID.map({ Subscription(user: user, plan: $0, status: .active, periodEnd: 0, updatedAt: 0) }) else {
                throw APIError(.conflict, .conflict, "\(user) has no subscription yet; its subscription.activated comes first")
            }
            if let planID { current.plan = planID }
            if let periodEnd { current.periodEnd = periodEnd * 1000 }
            current.status = event == "subscription.renewed" ? .active : event == "subscription.cancelled" ? .cancelled : .pastDue
            if event == "subscription.renewed", periodEnd == nil { throw ValidationError("subscription.renewed needs 'period_end'") }
            current.updatedAt = at
            current.event = eventID
            next = current
        default:
            throw ValidationError(
                "unknown event '\(event)' (subscription.activated, subscription.renewed, subscription.cancelled, subscription.past_due)")
        }
        let applied = try await store.saveSubscription(next)
        plans.forget(user)
        if applied {
            await audit.record(
                event, actor: "system", target: user, ip: ip,
                detail: ["event_id": eventID, "plan": next.plan, "status": next.status.rawValue])
        }
        let response = HTTPResponse(
            .ok, json: .object([("status", .string(applied ? "applied" : "stale")), ("subscription", (applied ? next : stored ?? next).json)]))
        return (response, applied)
    }
}

extension Subscription {
    var json: JSONValue {
        .object([
            ("plan", .string(plan)), ("status", .string(status.rawValue)), ("period_end", .string(Timestamp.rfc3339(millis: periodEnd))),
        ])
    }
}

extension RESTAPI {
    /// `GET /v1/me/usage?by=day|clone|conversation|feature|model&from=&to=`: what the caller
    /// spent in [from, to) (RFC 3339 times; by default from this billing period's start on), summed
    /// from their ledger, read newest first until `from`.
    func usage(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let byName = request.query["by"] ?? "day"
        guard let grouping = UsageReport.Grouping(rawValue: byName) else {
            throw ValidationError("'by' must be one of \(UsageReport.Grouping.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let (from, to) = try usageRange(request)
        var report = UsageReport(by: grouping)
        var clones: [String: String?] = [:]
        var before: String?
        reading: while true {
            let page = try await store.ledger(user: identity.user, limit: Self.exportPage, before: before)
            for entry in page {
                if entry.createdAt < from { break reading }
                if let to, entry.createdAt >= to { continue }
                if grouping == .clone, let conversation = entry.conversation, clones[conversation] == nil {
                    clones[conversation] = .some(try await store.conversation(id: conversation, owner: identity.user)?.clone)
                }
                report.add(entry) { clones[$0] ?? nil }
            }
            guard page.count == Self.exportPage, let last = page.last else { break }
            before = last.id
        }
        guard case .object(let pairs) = report.json else { return HTTPResponse(.ok, json: report.json) }
        return HTTPResponse(
            .ok,
            json: .object(
                [("from", .string(Timestamp.rfc3339(millis: from))), ("to", to.map { .string(Timestamp.rfc3339(millis: $0)) } ?? .null)] + pairs))
    }
}

extension RESTAPI {
    /// `GET /v1/admin/usage?from=&to=` (admin role): every user's spending in [from, to) (RFC 3339;
    /// by default this billing period), summed from the ledger by plan (each user's plan now),
    /// feature, model and day, with grants and refunds; and what this node refused since it
    /// started (paywall hits, insufficient credits, plan_required, spending limits).
    func adminUsage(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard identity.isAdmin else { throw APIError(.forbidden, .forbidden, "the usage of all users needs the admin role") }
        let (from, to) = try usageRange(request)
        var reports = [UsageReport(by: .feature), UsageReport(by: .model), UsageReport(by: .day)]
        var byPlan: [String: Int64] = [:]
        var plans: [String: String] = [:]
        var spenders = Set<String>()
        var after: (createdAt: Int64, id: String)?
        while true {
            let page = try await store.ledgerEntries(from: from, to: to, after: after, limit: 1_000)
            for entry in page {
                for index in reports.indices { reports[index].add(entry) }
                guard entry.kind == .debit || entry.kind == .settlement else { continue }
                spenders.insert(entry.user)
                if plans[entry.user] == nil {
                    plans[entry.user] = try await credits.plans?.plan(of: entry.user).id ?? configuration.credits.plans.defaultPlan.id
                }
                byPlan[plans[entry.user]!, default: 0] -= entry.credits
            }
            guard page.count == 1_000, let last = page.last else { break }
            after = (last.createdAt, last.id)
        }
        let metrics = credits.metrics
        return HTTPResponse(
            .ok,
            json: .object([
                ("from", .string(Timestamp.rfc3339(millis: from))), ("to", to.map { .string(Timestamp.rfc3339(millis: $0)) } ?? .null),
                ("spent", .int(reports[0].spent)), ("granted", .int(reports[0].granted)), ("refunded", .int(reports[0].refunded)),
                ("users", .int(Int64(spenders.count))),
                ("by_plan", .array(byPlan.sorted { $0.key < $1.key }.map { .object([("key", .string($0.key)), ("credits", .int($0.value))]) })),
                ("by_feature", reports[0].groupsJSON), ("by_model", reports[1].groupsJSON), ("by_day", reports[2].groupsJSON),
                (
                    "refusals_since_start",
                    .object([
                        ("paywall_hits", .int(Int64(metrics.paywallHits.value))),
                        ("insufficient_credits", .int(Int64(metrics.refusals.value))),
                        ("plan_required", .int(Int64(credits.plans?.refusals.value ?? 0))),
                        ("spend_limit", .int(Int64(metrics.spendLimitHits.value))),
                    ])
                ),
            ]))
    }

    /// A usage report's `from` and `to` (RFC 3339): by default from this billing period's start
    /// on; at most 400 days.
    private func usageRange(_ request: HTTPRequest) throws -> (from: Int64, to: Int64?) {
        func time(_ name: String) throws -> Int64? {
            guard let text = request.query[name] else { return nil }
            guard let millis = RFC3339.parse(text) else { throw ValidationError("'\(name)' must be an RFC 3339 time such as 2026-12-01T00:00:00Z") }
            return millis
        }
        let from = try time("from") ?? BillingPeriod(containing: configuration.credits.clock()).start
        let to = try time("to")
        guard to.map({ from < $0 && $0 - from <= 400 * 86_400_000 }) ?? true else {
            throw ValidationError("'from' must be before 'to', at most 400 days apart")
        }
        return (from, to)
    }
}
