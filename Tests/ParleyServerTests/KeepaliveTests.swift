import NIOCore
import NIOPosix
import NIOWebSocket
import ParleyServer
import ParleyTestSupport
import Synchronization
import Testing

/// The keepalive on real sockets: a peer is judged silent by what reached this host since the
/// ping, not by what the server's loop has read of it (#26: a loop that fell behind closed live
/// sockets with 1011).
@Suite struct KeepaliveTests {
    static let interval: Duration = .milliseconds(400)

    /// A server on one loop of its own, so a test can hold that loop; pinging every `interval`.
    func start() async throws -> (TestServer, MultiThreadedEventLoopGroup, TestWebSocket) {
        var configuration = ServerConfiguration()
        configuration.eventLoopThreads = 1
        let group = ParleyServer.eventLoops(configuration)
        let server = try await TestServer.start(eventLoopGroup: group) {
            $0.eventLoopThreads = 1
            $0.webSocketPingInterval = Self.interval
        }
        let socket = try await TestWebSocket.connect(port: server.port, token: try await server.token("alice"), pings: true)
        #expect(try await socket.nextJSON()["type"] == .string("welcome"))
        return (server, group, socket)
    }

    @Test func aPeerThatAnsweredWhileTheLoopWasBusyIsPingedAgainNotClosed() async throws {
        let (server, group, socket) = try await start()
        guard case .ping(let payload) = try await socket.next() else {
            Issue.record("no first ping")
            return
        }
        let pinged = NIODeadline.now()  // the server wrote it before this

        // Hold the server's only loop past the ping's whole interval; the pong reaches the
        // server's kernel meanwhile and is read only after the keepalive has run (NIO runs the
        // timers due before it polls again).
        let (holding, held) = AsyncStream<Void>.makeStream()
        let sentAt = Atomic<UInt64>(0)  // uptime nanoseconds; 0 until the pong is written
        let due = pinged + TimeAmount(Self.interval) + .milliseconds(100)
        let hold = group.next().submit {
            held.yield()
            // Past the keepalive's deadline, and long enough after the write for loopback to deliver it.
            while true {
                let sent = sentAt.load(ordering: .acquiring)
                if sent != 0, NIODeadline.now() >= max(due, .uptimeNanoseconds(sent) + .milliseconds(50)) { break }
            }
        }
        var iterator = holding.makeAsyncIterator()
        await iterator.next()
        try await socket.send(WebSocketFrame(fin: true, opcode: .pong, data: ByteBuffer(bytes: payload)))
        sentAt.store(NIODeadline.now().uptimeNanoseconds, ordering: .releasing)
        try await hold.get()

        let after = try await socket.next()
        #expect(after == .ping(payload), "pinged again, not closed: \(after)")
        await socket.drop()
        await server.stop()
        try await group.shutdownGracefully()
    }

    @Test func aPeerThatSentNothingSinceThePingIsStillClosed() async throws {
        let (server, group, socket) = try await start()
        guard case .ping = try await socket.next() else {
            Issue.record("no first ping")
            return
        }
        // It sent its upgrade request before the ping, and nothing after.
        let closed = try await socket.next()
        #expect(closed == .close(code: 1011, reason: "keepalive ping timeout"))
        await server.stop()
        try await group.shutdownGracefully()
    }
}
