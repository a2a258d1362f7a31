import NIOCore
import NIOWebSocket
import ParleyDeflate

/// permessage-deflate (RFC 7692) on one socket, between the frame validator and the fragment
/// aggregator. Inbound, a message whose first frame has RSV1 set is decompressed fragment by
/// fragment, at most `maxMessageBytes` in all (more is closed 1009: a compression bomb costs at
/// most the limit), and passed on as plain frames. Outbound, every whole text message is
/// compressed; binary ones (audio) and control frames never are.
///
/// Outbound the compressor keeps its window across messages (context takeover, unless the
/// client asked otherwise): token frames repeat their keys, so each costs a fraction of its size.
/// That state is per socket, so a fan-out frame is encoded once as JSON and compressed per
/// socket, like encryption would be. The compressor is created on a socket's first message and
/// dropped after `idleRelease` without one, so an idle socket holds none; starting again from an
/// empty window is always valid for the client's decompressor. Inbound, the response asked for
/// `client_no_context_takeover`, so an inflater lives only for the message it decodes.
public final class PerMessageDeflateHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = WebSocketFrame
    public typealias InboundOut = WebSocketFrame
    public typealias OutboundIn = WebSocketFrame
    public typealias OutboundOut = WebSocketFrame

    private let agreement: DeflateAgreement
    private let maxMessageBytes: Int
    private let idleRelease: TimeAmount
    private var deflater: Deflater?
    private var usedSinceCheck = false
    private var releaseCheck: Scheduled<Void>?
    /// The inflater of the compressed message being received, if one is.
    private var inflater: Inflater?
    private var failed = false

    public init(agreement: DeflateAgreement, maxMessageBytes: Int, idleRelease: TimeAmount = .seconds(30)) {
        self.agreement = agreement
        self.maxMessageBytes = maxMessageBytes
        self.idleRelease = idleRelease
    }

    /// Bytes zlib holds for this socket now (its compressor and any message being decompressed).
    public var heldBytes: Int { (deflater?.heldBytes ?? 0) + (inflater?.heldBytes ?? 0) }

    public func handlerRemoved(context: ChannelHandlerContext) {
        releaseCheck?.cancel()
        deflater = nil
        inflater = nil
    }

    public func channelInactive(context: ChannelHandlerContext) {
        releaseCheck?.cancel()
        deflater = nil
        inflater = nil
        context.fireChannelInactive()
    }

    // MARK: inbound

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text, .binary:
            if inflater != nil {
                // A new message before the compressed one ended: the aggregator reports it.
                inflater = nil
                context.fireChannelRead(data)
            } else if frame.rsv1 {
                inflater = Inflater(limit: maxMessageBytes)
                inflate(frame, context: context)
            } else {
                context.fireChannelRead(data)
            }
        case .continuation:
            if frame.rsv1 {
                fail(context: context, WebSocketViolation(code: .protocolError, reason: "RSV1 set on a continuation frame"))
            } else if inflater != nil {
                inflate(frame, context: context)
            } else {
                context.fireChannelRead(data)
            }
        default:
            if frame.rsv1 {
                fail(context: context, WebSocketViolation(code: .protocolError, reason: "control frames cannot be compressed"))
            } else {
                context.fireChannelRead(data)
            }
        }
    }

    private func inflate(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        guard let inflater else { return }
        var out = context.channel.allocator.buffer(capacity: min(maxMessageBytes, max(256, frame.length * 4)))
        do {
            try inflater.inflate(frame.unmaskedData, final: frame.fin, into: &out)
        } catch {
            let code: WebSocketErrorCode = if case .tooLarge = error { .messageTooLarge } else { .dataInconsistentWithMessage }
            fail(context: context, WebSocketViolation(code: code, reason: "\(error)"))
            return
        }
        if frame.fin { self.inflater = nil }
        context.fireChannelRead(wrapInboundOut(WebSocketFrame(fin: frame.fin, opcode: frame.opcode, data: out)))
    }

    private func fail(context: ChannelHandlerContext, _ violation: WebSocketViolation) {
        failed = true
        inflater = nil
        context.fireErrorCaught(violation)
    }

    // MARK: outbound

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = unwrapOutboundIn(data)
        // Binary messages are a voiced reply's PCM (#29): it hardly compresses and zlib's time per
        // byte was most of what relaying audio cost, so it goes as it is (RSV1 clear: RFC 7692
        // leaves each message's compression to the sender; the window is unaffected).
        guard frame.fin, !frame.rsv1, frame.opcode == .text else {
            context.write(data, promise: promise)
            return
        }
        let compressed = compressor(context: context).compress(frame.data, allocator: context.channel.allocator)
        usedSinceCheck = true
        context.write(wrapOutboundOut(WebSocketFrame(fin: true, rsv1: true, opcode: frame.opcode, data: compressed)), promise: promise)
    }

    private func compressor(context: ChannelHandlerContext) -> Deflater {
        if let deflater { return deflater }
        let made = Deflater(
            level: Int32(agreement.level), windowBits: agreement.serverWindowBits,
            resetsEachMessage: agreement.serverNoContextTakeover)
        deflater = made
        scheduleReleaseCheck(context: context)
        return made
    }

    /// Drops the compressor after a whole `idleRelease` without a message.
    private func scheduleReleaseCheck(context: ChannelHandlerContext) {
        releaseCheck = context.eventLoop.assumeIsolated().scheduleTask(in: idleRelease) { [self] in
            if usedSinceCheck {
                usedSinceCheck = false
                scheduleReleaseCheck(context: context)
            } else {
                deflater = nil
                releaseCheck = nil
            }
        }
    }
}
