import MetricsTestKit
import ParleyCore
import ParleyLLM
import ParleyServer
import ParleyTestSupport
import Testing

/// The operability metrics a stream and a socket report, through a test metrics backend.
@Suite struct StreamMetricsTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func aChatStreamReportsItsTokensLatenciesAndEnd(_ store: TestServer.StoreKind) async throws {
        let metrics = TestMetrics()
        let server = try await TestServer.start(store: store) {
            $0.metrics = metrics
            $0.simulated.replyTokens = 12
            $0.simulated.tokensPerSecond = 0
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        #expect(try metrics.expectMeter("parley_sockets_open").lastValue == 1)

        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        var frame = try await socket.nextJSON()
        while frame["type"] != .string("stream.end") { frame = try await socket.nextJSON() }
        #expect(frame["reason"] == .string("complete"))

        #expect(try metrics.expectCounter("parley_tokens_total").totalValue == 12)
        #expect(try metrics.expectTimer("parley_time_to_first_token_seconds").values.count == 1)
        #expect(try metrics.expectTimer("parley_inter_token_seconds").values.count == 11)
        #expect(try metrics.expectMeter("parley_streams_active").lastValue == 0)
        #expect(try metrics.expectCounter("parley_streams_ended_total", [("reason", "complete")]).totalValue == 1)
        // Every store call is timed, on both backends.
        #expect(try metrics.expectTimer("parley_store_seconds", [("store", store == .sqlite ? "sqlite" : "mongodb")]).values.count > 3)

        await socket.drop()
        try await waitUntil { (try? metrics.expectMeter("parley_sockets_open").lastValue) == 0 }
        await server.stop()
    }

    @Test func aCancelledStreamIsCountedByItsReason() async throws {
        let metrics = TestMetrics()
        let server = try await TestServer.start {
            $0.metrics = metrics
            $0.simulated.replyTokens = 500
            $0.simulated.tokensPerSecond = 50
        }
        let token = try await server.token("bob")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Go on")
        let start = try await socket.nextJSON()
        _ = try await socket.nextJSON()  // a first token
        try await socket.chatCancel(id: "x1", stream: start["stream"]!.stringValue!)
        var frame = try await socket.nextJSON()
        while frame["type"] != .string("stream.end") { frame = try await socket.nextJSON() }
        #expect(try metrics.expectCounter("parley_streams_ended_total", [("reason", "cancelled")]).totalValue == 1)
        #expect(try metrics.expectMeter("parley_streams_active").lastValue == 0)
        await server.stop()
    }

    @Test func providerFailuresAndAFullQueueAreCountedApart() async throws {
        /// A provider that fails every reply before its first token.
        struct Failing: LLMProvider {
            func modelName(for request: CompletionRequest) -> String { "simulated" }
            func stream(_ request: CompletionRequest) -> LLMEventStream {
                LLMEventStream { $0.finish(throwing: ProviderError("the model provider answered HTTP 500")) }
            }
        }
        let metrics = TestMetrics()
        let failing = try await TestServer.start(provider: Failing()) { $0.metrics = metrics }
        let token = try await failing.token("carol")
        let clone = try await failing.createClone(token: token)["id"]!.stringValue!
        let socket = try await failing.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        #expect(try await socket.next(type: "stream.end").frame["reason"] == .string("error"))
        #expect(try metrics.expectCounter("parley_provider_errors_total", [("kind", "failed")]).totalValue == 1)
        await failing.stop()

        let busyMetrics = TestMetrics()
        let busy = try await TestServer.start {
            $0.metrics = busyMetrics
            $0.providerConcurrency = 1
            $0.providerQueue = 0
            // The first reply holds the one slot for 50 s (the server's stop ends it), so the
            // second request meets it taken however late a loaded machine runs this test's steps.
            $0.simulated.tokensPerSecond = 20
            $0.simulated.replyTokens = 1000
        }
        let dan = try await busy.token("dan")
        let danClone = try await busy.createClone(token: dan)["id"]!.stringValue!
        let first = try await busy.connect(token: dan)
        try await first.chatSend(id: "a", clone: danClone, text: "One")
        _ = try await first.readUntilToken()
        try await first.chatSend(id: "b", clone: danClone, text: "Two")
        _ = try await first.next(type: "error")
        #expect(try busyMetrics.expectCounter("parley_provider_errors_total", [("kind", "busy")]).totalValue == 1)
        #expect((try? busyMetrics.expectCounter("parley_provider_errors_total", [("kind", "failed")]).totalValue) ?? 0 == 0)
        await busy.stop()
    }
}

/// Polls `condition` for up to ten seconds: for effects that follow a close with no event to
/// await. (Only a failing test waits it out; two seconds was tight beside a loaded CI run.)
func waitUntil(_ condition: () async throws -> Bool) async throws {
    if try await !holds(within: .seconds(10), condition) { Issue.record("the condition did not become true within 10 s") }
}
