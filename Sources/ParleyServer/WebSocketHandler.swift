import Logging
import NIOCore
import NIOWebSocket
import ParleyCore
import ParleyWebSocket

/// One authenticated WebSocket after the upgrade: answers control frames, parses text frames
/// into protocol requests for the server's services, and tells them when it opens and closes.
final class WebSocketHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private let connection: ClientConnection
    private let services: any SocketServices
    private let limits: FrameLimits
    /// How often an idle-or-not socket is pinged; a socket that sent nothing (no pong, no frame)
    /// for a whole interval after a ping is closed. nil: no keepalive.
    private let pingInterval: TimeAmount?
    private var heardSincePing = true
    /// `bytesReceived` when the last ping was written.
    private var receivedAtPing: UInt64?
    private var keepalive: Scheduled<Void>?
    /// Closes the socket when its token expires.
    private var expiry: Scheduled<Void>?
    private var frames: TokenBucket?
    /// Frames dropped in a row for the rate; past a burst's worth the socket is closed.
    private var droppedInARow = 0

    init(connection: ClientConnection, services: any SocketServices, limits: FrameLimits, pingInterval: TimeAmount? = nil, frameRate: Int? = nil) {
        self.pingInterval = pingInterval
        frames = frameRate.map { TokenBucket(rate: Double($0), burst: 2 * $0, now: NIODeadline.now().uptimeNanoseconds) }
        self.connection = connection
        self.services = services
        self.limits = limits
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { open(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        open(context: context)
        context.fireChannelActive()
    }

    private func open(context: ChannelHandlerContext) {
        guard connection.opened() else { return }
        if let refusal = services.register(connection) {
            close(context: context, code: .policyViolation, reason: refusal.reason)
            return
        }
        if let expiresAt = connection.identity.expiresAt {
            // A token's lifetime bounds its socket's: 1008 at expiry, and the client reconnects with a new one.
            let seconds = max(0, expiresAt.timeIntervalSinceNow)
            expiry = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(Int64(min(seconds, 1e9) * 1000))) { [self] in
                close(context: context, code: .policyViolation, reason: "token expired")
            }
        }
        send(ServerFrame.welcome(user: connection.identity.user, coalesce: connection.joinsTokens ? "tokens" : nil), context: context)
        services.welcomed(connection)  // scheduled messages that fired while no socket was open
        scheduleKeepalive(context: context)
    }

    /// Pings every `pingInterval`; a peer that sent nothing since the previous ping is gone
    /// (a dead network path never says so): 1011, and the socket is released at once. What the
    /// peer sent counts when its bytes reached this host, not when the loop read them: a loop
    /// that fell behind (#26) must not take its own lateness for the peer's silence.
    private func scheduleKeepalive(context: ChannelHandlerContext) {
        guard let interval = pingInterval else { return }
        keepalive = context.eventLoop.assumeIsolated().scheduleTask(in: interval) { [self] in
            guard connection.acceptsFrames, context.channel.isActive else { return }
            guard !heardSincePing else { return ping(context: context) }
            Self.bytesReceived(on: context.channel).assumeIsolated().whenSuccess { [self] received in
                guard connection.acceptsFrames, context.channel.isActive else { return }
                guard let received, let before = receivedAtPing, received > before else {
                    // Closed at once, not after the write: a dead peer may never take it.
                    connection.drop(code: .unexpectedServerError, reason: "keepalive ping timeout")
                    return
                }
                ping(context: context)
            }
        }
    }

    private func ping(context: ChannelHandlerContext) {
        heardSincePing = false
        context.writeAndFlush(
            wrapOutboundOut(WebSocketFrame(fin: true, opcode: .ping, data: context.channel.allocator.buffer(string: "parley"))),
            promise: nil)
        Self.bytesReceived(on: context.channel).assumeIsolated().whenSuccess { [self] in receivedAtPing = $0 }
        scheduleKeepalive(context: context)
    }

    /// The bytes the kernel has taken from the peer, read by the loop or not (TCP_INFO's
    /// `tcpi_bytes_received`, Linux 4.1+); nil where that cannot be known (not a TCP socket,
    /// not Linux).
    static func bytesReceived(on channel: any Channel) -> EventLoopFuture<UInt64?> {
        #if os(Linux)
        guard let socket = channel as? any SocketOptionProvider else { return channel.eventLoop.makeSucceededFuture(nil) }
        // The kernel's `struct tcp_info` only grows; the counter is its 17th 64-bit word (offset
        // 128). Glibc's `tcp_info` stops before it; an older kernel leaves it zero.
        let info: EventLoopFuture<TCPInfoWords> = socket.unsafeGetSocketOption(level: .tcp, name: .tcp_info)
        return info.map { $0.16 == 0 ? nil : $0.16 }.recover { _ in nil }
        #else
        return channel.eventLoop.makeSucceededFuture(nil)
        #endif
    }

    typealias TCPInfoWords = (
        UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64
    )

    func channelInactive(context: ChannelHandlerContext) {
        connection.channelClosed()
        keepalive?.cancel()
        expiry?.cancel()
        services.unregister(connection)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        heardSincePing = true
        switch frame.opcode {
        case .text:
            guard connection.acceptsFrames, withinFrameRate(context: context) else { return }
            let payload = frame.unmaskedData
            guard String(validating: payload.readableBytesView, as: UTF8.self) != nil else {
                close(context: context, code: .dataInconsistentWithMessage, reason: "text frames must be valid UTF-8")
                return
            }
            do {
                let request = try ClientFrame.parse(payload.readableBytesView, limits: limits)
                services.handle(request, from: connection, turn: connection.order.next())
            } catch {
                send(ServerFrame.error(error), context: context)
            }
        case .binary:
            close(context: context, code: .unacceptableData, reason: "Parley speaks JSON in text frames")
        case .ping:
            guard connection.acceptsFrames, withinFrameRate(context: context) else { return }  // each ping costs a write: a flood is limited too
            let pong = WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .connectionClose:
            // Our close answered (the handshake is complete), or the peer's echoed with its code or
            // refused as a code a peer must not send (RFC 6455 sections 5.5.1, 7.4).
            connection.peerClosed(payload: frame.unmaskedData.readableBytesView)
        default:
            break
        }
    }

    /// Whether this frame is within the socket's frame rate; a frame beyond it is answered with
    /// `rate_limited`, and a socket that goes on for a whole burst of drops is closed (1008).
    private func withinFrameRate(context: ChannelHandlerContext) -> Bool {
        guard var bucket = frames else { return true }
        defer { frames = bucket }
        if bucket.take(now: NIODeadline.now().uptimeNanoseconds) {
            droppedInARow = 0
            return true
        }
        droppedInARow += 1
        if Double(droppedInARow) > bucket.burst {
            close(context: context, code: .policyViolation, reason: "frame rate limit exceeded")
        } else if droppedInARow == 1 {
            // One error per run of drops: answering each would amplify the flood.
            send(
                ServerFrame.error(ref: nil, code: .rateLimited, message: "more than \(Int(bucket.rate)) frames a second; frames are being dropped"),
                context: context)
        }
        return false
    }

    /// NIO holds more than the socket's queue bound for a reader that is not keeping up.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if !context.channel.isWritable { connection.cutOffSlowReader() }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Closing politely: the decoder's complaints about input after its error are expected.
        guard connection.acceptsFrames else { return }
        switch error {
        case let violation as WebSocketViolation:
            close(context: context, code: violation.code, reason: violation.reason)
        case let error as NIOWebSocketError:
            close(context: context, code: error == .invalidFrameLength ? .messageTooLarge : .protocolError, reason: "\(error)")
        case let error as NIOWebSocketFrameAggregator.Error:
            switch error {
            case .accumulatedFrameSizeIsTooLarge, .tooManyFragments:
                close(context: context, code: .messageTooLarge, reason: "the message is larger than the server accepts")
            default:
                close(context: context, code: .protocolError, reason: "fragments out of order (\(error))")
            }
        default:
            context.close(promise: nil)
        }
    }

    private func send(_ bytes: [UInt8], context: ChannelHandlerContext) {
        let frame = WebSocketFrame(fin: true, opcode: .text, data: context.channel.allocator.buffer(bytes: bytes))
        context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
    }

    private func close(context: ChannelHandlerContext, code: WebSocketErrorCode, reason: String) {
        connection.close(code: code, reason: reason)
    }
}
