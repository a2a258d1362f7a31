import NIOCore
import NIOWebSocket

/// Checks each frame as it arrives, before fragments are reassembled, for what NIO's decoder
/// lets through: client frames must be masked, no reserved bit may be set (RSV1 only when the
/// socket negotiated permessage-deflate, whose handler checks where it may appear), and reserved
/// opcodes are errors (RFC 6455 section 5). A violation is raised as
/// `WebSocketViolation` for the handler to close with its code; nothing after it is read.
public final class WebSocketFrameValidator: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = WebSocketFrame
    public typealias InboundOut = WebSocketFrame

    private var failed = false
    private let allowsRSV1: Bool

    public init(allowsRSV1: Bool = false) {
        self.allowsRSV1 = allowsRSV1
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let frame = unwrapInboundIn(data)
        let problem: String? =
            if frame.maskKey == nil { "client frames must be masked" } else if (frame.rsv1 && !allowsRSV1) || frame.rsv2 || frame.rsv3 {
                "reserved bits set without a negotiated extension"
            } else if !Self.known.contains(frame.opcode) { "reserved opcode \(frame.opcode)" } else { nil }
        guard let problem else {
            context.fireChannelRead(data)
            return
        }
        failed = true
        context.fireErrorCaught(WebSocketViolation(code: .protocolError, reason: problem))
    }

    static let known: [WebSocketOpcode] = [.continuation, .text, .binary, .connectionClose, .ping, .pong]
}

/// A frame-level protocol error and the close code it earns.
public struct WebSocketViolation: Error {
    public var code: WebSocketErrorCode
    public var reason: String

    public init(code: WebSocketErrorCode, reason: String) {
        self.code = code
        self.reason = reason
    }
}
