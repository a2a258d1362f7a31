import Crypto
import Foundation
import MetricsTestKit
import NIOHTTP1
import ParleyCore
import ParleyServer
import ParleyTestSupport
import Testing

/// One credit per output token, prompts free: figures in these tests are token counts.
func creditServer(
    _ store: TestServer.StoreKind = .sqlite, grant: Int64, batch: Int = 4, reserve: Int = 4, replyTokens: Int = 100,
    tokensPerSecond: Double = 0, _ more: (inout ServerConfiguration) -> Void = { _ in }
) async throws -> TestServer {
    try await TestServer.start(store: store) {
        $0.credits.pricing = PricingTable(models: ["simulated": ModelPrice(inputPer1K: 0, outputPer1K: 1_000)])
        $0.credits.startingGrant = grant
        $0.credits.batchTokens = batch
        $0.credits.outputReserveTokens = reserve
        $0.simulated.replyTokens = replyTokens
        $0.simulated.tokensPerSecond = tokensPerSecond
        more(&$0)
    }
}

/// Alice's token, a clone of hers and a socket that has sent it `text` (`chat.send` "c1").
func aliceSends(_ text: String, on server: TestServer) async throws -> (token: String, clone: String, socket: TestWebSocket) {
    let token = try await server.token("alice")
    let clone = try await server.createClone(token: token)["id"]!.stringValue!
    let socket = try await server.connect(token: token)
    try await socket.chatSend(id: "c1", clone: clone, text: text)
    return (token, clone, socket)
}

/// GET /v1/credits followed to its last page: the balance, and every entry.
func creditsOf(_ server: TestServer, token: String) async throws -> (balance: Int64, entries: [JSONValue]) {
    var entries: [JSONValue] = []
    var uri = "/v1/credits?limit=200"
    var balance: Int64 = 0
    while true {
        let page = try await server.get(uri, token: token).json()
        balance = page["balance"]!.intValue!
        entries += page["entries"]!.arrayValue!
        guard let next = page["next_before"]?.stringValue else { return (balance, entries) }
        uri = "/v1/credits?limit=200&before=\(next)"
    }
}

/// The ledger invariant, through the API: the balance is the sum of the entries, each once.
func expectInvariant(_ server: TestServer, token: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let (balance, entries) = try await creditsOf(server, token: token)
    let ids = entries.map { $0["id"]!.stringValue! }
    #expect(Set(ids).count == ids.count, "an entry appears twice", sourceLocation: sourceLocation)
    #expect(entries.reduce(0) { $0 + $1["credits"]!.intValue! } == balance, sourceLocation: sourceLocation)
}

@Suite struct CreditsIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func aStreamThatRunsOutStopsAtTheLastPaidToken(_ store: TestServer.StoreKind) async throws {
        let metrics = TestMetrics()
        let server = try await creditServer(store, grant: 10) { $0.metrics = metrics }
        let (token, clone, socket) = try await aliceSends("Talk a lot", on: server)
        let start = try await socket.nextJSON()
        var tokens: [JSONValue] = []
        var frame = try await socket.nextJSON()
        while frame["type"] == .string("token") {
            tokens.append(frame)
            frame = try await socket.nextJSON()
        }
        #expect(tokens.count == 10)
        #expect(frame == .object([("type", .string("paywall")), ("stream", start["stream"]!), ("balance", .int(0)), ("required", .int(1))]))
        let end = try await socket.nextJSON()
        #expect(end["reason"] == .string("insufficient_credits"))
        #expect(end["cost"] == .int(10))
        #expect(end["balance"] == .int(0))
        #expect(end["usage"]?["output_tokens"] == .int(10))

        let messages = try await server.get("/v1/conversations/\(start["conversation"]!.stringValue!)/messages", token: token).json()["messages"]!
            .arrayValue!
        #expect(messages.last?["reason"] == .string("insufficient_credits"))
        #expect(messages.last?["text"] == .string(tokens.map { $0["text"]!.stringValue! }.joined()))
        try await expectInvariant(server, token: token)
        #expect(try metrics.expectCounter("parley_credits_debited_total").totalValue == 10)
        #expect(try metrics.expectCounter("parley_paywall_hits_total").totalValue == 1)

