import Foundation
import Logging
import NIOHTTP1
import ParleyCore
@testable import ParleyServer
import ParleyStore
import ParleyTestSupport
import Testing

/// Sessions (#28): each token Parley issues names one; signing out ends it (or every session)
/// on the real socket and REST API, on both stores.
@Suite struct SessionTests {
    func closeFrame(_ socket: TestWebSocket) async throws -> TestInbound? {
        while true {
            let inbound = try await socket.next()
            if case .close = inbound { return inbound }
            if case .disconnected = inbound { return inbound }
        }
    }

    func signOut(_ server: TestServer, _ token: String, all: Bool? = nil) async throws -> TestHTTPResponse {
        try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/me/sign-out", token: token, json: .object(all.map { [("all", .bool($0))] } ?? []))
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func signingOutEndsThatSessionOrEveryOne(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let laptop = try await server.token("alice")
        let phone = try await server.token("alice")
        let bob = try await server.token("bob")
        let laptopSocket = try await server.connect(token: laptop)
        let phoneSocket = try await server.connect(token: phone)

        #expect(try await signOut(server, laptop).status == .noContent)
        #expect(try await closeFrame(laptopSocket) == .close(code: 1008, reason: "signed out"))
        let refused = try await server.get("/v1/clones", token: laptop)
        #expect(refused.status == .unauthorized)
        #expect(try refused.json()["error"]?["message"]?.stringValue?.contains("signed out") == true)
        #expect(try await server.upgradeAttempt(token: laptop).status == .unauthorized)
        // The other session and the other user go on.
        #expect(try await server.get("/v1/clones", token: phone).status == .ok)
        #expect(try await server.get("/v1/clones", token: bob).status == .ok)
        try await phoneSocket.chatCancel(id: "x", stream: "st_none")
        #expect(try await phoneSocket.next(type: "error").frame["ref"] == .string("x"), "still open")

        // Everywhere: the phone's session ends too; a token issued afterwards signs in.
        #expect(try await signOut(server, phone, all: true).status == .noContent)
        #expect(try await closeFrame(phoneSocket) == .close(code: 1008, reason: "signed out"))
        #expect(try await server.get("/v1/clones", token: phone).status == .unauthorized)
        let fresh = try await server.token("alice")
        #expect(try await server.get("/v1/clones", token: fresh).status == .ok)
        #expect(try await server.get("/v1/clones", token: bob).status == .ok)
        #expect(try await signOut(server, fresh, all: false).status == .noContent)
        #expect(
            try await TestHTTPClient.json(port: server.port, .POST, "/v1/me/sign-out", token: bob, json: .object([("every", .bool(true))])).status
                == .badRequest)
        await server.stop()
    }

