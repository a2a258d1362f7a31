import NIOCore
import NIOEmbedded
import NIOWebSocket
import ParleyDeflate
import ParleyWebSocket
import Testing

/// permessage-deflate on an EmbeddedChannel: validator, deflate handler and aggregator as the
/// server installs them, with a collector in the WebSocket handler's place.
@Suite struct PerMessageDeflateHandlerTests {
    final class Collector: ChannelInboundHandler {
        typealias InboundIn = WebSocketFrame
        var messages: [WebSocketFrame] = []
        var errors: [any Error] = []
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { messages.append(unwrapInboundIn(data)) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { errors.append(error) }
    }

    final class Fixture {
        let loop = EmbeddedEventLoop()
        let channel: EmbeddedChannel
        let deflate: PerMessageDeflateHandler
        let collector = Collector()
        let allocator = ByteBufferAllocator()

        init(noContextTakeover: Bool = false, maxMessageBytes: Int = 4096) throws {
            channel = EmbeddedChannel(loop: loop)
            deflate = PerMessageDeflateHandler(
                agreement: DeflateAgreement(serverWindowBits: 12, serverNoContextTakeover: noContextTakeover, level: 6),
                maxMessageBytes: maxMessageBytes, idleRelease: .seconds(30))
            try channel.pipeline.syncOperations.addHandlers([
                WebSocketFrameValidator(allowsRSV1: true), deflate,
                NIOWebSocketFrameAggregator(minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 64, maxAccumulatedFrameSize: maxMessageBytes),
                collector,
            ])
        }

        func compressed(_ text: String) -> ByteBuffer {
            Deflater(windowBits: 15, resetsEachMessage: true).compress(ByteBuffer(string: text), allocator: allocator)
        }

        /// One client frame, masked as a client must.
        func send(_ opcode: WebSocketOpcode, _ data: ByteBuffer, fin: Bool = true, rsv1: Bool) throws {
            let key = WebSocketMaskingKey.random()
            var masked = data
            masked.webSocketMask(key)
            try channel.writeInbound(WebSocketFrame(fin: fin, rsv1: rsv1, opcode: opcode, maskKey: key, data: masked))
        }

        var violation: WebSocketViolation? { collector.errors.last as? WebSocketViolation }
    }

