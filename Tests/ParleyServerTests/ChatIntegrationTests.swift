import Foundation
import NIOHTTP1
import ParleyCore
import ParleyLLM
import ParleyServer
import ParleyStore
import ParleyTestSupport
import Testing

/// The real server on an ephemeral port, driven over real sockets.
@Suite struct ChatIntegrationTests {
    @Test func aFullReplyStreamsWithContiguousSeqsAndIsStored() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let cloneJSON = try await server.createClone(
            token: token, name: "Ada",
            fields: [
                ("traits", .array([.string("curious")])), ("system_prompt", .string("Be brief.")),
                ("sliders", .object([("warmth", .int(70))])), ("memory", .array([.string("Has a cat")])),
            ])
        let clone = cloneValue(cloneJSON, owner: "alice")
        let socket = try await server.connect(token: token)

        try await socket.chatSend(id: "c1", clone: clone.id, text: "Tell me about music")
        let reply = try await socket.readReply()
        #expect(reply.start["ref"] == .string("c1"))
        #expect(reply.start["clone"] == .string(clone.id))
        #expect(reply.start["model"] == .string("simulated"))
        #expect(reply.seqs == Array(1...Int64(reply.tokens.count)))
        #expect(reply.tokens.allSatisfy { $0["stream"] == .string(reply.stream) })
        #expect(reply.reason == "complete")

        let user = Message(id: "", conversation: "", role: .user, text: "Tell me about music", createdAt: 0)
        let expected = expectedReply(configuration: server.server.configuration, clone: clone, history: [user])
        #expect(reply.text == expected.tokens.joined())
        #expect(reply.end["usage"] == .object([("input_tokens", .int(Int64(expected.inputTokens))), ("output_tokens", .int(24))]))

        // Both turns are in the transcript, the reply under the id stream.end named.
        let page = try await server.get("/v1/conversations/\(reply.conversation)/messages", token: token).json()
        let messages = page["messages"]!.arrayValue!
        #expect(messages.map { $0["role"]!.stringValue! } == ["user", "assistant"])
        #expect(messages[0]["text"] == .string("Tell me about music"))
        #expect(messages[1]["id"] == reply.end["message"])
        #expect(messages[1]["text"] == .string(reply.text))
        #expect(messages[1]["reason"] == .string("complete"))
        #expect(messages[1]["stream"] == .string(reply.stream))

