import Foundation
import NIOHTTP1
import ParleyCore
@testable import ParleyServer
import ParleyStore
import ParleyTestSupport
import Testing

/// One user with something of every kind: a clone, a conversation with a reply, a schedule, a
/// debate room they own, and ledger entries.
private struct Account {
    var token: String
    var clone: String
    var conversation: String
    var schedule: String
    var room: String
}

private func populate(_ server: TestServer, _ user: String) async throws -> Account {
    let token = try await server.token(user)
    let clone = try await server.createClone(token: token, name: "\(user)'s clone")["id"]!.stringValue!
    let second = try await server.createClone(token: token, name: "\(user)'s second clone")["id"]!.stringValue!
    let socket = try await server.connect(token: token)
    try await socket.chatSend(id: "c1", clone: clone, text: "hello from \(user)")
    let reply = try await socket.readReply()
    try await socket.sendClose()
    let schedule = try await TestHTTPClient.json(
        port: server.port, .POST, "/v1/schedules", token: token,
        json: .object([
            ("clone", .string(clone)), ("delay_ms", .int(3_600_000)), ("text", .string("later, \(user)")),
        ]))
    #expect(schedule.status == .created)
    let room = try await TestHTTPClient.json(
        port: server.port, .POST, "/v1/rooms", token: token,
        json: .object([
            ("kind", .string("debate")), ("topic", .string("\(user)'s topic")),
            (
                "clones",
                .array([
                    .object([("clone", .string(clone)), ("stance", .string("yes"))]),
                    .object([("clone", .string(second)), ("stance", .string("no"))]),
                ])
            ),
        ]))
    #expect(room.status == .created)
    return Account(
        token: token, clone: clone, conversation: reply.conversation, schedule: try schedule.json()["id"]!.stringValue!,
        room: try room.json()["id"]!.stringValue!)
}

