import NIOCore
import NIOEmbedded
import NIOWebSocket
import ParleyCore
import ParleyDeflate
import ParleyWebSocket

// libFuzzer's entry point: every input goes through the socket's inbound path (NIO's frame
// decoder, Parley's frame validator, the permessage-deflate handler, the fragment aggregator,
// the protocol frame parser, the close-frame check) and through the hand-written parsers of untrusted input (extension
// offers, JSON, character cards, card PNGs).
// An error thrown is the expected answer to bad input; a crash, a trap or a leak is a bug.

/// Ends the inbound path: what a text frame turns into, as the WebSocket handler parses it.
final class ParseSink: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if frame.opcode == .text {
            _ = try? ClientFrame.parse(frame.unmaskedData.readableBytesView, limits: FrameLimits())
        } else if frame.opcode == .connectionClose {
            _ = CloseFrame.answer(to: frame.unmaskedData.readableBytesView)
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {}
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let channel = EmbeddedChannel()
    try? channel.pipeline.syncOperations.addHandlers([
        ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: 1 << 16)),
        WebSocketFrameValidator(allowsRSV1: true),
        PerMessageDeflateHandler(agreement: DeflateAgreement(serverWindowBits: 12, serverNoContextTakeover: false, level: 6),
                                 maxMessageBytes: 1 << 16),
        NIOWebSocketFrameAggregator(minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 64, maxAccumulatedFrameSize: 1 << 16),
        ParseSink(),
    ])
    // Split the input in two reads, so frames straddle reads as they do on a socket.
    let cut = bytes.isEmpty ? 0 : Int(bytes[0]) % (bytes.count + 1)
    _ = try? channel.writeInbound(ByteBuffer(bytes: bytes[..<cut]))
    _ = try? channel.writeInbound(ByteBuffer(bytes: bytes[cut...]))
    _ = try? channel.finish()

    _ = PerMessageDeflate.negotiate(offers: [String(decoding: bytes, as: UTF8.self)], settings: DeflateSettings())
    _ = try? ClientFrame.parse(bytes, limits: FrameLimits())
    _ = CloseFrame.answer(to: bytes)
    if let json = try? JSONValue.parse(bytes) {
        _ = try? CharacterCard.parse(json)
        _ = json.serializedString()
    }
    _ = try? CardPNG.card(in: bytes)
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`; hand it to libFuzzer's driver
// (the archive's own main is then never pulled in).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
) -> CInt

@_cdecl("parley_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { fuzz($0, $1) }
}
