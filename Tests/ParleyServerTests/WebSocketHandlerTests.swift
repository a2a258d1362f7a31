import Logging
import NIOCore
import NIOEmbedded
import NIOWebSocket
import ParleyCore
import ParleyLLM
import ParleyStore
@testable import ParleyServer
import ParleyTestSupport
import Foundation
import Synchronization
import Testing

/// The WebSocket handler on an EmbeddedChannel with stand-in services: control frames, bad input,
/// what the services are told and asked, with no sockets, store or services involved.
@Suite struct WebSocketHandlerTests {
    /// Stands in for the server's services: records what the handler asks of them.
    final class RecordingServices: SocketServices {
        struct State {
            var open: [String] = []
            var welcomed: [String] = []
            var requests: [ClientFrame] = []
        }

        let state = Mutex(State())
        let capacity: Int

        init(capacity: Int = 1) {
            self.capacity = capacity
        }

        func register(_ connection: ClientConnection) -> SocketHub.Refusal? {
            state.withLock { s in
                guard s.open.count < capacity else { return .tooManySockets }
                s.open.append(connection.id)
                return nil
            }
        }

        func welcomed(_ connection: ClientConnection) { state.withLock { $0.welcomed.append(connection.id) } }

        func handle(_ request: ClientFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
            state.withLock { $0.requests.append(request) }
            turn.runSoon {}
        }

        func unregister(_ connection: ClientConnection) { state.withLock { $0.open.removeAll { $0 == connection.id } } }

        var open: [String] { state.withLock { $0.open } }
    }

    final class Fixture {
        let loop = EmbeddedEventLoop()
        let channel: EmbeddedChannel
        let services: RecordingServices
        let connection: ClientConnection

        init(pingInterval: TimeAmount? = nil, frameRate: Int? = nil, services: RecordingServices = RecordingServices()) async throws {
            channel = EmbeddedChannel(loop: loop)
            self.services = services
            connection = ClientConnection(id: "conn_1", identity: Identity(user: "alice", role: nil), channel: channel)
            try channel.pipeline.syncOperations.addHandler(
                WebSocketHandler(connection: connection, services: services, limits: FrameLimits(), pingInterval: pingInterval, frameRate: frameRate))
            try await channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).get()
        }

        func inbound(_ opcode: WebSocketOpcode, _ bytes: [UInt8]) throws {
            try channel.writeInbound(WebSocketFrame(fin: true, opcode: opcode, data: ByteBuffer(bytes: bytes)))
        }

        func outbound() throws -> WebSocketFrame? {
            try channel.readOutbound(as: WebSocketFrame.self)
        }

        func outboundJSON() throws -> JSONValue? {
            guard let frame = try outbound() else { return nil }
            #expect(frame.opcode == .text)
            return try JSONValue.parse(frame.unmaskedData.readableBytesView)
        }