@Suite("Privacy routes") struct PrivacyIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func theExportHoldsEverythingOfTheCallerAndNothingOfOthers(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let alice = try await populate(server, "alice")
        _ = try await populate(server, "bob-the-other")
        // Enough messages for several pages of the export.
        for i in 0..<450 {
            try await server.server.store.appendMessage(
                Message(
                    id: IDGenerator().make(.message), conversation: alice.conversation, role: .user,
                    text: "note \(i)", createdAt: Int64(Timestamp.nowMillis())))
        }
        let response = try await server.get("/v1/me/export", token: alice.token)
        #expect(response.status == .ok)
        #expect(response.headers["transfer-encoding"] == ["chunked"], "streamed, not sized up front")
        #expect(!response.text.contains("bob-the-other"))
        let export = try response.json()
        #expect(export["format"] == .string("parley-export") && export["account"]?["user"] == .string("alice"))
        #expect(export["clones"]?.arrayValue?.count == 2 && export["clones"]?.arrayValue?.first?["id"] == .string(alice.clone))
        let conversations = try #require(export["conversations"]?.arrayValue)
        #expect(conversations.map { $0["conversation"]?["id"] } == [.string(alice.conversation)])
        let messages = try #require(conversations.first?["messages"]?.arrayValue)
        #expect(messages.count == 452)
        let ids = messages.compactMap { $0["id"]?.stringValue }
        #expect(ids == ids.sorted(by: >), "newest first, no page repeated or skipped")
        #expect(Set(ids).count == 452)
        #expect(export["schedules"]?.arrayValue?.map { $0["id"] } == [.string(alice.schedule)])
        #expect(export["rooms"]?.arrayValue?.map { $0["room"]?["id"] } == [.string(alice.room)])
        let credits = try await server.get("/v1/credits?limit=200", token: alice.token).json()
        #expect(export["ledger"]?.arrayValue?.map { $0["id"] } == credits["entries"]?.arrayValue?.map { $0["id"] })
        #expect(export["account"]?["balance"] == credits["balance"])
        #expect(try await server.get("/v1/me/export", token: nil).status == .unauthorized)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func afterDeletionNothingOfTheUserIsReadableAndTheirSocketsAreClosed(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store) {
            // Paced, so the reply below is likely still streaming when the account goes.
            $0.simulated.tokensPerSecond = 100
            $0.simulated.replyTokens = 60
        }
        let alice = try await populate(server, "alice")
        let bob = try await populate(server, "bob")
        let admin = try await server.token("root", role: "admin")
        let socket = try await server.connect(token: alice.token)
        try await socket.chatSend(id: "c2", clone: alice.clone, conversation: alice.conversation, text: "talk for long")
        _ = try await socket.readUntilToken()

        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/me", token: alice.token)
        #expect(deleted.status == .ok)
        #expect(try deleted.json()["removed"]?["clones"] == .int(2))
        // The open socket is closed at once (its reply ended first).
        var closed: TestInbound?
        while closed == nil {
            let inbound = try await socket.next()
            if case .close = inbound { closed = inbound }
            if case .disconnected = inbound { closed = inbound }
        }
        #expect(closed == .close(code: 1008, reason: "account deleted"))

        let t = alice.token
        #expect(try await server.get("/v1/clones", token: t).json()["clones"] == .array([]))
        #expect(try await server.get("/v1/clones/\(alice.clone)", token: t).status == .notFound)
        #expect(try await server.get("/v1/conversations", token: t).json()["conversations"] == .array([]))
        #expect(try await server.get("/v1/conversations/\(alice.conversation)", token: t).status == .notFound)
        #expect(try await server.get("/v1/schedules", token: t).json()["schedules"] == .array([]))
        #expect(try await server.get("/v1/schedules/\(alice.schedule)", token: t).status == .notFound)
        #expect(try await server.get("/v1/rooms/\(alice.room)", token: t).status == .notFound)
        #expect(try await server.get("/v1/rooms/\(alice.room)", token: bob.token).status == .notFound)
        let export = try await server.get("/v1/me/export", token: t).json()
        for section in ["clones", "conversations", "rooms", "schedules", "ledger"] {
            #expect(export[section] == .array([]), "\(section) of a deleted account")
        }
        // A returning user starts a fresh account with nothing of the old one, and no second
        // starting grant: deleting an account is no way to mint credits.
        let credits = try await server.get("/v1/credits", token: t).json()
        #expect(credits["entries"] == .array([]) && credits["balance"] == .int(0))
        // The audit log names only the pseudonym, and no route gives back an "alice".
        let audit = try await server.get("/v1/admin/audit?limit=200", token: admin)
        #expect(!audit.text.contains("\"alice\""))
        let events = try #require(try audit.json()["events"]?.arrayValue)
        let deletion = try #require(events.first { $0["action"] == .string("user.deleted") })
        #expect(deletion["actor"]?.stringValue?.hasPrefix("deleted:") == true)
        // Bob keeps everything.
        #expect(try await server.get("/v1/clones/\(bob.clone)", token: bob.token).status == .ok)
        #expect(try await server.get("/v1/conversations/\(bob.conversation)/messages", token: bob.token).json()["messages"]?.arrayValue?.count == 2)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func theSameSubjectCanDeleteItsAccountAgainAndAgain(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let admin = try await server.token("root", role: "admin")
        for round in 1...3 {
            // Each time back: what they make is theirs, and each deletion takes all of it.
            let token = try await server.token("alice")
            let clone = try await server.createClone(token: token, name: "clone \(round)")["id"]!.stringValue!
            let grant = try await TestHTTPClient.json(
                port: server.port, .POST, "/v1/admin/credits", token: admin,
                json: .object([("user", .string("alice")), ("credits", .int(500)), ("key", .string("r\(round)"))]))
            #expect(grant.status == .created)
            let socket = try await server.connect(token: token)
            try await socket.chatSend(id: "c\(round)", clone: clone, text: "hello, round \(round)")
            let reply = try await socket.readReply()
            try await socket.sendClose()
            let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/me", token: token)
            #expect(deleted.status == .ok, "deletion \(round): \(deleted.text)")
            #expect(try await server.get("/v1/clones", token: token).json()["clones"] == .array([]), "round \(round)")
            #expect(try await server.get("/v1/conversations/\(reply.conversation)", token: token).status == .notFound)
            let credits = try await server.get("/v1/credits", token: token).json()
            #expect(credits["balance"] == .int(0) && credits["entries"] == .array([]), "no starting grant after a deletion (round \(round))")
        }
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aSavedMessageOutlivesThePurgeAndTheRestGoes(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let alice = try await populate(server, "alice")
        let admin = try await server.token("root", role: "admin")
        let page = try await server.get("/v1/conversations/\(alice.conversation)/messages", token: alice.token).json()
        let messages = try #require(page["messages"]?.arrayValue)
        #expect(messages.map { $0["saved"] } == [.bool(false), .bool(false)])
        let reply = messages[1]["id"]!.stringValue!
        let uri = "/v1/conversations/\(alice.conversation)/messages/\(reply)"

        let saved = try await TestHTTPClient.json(port: server.port, .PATCH, uri, token: alice.token, json: .object([("saved", .bool(true))]))
        let savedJSON = try saved.json()
        #expect(saved.status == .ok && savedJSON["saved"] == .bool(true))
        let bob = try await server.token("bob")
        #expect(
            try await TestHTTPClient.json(port: server.port, .PATCH, uri, token: bob, json: .object([("saved", .bool(true))])).status == .notFound)
        #expect(
            try await TestHTTPClient.json(port: server.port, .PATCH, uri, token: alice.token, json: .object([("saved", .string("yes"))])).errorCode
                == "bad_request")
        #expect(
            try await TestHTTPClient.json(
                port: server.port, .PATCH, "/v1/conversations/\(alice.conversation)/messages/msg_nope",
                token: alice.token, json: .object([("saved", .bool(true))])
            ).status == .notFound)

        let purge = { (token: String) in
            try await TestHTTPClient.json(
                port: server.port, .POST, "/v1/admin/retention/purge", token: token,
                json: .object([("older_than_seconds", .int(0))]))
        }
        #expect(try await purge(alice.token).status == .forbidden)
        let purged = try await purge(admin)
        #expect(purged.status == .ok)
        #expect(try purged.json()["messages"] == .int(1), "the unsaved one of the two")
        let left = try await server.get("/v1/conversations/\(alice.conversation)/messages", token: alice.token).json()
        #expect(left["messages"]?.arrayValue?.map { $0["id"] } == [.string(reply)])
        await server.stop()
    }

    @Test func everyAdminRouteRefusesOthers() async throws {
        let server = try await TestServer.start {
            $0.metricsExposition = { Array("# metrics\n".utf8) }
        }
        let user = try await server.token("mallory")
        let admin = try await server.token("root", role: "admin")
        let routes: [(HTTPMethod, String, JSONValue?)] = [
            (.GET, "/metrics", nil),
            (.GET, "/v1/admin/audit", nil),
            (.POST, "/v1/admin/credits", .object([("user", .string("mallory")), ("credits", .int(5))])),
            (.POST, "/v1/admin/retention/purge", .object([("older_than_seconds", .int(86_400))])),
        ]
        for (method, path, body) in routes {
            let call = { (token: String?) in
                try await TestHTTPClient.request(
                    port: server.port, method, path, token: token, headers: ["content-type": "application/json"],
                    body: body?.serialized())
            }
            #expect(try await call(nil).status == .unauthorized, "\(path) without a token")
            #expect(try await call(user).status == .forbidden, "\(path) for a user")
            #expect(try await call(admin).status.code < 300, "\(path) for an admin")
        }
        await server.stop()
    }

    @Test func stateChangesAreAuditedWithTheAddressOnlyAsAKeyedHash() async throws {
        let server = try await TestServer.start()
        let alice = try await populate(server, "alice")
        let socket = try await server.connect(token: alice.token)
        try await socket.send(.object([("type", .string("room.join")), ("id", .string("j")), ("room", .string(alice.room))]))
        _ = try await socket.next(type: "room.state")
        try await socket.send(
            .object([
                ("type", .string("room.control")), ("id", .string("k")), ("room", .string(alice.room)),
                ("action", .string("end")),
            ]))
        _ = try await socket.next(type: "room.event")
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/clones/\(alice.clone)", token: alice.token).status == .noContent)
        let events = try await server.server.store.auditEvents(limit: 50, before: nil, involving: nil)
        #expect(
            events.map(\.action).reversed() == ["session.signed_in", "clone.created", "clone.created", "room.created", "room.ended", "clone.deleted"])
        for event in events {
            let hash = try #require(event.ipHash)
            #expect(hash.count == 64 && hash.allSatisfy(\.isHexDigit))
            #expect(!event.json.serializedString().contains("127.0.0.1"))
        }
        #expect(Set(events.map(\.ipHash)).count == 1, "one address, one hash")
        await server.stop()
    }

    /// A server with the drain grace given and alice's reply already streaming.
    private func streaming(grace: Duration, tokensPerSecond: Double, replyTokens: Int) async throws -> (TestServer, TestWebSocket) {
        let server = try await TestServer.start {
            $0.drainGrace = grace
            $0.simulated.tokensPerSecond = tokensPerSecond
            $0.simulated.replyTokens = replyTokens
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "go")
        _ = try await socket.readUntilToken()
        return (server, socket)
    }

    @Test func aDrainLetsARunningReplyFinishAndRefusesNewOnes() async throws {
        let (server, socket) = try await streaming(grace: .seconds(60), tokensPerSecond: 50, replyTokens: 250)
        let bob = try await server.token("bob")
        let bobsClone = try await server.createClone(token: bob)["id"]!.stringValue!
        let other = try await server.connect(token: bob)
        let stopping = Task { await server.server.shutdown() }
        // Once the drain began, a new request is refused… (asked only then: a request accepted
        // just before could end with the drain, and the socket with it, before a second one)
        while server.server.chat.requests.isAccepting { await Task.yield() }
        try await other.chatSend(id: "late", clone: bobsClone, text: "one more")
        let refused = try await other.nextJSON()
        #expect(refused["type"] == .string("error") && refused["code"] == .string("unavailable"))
        // …while the reply in flight runs to its end.
        let (end, _) = try await socket.next(type: "stream.end")
        #expect(end["reason"] == .string("complete"))
        #expect(try await socket.next() == .close(code: 1001, reason: "server shutting down"))
        await stopping.value
        await server.stop()
    }

    @Test func aDrainEndsWhatOutlastsTheGraceWithReasonShutdown() async throws {
        let (server, socket) = try await streaming(grace: .milliseconds(300), tokensPerSecond: 20, replyTokens: 1_000)
        let began = ContinuousClock.now
        let stopping = Task { await server.server.shutdown() }
        let (end, tokens) = try await socket.next(type: "stream.end")
        #expect(end["reason"] == .string("shutdown"))
        #expect(ContinuousClock.now - began >= .milliseconds(300), "not before the grace was over")
        #expect(!tokens.isEmpty, "tokens kept coming during the grace")
        await stopping.value
        await server.stop()
    }
}
