import ParleyCore
import ParleyServer
import ParleyTestSupport
import Testing

extension TestWebSocket {
    func chatRegenerate(id: String, message: String) async throws {
        try await send(.object([("type", .string("chat.regenerate")), ("id", .string(id)), ("message", .string(message))]))
    }

    func chatEdit(id: String, message: String, text: String) async throws {
        try await send(.object([("type", .string("chat.edit")), ("id", .string(id)), ("message", .string(message)), ("text", .string(text))]))
    }
}

extension TestServer {
    /// The conversation's path as `GET …/messages` lists it.
    func path(_ conversation: String, token: String) async throws -> [JSONValue] {
        try await get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]?.arrayValue ?? []
    }

    func choose(_ message: String, alternative: Int? = nil, in conversation: String, token: String) async throws -> TestHTTPResponse {
        var body: [(String, JSONValue)] = [("message", .string(message))]
        if let alternative { body.append(("alternative", .int(Int64(alternative)))) }
        return try await TestHTTPClient.json(port: port, .POST, "/v1/conversations/\(conversation)/active", token: token, json: .object(body))
    }
}

/// Regenerate, edit and choose a branch (#24) over the real socket and REST API, on both stores.
@Suite struct BranchIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func regeneratingTwiceMakesThreeAlternativesToSwitchAmong(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let cloneJSON = try await server.createClone(token: token)
        let clone = cloneValue(cloneJSON, owner: "alice")
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone.id, text: "Tell me about music")
        let first = try await socket.readReply()
        try await socket.chatSend(id: "c2", clone: clone.id, conversation: first.conversation, text: "And painting?")
        let followUp = try await socket.readReply()
        let before = try await server.path(first.conversation, token: token)
        let question = before[0]["id"]!.stringValue!

        // Regenerating the first reply, not the last: the prompt ends with the message it answered.
        try await socket.chatRegenerate(id: "r1", message: first.end["message"]!.stringValue!)
        let second = try await socket.readReply()
        #expect(second.start["ref"] == .string("r1"))
        #expect(second.start["parent"] == .string(question))
        #expect(second.start["message"] == second.end["message"] && second.reason == "complete")
        let user = Message(id: "", conversation: "", role: .user, text: "Tell me about music", createdAt: 0)
        #expect(second.text == expectedReply(configuration: server.server.configuration, clone: clone, history: [user]).tokens.joined())
        try await socket.chatRegenerate(id: "r2", message: second.end["message"]!.stringValue!)
        let third = try await socket.readReply()

        var path = try await server.path(first.conversation, token: token)
        #expect(path.map { $0["id"]!.stringValue! } == [question, third.end["message"]!.stringValue!])
        #expect(path[1]["parent"] == .string(question) && path[0]["parent"] == .null)
        #expect(path[1]["alternatives"] == .int(3) && path[1]["alternative"] == .int(2))
        #expect(path[0]["alternatives"] == .int(1) && path[0]["alternative"] == .int(0))

        // Back to the first reply: the branch that followed it comes back with it.
        let chosen = try await server.choose(first.end["message"]!.stringValue!, in: first.conversation, token: token)
        #expect(chosen.status == .ok)
        path = try await server.path(first.conversation, token: token)
        #expect(path.map { $0["id"]!.stringValue! } == before.map { $0["id"]!.stringValue! })
        #expect(path[1]["alternative"] == .int(0) && path[3]["id"] == followUp.end["message"])
        // A swipe: the alternative at an index among a message's siblings.
        let swiped = try await server.choose(first.end["message"]!.stringValue!, alternative: 1, in: first.conversation, token: token)
        #expect(try swiped.json()["messages"]?.arrayValue?.map { $0["id"]! } == [.string(question), second.end["message"]!])
        let beyond = try await server.choose(first.end["message"]!.stringValue!, alternative: 3, in: first.conversation, token: token)
        #expect(beyond.status == .badRequest)
        // The privacy export holds every message, the alternatives off the path marked so.
        let export = try await server.get("/v1/me/export", token: token).json()
        let exported = export["conversations"]?.arrayValue?.first?["messages"]?.arrayValue ?? []
        #expect(exported.count == 6)
        #expect(exported.filter { $0["on_path"] == .bool(false) }.count == 4, "the first and third reply, and the first's branch")
        #expect(exported.filter { $0["parent"] == .string(question) }.count == 3)
        #expect(try await server.choose("msg_none", in: first.conversation, token: token).status == .notFound)
        #expect(try await server.choose(question, in: "cv_none", token: token).status == .notFound)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func anEditStartsABranchWithItsOwnReplyAndTheOldBranchStays(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = cloneValue(try await server.createClone(token: token), owner: "alice")
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone.id, text: "Hello")
        let hello = try await socket.readReply()
        try await socket.chatSend(id: "c2", clone: clone.id, conversation: hello.conversation, text: "Tell me a joke")
        _ = try await socket.readReply()
        let old = try await server.path(hello.conversation, token: token)

        try await socket.chatEdit(id: "e1", message: old[2]["id"]!.stringValue!, text: "Tell me a story")
        let story = try await socket.readReply()
        let path = try await server.path(hello.conversation, token: token)
        #expect(path.map { $0["text"]!.stringValue! } == ["Hello", hello.text, "Tell me a story", story.text])
        #expect(path[2]["alternatives"] == .int(2) && path[2]["alternative"] == .int(1) && path[2]["parent"] == old[1]["id"])
        #expect(story.start["parent"] == path[2]["id"])
        let history = [("Hello", Role.user), (hello.text, .assistant), ("Tell me a story", .user)].map {
            Message(id: "", conversation: "", role: $0.1, text: $0.0, createdAt: 0)
        }
        #expect(story.text == expectedReply(configuration: server.server.configuration, clone: clone, history: history).tokens.joined())

        #expect(try await server.choose(old[2]["id"]!.stringValue!, in: hello.conversation, token: token).status == .ok)
        #expect(try await server.path(hello.conversation, token: token).map { $0["id"]! } == old.map { $0["id"]! })
        await server.stop()
    }

    @Test func whatCannotBeRegeneratedOrEditedIsRefusedClearly() async throws {
        // 24 tokens at 10 a second: the branch choice below must land while the reply streams,
        // 2.4 s (at 50 a second it once came after the 0.5 s on a loaded machine).
        let server = try await TestServer.start { $0.simulated.tokensPerSecond = 10 }
        let alice = try await server.token("alice")
        let clone = try await server.createClone(token: alice)["id"]!.stringValue!
        let socket = try await server.connect(token: alice)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        let reply = try await socket.readReply()
        let path = try await server.path(reply.conversation, token: alice)
        let (question, answer) = (path[0]["id"]!.stringValue!, path[1]["id"]!.stringValue!)

        func refusal(_ send: () async throws -> Void) async throws -> (code: String?, message: String?) {
            try await send()
            let error = try await socket.next(type: "error").frame
            return (error["code"]?.stringValue, error["message"]?.stringValue)
        }
        #expect((try await refusal { try await socket.chatRegenerate(id: "r1", message: question) }).code == "bad_request")
        #expect((try await refusal { try await socket.chatEdit(id: "e1", message: answer, text: "no") }).code == "bad_request")
        #expect((try await refusal { try await socket.chatRegenerate(id: "r2", message: "msg_none") }).code == "not_found")
        let bob = try await server.connect(token: try await server.token("bob"))
        try await bob.chatRegenerate(id: "b1", message: answer)
        #expect(try await bob.next(type: "error").frame["code"] == .string("not_found"), "another user's message is not found")

        // While a reply streams in the conversation, no branch is chosen.
        try await socket.chatRegenerate(id: "r3", message: answer)
        _ = try await socket.readUntilToken()
        #expect(try await server.choose(question, in: reply.conversation, token: alice).status == .conflict)
        #expect(try await socket.next(type: "stream.end").frame["reason"] == .string("complete"))
        // The replaced reply is an alternative now, off the path: regenerating it again is refused.
        #expect((try await refusal { try await socket.chatRegenerate(id: "r4", message: answer) }).code == "bad_request")
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aConversationIsForkedRenamedTrimmedAndDeleted(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        let hello = try await socket.readReply()
        let conversation = hello.conversation
        try await socket.chatSend(id: "c2", clone: clone, conversation: conversation, text: "Tell me a joke")
        _ = try await socket.readReply()
        let path = try await server.path(conversation, token: token)
        let base = "/v1/conversations/\(conversation)"

        // Fork at the first reply: a new conversation with exactly the path up to it.
        let forked = try await TestHTTPClient.json(
            port: server.port, .POST, base + "/fork", token: token, json: .object([("message", path[1]["id"]!)]))
        #expect(forked.status == .created)
        let copy = try forked.json()
        #expect(copy["clone"] == .string(clone) && copy["id"] != .string(conversation))
        let copied = try await server.path(copy["id"]!.stringValue!, token: token)
        #expect(copied.map { $0["text"]! } == path.prefix(2).map { $0["text"]! })
        #expect(copied.map { $0["role"]! } == [.string("user"), .string("assistant")] && copied[1]["parent"] == copied[0]["id"])
        #expect(Set(copied.map { $0["id"]!.stringValue! }).isDisjoint(with: path.map { $0["id"]!.stringValue! }))
        // The fork goes on by itself.
        try await socket.chatSend(id: "c3", clone: clone, conversation: copy["id"]!.stringValue!, text: "Another?")
        #expect(try await socket.readReply().reason == "complete")
        #expect(try await server.path(conversation, token: token).count == 4, "the original is untouched")

        // Renamed.
        let renamed = try await TestHTTPClient.json(port: server.port, .PATCH, base, token: token, json: .object([("title", .string("  Jokes  "))]))
        #expect(renamed.status == .ok)
        #expect(try renamed.json()["title"] == .string("Jokes"))
        let blank = try await TestHTTPClient.json(port: server.port, .PATCH, base, token: token, json: .object([("title", .string(" "))]))
        #expect(blank.status == .badRequest)

        // A message deleted with what follows it.
        let trimmed = try await TestHTTPClient.request(port: server.port, .DELETE, base + "/messages/\(path[2]["id"]!.stringValue!)", token: token)
        #expect(trimmed.status == .ok)
        #expect(try trimmed.json()["deleted"] == .int(2))
        #expect(try await server.path(conversation, token: token).map { $0["id"]! } == path.prefix(2).map { $0["id"]! })

        // Deleted: gone from the list, search and export, its messages with it; another user cannot.
        #expect(try await server.search("jokes", token: token).json()["items"]?.arrayValue?.count == 1, "its title")
        let bob = try await server.token("bob")
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, base, token: bob).status == .notFound)
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, base, token: token).status == .noContent)
        let list = try await server.get("/v1/conversations", token: token).json()["conversations"]?.arrayValue ?? []
        #expect(list.map { $0["id"]! } == [copy["id"]!])
        #expect(try await server.search("jokes", token: token).json()["items"]?.arrayValue?.isEmpty == true)
        let hellos = try await server.search("hello", token: token).json()["items"]?.arrayValue ?? []
        #expect(!hellos.isEmpty && hellos.allSatisfy { $0["conversation"]?["id"] == copy["id"] }, "only the fork's copy")
        #expect(try await server.get(base + "/messages", token: token).status == .notFound)
        let export = try await server.get("/v1/me/export", token: token).json()
        #expect(export["conversations"]?.arrayValue?.map { $0["conversation"]?["id"] } == [copy["id"]])
        await server.stop()
    }
}
