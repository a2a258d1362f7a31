import Crypto
import Foundation
import NIOHTTP1
import ParleyCore
import ParleyTestSupport
import Synchronization
import Testing

@testable import ParleyServer
@testable import ParleyStore

/// Plans (#27) over the real server on both stores: a feature or a count the plan does not allow
/// is refused with `plan_required` naming a plan that allows it; a subscription event changes the
/// plan, once, whatever the order events arrive in; the allowance arrives once per period.
@Suite struct PlanIntegrationTests {
    static let catalog = try! PlanCatalog(
        parsing: try! JSONValue.parse(
            Array(
                """
                {"default": "free", "plans": [
                  {"id": "free", "name": "Free", "features": ["chat"], "limits": {"concurrent_streams": 1, "clones": 2}},
                  {"id": "plus", "name": "Plus", "monthly_credits": 1000, "features": ["chat", "schedule"], "limits": {"concurrent_streams": 2}},
                  {"id": "pro", "name": "Pro", "monthly_credits": 5000, "renewal": "add"}
                ]}
                """.utf8)))
    static let secret = "whsec_plans_0123456789abcdef"
    /// 2026-12-04T03:00Z.
    static let december: Int64 = 1_796_353_200_000

    /// `slow`: replies of 100 tokens at 5 a second, to be still streaming when the next request comes.
    func server(_ store: TestServer.StoreKind, clock: ManualClock, grant: Int64 = 0, slow: Bool = false) async throws -> TestServer {
        try await TestServer.start(store: store) {
            $0.credits.plans = Self.catalog
            $0.credits.clock = { clock.millis }
            $0.credits.paymentsSecret = Self.secret
            $0.credits.startingGrant = grant
            $0.credits.pricing = PricingTable(models: ["simulated": ModelPrice(inputPer1K: 0, outputPer1K: 1_000)])
            $0.credits.outputReserveTokens = 1
            $0.simulated.replyTokens = slow ? 100 : 3
            if slow { $0.simulated.tokensPerSecond = 5 }
        }
    }

    func event(_ server: TestServer, _ fields: [(String, JSONValue)], at clock: ManualClock) async throws -> TestHTTPResponse {
        let bytes = JSONValue.object(fields + [("timestamp", .int(clock.millis / 1000))]).serialized()
        let mac = HMAC<SHA256>.authenticationCode(for: bytes, using: SymmetricKey(data: Array(Self.secret.utf8)))
        let hex = mac.map { String(format: "%02x", $0) }.joined()
        return try await TestHTTPClient.request(
            port: server.port, .POST, "/v1/webhooks/payments",
            headers: ["x-parley-signature": "sha256=\(hex)", "content-type": "application/json"], body: bytes)
    }

    func activate(_ server: TestServer, _ user: String, plan: String, id: String, clock: ManualClock) async throws -> TestHTTPResponse {
        try await event(
            server,
            [
                ("event", .string("subscription.activated")), ("event_id", .string(id)), ("user", .string(user)), ("plan", .string(plan)),
                ("period_end", .int(clock.millis / 1000 + 30 * 86_400)),
            ], at: clock)
    }

