import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket
import ParleyCore

/// What a test WebSocket receives.
public enum TestInbound: Sendable, Equatable {
    case text(String)
    case binary([UInt8])
    case pong([UInt8])
    /// Only for a socket connected with `pings: true` or an `onPing` (this client never answers
    /// one itself).
    case ping([UInt8])
    case close(code: UInt16?, reason: String)
    /// The TCP connection ended.
    case disconnected
}

/// A test expectation about the wire that did not hold (nothing arrived, or the wrong thing).
public struct TestTimeout: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

public struct UpgradeRefused: Error {}

/// A WebSocket client for tests, built on NIO's client upgrader. Frames are read in order with
/// `next()`, which fails after a watchdog timeout instead of hanging the suite.
public final class TestWebSocket {
    private enum Event: Sendable {
        case inbound(TestInbound)
        case timedOut(UInt64)
    }

    private let channel: any Channel
    private var iterator: AsyncStream<Event>.AsyncIterator
    private let continuation: AsyncStream<Event>.Continuation
    private var waits: UInt64 = 0
    private var ended = false

    private init(channel: any Channel, stream: AsyncStream<Event>, continuation: AsyncStream<Event>.Continuation) {
        self.channel = channel
        self.iterator = stream.makeAsyncIterator()
        self.continuation = continuation
    }

