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
    static let interval: Duration = .seconds(1)

    /// A server on one loop of its own, so a test can hold that loop; pinging every `interval`.
    /// `onPing` sees the server's pings as they arrive, on the client's event loop.
    func start(
        onPing: (@Sendable (any EventLoop, [UInt8], @escaping @Sendable () -> Void) -> Void)? = nil
    ) async throws -> (TestServer, MultiThreadedEventLoopGroup, TestWebSocket) {
        var configuration = ServerConfiguration()
        configuration.eventLoopThreads = 1
        let group = ParleyServer.eventLoops(configuration)
        let server = try await TestServer.start(eventLoopGroup: group) {
            $0.eventLoopThreads = 1
            $0.webSocketPingInterval = Self.interval
        }
        let loop = group.next()
        var seen: (@Sendable ([UInt8], @escaping @Sendable () -> Void) -> Void)?
        if let onPing { seen = { payload, pong in onPing(loop, payload, pong) } }
        let socket = try await TestWebSocket.connect(port: server.port, token: try await server.token("alice"), pings: true, onPing: seen)
        #expect(try await socket.nextJSON()["type"] == .string("welcome"))
        return (server, group, socket)
    }

    @Test func aPeerThatAnsweredWhileTheLoopWasBusyIsPingedAgainNotClosed() async throws {
        // At the first ping the server's only loop is held past the ping's whole interval, and
        // the pong is sent once it is held: the pong reaches the server's kernel meanwhile and is
        // read only after the keepalive has judged (NIO runs the timers due before it polls
        // again). All of it on event loops, so the test's own tasks' delays do not matter.
        let first = Atomic(true)
        let (server, group, socket) = try await start { serverLoop, _, pong in
            guard first.exchange(false, ordering: .relaxed) else { return }
            // The server wrote the ping before it arrived here: its verdict is due before this.
            let due = NIODeadline.now() + TimeAmount(Self.interval) + .milliseconds(200)
            serverLoop.execute {
                pong()
                while NIODeadline.now() < due {}
            }
        }
        guard case .ping(let payload) = try await socket.next() else {
            Issue.record("no first ping")
            return
        }
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