    /// POST /v1/rooms for a debate between the user's first two clones (made on the first call).
    func debate(_ server: TestServer, token: String) async throws -> TestHTTPResponse {
        var clones = try await server.get("/v1/clones", token: token).json()["clones"]!.arrayValue!.compactMap { $0["id"]?.stringValue }
        while clones.count < 2 { clones.append(try await server.createClone(token: token)["id"]!.stringValue!) }
        return try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/rooms", token: token,
            json: .object([
                ("kind", .string("debate")), ("topic", .string("tea or coffee")),
                ("clones", .array(clones.prefix(2).map { .object([("clone", .string($0)), ("stance", .string("for \($0)"))]) })),
            ]))
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aFreeUserIsRefusedADebateUntilASubscriptionAllowsIt(_ store: TestServer.StoreKind) async throws {
        let clock = ManualClock(millis: Self.december)
        let server = try await server(store, clock: clock)
        let token = try await server.token("alice")
        let refused = try await debate(server, token: token)
        #expect(refused.status == .paymentRequired)
        #expect(refused.errorCode == "plan_required")
        #expect(try refused.json()["error"]?["plan"] == .string("pro"), "the first plan that allows debates")

        #expect(try await activate(server, "alice", plan: "pro", id: "evt_1", clock: clock).status == .ok)
        #expect(try await debate(server, token: token).status == .created)
        let me = try await server.get("/v1/me", token: token).json()
        #expect(me["plan"]?["id"] == .string("pro") && me["subscription"]?["status"] == .string("active"))

        // A replay, and a cancellation older than the activation, change nothing.
        let replay = try await activate(server, "alice", plan: "pro", id: "evt_1", clock: clock)
        #expect(try replay.json()["status"] == .string("stale"))
        clock.set(millis: Self.december - 60_000)
        let late = try await event(
            server, [("event", .string("subscription.cancelled")), ("event_id", .string("evt_0")), ("user", .string("alice"))], at: clock)
        #expect(try late.json()["status"] == .string("stale"))
        clock.set(millis: Self.december + 60_000)
        #expect(try await server.get("/v1/me", token: token).json()["subscription"]?["status"] == .string("active"))

        // A cancellation keeps the plan to the period's end; then the user is on the default plan.
        let cancelled = try await event(
            server, [("event", .string("subscription.cancelled")), ("event_id", .string("evt_2")), ("user", .string("alice"))], at: clock)
        #expect(try cancelled.json()["status"] == .string("applied"))
        #expect(try await debate(server, token: token).status == .created)
        clock.set(millis: Self.december + 31 * 86_400_000)
        #expect(try await debate(server, token: token).errorCode == "plan_required")
        #expect(try await server.get("/v1/me", token: token).json()["plan"]?["id"] == .string("free"))
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func theAllowanceArrivesOncePerPeriodHoweverOftenItIsAskedAndAcrossARestart(_ store: TestServer.StoreKind) async throws {
        let clock = ManualClock(millis: Self.december)
        let server = try await server(store, clock: clock)
        let token = try await server.token("alice")
        #expect(try await activate(server, "alice", plan: "plus", id: "evt_p", clock: clock).status == .ok)
        // Plus tops up to 1,000 credits each period.
        for _ in 0..<3 { #expect(try await server.get("/v1/me", token: token).json()["balance"] == .int(1000)) }
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "hello")
        _ = try await socket.readReply()
        let spent = try await creditsOf(server, token: token).balance
        #expect(spent < 1000)
        let again = try await server.restarted()
        #expect(try await again.get("/v1/me", token: token).json()["balance"] == .int(spent), "no second allowance this period")

        // January: topped up to 1,000 once, whatever was left.
        clock.set(millis: Self.december + 31 * 86_400_000)
        #expect(try await activate(again, "alice", plan: "plus", id: "evt_renew", clock: clock).status == .ok)
        for _ in 0..<2 { #expect(try await again.get("/v1/me", token: token).json()["balance"] == .int(1000)) }
        let entries = try await creditsOf(again, token: token).entries.compactMap { $0["id"]?.stringValue }
        #expect(entries.filter { $0.hasPrefix("refill:") }.sorted() == ["refill:alice:2026-12:plus", "refill:alice:2027-01:plus"])
        try await expectInvariant(again, token: token)
        await again.stop()
    }

    @Test func aPlansLimitsAnswerPlanRequiredAndThePlansArePublic() async throws {
        let clock = ManualClock(millis: Self.december)
        let server = try await server(.sqlite, clock: clock, grant: 10_000, slow: true)
        let plans = try await TestHTTPClient.request(port: server.port, .GET, "/v1/plans")
        #expect(plans.status == .ok)
        #expect(try PlanCatalog(parsing: try plans.json()) == Self.catalog)

        let token = try await server.token("bob")
        // Free: two clones, one reply at a time, no scheduled messages.
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        _ = try await server.createClone(token: token)
        let third = try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones", token: token, json: .object([("name", .string("C"))]))
        #expect(third.status == .paymentRequired && third.errorCode == "plan_required")
        #expect(try third.json()["error"]?["plan"] == .string("plus"))
        let schedule = try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/schedules", token: token,
            json: .object([("clone", .string(clone)), ("delay_ms", .int(60_000)), ("text", .string("later"))]))
        #expect(schedule.errorCode == "plan_required")
        #expect(try schedule.json()["error"]?["plan"] == .string("plus"))

        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "first")
        let first = try await socket.readUntilToken()["stream"]!
        try await socket.chatSend(id: "c2", clone: clone, text: "second, at the same time")
        let error = try await socket.next(type: "error").frame
        #expect(error["code"] == .string("plan_required") && error["ref"] == .string("c2") && error["plan"] == .string("plus"))
        // The ledger is read once the first reply has ended: a batch it buys between the page's
        // entries and its balance (two reads) would show them apart.
        try await socket.chatCancel(id: "x1", stream: first.stringValue!)
        _ = try await socket.next(type: "stream.end")
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    func order(_ server: TestServer, _ event: String, id: String, order: String, credits: Int64? = nil, clock: ManualClock) async throws -> JSONValue
    {
        var fields: [(String, JSONValue)] = [
            ("event", .string(event)), ("event_id", .string(id)), ("order_id", .string(order)), ("user", .string("alice")),
        ]
        if let credits { fields.append(("credits", .int(credits))) }
        let response = try await self.event(server, fields, at: clock)
        guard response.status == .ok else { throw TestTimeout(description: "\(event) answered \(response.status): \(response.text)") }
        return try response.json()
    }

    /// A pack bought, spent, then refunded: the balance goes below zero and no reply starts until
    /// it is positive again; every event applies once whatever the order; the orders and the
    /// webhook log (refused deliveries too) are there to read.
    @Test(arguments: TestServer.StoreKind.allCases)
    func aRefundAfterTheCreditsWereSpentLeavesANegativeBalanceThatRefusesReplies(_ store: TestServer.StoreKind) async throws {
        let clock = ManualClock(millis: Int64(Date().timeIntervalSince1970 * 1000))
        let server = try await server(store, clock: clock)
        let token = try await server.token("alice")
        let admin = try await server.token("root", role: "admin")
        // A payment for a pack not known yet is refused before anything is recorded, so the
        // same event delivered again with its credits is applied.
        let unknown = try await event(
            server,
            [("event", .string("order.paid")), ("event_id", .string("evt_b")), ("order_id", .string("ord_1")), ("user", .string("alice"))],
            at: clock)
        #expect(unknown.status == .badRequest)
        // Paid arrives before created: credited once, and the late creation moves nothing back.
        #expect(try await order(server, "order.paid", id: "evt_b", order: "ord_1", credits: 100, clock: clock)["balance"] == .int(100))
        #expect(try await order(server, "order.paid", id: "evt_b", order: "ord_1", clock: clock)["status"] == .string("duplicate"))
        let created = try await order(server, "order.created", id: "evt_a", order: "ord_1", credits: 100, clock: clock)
        #expect(created["order"]?["status"] == .string("paid") && created["balance"] == .int(100))

        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "spend a little")
        _ = try await socket.readReply()
        let left = try await creditsOf(server, token: token).balance
        #expect(left < 100)

        let refunded = try await order(server, "order.refunded", id: "evt_c", order: "ord_1", clock: clock)
        #expect(refunded["balance"] == .int(left - 100) && refunded["order"]?["status"] == .string("refunded"))
        #expect(try await order(server, "order.refunded", id: "evt_c", order: "ord_1", clock: clock)["balance"] == .int(left - 100))
        try await socket.chatSend(id: "c2", clone: clone, text: "and more")
        #expect(try await socket.next(type: "error").frame["code"] == .string("insufficient_credits"))
        let entries = try await creditsOf(server, token: token).entries
        #expect(entries.filter { $0["kind"] == .string("refund") }.map { $0["credits"] } == [.int(-100)])
        try await expectInvariant(server, token: token)

        let orders = try await server.get("/v1/payments", token: token).json()["orders"]!.arrayValue!
        #expect(orders.map { $0["id"] } == [.string("ord_1")])
        #expect(orders[0]["history"]?.arrayValue?.map { $0["status"]?.stringValue } == ["created", "paid", "refunded"])
        #expect(try await server.get("/v1/admin/payments", token: token).status == .forbidden)
        #expect(try await server.get("/v1/admin/payments", token: admin).json()["orders"]?.arrayValue?.count == 1)

        // Refused deliveries are logged with the reason, once per address and reason a minute.
        for _ in 0..<3 {
            let forged = try await TestHTTPClient.request(
                port: server.port, .POST, "/v1/webhooks/payments", headers: ["x-parley-signature": "sha256=00", "content-type": "application/json"],
                body: Array("{}".utf8))
            #expect(forged.status == .unauthorized)
        }
        let deliveries = try await server.get("/v1/admin/webhooks", token: admin).json()["deliveries"]!.arrayValue!
        #expect(deliveries.map { $0["outcome"]?.stringValue } == ["refused", "duplicate", "applied", "applied", "duplicate", "applied", "refused"])
        #expect(deliveries[0]["reason"]?.stringValue?.contains("X-Parley-Signature") == true)
        #expect(!deliveries.map { $0.serializedString() }.joined().contains(Self.secret))
        await server.stop()
    }

