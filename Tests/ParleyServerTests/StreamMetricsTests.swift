import MetricsTestKit
import ParleyCore
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
        try await socket.send(#"{"type":"chat.cancel","id":"x1","stream":"\#(start["stream"]!.stringValue!)"}"#)
        var frame = try await socket.nextJSON()
        while frame["type"] != .string("stream.end") { frame = try await socket.nextJSON() }
        #expect(try metrics.expectCounter("parley_streams_ended_total", [("reason", "cancelled")]).totalValue == 1)
        #expect(try metrics.expectMeter("parley_streams_active").lastValue == 0)
        await server.stop()
    }
}

/// Polls `condition` for up to two seconds: for effects that follow a close with no event to await.
func waitUntil(_ condition: () async throws -> Bool) async throws {
    for _ in 0..<200 {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("the condition did not become true within 2 s")
}