        // Now broke: the next request is refused before it starts, and counted.
        try await socket.chatSend(id: "c2", clone: clone, text: "More?")
        #expect(try await socket.nextJSON()["code"] == .string("insufficient_credits"))
        #expect(try metrics.expectCounter("parley_insufficient_credits_refusals_total").totalValue == 1)
        await server.stop()
    }

    /// A first batch the balance does not cover in full (here 8 tokens against 5 credits, the
    /// reserve of 4 covered) is bought as large as the balance allows, under its own ledger id.
    @Test(arguments: TestServer.StoreKind.allCases)
    func aFirstBatchTheBalanceCoversOnlyInPartIsBoughtAsLargeAsItAllows(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 5, batch: 8)
        let (token, _, socket) = try await aliceSends("Talk a lot", on: server)
        let stream = try await socket.next(type: "stream.start").frame["stream"]!.stringValue!
        let end = try await socket.next(type: "stream.end").frame
        #expect(end["reason"] == .string("insufficient_credits") && end["usage"]?["output_tokens"] == .int(5))
        let entries = try await creditsOf(server, token: token).entries
        #expect(entries.first { $0["id"] == .string(stream + ":1") }?["credits"] == .int(-5))
        #expect(try await creditsOf(server, token: token).balance == 0)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aStreamIsRefusedBeforeItStartsWhenTheReserveIsNotCovered(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 3, reserve: 4)
        let (token, _, socket) = try await aliceSends("Hello?", on: server)
        let error = try await socket.nextJSON()
        #expect(error["code"] == .string("insufficient_credits"))
        #expect(error["ref"] == .string("c1"))
        #expect(error["balance"] == .int(3))
        #expect(error["required"] == .int(4))
        // Nothing was generated, stored or charged.
        #expect(try await server.get("/v1/conversations", token: token).json()["conversations"] == .array([]))
        #expect(try await creditsOf(server, token: token).balance == 3)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func concurrentStreamsOfOneUserNeverOverdraw(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 50, batch: 3, reserve: 1, tokensPerSecond: 400)
        let token = try await server.token("alice")
        let socket = try await server.connect(token: token)
        var clones: [String] = []
        for i in 0..<4 { clones.append(try await server.createClone(token: token, name: "C\(i)")["id"]!.stringValue!) }
        for (i, clone) in clones.enumerated() { try await socket.chatSend(id: "c\(i)", clone: clone, text: "Go") }
        var delivered = 0
        var ends: [JSONValue] = []
        // A request admitted after the others spent the balance (a slow machine) is refused
        // before it starts: that is an outcome too, and charges nothing.
        var refused = 0
        while ends.count + refused < 4 {
            let frame = try await socket.nextJSON()
            switch frame["type"]?.stringValue {
            case "token": delivered += 1
            case "stream.end": ends.append(frame)
            case "error" where frame["code"] == .string("insufficient_credits"): refused += 1
            case "stream.start", "paywall": break
            default: Issue.record("unexpected \(frame)")
            }
        }
        #expect(delivered == 50)
        #expect(ends.reduce(0) { $0 + $1["cost"]!.intValue! } == 50)
        #expect(ends.allSatisfy { $0["balance"]!.intValue! >= 0 })
        #expect(try await creditsOf(server, token: token).balance == 0)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test func unusedPrepaidCreditsAreRefundedAndCostIsExact() async throws {
        let server = try await TestServer.start {
            $0.credits.startingGrant = 1_000
            $0.credits.batchTokens = 16
            $0.simulated.replyTokens = 10
        }
        let token = try await server.token("alice")
        let cloneJSON = try await server.createClone(token: token)
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: cloneJSON["id"]!.stringValue!, text: "Short one")
        let reply = try await socket.readReply()
        let pricing = PricingTable.standard
        let usage = reply.end["usage"]!
        let expected =
            pricing.inputCost(tokens: Int(usage["input_tokens"]!.intValue!), model: "simulated", feature: .chat)!
            + pricing.outputCost(tokens: 10, model: "simulated", feature: .chat)!
        #expect(reply.end["cost"] == .int(expected))
        #expect(reply.end["balance"] == .int(1_000 - expected))
        let entries = try await creditsOf(server, token: token).entries
        let settle = entries.first { $0["id"] == .string("\(reply.stream):settle") }
        #expect(settle?["kind"] == .string("settlement"))
        #expect(
            settle?["credits"]
                == .int(
                    pricing.outputCost(tokens: 16, model: "simulated", feature: .chat)! - pricing.outputCost(
                        tokens: 10, model: "simulated", feature: .chat)!))
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aCancelledStreamPaysOnlyForWhatWasDelivered(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 1_000, batch: 16, replyTokens: 1000, tokensPerSecond: 50)
        let (token, _, socket) = try await aliceSends("Long", on: server)
        let start = try await socket.nextJSON()
        _ = try await socket.readUntilToken()
        try await socket.chatCancel(id: "x", stream: start["stream"]!.stringValue!)
        let (end, _) = try await socket.next(type: "stream.end")
        let delivered = end["usage"]!["output_tokens"]!.intValue!
        #expect(end["reason"] == .string("cancelled"))
        #expect(end["cost"] == .int(delivered))
        #expect(end["balance"] == .int(1_000 - delivered))
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    /// A reply's debits grow: 4, 8, 16, then 16 each (`maxBatchTokens`), so a long reply costs a
    /// few commits; the settlement refunds what was bought and not sent, and where the balance
    /// ends the reply, the last debit shrinks to what it covers: every token still paid first.
    @Test(arguments: TestServer.StoreKind.allCases)
    func aReplysDebitsGrowAndTheUnsentRestIsRefunded(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 1_000, batch: 4, replyTokens: 50) { $0.credits.maxBatchTokens = 16 }
        let (token, _, socket) = try await aliceSends("Fifty tokens", on: server)
        let (end, _) = try await socket.next(type: "stream.end")
        let stream = end["stream"]!.stringValue!
        #expect(end["reason"] == .string("complete"))
        #expect(end["cost"] == .int(50))
        #expect(end["balance"] == .int(950))
        let entries = try await creditsOf(server, token: token).entries
        func debit(_ suffix: String) -> JSONValue? { entries.first { $0["id"] == .string("\(stream):\(suffix)") } }
        // 4 + 8 + 16 + 16 = 44 tokens, then 16 more for the last 6: 60 bought, 10 refunded.
        #expect((1...5).map { debit(String($0))?["tokens"]?.intValue } == [4, 8, 16, 16, 16])
        #expect(debit("6") == nil)
        #expect(debit("settle")?["credits"] == .int(10))
        try await expectInvariant(server, token: token)

        // 30 credits left: 4 + 8 + 16 bought, then only 2 of the next 16.
        let poor = try await creditServer(store, grant: 30, batch: 4, reserve: 1, replyTokens: 50) { $0.credits.maxBatchTokens = 16 }
        let bob = try await poor.token("bob")
        let bobsClone = try await poor.createClone(token: bob)["id"]!.stringValue!
        let bobsSocket = try await poor.connect(token: bob)
        try await bobsSocket.chatSend(id: "c1", clone: bobsClone, text: "Fifty tokens")
        let (poorEnd, _) = try await bobsSocket.next(type: "stream.end")
        #expect(poorEnd["reason"] == .string("insufficient_credits"))
        #expect(poorEnd["usage"]?["output_tokens"] == .int(30))
        #expect(poorEnd["balance"] == .int(0))
        let bobsEntries = try await creditsOf(poor, token: bob).entries
        let bobsStream = poorEnd["stream"]!.stringValue!
        #expect(
            (1...4).map { n in bobsEntries.first { $0["id"] == .string("\(bobsStream):\(n)") }?["tokens"]?.intValue } == [4, 8, 16, 2])
        try await expectInvariant(poor, token: bob)
        await poor.stop()
        await server.stop()
    }

    @Test func pricesArePublic() async throws {
        let server = try await TestServer.start()
        let prices = try await server.get("/v1/credits/prices", token: nil)
        #expect(prices.status == .ok)
        #expect(try PricingTable.parse(try prices.json()).price(for: "simulated") == PricingTable.standard.price(for: "simulated"))
        await server.stop()
    }
}

