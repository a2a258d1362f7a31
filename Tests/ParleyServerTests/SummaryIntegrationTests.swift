import ParleyCore
import ParleyLLM
import ParleyServer
import ParleyTestSupport
import Synchronization
import Testing

/// A model that answers chat briefly and summarizes faithfully: its summary keeps the previous
/// summary and every line of the user's that says "Remember", cut to the tokens it is allowed,
/// oldest first (the way a model told to keep the user's facts does); asked for facts, it lists
/// what follows each "Remember:". It records every request.
final class SummarizingModel: LLMProvider {
    let requests = Mutex<[CompletionRequest]>([])

    func modelName(for request: CompletionRequest) -> String { "simulated" }

    static func isSummary(_ request: CompletionRequest) -> Bool {
        request.messages.first?.text.hasPrefix("You keep the running summary") == true
    }

    static func isFacts(_ request: CompletionRequest) -> Bool {
        request.messages.first?.text.hasPrefix("You note what a user says") == true
    }

    func stream(_ request: CompletionRequest) -> LLMEventStream {
        requests.withLock { $0.append(request) }
        var text = "Noted."
        if Self.isSummary(request), let body = request.messages.last?.text {
            let sections = body.components(separatedBy: "\n\nNew messages:\n")
            let previous = sections[0].replacingOccurrences(of: "Summary so far:\n", with: "")
            var kept = previous == "(none yet)" ? [] : previous.components(separatedBy: " ")
            for line in sections.last!.split(separator: "\n") where line.contains("Remember") {
                kept += line.split(separator: " ").map(String.init)
            }
            while Tokenizer.count(kept.joined(separator: " ")) > request.maxOutputTokens { kept.removeLast() }
            text = kept.joined(separator: " ")
        } else if Self.isFacts(request), let body = request.messages.last?.text {
            let said = body.components(separatedBy: "\n\nMessages from ").last ?? ""
            let facts = said.split(separator: "\n").compactMap { line in line.range(of: "Remember: ").map { "- " + line[$0.upperBound...] } }
            text = facts.isEmpty ? "none" : facts.joined(separator: "\n")
        }
        let tokens = Tokenizer.tokens(text).map(String.init)
        return LLMEventStream { continuation in
            for token in tokens { continuation.yield(.token(token)) }
            let input = Tokenizer.count(request.messages.map(\.text).joined(separator: "\n"))
            continuation.yield(.usage(Usage(inputTokens: input, outputTokens: tokens.count)))
            continuation.finish()
        }
    }

    var chatPrompts: [CompletionRequest] { requests.withLock { $0.filter { !Self.isSummary($0) && !Self.isFacts($0) } } }
    var summaryPrompts: [CompletionRequest] { requests.withLock { $0.filter(Self.isSummary) } }
}

/// The rolling summary (#24) over the real socket: a fact said in the first turn is still in the
/// prompt 200 turns later, long after the turn itself left it, and no prompt outgrows its budget.
@Suite struct SummaryIntegrationTests {
    @Test func aFactSaidEarlyReachesThePromptAfter200Turns() async throws {
        let model = SummarizingModel()
        let budget = 300
        let server = try await TestServer.start(provider: model) {
            $0.contextBudgetTokens = budget
            $0.maxFramesPerSecond = nil  // 200 turns as fast as they stream
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "t1", clone: clone, text: "Remember: my sister is called Wilhelmina.")
        let conversation = try await socket.readReply().conversation
        for turn in 2...200 {
            try await socket.chatSend(
                id: "t\(turn)", clone: clone, conversation: conversation, text: "Turn \(turn): what do you make of today's weather?")
            #expect(try await socket.readReply().reason == "complete")
        }

        let last = try #require(model.chatPrompts.last)
        #expect(last.messages.last?.text.hasPrefix("Turn 200:") == true)
        let system = try #require(last.messages.first)
        #expect(system.role == .system && system.text.contains("What was said earlier in this conversation, in short:"))
        #expect(system.text.contains("Wilhelmina"), "the summary carries the first turn's fact")
        #expect(!last.messages.dropFirst().contains { $0.text.contains("Wilhelmina") }, "the turn itself left the prompt long ago")
        for prompt in model.chatPrompts {
            let tokens = prompt.messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
            #expect(tokens <= budget)
        }
        // Folded every few turns, not every turn, each fold paid as feature `summary`.
        let folds = model.summaryPrompts.count
        #expect(folds > 5 && folds < 100, "\(folds) folds")
        let ledger = try await server.get("/v1/credits?limit=100", token: token).json()["entries"]?.arrayValue ?? []
        #expect(ledger.contains { $0["feature"] == .string("summary") })
        let stored = try await server.get("/v1/conversations/\(conversation)", token: token).json()
        #expect(stored["summary"]?["text"]?.stringValue?.contains("Wilhelmina") == true)
        let through = try #require(stored["summary"]?["through"]?.stringValue)
        // The summary covers the oldest turns; the newest turns follow it in the prompt.
        let path = try await server.path(conversation, token: token)
        let index = try #require(path.firstIndex { $0["id"]?.stringValue == through })
        #expect(index < path.count - 2)

        // The clone learnt the fact, once, as a memory entry the user sees; a new conversation
        // with it starts knowing it.
        let memory = try await server.get("/v1/clones/\(clone)", token: token).json()["memory"]?.arrayValue ?? []
        #expect(memory.filter { $0.stringValue?.contains("Wilhelmina") == true }.count == 1, "\(memory)")
        try await socket.chatSend(id: "fresh", clone: clone, text: "Hello again")
        _ = try await socket.readReply()
        #expect(model.chatPrompts.last?.messages.first?.text.contains("- my sister is called Wilhelmina.") == true)
        await server.stop()
    }

    /// A summary that ran through a message an edit took off the path describes another branch:
    /// the prompt leaves it out until a new fold.
    @Test func aSummaryOfAnotherBranchIsLeftOut() async throws {
        let model = SummarizingModel()
        let server = try await TestServer.start(provider: model) { $0.contextBudgetTokens = 200 }
        let token = try await server.token("bob")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "t1", clone: clone, text: "Remember: I live in Lisbon.")
        let conversation = try await socket.readReply().conversation
        var turn = 1
        while model.summaryPrompts.isEmpty {
            turn += 1
            try await socket.chatSend(id: "t\(turn)", clone: clone, conversation: conversation, text: "Turn \(turn): tell me something.")
            _ = try await socket.readReply()
        }
        let first = try #require(try await server.path(conversation, token: token).first?["id"]?.stringValue)
        try await socket.chatEdit(id: "e1", message: first, text: "Remember: I live in Porto.")
        _ = try await socket.readReply()
        let edited = try #require(model.chatPrompts.last)
        #expect(!edited.messages[0].text.contains("What was said earlier"), "the summary was of the Lisbon branch")
        #expect(edited.messages.last?.text == "Remember: I live in Porto.")
        await server.stop()
    }
}