        // The next turn in the same conversation is prompted with the history.
        try await socket.chatSend(id: "c2", clone: clone.id, conversation: reply.conversation, text: "And painting?")
        let second = try await socket.readReply()
        #expect(second.conversation == reply.conversation)
        let assistant = Message(id: "", conversation: "", role: .assistant, text: reply.text, createdAt: 0)
        let followUp = Message(id: "", conversation: "", role: .user, text: "And painting?", createdAt: 0)
        #expect(
            second.text
                == expectedReply(configuration: server.server.configuration, clone: clone, history: [user, assistant, followUp]).tokens.joined())
        await server.stop()
    }

    @Test func aReplyBeyondTheProvidersLimitsFailsWithRateLimited() async throws {
        let server = try await TestServer.start {
            $0.providerConcurrency = 1
            $0.providerQueue = 0
            // Alice's reply holds the one slot until she cancels it (1,000 tokens: 50 s), so Bob's
            // request meets it taken however late a loaded machine runs this test's steps.
            $0.simulated.tokensPerSecond = 20
            $0.simulated.replyTokens = 1000
        }
        let alice = try await server.connect(token: try await server.token("alice"))
        let bob = try await server.connect(token: try await server.token("bob"))
        let aliceClone = try await server.createClone(token: try await server.token("alice"))["id"]!.stringValue!
        let bobClone = try await server.createClone(token: try await server.token("bob"))["id"]!.stringValue!
        try await alice.chatSend(id: "a1", clone: aliceClone, text: "Hello")
        let aliceStream = try await alice.readUntilToken()["stream"]!
        try await bob.chatSend(id: "b1", clone: bobClone, text: "Hello")
        let refused = try await bob.next(type: "error").frame
        #expect(refused["ref"] == .string("b1") && refused["code"] == .string("rate_limited"))
        #expect(try await bob.next(type: "stream.end").frame["reason"] == .string("error"))
        try await alice.chatCancel(id: "a2", stream: aliceStream.stringValue!)
        #expect(try await alice.next(type: "stream.end").frame["reason"] == .string("cancelled"))
        try await bob.chatSend(id: "b2", clone: bobClone, text: "Hello again")
        #expect(try await bob.nextJSON()["type"] == .string("stream.start"))
        #expect(try await bob.nextJSON()["type"] == .string("token"), "the slot is free again: Bob's reply streams")
        await server.stop()
    }

    @Test func cancelStopsTheStreamAndStoresThePartialReply() async throws {
        var chat = try await LongReply.start(tokensPerSecond: 50)
        try await chat.socket.chatCancel(id: "x1", stream: chat.stream.stringValue!)
        let (end, more) = try await chat.socket.next(type: "stream.end")
        chat.tokens += more
        #expect(end["reason"] == .string("cancelled"))
        #expect(chat.tokens.count < 1000)
        #expect(end["usage"]?["output_tokens"] == .int(Int64(chat.tokens.count)))

        let messages = try await chat.server.get("/v1/conversations/\(chat.conversation)/messages", token: chat.token).json()["messages"]!.arrayValue!
        #expect(messages.last?["reason"] == .string("cancelled"))
        #expect(messages.last?["text"] == .string(chat.tokens.map { $0["text"]!.stringValue! }.joined()))
        await chat.server.stop()
    }

    @Test func resumeAfterReconnectReplaysTheRestWithoutGapsOrDuplicates() async throws {
        let server = try await TestServer.start {
            $0.simulated.tokensPerSecond = 100
            $0.simulated.replyTokens = 60
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let first = try await server.connect(token: token)

        try await first.chatSend(id: "c1", clone: clone, text: "Hello")
        let start = try await first.nextJSON()
        let stream = start["stream"]!.stringValue!
        var received: [JSONValue] = []
        for _ in 0..<3 { received.append(try await first.readUntilToken()) }
        await first.drop()

        let second = try await server.connect(token: token)
        let after = received.last!["seq"]!.intValue!
        try await second.send(
            .object([("type", .string("stream.resume")), ("id", .string("r1")), ("stream", .string(stream)), ("after", .int(after))]))
        let ack = try await second.nextJSON()
        #expect(ack["type"] == .string("stream.start"))
        #expect(ack["ref"] == .string("r1"))
        #expect(ack["stream"] == .string(stream))
        let (end, rest) = try await second.next(type: "stream.end")
        received += rest
        #expect(received.map { $0["seq"]!.intValue! } == Array(1...60))
        #expect(end["reason"] == .string("complete"))

        // A resume after the end replays the ended stream's tail and its end.
        try await second.send(.object([("type", .string("stream.resume")), ("id", .string("r2")), ("stream", .string(stream)), ("after", .int(58))]))
        #expect(try await second.nextJSON()["ref"] == .string("r2"))
        #expect(try await second.nextJSON()["seq"] == .int(59))
        #expect(try await second.nextJSON()["seq"] == .int(60))
        #expect(try await second.nextJSON() == end)
        await server.stop()
    }

    /// A page reloaded mid-reply (#25) learns from the conversation which reply is being
    /// written, and resumes it from the start on its new socket: every token once, in order.
    @Test func aConversationNamesTheReplyBeingWrittenSoAReloadResumesIt() async throws {
        // Ten seconds of reply: at 0.6 s it had ended before a loaded machine asked about it.
        let server = try await TestServer.start {
            $0.simulated.tokensPerSecond = 30
            $0.simulated.replyTokens = 300
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let first = try await server.connect(token: token)
        try await first.chatSend(id: "c1", clone: clone, text: "Hello")
        let start = try await first.nextJSON()
        let stream = try #require(start["stream"]?.stringValue)
        let conversation = try #require(start["conversation"]?.stringValue)
        for _ in 0..<3 { _ = try await first.readUntilToken() }
        await first.drop()

        let shown = try await server.get("/v1/conversations/\(conversation)", token: token).json()
        #expect(shown["streaming"]?["stream"] == .string(stream))
        #expect(shown["streaming"]?["message"] == start["message"] && shown["streaming"]?["parent"] == start["parent"])
        let other = try await server.token("bob")
        #expect(try await server.get("/v1/conversations/\(conversation)", token: other).status == .notFound)

        let reloaded = try await server.connect(token: token)
        try await reloaded.send(
            .object([("type", .string("stream.resume")), ("id", .string("r1")), ("stream", .string(stream)), ("after", .int(0))]))
        let (end, frames) = try await reloaded.next(type: "stream.end")
        #expect(frames.first?["type"] == .string("stream.start") && frames.first?["ref"] == .string("r1"))
        #expect(frames.dropFirst().compactMap { $0["seq"]?.intValue } == Array(1...300))
        #expect(end["reason"] == .string("complete"))
        let after = try await server.get("/v1/conversations/\(conversation)", token: token).json()
        #expect(after["streaming"] == nil)
        await server.stop()
    }

    @Test func streamsNoLongerBufferedAreGone() async throws {
        let server = try await TestServer.start {
            $0.resumeBufferTokens = 4
            $0.simulated.replyTokens = 20
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        let reply = try await socket.readReply()

        try await socket.send(
            .object([("type", .string("stream.resume")), ("id", .string("r1")), ("stream", .string(reply.stream)), ("after", .int(3))]))
        let gone = try await socket.nextJSON()
        #expect(gone["type"] == .string("error"))
        #expect(gone["code"] == .string("stream_gone"))
        #expect(gone["ref"] == .string("r1"))

        // The last four are still there.
        try await socket.send(
            .object([("type", .string("stream.resume")), ("id", .string("r2")), ("stream", .string(reply.stream)), ("after", .int(16))]))
        #expect(try await socket.nextJSON()["type"] == .string("stream.start"))
        #expect(try await socket.nextJSON()["seq"] == .int(17))

        try await socket.send(
            .object([("type", .string("stream.resume")), ("id", .string("r3")), ("stream", .string("st_unknown")), ("after", .int(0))]))
        _ = try await socket.next(type: "stream.end")
        let unknown = try await socket.nextJSON()
        #expect(unknown["code"] == .string("stream_gone"))
        #expect(unknown["ref"] == .string("r3"))
        await server.stop()
    }

    @Test func everySocketOfTheUserSeesTheStream() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let tab1 = try await server.connect(token: token)
        let tab2 = try await server.connect(token: try await server.token("alice"))
        try await tab1.chatSend(id: "c1", clone: clone, text: "Hi both")
        let one = try await tab1.readReply()
        let two = try await tab2.readReply()
        #expect(one.start == two.start)
        #expect(one.tokens == two.tokens)
        #expect(one.end == two.end)
        await server.stop()
    }

    @Test func anotherUsersThingsAreNotFound() async throws {
        let server = try await TestServer.start()
        let alice = try await server.token("alice")
        let bob = try await server.token("bob")
        let clone = try await server.createClone(token: alice)["id"]!.stringValue!
        let aliceSocket = try await server.connect(token: alice)
        try await aliceSocket.chatSend(id: "c1", clone: clone, text: "secret")
        let reply = try await aliceSocket.readReply()

        for (method, uri) in [
            (HTTPMethod.GET, "/v1/clones/\(clone)"), (.DELETE, "/v1/clones/\(clone)"),
            (.GET, "/v1/conversations/\(reply.conversation)"), (.GET, "/v1/conversations/\(reply.conversation)/messages"),
        ] {
            let response = try await TestHTTPClient.request(port: server.port, method, uri, token: bob)
            #expect(response.status == .notFound, "\(method) \(uri)")
            #expect(response.errorCode == "not_found")
        }
        let patch = try await TestHTTPClient.json(
            port: server.port, .PATCH, "/v1/clones/\(clone)", token: bob, json: .object([("name", .string("Mine"))]))
        #expect(patch.status == .notFound)
        #expect(try await server.get("/v1/clones", token: bob).json()["clones"] == .array([]))
        #expect(try await server.get("/v1/conversations", token: bob).json()["conversations"] == .array([]))

        let bobSocket = try await server.connect(token: bob)
        try await bobSocket.chatSend(id: "b1", clone: clone, text: "let me in")
        #expect(
            try await bobSocket.nextJSON()
                == .object([
                    ("type", .string("error")), ("ref", .string("b1")), ("code", .string("not_found")), ("message", .string("no clone \(clone)")),
                ]))
        try await bobSocket.send(
            .object([("type", .string("stream.resume")), ("id", .string("b2")), ("stream", .string(reply.stream)), ("after", .int(0))]))
        #expect(try await bobSocket.nextJSON()["code"] == .string("stream_gone"))
        try await bobSocket.chatCancel(id: "b3", stream: reply.stream)
        #expect(try await bobSocket.nextJSON()["code"] == .string("not_found"))

        // Alice's clone and transcript are untouched.
        #expect(try await server.get("/v1/clones/\(clone)", token: alice).status == .ok)
        await server.stop()
    }

    @Test func malformedFramesGetBadRequestAndTheSocketStaysOpen() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        let bad = [
            "not json at all", "[]", #"{"id":"m1"}"#, #"{"type":"chat.send","id":"m2"}"#, #"{"type":"warp","id":"m3"}"#,
            #"{"type":"chat.send","id":"m4","clone":"x","text":"hi","extra":1}"#, #"{"type":"stream.resume","id":"m5","stream":"s"}"#,
        ]
        for text in bad {
            try await socket.send(text)
            let error = try await socket.nextJSON()
            #expect(error["type"] == .string("error"), "\(text)")
            #expect(error["code"] == .string("bad_request"), "\(text)")
        }
        try await socket.chatSend(id: "ok", clone: clone, text: "still here?")
        #expect(try await socket.readReply().reason == "complete")
        await server.stop()
    }

    @Test func oneStreamPerConversationAtATime() async throws {
        let chat = try await LongReply.start()
        let socket = chat.socket
        let other = try await chat.server.createClone(token: chat.token, name: "Bo")["id"]!.stringValue!

        try await socket.chatSend(id: "c2", clone: chat.clone, conversation: chat.conversation, text: "Interrupt")
        let busy = try await socket.next(type: "error").frame
        #expect(busy["ref"] == .string("c2"))
        #expect(busy["code"] == .string("rate_limited"))

        try await socket.chatSend(id: "c3", clone: other, conversation: chat.conversation, text: "Wrong clone")
        let wrong = try await socket.next(type: "error").frame
        #expect(wrong["ref"] == .string("c3"))
        #expect(wrong["code"] == .string("bad_request"))

        try await socket.chatCancel(id: "x", stream: chat.stream.stringValue!)
        _ = try await socket.next(type: "stream.end")
        await chat.server.stop()
    }

    @Test func shutdownEndsStreamsStoresThemAndClosesWith1001() async throws {
        let chat = try await LongReply.start()
        let server = chat.server.server
        let stopping = Task { await server.shutdown() }
        let (end, _) = try await chat.socket.next(type: "stream.end")
        #expect(end["reason"] == .string("shutdown"))
        let messageID = end["message"]?.stringValue
        #expect(messageID != nil)
        #expect(try await chat.socket.next() == .close(code: 1001, reason: "server shutting down"))
        await stopping.value

        // The partial reply was flushed to disk before the store closed.
        let store = try await SQLiteStore.open(path: chat.server.server.configuration.sqlitePath)
        let messages = try await store.messages(conversation: chat.conversation, limit: 10, before: nil)
        #expect(messages.map(\.role) == [.user, .assistant])
        #expect(messages.last?.id == messageID)
        #expect(messages.last?.reason == .shutdown)
        try await store.close()
        await chat.server.stop()
    }
}