@Suite struct GrantTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func onlyAdminsGrantAndAKeyMakesAGrantApplyOnce(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 0)
        let admin = try await server.token("root", role: "admin")
        let user = try await server.token("alice")
        let body: JSONValue = .object([("user", .string("alice")), ("credits", .int(500)), ("key", .string("support-ticket-7"))])
        let refused = try await TestHTTPClient.json(port: server.port, .POST, "/v1/admin/credits", token: user, json: body)
        #expect(refused.status == .forbidden)
        #expect(try await creditsOf(server, token: user).balance == 0)

        let granted = try await TestHTTPClient.json(port: server.port, .POST, "/v1/admin/credits", token: admin, json: body)
        #expect(granted.status == .created)
        #expect(try granted.json()["balance"] == .int(500))
        let again = try await TestHTTPClient.json(port: server.port, .POST, "/v1/admin/credits", token: admin, json: body)
        #expect(again.status == .ok)
        #expect(try again.json()["applied"] == .bool(false))
        #expect(try again.json()["entry"] == granted.json()["entry"], "the retry answers with the stored grant")
        #expect(try await creditsOf(server, token: user).balance == 500)
        // The same key for another amount or user is another grant: refused, and the answer never
        // claims what was not granted.
        for (who, amount) in [("alice", 900), ("bob", 500)] {
            let reused = try await TestHTTPClient.json(
                port: server.port, .POST, "/v1/admin/credits", token: admin,
                json: .object([
                    ("user", .string(who)), ("credits", .int(Int64(amount))), ("key", .string("support-ticket-7")),
                ]))
            #expect(reused.status == .conflict && reused.errorCode == "conflict")
            #expect(try reused.json()["error"]?["message"]?.stringValue?.contains("500 credits to alice") == true)
        }
        #expect(try await creditsOf(server, token: user).balance == 500)
        let bad = try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/admin/credits", token: admin,
            json: .object([("user", .string("alice")), ("credits", .int(-5))]))
        #expect(bad.status == .badRequest)
        try await expectInvariant(server, token: user)
        await server.stop()
    }

    static let secret = "whsec_test_0123456789abcdef0123456789"

    func signed(_ body: JSONValue, secret: String = GrantTests.secret) -> (HTTPHeaders, [UInt8]) {
        let bytes = body.serialized()
        let mac = HMAC<SHA256>.authenticationCode(for: bytes, using: SymmetricKey(data: Array(secret.utf8)))
        let hex = mac.map { String(format: "%02x", $0) }.joined()
        return (["x-parley-signature": "sha256=\(hex)", "content-type": "application/json"], bytes)
    }

    func payment(order: String, credits: Int64 = 250, timestamp: Int64 = Int64(Date().timeIntervalSince1970)) -> JSONValue {
        .object([("order_id", .string(order)), ("user", .string("alice")), ("credits", .int(credits)), ("timestamp", .int(timestamp))])
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aPaymentCreditsOnceHoweverOftenItIsDelivered(_ store: TestServer.StoreKind) async throws {
        let server = try await creditServer(store, grant: 0) { $0.credits.paymentsSecret = GrantTests.secret }
        let user = try await server.token("alice")
        let (headers, body) = signed(payment(order: "ord_1"))
        for attempt in 0..<3 {
            let response = try await TestHTTPClient.request(port: server.port, .POST, "/v1/webhooks/payments", headers: headers, body: body)
            #expect(response.status == .ok)
            #expect(try response.json()["status"] == .string(attempt == 0 ? "credited" : "already_credited"))
        }
        #expect(try await creditsOf(server, token: user).balance == 250)
        try await expectInvariant(server, token: user)
        await server.stop()
    }

    @Test func forgedStaleAndUnsignedPaymentsChangeNothing() async throws {
        let server = try await creditServer(grant: 0) { $0.credits.paymentsSecret = GrantTests.secret }
        let user = try await server.token("alice")
        let forged = signed(payment(order: "ord_2"), secret: "not-the-secret-at-all-not-the-secret")
        let stale = signed(payment(order: "ord_3", timestamp: Int64(Date().timeIntervalSince1970) - 3_600))
        var tampered = signed(payment(order: "ord_4"))
        tampered.1 = payment(order: "ord_4", credits: 1_000_000).serialized()
        let unsigned: (HTTPHeaders, [UInt8]) = ([:], payment(order: "ord_5").serialized())
        for (headers, body) in [forged, stale, tampered, unsigned] {
            let response = try await TestHTTPClient.request(port: server.port, .POST, "/v1/webhooks/payments", headers: headers, body: body)
            #expect(response.status == .unauthorized)
            #expect(response.errorCode == "unauthorized")
        }
        #expect(try await creditsOf(server, token: user).balance == 0)
        #expect(try await creditsOf(server, token: user).entries.isEmpty)
        await server.stop()
    }

    @Test func withoutASecretTheWebhookIsOff() async throws {
        let server = try await creditServer(grant: 0)
        let (headers, body) = signed(payment(order: "ord_6"))
        let response = try await TestHTTPClient.request(port: server.port, .POST, "/v1/webhooks/payments", headers: headers, body: body)
        #expect(response.status == .notFound)
        await server.stop()
    }
}
