import NIOHTTP1
import ParleyCore
import ParleyTestSupport
import Testing

@testable import ParleyServer

/// A user's persona (`/v1/me/persona`): who `{{user}}` is in their clones' greetings and prompts.
@Suite struct PersonaIntegrationTests {
    func put(_ server: TestServer, _ token: String, _ body: JSONValue) async throws -> TestHTTPResponse {
        try await TestHTTPClient.json(port: server.port, .PUT, "/v1/me/persona", token: token, json: body)
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aPersonaNamesTheUserInGreetingsAndPromptsUntilRemoved(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        #expect(try await server.get("/v1/me/persona", token: token).status == .notFound)
        #expect(try await server.get("/v1/me", token: token).json()["persona"] == .null)

        // Refused with the reason, and nothing stored.
        let bad = try await put(server, token, .object([("name", .string("Ana\nMaria"))]))
        #expect(bad.status == .badRequest)
        #expect(try bad.json()["error"]?["message"] == .string("'name' must be one line of 1-50 characters"))
        #expect(try await put(server, token, .object([("name", .string("Ana")), ("age", .int(3))])).status == .badRequest)
        #expect(try await server.get("/v1/me/persona", token: token).status == .notFound)

        let ana = Persona(name: "Ana", description: "A cartographer who distrusts {{char}}.")
        let saved = try await put(server, token, .object([("name", .string(" Ana ")), ("description", .string(ana.description))]))
        #expect(saved.status == .ok)
        #expect(try saved.json() == ana.json)
        #expect(try await server.get("/v1/me/persona", token: token).json() == ana.json)
        #expect(try await server.get("/v1/me", token: token).json()["persona"] == ana.json)

        // The card's greeting names her, in the clone's JSON and as the conversation's first message.
        let card = JSONValue.object([
            ("spec", .string("chara_card_v2")), ("spec_version", .string("2.0")),
            ("data", .object([("name", .string("Seraphina")), ("first_mes", .string("Welcome, {{user}}. I am {{char}}."))])),
        ])
        let imported = try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones/import", token: token, json: card)
        let id = try imported.json()["id"]!.stringValue!
        #expect(try imported.json()["greeting"] == .string("Welcome, Ana. I am Seraphina."))
        #expect(try await server.get("/v1/clones/\(id)", token: token).json()["greetings"] == .array([.string("Welcome, Ana. I am Seraphina.")]))
        #expect(
            try await server.get("/v1/clones", token: token).json()["clones"]?.arrayValue?.first?["greeting"]
                == .string("Welcome, Ana. I am Seraphina."))
        let clone = try #require(try await server.server.store.clone(id: id, owner: "alice"))
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: id, text: "Hello")
        let reply = try await socket.readReply()
        let messages = try await server.get("/v1/conversations/\(reply.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.first?["text"] == .string("Welcome, Ana. I am Seraphina."))
        let history = [
            Message(id: "", conversation: "", role: .assistant, text: "Welcome, Ana. I am Seraphina.", createdAt: 0),
            Message(id: "", conversation: "", role: .user, text: "Hello", createdAt: 0),
        ]
        let configuration = server.server.configuration
        #expect(reply.text == expectedReply(configuration: configuration, clone: clone, history: history, user: ana).tokens.joined())
        #expect(reply.text != expectedReply(configuration: configuration, clone: clone, history: history).tokens.joined())

        // In the account's export.
        let export = try await server.get("/v1/me/export", token: token).json()
        #expect(export["account"]?["persona"] == ana.json)
        #expect(export["clones"]?.arrayValue?.first?["greeting"] == .string("Welcome, Ana. I am Seraphina."))

        // Removed: "User" again, from the next conversation on.
        let removed = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/me/persona", token: token)
        #expect(removed.status == .noContent)
        #expect(try await server.get("/v1/me/persona", token: token).status == .notFound)
        try await socket.chatSend(id: "c2", clone: id, text: "Hello")
        let plain = try await socket.readReply()
        let opened = try await server.get("/v1/conversations/\(plain.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(opened.first?["text"] == .string("Welcome, User. I am Seraphina."))
        await server.stop()
    }

    /// A scheduled reply's prompt knows who it writes to.
    @Test func aScheduledReplyIsPromptedWithTheOwnersPersona() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let bo = Persona(name: "Bo", description: "Likes rain.")
        #expect(try await put(server, token, bo.json).status == .ok)
        let id = try await server.createClone(token: token)["id"]!.stringValue!
        let clone = try #require(try await server.server.store.clone(id: id, owner: "alice"))
        let socket = try await server.connect(token: token)
        try await socket.scheduleCreate(id: "s1", clone: id, delayMS: 0, prompt: "the weather")
        _ = try await socket.next(type: "schedule.ok")
        let reply = try await socket.readReply()
        let cue = Message(
            id: "", conversation: "", role: .user, text: "(Scheduled message: write to the user now, unprompted, about: the weather)", createdAt: 0)
        let configuration = server.server.configuration
        #expect(reply.text == expectedReply(configuration: configuration, clone: clone, history: [cue], user: bo).tokens.joined())
        #expect(reply.text != expectedReply(configuration: configuration, clone: clone, history: [cue]).tokens.joined())
        await server.stop()
    }
}