        func finish() async throws {
            _ = try? channel.finish()
        }
    }

    func closeCode(_ frame: WebSocketFrame?) -> WebSocketErrorCode? {
        guard let frame, frame.opcode == .connectionClose else { return nil }
        var data = frame.unmaskedData
        return data.readWebSocketErrorCode()
    }

    @Test func welcomesTheUserAndTellsTheServicesWhenItOpensAndCloses() async throws {
        let f = try await Fixture()
        #expect(try f.outboundJSON() == .object([("type", .string("welcome")), ("user", .string("alice")), ("protocol", .int(1))]))
        #expect(f.services.open == ["conn_1"] && f.services.state.withLock { $0.welcomed } == ["conn_1"])
        try await f.channel.close()
        #expect(f.services.open.isEmpty)
        try await f.finish()
    }

    @Test func aSocketBeyondTheUsersLimitIsClosedWith1008AndNotWelcomed() async throws {
        let f = try await Fixture(services: RecordingServices(capacity: 0))
        let close = try f.outbound()
        #expect(closeCode(close) == .policyViolation)
        #expect(close.map { String(buffer: $0.unmaskedData).hasSuffix("too many open sockets for this user") } == true)
        #expect(try f.outbound() == nil && f.services.state.withLock { $0.welcomed }.isEmpty)
        try await f.finish()
    }

    @Test func requestsGoToTheServicesParsedAndInOrder() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        try f.inbound(.text, Array(#"{"type":"room.join","id":"j1","room":"rm_1"}"#.utf8))
        try f.inbound(.text, Array(#"{"type":"room.control","id":"c1","room":"rm_1","action":"start"}"#.utf8))
        try f.inbound(.text, Array(#"{"type":"chat.cancel","id":"x1","stream":"st_1"}"#.utf8))
        #expect(
            f.services.state.withLock { $0.requests } == [
                .room(.join(id: "j1", room: "rm_1", language: nil)),
                .room(.control(id: "c1", room: "rm_1", action: .start, target: nil)),
                .chat(.cancel(id: "x1", stream: "st_1")),
            ])
        #expect(try f.outbound() == nil, "nothing is answered by the handler itself")
        try await f.finish()
    }

    @Test func answersPingWithPong() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        try f.inbound(.ping, Array("are you there".utf8))
        let pong = try f.outbound()
        #expect(pong?.opcode == .pong)
        #expect(pong.map { Array($0.unmaskedData.readableBytesView) } == Array("are you there".utf8))
        try await f.finish()
    }

    @Test func malformedJSONIsAnErrorFrameAndTheSocketStaysOpen() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        try f.inbound(.text, Array("{not json".utf8))
        #expect(try f.outboundJSON()?["code"] == .string("bad_request"))
        try f.inbound(.text, Array(#"{"type":"nope","id":"n1"}"#.utf8))
        let error = try f.outboundJSON()
        #expect(error?["ref"] == .string("n1"))
        #expect(error?["message"] == .string("unknown frame type 'nope'"))
        #expect(f.channel.isActive)
        try await f.finish()
    }

    @Test func invalidUTF8ClosesWith1007() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        try f.inbound(.text, [0x7B, 0xFF, 0xFE, 0x7D])
        #expect(closeCode(try f.outbound()) == .dataInconsistentWithMessage)
        #expect(!f.channel.isActive)
        try await f.finish()
    }

    @Test func binaryFramesCloseWith1003() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        try f.inbound(.binary, [1, 2, 3])
        #expect(closeCode(try f.outbound()) == .unacceptableData)
        #expect(!f.channel.isActive)
        try await f.finish()
    }

    @Test func theServerPingsAndClosesAPeerThatStoppedAnswering() async throws {
        let f = try await Fixture(pingInterval: .seconds(30))
        _ = try f.outbound()
        f.loop.advanceTime(by: .seconds(29))
        #expect(try f.outbound() == nil, "no ping before the interval")
        f.loop.advanceTime(by: .seconds(1))
        let ping = try f.outbound()
        #expect(ping?.opcode == .ping)
        // A pong (any frame would do) keeps it open through the next interval, which pings again.
        try f.inbound(.pong, ping.map { Array($0.unmaskedData.readableBytesView) } ?? [])
        f.loop.advanceTime(by: .seconds(30))
        #expect(try f.outbound()?.opcode == .ping)
        #expect(f.channel.isActive)
        // Silence for a whole interval after that ping: closed with 1011 and released.
        f.loop.advanceTime(by: .seconds(30))
        let close = try f.outbound()
        #expect(closeCode(close) == .unexpectedServerError)
        #expect(close.map { String(buffer: $0.unmaskedData).hasSuffix("keepalive ping timeout") } == true)
        #expect(!f.channel.isActive && f.services.open.isEmpty)
        try await f.finish()
    }

    @Test func framesBeyondTheRateAreDroppedWithOneErrorThenTheSocketIsClosed() async throws {
        // 2 frames a second, bursts of 4: the test sends far faster than the bucket refills.
        let f = try await Fixture(frameRate: 2)
        _ = try f.outbound()
        for n in 0..<4 {
            try f.inbound(.text, Array(#"{"type":"nope","id":"n\#(n)"}"#.utf8))
            #expect(try f.outboundJSON()?["ref"] == .string("n\(n)"), "within the burst each frame is answered")
        }
        try f.inbound(.text, Array(#"{"type":"nope","id":"over"}"#.utf8))
        let limited = try f.outboundJSON()
        #expect(limited?["code"] == .string("rate_limited") && limited?["ref"] == nil)
        for _ in 0..<3 { try f.inbound(.text, Array(#"{"type":"nope","id":"x"}"#.utf8)) }
        #expect(try f.outbound() == nil, "the drops that follow are silent")
        #expect(f.channel.isActive)
        try f.inbound(.text, Array(#"{"type":"nope","id":"x"}"#.utf8))
        #expect(closeCode(try f.outbound()) == .policyViolation, "a burst's worth of drops in a row closes it")
        #expect(!f.channel.isActive)
        try await f.finish()
    }

    @Test func aPingFloodIsLimitedLikeAnyOtherFrames() async throws {
        let f = try await Fixture(frameRate: 1)  // bursts of 2
        _ = try f.outbound()
        for _ in 0..<3 { try f.inbound(.ping, Array("p".utf8)) }
        #expect(try f.outbound()?.opcode == .pong)
        #expect(try f.outbound()?.opcode == .pong)
        #expect(try f.outboundJSON()?["code"] == .string("rate_limited"), "the third ping is dropped, not answered")
        #expect(try f.outbound() == nil)
        try await f.finish()
    }

    @Test func withoutAnIntervalNothingIsPinged() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        f.loop.advanceTime(by: .hours(2))
        #expect(try f.outbound() == nil && f.channel.isActive)
        try await f.finish()
    }

    @Test func aServerCloseAnsweredByThePeerIsOneCloseFrameAndNothingIsServedMeanwhile() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        f.connection.close(code: .goingAway, reason: "server shutting down")
        f.connection.close(code: .policyViolation, reason: "account deleted")
        #expect(closeCode(try f.outbound()) == .goingAway)
        #expect(try f.outbound() == nil, "the second reason sends no second frame")
        try f.inbound(.text, Array(#"{"type":"chat.cancel","id":"x1","stream":"st_1"}"#.utf8))
        try f.inbound(.ping, Array("p".utf8))
        #expect(try f.outbound() == nil && f.services.state.withLock { $0.requests }.isEmpty, "a closing socket serves nothing")
        var data = ByteBuffer()
        data.write(webSocketErrorCode: .goingAway)
        try f.channel.writeInbound(WebSocketFrame(fin: true, opcode: .connectionClose, data: data))
        #expect(try f.outbound() == nil, "the peer's answer completes the handshake; it is not echoed")
        #expect(!f.channel.isActive && f.services.open.isEmpty)
        try await f.finish()
    }

    @Test func aPeerCloseIsEchoedWithItsCode() async throws {
        let f = try await Fixture()
        _ = try f.outbound()
        var data = ByteBuffer()
        data.write(webSocketErrorCode: .goingAway)
        try f.channel.writeInbound(WebSocketFrame(fin: true, opcode: .connectionClose, data: data))
        #expect(closeCode(try f.outbound()) == .goingAway)
        #expect(!f.channel.isActive)
        try await f.finish()
    }
}

@Suite struct RouterTests {
    func router() -> Router<Int> {
        var r = Router<Int>()
        r.add(.GET, "/v1/clones") { _, _, _ in HTTPResponse(.ok) }
        r.add(.GET, "/v1/clones/:id") { _, p, _ in HTTPResponse(.ok, json: .string(p["id"]!)) }
        r.add(.DELETE, "/v1/clones/:id") { _, _, _ in HTTPResponse(.noContent) }
        return r
    }

    @Test func matchesLiteralAndParameterSegments() {
        guard case .found(_, let parameters) = router().match(.GET, path: "/v1/clones/cl_1") else {
            Issue.record("no match")
            return
        }
        #expect(parameters == ["id": "cl_1"])
        guard case .found(_, let none) = router().match(.GET, path: "/v1/clones/") else {
            Issue.record("no match for the trailing slash")
            return
        }
        #expect(none.isEmpty)
    }

    @Test func distinguishesUnknownPathsFromWrongMethods() {
        guard case .notFound = router().match(.GET, path: "/v1/nothing") else {
            Issue.record("expected 404")
            return
        }
        guard case .methodNotAllowed(let allowed) = router().match(.PUT, path: "/v1/clones/x") else {
            Issue.record("expected 405")
            return
        }
        #expect(allowed == [.GET, .DELETE])
    }
}

@Suite struct RateLimiterTests {
    @Test func eachAddressHasItsOwnBucket() {
        let limiter = RateLimiter.perAddress(rate: 1)  // bursts of 2
        #expect(limiter.allow("10.0.0.1", now: 0) && limiter.allow("10.0.0.1", now: 0))
        #expect(!limiter.allow("10.0.0.1", now: 0) && limiter.isLimited("10.0.0.1", now: 0))
        #expect(limiter.allow("10.0.0.2", now: 0) && !limiter.isLimited("10.0.0.2", now: 0))
        #expect(limiter.allow("10.0.0.1", now: 1_000_000_000), "a second later one more")
        #expect((0..<10).allSatisfy { _ in limiter.allow("127.0.0.1", now: 0) }, "loopback is exempt unless asked")
        let strict = RateLimiter.perAddress(rate: 1, limitsLoopback: true)
        #expect(strict.allow("127.0.0.1", now: 0) && strict.allow("127.0.0.1", now: 0) && !strict.allow("127.0.0.1", now: 0))
    }

    @Test func memoryIsBoundedByForgettingIdleAddresses() {
        let limiter = RateLimiter(rate: 1, maxTracked: 100)
        for i in 0..<1_000 { _ = limiter.allow("10.0.\(i / 256).\(i % 256)", now: UInt64(i) * 1_000_000_000) }
        #expect(limiter.tracked <= 100)
        // A busy address seen just now is not forgotten while others are idle.
        #expect(limiter.allow("10.9.9.9", now: 2_000_000_000_000) && limiter.allow("10.9.9.9", now: 2_000_000_000_000))
        #expect(!limiter.allow("10.9.9.9", now: 2_000_000_000_000))
    }

    /// A flood of new addresses, none idle: a sweep makes room for a quarter more at once, so
    /// the table is not swept (copied) again at every new address.
    @Test func aFloodOfNewAddressesIsSweptAQuarterAtATime() {
        let limiter = RateLimiter(rate: 1, maxTracked: 100)
        var sizes: [Int] = []
        for i in 0..<1_000 {
            _ = limiter.allow("10.1.\(i / 256).\(i % 256)", now: 0)
            sizes.append(limiter.tracked)
        }
        #expect(sizes.max() == 100 && sizes.dropFirst(100).min() == 76)
        // An address held back now outlives the sweeps that the others' handshakes cause.
        #expect(limiter.allow("10.9.9.9", now: 0) && limiter.allow("10.9.9.9", now: 0))
        for i in 0..<300 {
            _ = limiter.allow("10.2.\(i / 256).\(i % 256)", now: 0)
            #expect(!limiter.allow("10.9.9.9", now: 0))
        }
    }
}