    /// Usage sums equal the ledger, however grouped, and each conversation's `cost` is its share.
    @Test(arguments: TestServer.StoreKind.allCases)
    func usageSumsEqualTheLedgerAndEachConversationShowsItsCost(_ store: TestServer.StoreKind) async throws {
        let clock = ManualClock(millis: Int64(Date().timeIntervalSince1970 * 1000))
        let server = try await server(store, clock: clock, grant: 1_000)
        let token = try await server.token("alice")
        let ada = try await server.createClone(token: token, name: "Ada")["id"]!.stringValue!
        let bob = try await server.createClone(token: token, name: "Bob")["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        var conversations: [String] = []
        for (index, clone) in [ada, ada, bob].enumerated() {
            try await socket.chatSend(id: "c\(index)", clone: clone, conversation: index == 1 ? conversations[0] : nil, text: "hello \(index)")
            let reply = try await socket.readReply()
            if index != 1 { conversations.append(reply.start["conversation"]!.stringValue!) }
        }
        let entries = try await creditsOf(server, token: token).entries
        let spent = -entries.filter { ["debit", "settlement"].contains($0["kind"]?.stringValue) }.reduce(0) { $0 + $1["credits"]!.intValue! }
        #expect(spent > 0)
        for by in ["day", "clone", "conversation", "feature", "model"] {
            let usage = try await server.get("/v1/me/usage?by=\(by)", token: token).json()
            #expect(usage["spent"] == .int(spent), "by \(by)")
            #expect(usage["groups"]?.arrayValue?.reduce(0) { $0 + $1["credits"]!.intValue! } == spent, "by \(by)")
            #expect(usage["granted"] == .int(1_000))
        }
        let byClone = try await server.get("/v1/me/usage?by=clone", token: token).json()["groups"]!.arrayValue!
        #expect(Set(byClone.compactMap { $0["key"]?.stringValue }) == [ada, bob])
        let byConversation = try await server.get("/v1/me/usage?by=conversation", token: token).json()["groups"]!.arrayValue!
        let listed = try await server.get("/v1/conversations", token: token).json()["conversations"]!.arrayValue!
        for conversation in listed {
            let share = byConversation.first { $0["key"] == conversation["id"] }?["credits"]
            #expect(share != nil && conversation["cost"] == share)
            #expect(try await server.get("/v1/conversations/\(conversation["id"]!.stringValue!)", token: token).json()["cost"] == share)
        }
        #expect(try await server.get("/v1/me/usage?by=week", token: token).status == .badRequest)
        let empty = try await server.get("/v1/me/usage?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z", token: token).json()
        #expect(empty["spent"] == .int(0) && empty["groups"] == .array([]))
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    /// A daily limit the user set stops a reply at exactly the last token within it, with reason
    /// spend_limit and no paywall; the next reply is refused until the limit is raised.
    @Test(arguments: TestServer.StoreKind.allCases)
    func aDailyLimitStopsAReplyAtTheLastTokenWithinIt(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store) {
            $0.credits.pricing = PricingTable(models: ["simulated": ModelPrice(inputPer1K: 0, outputPer1K: 1_000)])
            $0.credits.startingGrant = 10_000
            $0.credits.batchTokens = 4
            $0.credits.outputReserveTokens = 1
            $0.simulated.replyTokens = 100
        }
        let token = try await server.token("alice")
        let set = try await TestHTTPClient.json(
            port: server.port, .PUT, "/v1/me/limits", token: token, json: .object([("daily", .int(10)), ("monthly", .null)]))
        #expect(set.status == .ok)
        #expect(try set.json() == SpendLimits(daily: 10).json)
        #expect(try await server.get("/v1/me", token: token).json()["limits"] == SpendLimits(daily: 10).json)
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "talk a lot")
        let reply = try await socket.readReply()
        #expect(reply.tokens.count == 10, "1 credit a token: exactly the ten the limit allows")
        #expect(reply.end["reason"] == .string("spend_limit") && reply.end["cost"] == .int(10))
        let entries = try await creditsOf(server, token: token).entries.filter { $0["stream"] == .string(reply.stream) }
        #expect(entries.reduce(0) { $0 - $1["credits"]!.intValue! } == 10)
        #expect(try await server.get("/v1/me/usage", token: token).json()["spent"] == .int(10))

        try await socket.chatSend(id: "c2", clone: clone, conversation: reply.conversation, text: "more?")
        let refused = try await socket.next(type: "error").frame
        #expect(refused["code"] == .string("spend_limit") && refused["ref"] == .string("c2"))
        let raised = try await TestHTTPClient.json(port: server.port, .PUT, "/v1/me/limits", token: token, json: .object([("daily", .int(15))]))
        #expect(raised.status == .ok)
        try await socket.chatSend(id: "c3", clone: clone, conversation: reply.conversation, text: "a little more")
        let more = try await socket.readReply()
        #expect(more.tokens.count == 5 && more.end["reason"] == .string("spend_limit"))
        let bad = try await TestHTTPClient.json(port: server.port, .PUT, "/v1/me/limits", token: token, json: .object([("daily", .int(-1))]))
        #expect(bad.status == .badRequest)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    /// The admin's view sums every user's spending from the ledger by plan, feature, model and
    /// day, and counts what this node refused.
    @Test(arguments: TestServer.StoreKind.allCases)
    func theAdminsUsageViewSumsEveryUsersLedger(_ store: TestServer.StoreKind) async throws {
        let clock = ManualClock(millis: Int64(Date().timeIntervalSince1970 * 1000))
        let server = try await server(store, clock: clock, grant: 1_000)
        let admin = try await server.token("root", role: "admin")
        #expect(try await activate(server, "bob", plan: "pro", id: "evt_b", clock: clock).status == .ok)
        var spent: Int64 = 0
        for user in ["alice", "bob"] {
            let token = try await server.token(user)
            let clone = try await server.createClone(token: token)["id"]!.stringValue!
            let socket = try await server.connect(token: token)
            try await socket.chatSend(id: "c", clone: clone, text: "hello")
            _ = try await socket.readReply()
            let entries = try await creditsOf(server, token: token).entries
            spent -= entries.filter { ["debit", "settlement"].contains($0["kind"]?.stringValue) }.reduce(0) { $0 + $1["credits"]!.intValue! }
        }
        #expect(try await debate(server, token: try await server.token("alice")).errorCode == "plan_required")
        #expect(try await server.get("/v1/admin/usage", token: try await server.token("alice")).status == .forbidden)
        let usage = try await server.get("/v1/admin/usage", token: admin).json()
        #expect(usage["spent"] == .int(spent) && usage["users"] == .int(2))
        let byPlan = usage["by_plan"]!.arrayValue!
        #expect(byPlan.map { $0["key"]?.stringValue } == ["free", "pro"])
        #expect(byPlan.reduce(0) { $0 + $1["credits"]!.intValue! } == spent)
        for field in ["by_feature", "by_model", "by_day"] {
            #expect(usage[field]?.arrayValue?.reduce(0) { $0 + $1["credits"]!.intValue! } == spent, "\(field)")
        }
        #expect(usage["granted"] == .int(2_000 + 5_000), "two starting grants and Pro's allowance")
        #expect(usage["refusals_since_start"]?["plan_required"] == .int(1))
        for user in ["alice", "bob"] { try await expectInvariant(server, token: try await server.token(user)) }
        await server.stop()
    }

    /// Message buckets past the capacity: full ones are swept, the others kept (a user's limit
    /// holds through a sweep), and a sweep is not repeated at every message.
    @Test func messageBucketsPastTheCapacityAreSweptRarelyAndKeepTheirLimits() async throws {
        let catalog = try PlanCatalog(
            parsing: try JSONValue.parse(Array(#"{"plans": [{"id": "basic", "limits": {"messages_per_minute": 2}}]}"#.utf8)))
        let path = Scratch.path("buckets", suffix: ".sqlite")
        let store = try await SQLiteStore.open(path: path)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let book = PlanBook(catalog: catalog, store: store, clock: { 0 }, capacity: 4)
        let now: UInt64 = 1_000_000_000
        // 48 users with one message of two left: no bucket is full, none can be swept away.
        for user in 0..<48 { try await book.takeMessage(user: "u\(user)", ref: nil, now: now) }
        // u0's bucket outlived the sweeps: its second message goes, the third is refused.
        try await book.takeMessage(user: "u0", ref: nil, now: now)
        await #expect(throws: FrameError.self) { try await book.takeMessage(user: "u0", ref: nil, now: now) }
        // Swept at 4, 8, 16 and 32 buckets, not at each of the 45 messages past the capacity.
        let counts = book.messageBucketCounts
        #expect(counts.kept == 48 && counts.sweeps == 4, "kept \(counts.kept), swept \(counts.sweeps) times")
    }

    /// A plan's messages a minute and open rooms: the next one is refused with plan_required
    /// naming the plan that allows it; an ended room frees its place.
    @Test func messagesAMinuteAndOpenRoomsFollowThePlan() async throws {
        let catalog = try PlanCatalog(
            parsing: try JSONValue.parse(
                Array(
                    #"{"plans": [{"id": "basic", "features": ["chat", "debate"], "limits": {"rooms": 1, "messages_per_minute": 2}}, {"id": "max"}]}"#
                        .utf8)))
        let server = try await TestServer.start {
            $0.credits.plans = catalog
            $0.simulated.replyTokens = 2
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        for n in 0..<2 {
            try await socket.chatSend(id: "c\(n)", clone: clone, text: "hi")
            _ = try await socket.readReply()
        }
        try await socket.chatSend(id: "c2", clone: clone, text: "one too many")
        let error = try await socket.next(type: "error").frame
        #expect(error["code"] == .string("plan_required") && error["plan"] == .string("max") && error["ref"] == .string("c2"))

        let room = try await debate(server, token: token)
        #expect(room.status == .created)
        let second = try await debate(server, token: token)
        #expect(second.errorCode == "plan_required")
        #expect(try second.json()["error"]?["plan"] == .string("max"))
        let id = try room.json()["id"]!.stringValue!
        try await socket.send(.object([("type", .string("room.join")), ("id", .string("j")), ("room", .string(id))]))
        _ = try await socket.next(type: "room.state")
        try await socket.send(.object([("type", .string("room.control")), ("id", .string("e")), ("room", .string(id)), ("action", .string("end"))]))
        _ = try await socket.next(type: "room.event")
        #expect(try await debate(server, token: token).status == .created, "the ended room no longer counts")
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    /// Rooms made at the same moment keep to the plan's open rooms: each was counted before it
    /// was written, so all of them passed.
    @Test func roomsMadeAtOnceKeepToThePlan() async throws {
        let catalog = try PlanCatalog(
            parsing: try JSONValue.parse(Array(#"{"plans": [{"id": "basic", "features": ["chat", "debate"], "limits": {"rooms": 2}}]}"#.utf8)))
        let server = try await TestServer.start { $0.credits.plans = catalog }
        let token = try await server.token("alice")
        for _ in 0..<2 { _ = try await server.createClone(token: token) }
        let statuses = try await withThrowingTaskGroup(of: HTTPResponseStatus.self) { group in
            for _ in 0..<12 { group.addTask { try await debate(server, token: token).status } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(statuses.filter { $0 == .created }.count == 2, "\(statuses)")
        #expect(statuses.filter { $0 != .created }.allSatisfy { $0 == .paymentRequired }, "\(statuses)")
        await server.stop()
    }

    /// An ended room frees its place at once: a moderator who makes a room on seeing the last
    /// one's `ended` event is not refused for it while its store write is still on its way (held
    /// here behind a call that holds the store's writer).
    @Test func anEndedRoomFreesItsPlaceBeforeItsStoreWriteLands() async throws {
        let catalog = try PlanCatalog(
            parsing: try JSONValue.parse(Array(#"{"plans": [{"id": "basic", "features": ["chat", "debate"], "limits": {"rooms": 1}}]}"#.utf8)))
        let server = try await TestServer.start { $0.credits.plans = catalog }
        let token = try await server.token("alice")
        let socket = try await server.connect(token: token)
        let room = try await debate(server, token: token)
        #expect(room.status == .created)
        let id = try room.json()["id"]!.stringValue!
        try await socket.send(.object([("type", .string("room.join")), ("id", .string("j")), ("room", .string(id))]))
        _ = try await socket.next(type: "room.state")

        let store = try #require(server.server.store as? SQLiteStore)
        let (entered, enter) = AsyncStream<Void>.makeStream()
        var signals = entered.makeAsyncIterator()
        let gate = DispatchSemaphore(value: 0)
        let held = Task {
            try await store.run { _ in
                enter.yield()
                gate.wait()
            }
        }
        _ = await signals.next()
        try await socket.send(.object([("type", .string("room.control")), ("id", .string("e")), ("room", .string(id)), ("action", .string("end"))]))
        _ = try await socket.next(type: "room.event")
        #expect(await holds(within: .seconds(10)) { store.waitingCalls == 1 }, "the ended room's write waits")
        final class Finished: Sendable { let flag = Atomic(false) }
        let finished = Finished()
        let next = Task {
            defer { finished.flag.store(true, ordering: .releasing) }
            return try await debate(server, token: token)
        }
        // Refused at once (counted as open), or let through with its own write queued.
        _ = await holds(within: .seconds(10)) { finished.flag.load(ordering: .acquiring) || store.waitingCalls >= 2 }
        gate.signal()
        try await held.value
        #expect(try await next.value.status == .created)
        await server.stop()
    }

    /// Two nodes on one store asked at once for the same user's allowance grant it once.
    @Test func theAllowanceArrivesOnceAcrossTheNodesOfACluster() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let clock = ManualClock(millis: Self.december)
        func node(_ id: String) async throws -> TestServer {
            try await TestServer.clusterNode(id, nats: nats, uri: uri, secret: secret) {
                $0.credits.plans = Self.catalog
                $0.credits.clock = { clock.millis }
                $0.credits.paymentsSecret = Self.secret
                $0.credits.startingGrant = 0
            }
        }
        let a = try await node("node-a")
        let b = try await node("node-b")
        #expect(try await activate(a, "alice", plan: "plus", id: "evt_1", clock: clock).status == .ok)
        let token = try await a.token("alice")
        let balances = try await withThrowingTaskGroup(of: JSONValue?.self) { group in
            for n in 0..<8 { group.addTask { try await (n % 2 == 0 ? a : b).get("/v1/me", token: token).json()["balance"] } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(balances.allSatisfy { $0 == .int(1000) }, "\(balances)")
        let refills = try await creditsOf(b, token: token).entries.filter { $0["id"]?.stringValue?.hasPrefix("refill:") == true }
        #expect(refills.count == 1)
        try await expectInvariant(a, token: token)
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}

@Suite struct FreshValuesTests {
    /// Full, the cache forgets its older half; the users read lately keep their values (it
    /// used to forget everyone at once, sending every active user's next check to the store).
    @Test func pastItsCapacityTheOlderHalfIsReadAgainAndTheNewerKept() async throws {
        let values = FreshValues<Int>(freshness: 3_600_000, capacity: 4)
        let reads = Mutex<[String]>([])
        func value(_ user: String, at now: Int64) async throws -> Int {
            try await values.value(of: user, now: now) {
                reads.withLock { $0.append(user) }
                return now.hashValue
            }
        }
        for (at, user) in ["u0", "u1", "u2", "u3"].enumerated() { _ = try await value(user, at: Int64(at)) }
        // A fifth user fills it: u0 and u1, read first, are forgotten; u2 and u3 are kept.
        _ = try await value("u4", at: 10)
        for user in ["u3", "u2", "u1", "u0"] { _ = try await value(user, at: 11) }
        #expect(reads.withLock { $0 } == ["u0", "u1", "u2", "u3", "u4", "u1", "u0"])
    }
}
