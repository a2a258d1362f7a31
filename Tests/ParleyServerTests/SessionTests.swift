import Foundation
import NIOHTTP1
import ParleyCore
import ParleyServer
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
        try await phoneSocket.send(.object([("type", .string("chat.cancel")), ("id", .string("x")), ("stream", .string("st_none"))]))
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
}
