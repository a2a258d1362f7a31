import Logging
import NIOCore
import NIOWebSocket
import ParleyCore

/// One authenticated WebSocket after the upgrade: answers control frames, parses text frames
/// into protocol requests for `ChatService`, and keeps the hub's view of the user's sockets.
final class WebSocketHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private let connection: ClientConnection
    private let chat: ChatService
    private let schedules: ScheduleService
    private let rooms: RoomService
    private let hub: StreamHub
    private let limits: FrameLimits
    private var opened = false
    private var closing = false

    init(connection: ClientConnection, chat: ChatService, schedules: ScheduleService, rooms: RoomService, hub: StreamHub, limits: FrameLimits) {
        self.connection = connection
        self.chat = chat
        self.schedules = schedules
        self.rooms = rooms
        self.hub = hub
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
        guard !opened else { return }
        opened = true
        hub.add(connection)
        send(ServerFrame.welcome(user: connection.identity.user), context: context)
        schedules.connected(connection)  // scheduled messages that fired while no socket was open
    }

    func channelInactive(context: ChannelHandlerContext) {
        hub.remove(connection)
        rooms.disconnected(connection)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            guard !closing else { return }
            let payload = frame.unmaskedData
            guard String(validating: payload.readableBytesView, as: UTF8.self) != nil else {
                close(context: context, code: .dataInconsistentWithMessage, reason: "text frames must be valid UTF-8")
                return
            }
            do {
                let request = try ClientFrame.parse(payload.readableBytesView, limits: limits)
                switch request {
                case .scheduleCreate, .scheduleCancel: schedules.handle(request, from: connection)
                case .roomJoin, .roomLeave, .roomSay, .roomControl: rooms.handle(request, from: connection)
                default: chat.handle(request, from: connection)
                }
            } catch {
                send(ServerFrame.error(error), context: context)
            }
        case .binary:
            close(context: context, code: .unacceptableData, reason: "Parley speaks JSON in text frames")
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .connectionClose:
            if closing {
                // The peer answered our close: the handshake is complete.
                context.close(promise: nil)
            } else {
                // Echo the peer's status code, then close (RFC 6455 section 5.5.1).
                var data = frame.unmaskedData
                let code = data.readableBytes >= 2 ? data.readWebSocketErrorCode() ?? .normalClosure : .normalClosure
                close(context: context, code: code, reason: "")
            }
        default:
            break
        }
    }

    /// NIO holds more than the socket's queue bound for a reader that is not keeping up.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if !context.channel.isWritable { connection.cutOffSlowReader() }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let error = error as? NIOWebSocketError {
            let code: WebSocketErrorCode = switch error {
            case .invalidFrameLength: .messageTooLarge
            default: .protocolError
            }
            close(context: context, code: code, reason: "\(error)")
        } else {
            context.close(promise: nil)
        }
    }

    private func send(_ bytes: [UInt8], context: ChannelHandlerContext) {
        let frame = WebSocketFrame(fin: true, opcode: .text, data: context.channel.allocator.buffer(bytes: bytes))
        context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
    }

    private func close(context: ChannelHandlerContext, code: WebSocketErrorCode, reason: String) {
        guard !closing else { return }
        closing = true
        _ = connection.close(code: code, reason: reason)
    }
}