@Suite struct CardGreetingTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func aCardsGreetingOpensEachNewConversationAndTheReplyFollowsIt(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let card = JSONValue.object([
            ("spec", .string("chara_card_v2")), ("spec_version", .string("2.0")),
            ("data", .object([("name", .string("Seraphina")), ("first_mes", .string("  Welcome, {{user}}. I am {{char}}.  "))])),
        ])
        let imported = try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones/import", token: token, json: card)
        #expect(imported.status == .created)
        let id = try imported.json()["id"]!.stringValue!
        #expect(try imported.json()["greeting"] == .string("Welcome, User. I am Seraphina."), "the clone says how its conversations open")
        let clone = try #require(try await server.server.store.clone(id: id, owner: "alice"))
        let socket = try await server.connect(token: token)

        try await socket.chatSend(id: "c1", clone: id, text: "Hello")
        let reply = try await socket.readReply()
        let messages = try await server.get("/v1/conversations/\(reply.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["role"]!.stringValue! } == ["assistant", "user", "assistant"])
        #expect(messages[0]["text"] == .string("Welcome, User. I am Seraphina."))
        let greeting = Message(id: "", conversation: "", role: .assistant, text: "Welcome, User. I am Seraphina.", createdAt: 0)
        let hello = Message(id: "", conversation: "", role: .user, text: "Hello", createdAt: 0)
        #expect(
            reply.text == expectedReply(configuration: server.server.configuration, clone: clone, history: [greeting, hello]).tokens.joined(),
            "the reply was prompted with the greeting before the user's words")

        // Once per conversation: a further turn adds none, a clone without a card has none.
        try await socket.chatSend(id: "c2", clone: id, conversation: reply.conversation, text: "Again")
        _ = try await socket.readReply()
        let after = try await server.get("/v1/conversations/\(reply.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(after.map { $0["role"]!.stringValue! } == ["assistant", "user", "assistant", "user", "assistant"])
        let plain = try await server.createClone(token: token)["id"]!.stringValue!
        try await socket.chatSend(id: "c3", clone: plain, text: "Hi")
        let other = try await socket.readReply()
        let plainMessages = try await server.get("/v1/conversations/\(other.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(plainMessages.map { $0["role"]!.stringValue! } == ["user", "assistant"])

        // The greeting is edited like any field, and the next new conversation opens with it.
        let patched = try await TestHTTPClient.json(
            port: server.port, .PATCH, "/v1/clones/\(id)", token: token,
            json: .object([("profile", .object([("first_mes", .string("Back again, {{user}}?"))]))]))
        #expect(patched.status == .ok)
        #expect(try patched.json()["profile"]?["first_mes"] == .string("Back again, {{user}}?"))
        let exported = try await server.get("/v1/clones/\(id)/card", token: token).json()
        #expect(exported["data"]?["first_mes"] == .string("Back again, {{user}}?"))
        try await socket.chatSend(id: "c4", clone: id, text: "Hello once more")
        let third = try await socket.readReply()
        let opened = try await server.get("/v1/conversations/\(third.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(opened.first?["text"] == .string("Back again, User?"))
        await server.stop()
    }

    /// A new conversation may open with one of the card's alternate greetings (`greeting`: k);
    /// the clone lists them all, expanded. An index past them, or one given with a conversation,
    /// is `bad_request`; a blank one opens with none.
    @Test func aNewConversationOpensWithTheGreetingChosen() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let card = JSONValue.object([
            ("spec", .string("chara_card_v2")), ("spec_version", .string("2.0")),
            (
                "data",
                .object([
                    ("name", .string("Seraphina")), ("first_mes", .string("Welcome, {{user}}.")),
                    ("alternate_greetings", .array([.string("{{char}} waves."), .string("  ")])),
                ])
            ),
        ])
        let imported = try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones/import", token: token, json: card)
        let id = try #require(try imported.json()["id"]?.stringValue)
        #expect(try imported.json()["greetings"] == .array([.string("Welcome, User."), .string("Seraphina waves."), .null]))
        let socket = try await server.connect(token: token)
        func send(_ ref: String, greeting: Int, conversation: String? = nil) async throws {
            try await socket.send(
                .object(
                    [("type", .string("chat.send")), ("id", .string(ref)), ("clone", .string(id)), ("text", .string("Hi"))]
                        + (conversation.map { [("conversation", .string($0))] } ?? []) + [("greeting", .int(Int64(greeting)))]))
        }
        func opening(_ conversation: String) async throws -> [String] {
            try await server.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
                .map { $0["text"]!.stringValue! }
        }
        try await send("g1", greeting: 1)
        let chosen = try await socket.readReply()
        #expect(try await opening(chosen.conversation).prefix(2) == ["Seraphina waves.", "Hi"])
        try await send("g2", greeting: 2)
        let blank = try await socket.readReply()
        #expect(try await opening(blank.conversation).first == "Hi", "a blank greeting opens with none")

        try await send("g3", greeting: 3)
        let past = try await socket.next(type: "error").frame
        #expect(past["ref"] == .string("g3") && past["code"] == .string("bad_request"))
        #expect(past["message"] == .string("clone \(id) has 2 alternate greetings: 'greeting' is 0-2"))
        try await send("g4", greeting: 0, conversation: chosen.conversation)
        let begun = try await socket.next(type: "error").frame
        #expect(begun["ref"] == .string("g4") && begun["code"] == .string("bad_request"))
        #expect(begun["message"] == .string("'greeting' chooses how a new conversation opens: leave out 'conversation'"))
        await server.stop()
    }
}
