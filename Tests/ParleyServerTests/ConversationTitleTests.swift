import ParleyCore
import ParleyLLM
@testable import ParleyServer
import ParleyTestSupport
import Testing

/// The simulated model, except that a title's request waits until the test lets it answer.
final class HeldTitles: LLMProvider {
    static let title = "Tea, briefly"
    private let chat = SimulatedProvider(configuration: .init(timeToFirstToken: .zero, tokensPerSecond: 0, replyTokens: 8))
    let (asked, ask) = AsyncStream<Void>.makeStream()
    private let (released, release) = AsyncStream<Void>.makeStream()

    func modelName(for request: CompletionRequest) -> String { chat.modelName(for: request) }

    func stream(_ request: CompletionRequest) -> LLMEventStream {
        guard request.messages.first?.text.hasPrefix("You name conversations") == true else { return chat.stream(request) }
        let (stream, continuation) = LLMEventStream.makeStream()
        let (released, ask) = (self.released, self.ask)
        Task {
            ask.yield()
            var iterator = released.makeAsyncIterator()
            _ = await iterator.next()
            continuation.yield(.token(Self.title))
            continuation.yield(.usage(Usage(inputTokens: 20, outputTokens: 3)))
            continuation.finish()
        }
        return stream
    }

    func answer() { release.yield() }
}

/// A new conversation's title (#24): the first line of the first message, cleaned; with
/// `generatedTitles`, what the clone's model writes after the first reply, metered.
@Suite struct ConversationTitleTests {
    @Test func theFirstLineCleanedIsTheTitleByDefault() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("tom")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        let text = "## **What   is** a `good` life, and how would one know it when one had lived it well?\nSecond line"
        try await socket.chatSend(id: "c1", clone: clone, text: text)
        let reply = try await socket.readReply()
        let conversation = try await server.get("/v1/conversations/\(reply.conversation)", token: token).json()
        #expect(conversation["title"] == .string("What is a good life, and how would one know it when one…"))
        await server.stop()
    }

    /// ASCII text is cleaned in one pass over its bytes (#26): the same title as Character by
    /// Character, which any other text still takes.
    @Test func aTitleIsCleanedAsCharacterByCharacter() {
        let texts = [
            "", "   ", "\n\n", "Tell me something short about the sea.", "## **What   is** a `good` life?\nSecond line", "##\nHello",
            "  > “Quoted” _words_:  \r\nnext", "a.", ".", "Done:", "word\u{2028}next", "tab\there\u{3000}ideographic space",
            "emoji 👩‍👩‍👧 family and flags 🇫🇷 go on and on and on until the title must be cut somewhere", String(repeating: "x", count: 61),
            String(repeating: "é", count: 60), String(repeating: "ab ", count: 30), "one two three four five six seven eight nine ten eleven twelve.",
            String(repeating: "word ", count: 11) + "end.", "café\u{301} naïve e\u{301}", "#\u{301} mark", "\u{85}after a next-line",
        ]
        for text in texts { #expect(ConversationTitles.clean(text) == ConversationTitles.cleanByCharacter(text), "\(text.debugDescription)") }
        var random = SplitMix64(seed: 26)
        let alphabet = Array("ab  .:#*`_>\"\n\r\t\u{0B}\u{0C}x")
        for _ in 0..<2_000 {
            let text = String((0..<Int(random.next() % 90)).map { _ in alphabet[Int(random.next() % UInt64(alphabet.count))] })
            #expect(ConversationTitles.clean(text) == ConversationTitles.cleanByCharacter(text), "\(text.debugDescription)")
        }
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func theClonesModelTitlesANewConversationAfterItsFirstReplyMetered(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store) { $0.generatedTitles = true }
        let token = try await server.token("tom")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Tell me about tea")
        let reply = try await socket.readReply()
        let titled = try await socket.next(type: "conversation.title").frame
        #expect(titled["conversation"] == .string(reply.conversation))
        let title = try #require(titled["title"]?.stringValue)
        #expect(!title.isEmpty && title != "Tell me about tea" && !title.contains("\n"))
        #expect(try await server.get("/v1/conversations/\(reply.conversation)", token: token).json()["title"] == .string(title))
        let entries = try await server.get("/v1/credits?limit=50", token: token).json()["entries"]?.arrayValue ?? []
        let charged = entries.filter { $0["feature"] == .string("title") }
        #expect(!charged.isEmpty && charged.allSatisfy { $0["conversation"] == .string(reply.conversation) })

        // Later replies do not retitle it: only the new conversation gets a title frame.
        try await socket.chatSend(id: "c2", clone: clone, conversation: reply.conversation, text: "And coffee?")
        let second = try await socket.readReply()
        let renamed = try await TestHTTPClient.json(
            port: server.port, .PATCH, "/v1/conversations/\(reply.conversation)", token: token, json: .object([("title", .string("Drinks"))]))
        #expect(renamed.status == .ok && second.reason == "complete")
        try await socket.chatSend(id: "c3", clone: clone, text: "Tell me about juice")
        let third = try await socket.readReply()
        try await socket.chatSend(id: "c4", clone: clone, conversation: third.conversation, text: "More?")
        // A socket's next request starts once the one before it has its stream, not once that
        // one's title is written: the third conversation's title may come before or after the
        // fourth reply's end (the assumption that it came first failed one full run in four).
        var titles: [JSONValue] = []
        var ended = false
        while !ended || titles.isEmpty {
            let frame = try await socket.nextJSON()
            if frame["type"] == .string("conversation.title") { titles.append(frame["conversation"] ?? .null) }
            if frame["type"] == .string("stream.end") { ended = true }
        }
        #expect(titles == [.string(third.conversation)])
        #expect(try await server.get("/v1/conversations/\(reply.conversation)", token: token).json()["title"] == .string("Drinks"))
        await server.stop()
    }

    /// A reply's title is written in the reply's own task after its stream ended (the request
    /// that opened the stream ended as it started, #26): that work is still a request in flight,
    /// which the shutdown waits for, so the title is stored.
    @Test func aShutdownWaitsForATitleStillBeingWrittenAfterItsReply() async throws {
        let model = HeldTitles()
        let server = try await TestServer.start(provider: model) { $0.generatedTitles = true }
        let token = try await server.token("tom")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Tell me about tea")
        let reply = try await socket.readReply()
        #expect(reply.reason == "complete")
        var asked = model.asked.makeAsyncIterator()
        _ = await asked.next()
        // No stream is live any more, yet work is in flight: a drain with no grace says so.
        #expect(server.server.chat.streams.hub.liveStreams.isEmpty)
        #expect(await server.server.chat.streams.drain(grace: .zero) == false)
        model.answer()
        let restarted = try await server.restarted()
        let conversation = try await restarted.get("/v1/conversations/\(reply.conversation)", token: token).json()
        #expect(conversation["title"] == .string(HeldTitles.title))
        await restarted.stop()
    }
}
