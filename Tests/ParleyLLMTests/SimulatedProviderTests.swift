import ParleyCore
import ParleyLLM
import Testing

@Suite struct SimulatedProviderTests {
    let request = CompletionRequest(
        messages: [PromptMessage(role: .system, text: "You are Ada."), PromptMessage(role: .user, text: "Tell me about gardens and music")],
        speaker: "Ada", maxOutputTokens: 1000
    )

    func provider(ttft: Duration = .zero, tps: Double = 0, reply: Int = 30) -> SimulatedProvider {
        SimulatedProvider(configuration: .init(timeToFirstToken: ttft, tokensPerSecond: tps, replyTokens: reply))
    }

    func collect(_ stream: LLMEventStream) async throws -> (tokens: [String], usage: Usage?) {
        var tokens: [String] = []
        var usage: Usage?
        for try await event in stream {
            switch event {
            case .token(let t): tokens.append(t)
            case .usage(let u): usage = u
            }
        }
        return (tokens, usage)
    }

    @Test func repliesAreDeterministicAndShapedByThePrompt() {
        let p = provider()
        #expect(p.replyTokens(for: request) == p.replyTokens(for: request))
        var other = request
        other.messages[0].text = "You are Bob."
        #expect(p.replyTokens(for: other) != p.replyTokens(for: request))
        #expect(p.replyTokens(for: request).joined().contains("Ada"))
    }

    @Test func streamsExactlyTheReplyThenExactUsage() async throws {
        let p = provider(reply: 30)
        let (tokens, usage) = try await collect(p.stream(request))
        #expect(tokens == p.replyTokens(for: request))
        #expect(tokens.count == 30)
        // Each emitted piece is one token of Parley's tokenizer, so counts are exact.
        #expect(Tokenizer.count(tokens.joined()) == 30)
        #expect(usage == Usage(inputTokens: SimulatedProvider.inputTokens(request), outputTokens: 30))
    }

    @Test func theRequestCanAskForFewerTokens() async throws {
        var short = request
        short.maxOutputTokens = 5
        let (tokens, usage) = try await collect(provider(reply: 30).stream(short))
        #expect(tokens.count == 5)
        #expect(usage?.outputTokens == 5)
    }

    @Test func cancellingTheConsumerStopsGeneration() async throws {
        let p = provider(ttft: .zero, tps: 50, reply: 10_000)
        let (first, firstContinuation) = AsyncStream<Void>.makeStream()
        let consumer = Task { () -> (count: Int, sawUsage: Bool) in
            var count = 0
            var sawUsage = false
            do {
                for try await event in p.stream(request) {
                    switch event {
                    case .token:
                        count += 1
                        if count == 1 { firstContinuation.yield() }
                    case .usage:
                        sawUsage = true
                    }
                }
            } catch is CancellationError {}
            return (count, sawUsage)
        }
        for await _ in first { break }
        consumer.cancel()
        let result = try await consumer.value
        #expect(!result.sawUsage)
        #expect(result.count < 10_000)
    }
}