    /// Connects and upgrades. Throws `UpgradeRefused` when the server answers anything but 101
    /// (use `TestHTTPClient` to see that answer).
    /// `receiveBuffer` sets SO_RCVBUF before connecting (a small one makes a slow reader's
    /// backlog pile up on the server instead of in this kernel).
    /// `observe` sees every text message on the event loop the moment it is decoded, with its
    /// arrival time (benchmarks time deliveries with it); messages it returns true for are
    /// consumed, the others queue for `next` as usual. `pings` queues the server's pings too;
    /// `onPing` also sees each as it arrives, on the event loop, with a function that sends its
    /// pong (callable from any thread, at once or later).
    public static func connect(
        port: Int, uri: String = "/v1/ws", token: String? = nil, headers: HTTPHeaders = [:], receiveBuffer: Int? = nil,
        pings: Bool = false, observe: (@Sendable (ByteBuffer, ContinuousClock.Instant) -> Bool)? = nil,
        onPing: (@Sendable (_ payload: [UInt8], _ pong: @escaping @Sendable () -> Void) -> Void)? = nil
    ) async throws -> TestWebSocket {
        let (stream, continuation) = AsyncStream<Event>.makeStream()
        var headers = headers
        headers.replaceOrAdd(name: "host", value: "127.0.0.1:\(port)")
        headers.replaceOrAdd(name: "content-length", value: "0")
        if let token { headers.replaceOrAdd(name: "authorization", value: "Bearer \(token)") }
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: uri, headers: headers)

        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        if let receiveBuffer { bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: SocketOptionValue(receiveBuffer)) }
        let result: EventLoopFuture<(any Channel)?> =
            try await bootstrap
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let upgrader = NIOTypedWebSocketClientUpgrader<(any Channel)?>(
                        maxFrameSize: 1 << 24,
                        upgradePipelineHandler: { channel, _ in
                            channel.eventLoop.makeCompletedFuture {
                                try channel.pipeline.syncOperations.addHandler(
                                    FrameCollector(continuation: continuation, pings: pings || onPing != nil, onPing: onPing, observe: observe))
                                return channel
                            }
                        }
                    )
                    let configuration = NIOTypedHTTPClientUpgradeConfiguration<(any Channel)?>(
                        upgradeRequestHead: head,
                        upgraders: [upgrader],
                        notUpgradingCompletionHandler: { channel in
                            channel.close(promise: nil)
                            return channel.eventLoop.makeSucceededFuture(nil)
                        }
                    )
                    var pipeline = NIOUpgradableHTTPClientPipelineConfiguration(upgradeConfiguration: configuration)
                    // Frames the server sends right after its 101 share a read with it; the
                    // default (.dropBytes) would silently lose them.
                    pipeline.leftOverBytesStrategy = .forwardBytes
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: pipeline)
                }
            }
        let upgraded: (any Channel)?
        do {
            upgraded = try await result.get()
        } catch {
            throw UpgradeRefused()
        }
        guard let channel = upgraded else { throw UpgradeRefused() }
        // The async connect API turns autoRead off for NIOAsyncChannel; this client reads with a
        // plain handler, so turn it back on (and read what came with the 101, e.g. the welcome).
        try await channel.setOption(.autoRead, value: true).get()
        channel.read()
        return TestWebSocket(channel: channel, stream: stream, continuation: continuation)
    }

    /// Sends a text message (masked, as a client must).
    public func send(_ text: String) async throws {
        try await send(WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: text)))
    }

    public func send(_ json: JSONValue) async throws {
        try await send(json.serializedString())
    }

    public func send(_ frame: WebSocketFrame) async throws {
        var frame = frame
        if frame.maskKey == nil { frame.maskKey = .random() }
        try await channel.writeAndFlush(frame)
    }

    /// Puts a `timedOut` marker in the stream after `timeout`; the token tells this wait's marker
    /// from an earlier one's.
    private func startWatchdog(_ timeout: Duration) -> (UInt64, Task<Void, any Error>) {
        waits += 1
        let token = waits
        let continuation = self.continuation
        return (
            token,
            Task {
                try await Task.sleep(for: timeout)
                continuation.yield(.timedOut(token))
            }
        )
    }

    /// How long a read waits for a frame by default: only a failing test waits it out. 10 s
    /// was too little on a slow machine for tests whose every step goes through the one-thread
    /// MongoDB wire test server.
    public static let patience: Duration = .seconds(30)

    /// The next thing received, or `TestTimeout` after `timeout`.
    public func next(timeout: Duration = TestWebSocket.patience) async throws -> TestInbound {
        if ended { return .disconnected }
        let (token, watchdog) = startWatchdog(timeout)
        defer { watchdog.cancel() }
        while let event = await iterator.next() {
            switch event {
            case .timedOut(let t) where t == token:
                throw TestTimeout(description: "nothing received within \(timeout)")
            case .timedOut:
                continue
            case .inbound(let inbound):
                if inbound == .disconnected { ended = true }
                return inbound
            }
        }
        ended = true
        return .disconnected
    }

    /// Text messages up to and including the first for which `last` is true, under one watchdog
    /// for the whole batch (cheaper than `next` per message when there are thousands).
    public func texts(until last: (String) -> Bool, timeout: Duration = .seconds(30)) async throws -> [String] {
        if ended { throw TestTimeout(description: "disconnected") }
        let (token, watchdog) = startWatchdog(timeout)
        defer { watchdog.cancel() }
        var texts: [String] = []
        while let event = await iterator.next() {
            switch event {
            case .timedOut(let t) where t == token:
                throw TestTimeout(description: "no end of batch within \(timeout) (\(texts.count) messages)")
            case .timedOut:
                continue
            case .inbound(.text(let text)):
                texts.append(text)
                if last(text) { return texts }
            case .inbound(.disconnected):
                ended = true
                throw TestTimeout(description: "disconnected after \(texts.count) messages")
            case .inbound:
                continue
            }
        }
        throw TestTimeout(description: "disconnected after \(texts.count) messages")
    }

    /// The next text message parsed as JSON; fails on anything else.
    public func nextJSON(timeout: Duration = TestWebSocket.patience) async throws -> JSONValue {
        let inbound = try await next(timeout: timeout)
        guard case .text(let text) = inbound else {
            throw TestTimeout(description: "expected a text frame, got \(inbound)")
        }
        return try JSONValue.parse(Array(text.utf8))
    }

    /// Reads JSON frames until one has `type == type`, returning it and those skipped before it.
    /// A timeout names the type awaited and the last frames skipped (an `error` among them is
    /// usually why).
    public func next(type: String, timeout: Duration = TestWebSocket.patience) async throws -> (frame: JSONValue, skipped: [JSONValue]) {
        var skipped: [JSONValue] = []
        while true {
            let frame: JSONValue
            do {
                frame = try await nextJSON(timeout: timeout)
            } catch let timeout as TestTimeout {
                let last = skipped.suffix(3).map { $0.serializedString() }
                throw TestTimeout(
                    description: "no \(type) frame: \(timeout.description); \(skipped.count) skipped before, the last: \(last)")
            }
            if frame["type"] == .string(type) { return (frame, skipped) }
            skipped.append(frame)
        }
    }

    /// Stops reading from the socket (a client that stalls); `resumeReading` starts again.
    public func pauseReading() async throws {
        try await channel.setOption(.autoRead, value: false).get()
    }

    public func resumeReading() async throws {
        try await channel.setOption(.autoRead, value: true).get()
        channel.read()
    }

    /// Closes the TCP connection without a closing handshake (a dropped network).
    public func drop() async {
        try? await channel.close()
    }

    /// Sends a close frame with `code`.
    public func sendClose(code: WebSocketErrorCode = .normalClosure) async throws {
        var data = ByteBuffer()
        data.write(webSocketErrorCode: code)
        try await send(WebSocketFrame(fin: true, opcode: .connectionClose, data: data))
    }

    private final class FrameCollector: ChannelInboundHandler {
        typealias InboundIn = WebSocketFrame
        let continuation: AsyncStream<Event>.Continuation
        let pings: Bool
        let onPing: (@Sendable ([UInt8], @escaping @Sendable () -> Void) -> Void)?
        let observe: (@Sendable (ByteBuffer, ContinuousClock.Instant) -> Bool)?

        init(
            continuation: AsyncStream<Event>.Continuation, pings: Bool, onPing: (@Sendable ([UInt8], @escaping @Sendable () -> Void) -> Void)?,
            observe: (@Sendable (ByteBuffer, ContinuousClock.Instant) -> Bool)?
        ) {
            self.continuation = continuation
            self.pings = pings
            self.onPing = onPing
            self.observe = observe
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let frame = unwrapInboundIn(data)
            var payload = frame.unmaskedData
            switch frame.opcode {
            case .text:
                if let observe, observe(payload, .now) { return }
                continuation.yield(.inbound(.text(String(buffer: payload))))
            case .binary: continuation.yield(.inbound(.binary(Array(payload.readableBytesView))))
            case .pong: continuation.yield(.inbound(.pong(Array(payload.readableBytesView))))
            case .ping where pings:
                let bytes = Array(payload.readableBytesView)
                if let onPing {
                    let channel = context.channel
                    onPing(bytes) {
                        let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: ByteBuffer(bytes: bytes))
                        channel.writeAndFlush(pong, promise: nil)
                    }
                }
                continuation.yield(.inbound(.ping(bytes)))
            case .connectionClose:
                let code = payload.readableBytes >= 2 ? payload.readInteger(as: UInt16.self) : nil
                continuation.yield(.inbound(.close(code: code, reason: String(buffer: payload))))
            default: break
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            continuation.yield(.inbound(.disconnected))
            continuation.finish()
        }
    }
}