    /// A server that starts again reads the sign-outs from the store.
    @Test func aSignOutOutlivesARestart() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        #expect(try await signOut(server, token).status == .noContent)
        let again = try await server.restarted()
        #expect(try await again.get("/v1/clones", token: token).status == .unauthorized)
        #expect(try await again.get("/v1/clones", token: try await again.token("alice")).status == .ok)
        await again.stop()
    }

    /// Sign-ins in the audit log (#28): a session's first use from an address, by a request or a
    /// socket, once; a refused token once per address and reason a minute; no token, nothing.
    /// A user's export carries their own entries and no one else's.
    @Test(arguments: TestServer.StoreKind.allCases)
    func signInsAcceptedAndRefusedAreAudited(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let laptop = try await server.token("alice")
        let phone = try await server.token("alice")
        for _ in 0..<3 { #expect(try await server.get("/v1/clones", token: laptop).status == .ok) }
        let socket = try await server.connect(token: laptop)
        let phoneSocket = try await server.connect(token: phone)
        #expect(try await server.get("/v1/clones", token: try await server.token("bob")).status == .ok)
        for _ in 0..<3 { #expect(try await server.get("/v1/clones", token: "not.a.token").status == .unauthorized) }
        let expired = try await server.server.authenticator.issue(subject: "alice", ttl: .seconds(1), now: Date().addingTimeInterval(-60))
        #expect(try await server.get("/v1/clones", token: expired).status == .unauthorized)
        #expect(try await TestHTTPClient.request(port: server.port, .GET, "/v1/clones").status == .unauthorized)
        #expect(try await server.upgradeAttempt(token: "not.a.token").status == .unauthorized)

        let events = try await server.server.store.auditEvents(limit: 50, before: nil, involving: nil).reversed()
        let signIns = events.filter { $0.action == "session.signed_in" }
        #expect(signIns.map(\.actor) == ["alice", "alice", "bob"], "one per session and address, however many requests")
        #expect(signIns.map { $0.detail["via"] } == ["http", "socket", "http"])
        #expect(Set(signIns.compactMap { $0.detail["session"] }).count == 3)
        #expect(signIns.allSatisfy { $0.ipHash?.count == 64 && $0.target == $0.detail["session"] })
        let refused = events.filter { $0.action == "session.refused" }
        #expect(refused.map { $0.detail["reason"] } == ["invalid token", "token expired"], "once per reason a minute; no token is no sign-in")
        #expect(refused.allSatisfy { $0.actor == "anonymous" && $0.ipHash?.count == 64 })

        #expect(try await signOut(server, laptop).status == .noContent)
        _ = try await closeFrame(socket)
        let export = try await server.get("/v1/me/export", token: phone).json()
        let audit = try #require(export["audit"]?.arrayValue)
        #expect(audit.compactMap { $0["action"]?.stringValue } == ["session.signed_out", "session.signed_in", "session.signed_in"])
        #expect(audit.allSatisfy { $0["actor"] == .string("alice") }, "bob's sign-in and the refusals are not hers")
        _ = phoneSocket
        await server.stop()
    }

    /// The audit log keeps 24 months by default: a retention pass deletes what is older. (The
    /// server's own first pass comes a minute after start, so it cannot take the event first.)
    @Test func auditEventsOlderThanTheAuditRetentionArePurged() async throws {
        let server = try await TestServer.start()
        let day: Int64 = 86_400_000
        let now = Int64(Timestamp.nowMillis())
        let ids = IDGenerator()
        for (age, action) in [(800 * day, "old"), (700 * day, "young")] {
            try await server.server.store.appendAudit(
                AuditEvent(id: ids.make(.audit), at: now - age, actor: "alice", action: action, target: nil, ipHash: nil))
        }
        let admin = try await server.token("root", role: "admin")
        let purged = try await TestHTTPClient.json(port: server.port, .POST, "/v1/admin/retention/purge", token: admin, json: .object([]))
        let body = try purged.json()
        #expect(purged.status == .ok)
        #expect(body["audit_events"] == .int(1) && body["audit_older_than_seconds"] == .int(730 * 86_400))
        #expect(body["older_than_seconds"] == .null && body["messages"] == .int(0), "text is kept: content retention is off")
        let left = try await server.server.store.auditEvents(limit: 50, before: nil, involving: "alice").map(\.action)
        #expect(left == ["young"])
        await server.stop()
    }
}

/// The signed-out sessions a node keeps per user are bounded: past `capacity` users the older
/// half is forgotten, and read from the store again when asked for.
@Suite struct SessionGateTests {
    @Test func pastItsCapacityTheGateForgetsItsOlderUsersFirst() async throws {
        let path = Scratch.path("gate", suffix: ".sqlite")
        let store = try await SQLiteStore.open(path: path)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let gate = SessionGate(store: store, logger: Logger(label: "test"), freshness: .seconds(3600), capacity: 4)
        func identity(_ user: String) -> Identity { Identity(user: user, session: "ses_\(user)") }
        for user in ["u0", "u1", "u2", "u3"] { #expect(await gate.admits(identity(user))) }
        // Signed out in the store (as by another node): the gate still remembers them admitted.
        for user in ["u0", "u1", "u2", "u3"] { try await store.revokeSessions(user: user, session: "ses_\(user)", at: 1) }
        #expect(await gate.admits(identity("u0")))
        #expect(await gate.admits(identity("u3")))
        // A fifth user: the older half (u0, u1) is forgotten and read again; u2 and u3 are kept.
        #expect(await gate.admits(identity("u4")))
        #expect(await !gate.admits(identity("u0")))
        #expect(await !gate.admits(identity("u1")))
        #expect(await gate.admits(identity("u3")))
    }
}