    @Test func outboundMessagesAreCompressedWithContextTakeover() throws {
        let f = try Fixture()
        let inflater = Inflater(limit: 1 << 16)
        var sizes: [Int] = []
        for seq in 1...20 {
            let text = #"{"type":"token","stream":"st_1","seq":\#(seq),"text":" hello"}"#
            try f.channel.writeOutbound(WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: text)))
            let frame = try #require(try f.channel.readOutbound(as: WebSocketFrame.self))
            #expect(frame.rsv1 && frame.opcode == .text && frame.fin)
            var out = ByteBuffer()
            try inflater.inflate(frame.data, final: true, into: &out)
            #expect(String(buffer: out) == text)
            sizes.append(frame.data.readableBytes)
        }
        #expect(sizes.last! * 3 < sizes.first!, "\(sizes)")
    }

    @Test func binaryMessagesGoUncompressedAndTheWindowStaysGood() throws {
        let f = try Fixture()
        let inflater = Inflater(limit: 1 << 16)
        let audio = ByteBuffer(bytes: [0x01] + (0..<4_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        for text in [#"{"type":"token","seq":1}"#, nil, #"{"type":"token","seq":2}"#] {
            if let text {
                try f.channel.writeOutbound(WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: text)))
                let frame = try #require(try f.channel.readOutbound(as: WebSocketFrame.self))
                var out = ByteBuffer()
                try inflater.inflate(frame.data, final: true, into: &out)
                #expect(frame.rsv1 && String(buffer: out) == text, "text around it still inflates with the shared window")
            } else {
                try f.channel.writeOutbound(WebSocketFrame(fin: true, opcode: .binary, data: audio))
                let frame = try #require(try f.channel.readOutbound(as: WebSocketFrame.self))
                #expect(!frame.rsv1 && frame.opcode == .binary && frame.data == audio)
            }
        }
    }

    @Test func controlFramesAreNeverCompressed() throws {
        let f = try Fixture()
        try f.channel.writeOutbound(WebSocketFrame(fin: true, opcode: .ping, data: ByteBuffer(string: "parley")))
        let ping = try #require(try f.channel.readOutbound(as: WebSocketFrame.self))
        #expect(!ping.rsv1 && String(buffer: ping.data) == "parley")
    }

    @Test func aCompressedFragmentedMessageArrivesWhole() throws {
        let f = try Fixture()
        let text = String(repeating: #"{"type":"chat.send","text":"hi"} "#, count: 20)
        var compressed = f.compressed(text)
        let first = compressed.readSlice(length: compressed.readableBytes / 2)!
        try f.send(.text, first, fin: false, rsv1: true)
        try f.send(.ping, ByteBuffer(string: "between"), rsv1: false)  // control frames may interleave
        try f.send(.continuation, compressed, rsv1: false)
        #expect(f.collector.errors.isEmpty)
        #expect(f.collector.messages.map(\.opcode) == [.ping, .text])
        #expect(String(buffer: f.collector.messages[1].unmaskedData) == text)
        #expect(f.deflate.heldBytes == 0, "no inflater is kept between messages")
    }

    @Test func uncompressedMessagesPassThrough() throws {
        let f = try Fixture()
        try f.send(.text, ByteBuffer(string: "plain"), rsv1: false)
        #expect(f.collector.messages.map { String(buffer: $0.unmaskedData) } == ["plain"])
    }

    @Test func aBombIsTooLarge() throws {
        let f = try Fixture(maxMessageBytes: 4096)
        let bomb = Deflater(windowBits: 15, resetsEachMessage: true).compress(ByteBuffer(repeating: 0x20, count: 1 << 20), allocator: f.allocator)
        try f.send(.text, bomb, rsv1: true)
        #expect(f.violation?.code == .messageTooLarge)
        #expect(f.collector.messages.isEmpty)
    }

    @Test func aBombSpreadOverFragmentsIsTooLarge() throws {
        let f = try Fixture(maxMessageBytes: 4096)
        var bomb = Deflater(windowBits: 15, resetsEachMessage: true).compress(ByteBuffer(repeating: 0x20, count: 1 << 20), allocator: f.allocator)
        try f.send(.text, bomb.readSlice(length: bomb.readableBytes / 2)!, fin: false, rsv1: true)
        try f.send(.continuation, bomb, rsv1: false)
        #expect(f.violation?.code == .messageTooLarge)
    }

    @Test func rsv1OnAContinuationOrAControlFrameIsAProtocolError() throws {
        let f = try Fixture()
        var compressed = f.compressed("hello there")
        try f.send(.text, compressed.readSlice(length: 2)!, fin: false, rsv1: true)
        try f.send(.continuation, compressed, rsv1: true)
        #expect(f.violation?.code == .protocolError)

        let g = try Fixture()
        try g.send(.ping, g.compressed("ping"), rsv1: true)
        #expect(g.violation?.code == .protocolError)
    }

    @Test func corruptDataIsInconsistentWithTheMessage() throws {
        let f = try Fixture()
        try f.send(.text, ByteBuffer(bytes: [0xFF, 0xFF, 0xFF, 0x00]), rsv1: true)
        #expect(f.violation?.code == .dataInconsistentWithMessage)
    }

    @Test func withoutNegotiationRSV1IsRefusedByTheValidator() throws {
        let channel = EmbeddedChannel()
        let collector = Collector()
        try channel.pipeline.syncOperations.addHandlers([WebSocketFrameValidator(), collector])
        try channel.writeInbound(WebSocketFrame(fin: true, rsv1: true, opcode: .text, maskKey: .random(), data: ByteBuffer(string: "x")))
        #expect((collector.errors.last as? WebSocketViolation)?.code == .protocolError)
    }

    @Test func anIdleCompressorIsReleasedAndRecreated() throws {
        let f = try Fixture()
        func write() throws {
            try f.channel.writeOutbound(WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: "hello hello hello")))
            _ = try f.channel.readOutbound(as: WebSocketFrame.self)
        }
        try write()
        #expect(f.deflate.heldBytes > 0)
        f.loop.advanceTime(by: .seconds(20))
        try write()  // in use: kept through the next check
        f.loop.advanceTime(by: .seconds(15))
        #expect(f.deflate.heldBytes > 0)
        f.loop.advanceTime(by: .seconds(30))
        #expect(f.deflate.heldBytes == 0)
        try write()
        #expect(f.deflate.heldBytes > 0)
    }
}
