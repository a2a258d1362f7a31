import NIOCore
import NIOEmbedded
import NIOWebSocket
import ParleyCore
@testable import ParleyServer
import Testing

/// How frames leave a socket: encoded once for many sockets, written past the pipeline's
/// encoder, and flushed once per event-loop tick whatever the number of frames.
@Suite struct FlushBatchTests {
    /// Counts the flushes that reach the socket (it sits at the head, after the encoder).
    final class FlushCounter: ChannelOutboundHandler {
        typealias OutboundIn = ByteBuffer
        var flushes = 0
        func flush(context: ChannelHandlerContext) {
            flushes += 1
            context.flush()
        }
    }

    final class Socket {
        let loop: EmbeddedEventLoop
        let channel: EmbeddedChannel
        let counter = FlushCounter()
        let connection: ClientConnection

        /// `straight`: whole frames go to the channel itself, past the counter too (no TLS).
        init(
            batch: FlushBatch? = nil, loop: EmbeddedEventLoop? = nil, joinsTokens: Bool = false, maxQueuedBytes: Int = 4 * 1024 * 1024,
            straight: Bool = false
        ) throws {
            self.loop = loop ?? EmbeddedEventLoop()
            channel = EmbeddedChannel(loop: self.loop)
            try channel.pipeline.syncOperations.addHandlers([counter, WebSocketFrameEncoder()])
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            connection = ClientConnection(
                id: "c1", identity: Identity(user: "ann", role: nil), channel: channel, maxQueuedBytes: maxQueuedBytes, flushes: batch,
                joinsTokens: joinsTokens)
            try connection.writePastEncoder(straightToSocket: straight)
        }

        /// The bytes that reached the socket, buffer by buffer.
        func written() throws -> [[UInt8]] {
            var out: [[UInt8]] = []
            while let buffer = try channel.readOutbound(as: ByteBuffer.self) { out.append(Array(buffer.readableBytesView)) }
            return out
        }

        /// The texts of the frames that reached the socket, in order (a buffer may carry several
        /// frames, or a header alone when NIO's encoder wrote it).
        func frames() throws -> [String] {
            let bytes = try written().joined().map { $0 }
            var texts: [String] = []
            var at = 0
            while at + 2 <= bytes.count {
                // Unmasked server frames with a 7-bit length, as these tests' frames are.
                #expect(bytes[at] == 0x81 && bytes[at + 1] < 126)
                let end = min(bytes.count, at + 2 + Int(bytes[at + 1]))
                texts.append(String(decoding: bytes[(at + 2)..<end], as: UTF8.self))
                at = end
            }
            return texts
        }
    }

    /// Closes the channel from inside a write, as a socket whose write fails does.
    final class FailingSocket: ChannelOutboundHandler {
        typealias OutboundIn = ByteBuffer
        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            promise?.fail(ChannelError.ioOnClosedChannel)
            context.close(promise: nil)
        }
    }

    /// Tells the connection its channel closed, as `WebSocketHandler` does.
    final class ClosedNotifier: ChannelInboundHandler {
        typealias InboundIn = Never
        var connection: ClientConnection?
        func channelInactive(context: ChannelHandlerContext) { connection?.channelClosed() }
    }

    /// What NIO's own encoder writes for a frame of `payload`, all its buffers joined.
    func encodedByNIO(_ payload: ByteBuffer, opcode: WebSocketOpcode) throws -> [UInt8] {
        let channel = EmbeddedChannel(handler: WebSocketFrameEncoder())
        try channel.writeAndFlush(WebSocketFrame(fin: true, opcode: opcode, data: payload)).wait()
        var bytes: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { bytes += buffer.readableBytesView }
        return bytes
    }

    @Test(arguments: [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000])
    func aFrameEncodedOnceIsWhatNIOsEncoderWrites(size: Int) throws {
        // JSON goes as text; anything else (a voiced reply's audio, #29) as binary.
        let json = ByteBuffer(bytes: Array("{".utf8) + (1..<max(1, size)).map { _ in UInt8(ascii: "a") })
        #expect(WireFrame.opcode(of: json) == .text)
        #expect(Array(WireFrame.text(json, allocator: ByteBufferAllocator()).readableBytesView) == (try encodedByNIO(json, opcode: .text)))
        let audio = ByteBuffer(bytes: (0..<size).map { UInt8(truncatingIfNeeded: $0 + 1) })
        let opcode: WebSocketOpcode = size == 0 ? .text : .binary
        #expect(WireFrame.opcode(of: audio) == opcode)
        #expect(Array(WireFrame.text(audio, allocator: ByteBufferAllocator()).readableBytesView) == (try encodedByNIO(audio, opcode: opcode)))
    }

    /// Both ways to the socket: through the handlers after the encoder (TLS), or straight to the
    /// channel, which skips them (the counter sees nothing then).
    @Test(arguments: [false, true])
    func framesWrittenInOneTickLeaveWithOneFlushInOrder(straight: Bool) throws {
        let socket = try Socket(straight: straight)
        for text in ["a", "b", "c"] { socket.connection.send(ByteBuffer(string: text)) }
        #expect(socket.counter.flushes == 0)
        #expect(try socket.written().isEmpty)
        socket.loop.run()
        #expect(socket.counter.flushes == (straight ? 0 : 1))
        // Handed to the socket as one buffer, the frames back to back.
        let expected = ["a", "b", "c"].flatMap { Array(WireFrame.text(ByteBuffer(string: $0), allocator: ByteBufferAllocator()).readableBytesView) }
        #expect(try socket.written() == [expected])
        // The next tick's frame gets a flush of its own.
        socket.connection.send(ByteBuffer(string: "d"))
        #expect(try socket.written().isEmpty)
        socket.loop.run()
        #expect(socket.counter.flushes == (straight ? 0 : 2))
        #expect(try socket.written().count == 1)
    }

    @Test(arguments: [false, true])
    func aFrameThroughThePipelineKeepsItsPlaceAfterBatchedOnes(straight: Bool) throws {
        let socket = try Socket(straight: straight)
        socket.connection.send(ByteBuffer(string: "token"))
        socket.connection.close(code: .goingAway, reason: "bye")  // through the encoder, flushed at once
        socket.loop.run()
        let written = try socket.written()
        #expect(written.first == Array(WireFrame.text(ByteBuffer(string: "token"), allocator: ByteBufferAllocator()).readableBytesView))
        #expect(written.dropFirst().joined().first == 0x88)  // FIN + close
    }

    /// A scheduled message's confirmed write goes through the pipeline at once: the frames
    /// kept for the tick's flush are handed over first.
    @Test(arguments: [false, true])
    func aConfirmedWriteKeepsItsPlaceAfterFramesKeptForTheFlush(straight: Bool) throws {
        let socket = try Socket(straight: straight)
        socket.connection.send(ByteBuffer(string: "{\"a\":1}"))
        let confirmed = socket.connection.write(ByteBuffer(string: "{\"b\":2}"))
        socket.loop.run()
        try confirmed.wait()
        let frames = try socket.frames()
        #expect(frames == [#"{"a":1}"#, #"{"b":2}"#])
    }

    /// Frames kept for the flush count against the socket's bound: a tick's worth beyond it cuts
    /// the socket off, and nothing kept goes after its close frame.
    @Test(arguments: [false, true])
    func framesKeptForTheFlushCountAgainstTheBoundAndNoneFollowTheClose(straight: Bool) throws {
        let socket = try Socket(maxQueuedBytes: 100, straight: straight)
        for _ in 0..<5 { socket.connection.send(ByteBuffer(string: "{\"text\":\"" + String(repeating: "x", count: 20) + "\"}")) }
        socket.loop.run()
        let bytes = try socket.written().joined().map { $0 }
        #expect(bytes.first == 0x88)  // FIN + close, and nothing after it
        #expect(bytes.count == 2 + Int(bytes[1]))
        #expect(bytes.count > 4 && UInt16(bytes[2]) << 8 | UInt16(bytes[3]) == 1008)
    }

    @Test func aFanOutToSocketsOfOneLoopFlushesEachOnceAtTheTicksEnd() throws {
        let first = try Socket()
        let batch = FlushBatch(loop: first.loop)
        let channel = EmbeddedChannel(loop: first.loop)
        let counter = FlushCounter()
        try channel.pipeline.syncOperations.addHandlers([counter, WebSocketFrameEncoder()])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let a = ClientConnection(id: "a", identity: Identity(user: "ann", role: nil), channel: channel, flushes: batch)
        let second = EmbeddedChannel(loop: first.loop)
        let secondCounter = FlushCounter()
        try second.pipeline.syncOperations.addHandlers([secondCounter, WebSocketFrameEncoder()])
        try second.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2)).wait()
        let b = ClientConnection(id: "b", identity: Identity(user: "bob", role: nil), channel: second, flushes: batch)
        for connection in [a, b] { try connection.writePastEncoder() }
        let group = FanOut.Group(loop: first.loop, members: [a, b])
        for text in ["x", "y"] { FanOut.send(ByteBuffer(string: text), to: [group], audience: .everyone) }
        #expect(counter.flushes == 0 && secondCounter.flushes == 0)
        first.loop.run()
        #expect(counter.flushes == 1 && secondCounter.flushes == 1)
        #expect(try channel.readOutbound(as: ByteBuffer.self) != nil)
    }

    /// A write that closes its channel at once (the peer reset it) runs the close handler inside
    /// the write: the connection must not be in the middle of changing its own state then.
    @Test func aWriteThatClosesTheChannelAtOnceIsSurvived() throws {
        let loop = EmbeddedEventLoop()
        let channel = EmbeddedChannel(loop: loop)
        let notifier = ClosedNotifier()
        try channel.pipeline.syncOperations.addHandlers([FailingSocket(), WebSocketFrameEncoder(), notifier])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let connection = ClientConnection(id: "c1", identity: Identity(user: "ann", role: nil), channel: channel)
        notifier.connection = connection
        try connection.writePastEncoder()
        connection.send(ByteBuffer(string: "token"))
        loop.run()
        #expect(!channel.isActive)
        connection.send(ByteBuffer(string: "after"))  // a closed socket takes no more
        loop.run()
    }
}

/// A socket that asked for `?coalesce=tokens`: the tokens of one stream that wait for the same
/// flush leave as one frame, and nothing changes order or leaves later than it would have.
@Suite struct TokenJoiningTests {
    typealias Socket = FlushBatchTests.Socket

    /// Token frames of `stream` as the server publishes them, with their layout.
    struct Stream {
        var history: StreamHistory
        let id: String
        init(_ id: String) {
            self.id = id
            history = StreamHistory(capacity: 64, stream: id)
        }
        mutating func token(_ seq: Int64, _ text: String) -> (ByteBuffer, TokenLayout) {
            let frame = ByteBuffer(bytes: ServerFrame.token(stream: id, seq: seq, text: text[...]))
            return (frame, history.append(seq: seq, frame: frame)!)
        }
    }

    static func joining(batch: FlushBatch? = nil, loop: EmbeddedEventLoop? = nil, straight: Bool = false) throws -> Socket {
        try Socket(batch: batch, loop: loop, joinsTokens: true, straight: straight)
    }

    @Test(arguments: [false, true])
    func tokensOfOneTickLeaveAsOneFrameWithTheirRangeAndTextJoined(straight: Bool) throws {
        let socket = try Self.joining(straight: straight)
        let plain = try Socket(loop: socket.loop, straight: straight)
        var stream = Stream("st_1")
        for (seq, text) in [(1, "He said "), (2, "\"hi\"\n"), (3, "é")] {
            let (frame, layout) = stream.token(Int64(seq), text)
            for connection in [socket.connection, plain.connection] { connection.sendBehindQueued(frame, token: layout) }
        }
        socket.loop.run()
        let joined = try socket.frames()
        #expect(joined == [#"{"type":"token","stream":"st_1","seq":3,"from":1,"text":"He said \"hi\"\né"}"#])
        let parsed = try JSONValue.parse(Array(joined[0].utf8))
        #expect(parsed["text"]?.stringValue == "He said \"hi\"\né" && parsed["from"]?.intValue == 1 && parsed["seq"]?.intValue == 3)
        // A socket that did not ask gets every token as its own frame.
        #expect(try plain.frames().count == 3)
        #expect(socket.counter.flushes == (straight ? 0 : 1))
    }

    @Test func aTokenAloneIsItsOwnFrameAndLeavesInItsTick() throws {
        let socket = try Self.joining()
        var stream = Stream("st_1")
        for seq in 1...2 {
            let (frame, layout) = stream.token(Int64(seq), "t\(seq)")
            socket.connection.sendBehindQueued(frame, token: layout)
            socket.loop.run()
            #expect(try socket.written() == [Array(WireFrame.text(frame, allocator: ByteBufferAllocator()).readableBytesView)])
            #expect(socket.counter.flushes == seq)
        }
    }

    @Test func otherFramesAndOtherStreamsKeepTheirPlace() throws {
        let socket = try Self.joining()
        var one = Stream("st_1")
        var two = Stream("st_2")
        let sends: [(ByteBuffer, TokenLayout?)] = [
            one.token(1, "a"), one.token(2, "b"), two.token(1, "x"), one.token(3, "c"), (ByteBuffer(string: #"{"type":"stream.end"}"#), nil),
            one.token(4, "d"),
        ].map { ($0.0, $0.1) }
        for (frame, layout) in sends { socket.connection.sendBehindQueued(frame, token: layout) }
        socket.loop.run()
        #expect(
            try socket.frames() == [
                #"{"type":"token","stream":"st_1","seq":2,"from":1,"text":"ab"}"#,
                #"{"type":"token","stream":"st_2","seq":1,"text":"x"}"#,
                #"{"type":"token","stream":"st_1","seq":3,"text":"c"}"#,
                #"{"type":"stream.end"}"#,
                #"{"type":"token","stream":"st_1","seq":4,"text":"d"}"#,
            ])
    }

    @Test func aCloseGoesAfterTheTokensHeldBeforeIt() throws {
        let socket = try Self.joining()
        var stream = Stream("st_1")
        for seq in 1...2 {
            let (frame, layout) = stream.token(Int64(seq), "t")
            socket.connection.writeOnLoop(frame, encoded: nil, token: layout)
        }
        socket.connection.close(code: .goingAway, reason: "bye")
        let (late, layout) = stream.token(3, "late")
        socket.connection.writeOnLoop(late, encoded: nil, token: layout)
        socket.loop.run()
        let written = try socket.written()
        #expect(String(decoding: written[0].dropFirst(2), as: UTF8.self) == #"{"type":"token","stream":"st_1","seq":2,"from":1,"text":"tt"}"#)
        let rest = Array(written.dropFirst().joined())
        #expect(rest.first == 0x88)  // FIN + close
        #expect(!String(decoding: rest, as: UTF8.self).contains("late"))  // and no token after it
    }

    @Test func socketsOfOneLoopShareTheJoinedFrame() throws {
        let first = try Self.joining()
        let batch = FlushBatch(loop: first.loop)
        let a = try Self.joining(batch: batch, loop: first.loop)
        let b = try Self.joining(batch: batch, loop: first.loop)
        let group = FanOut.Group(loop: first.loop, members: [a.connection, b.connection])
        var stream = Stream("st_9")
        for seq in 1...4 {
            let (frame, layout) = stream.token(Int64(seq), "w\(seq) ")
            FanOut.send(frame, to: [group], audience: .everyone, token: layout)
        }
        first.loop.run()
        let fromA = try a.channel.readOutbound(as: ByteBuffer.self)
        let fromB = try b.channel.readOutbound(as: ByteBuffer.self)
        #expect(fromA != nil && fromA == fromB)
        // The same storage, not an equal copy: encoded once for the loop.
        #expect(fromA?.withUnsafeReadableBytes { $0.baseAddress } == fromB?.withUnsafeReadableBytes { $0.baseAddress })
        let text = fromA.map { String(decoding: $0.readableBytesView.dropFirst(2), as: UTF8.self) }
        #expect(text == #"{"type":"token","stream":"st_9","seq":4,"from":1,"text":"w1 w2 w3 w4 "}"#)
        #expect(try a.channel.readOutbound(as: ByteBuffer.self) == nil)
    }

    /// A socket whose kernel takes nothing until `drain`: writes stay pending in NIO, their
    /// promises open, as when the peer's window and the socket's buffer are full.
    final class Stall: ChannelOutboundHandler {
        typealias OutboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        var pending: [(ByteBuffer, EventLoopPromise<Void>?)] = []
        var context: ChannelHandlerContext?
        func handlerAdded(context: ChannelHandlerContext) { self.context = context }
        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            pending.append((unwrapOutboundIn(data), promise))
        }
        func flush(context: ChannelHandlerContext) {}
        func drain() {
            guard let context else { return }
            let writes = pending
            pending = []
            for (buffer, promise) in writes { context.write(wrapOutboundOut(buffer), promise: promise) }
            context.flush()
        }
    }

    @Test func tokensWaitingBehindAFrameTheKernelHasNotTakenLeaveAsOneFrameOnceItHas() throws {
        let socket = try Self.joining()
        let stall = Stall()
        try socket.channel.pipeline.syncOperations.addHandler(stall, position: .first)
        var stream = Stream("st_7")
        // Token 1 leaves at once; 2 to 5 come one tick each while the kernel takes nothing.
        for seq in 1...5 {
            let (frame, layout) = stream.token(Int64(seq), "t\(seq) ")
            socket.connection.sendBehindQueued(frame, token: layout)
            socket.loop.run()
        }
        #expect(stall.pending.count == 1)
        stall.drain()
        socket.loop.run()
        #expect(stall.pending.count == 1)  // the joined frame, written as the first was taken
        stall.drain()
        socket.loop.run()
        #expect(
            try socket.frames() == [
                #"{"type":"token","stream":"st_7","seq":1,"text":"t1 "}"#,
                #"{"type":"token","stream":"st_7","seq":5,"from":2,"text":"t2 t3 t4 t5 "}"#,
            ])
        // Once the kernel keeps up, each token goes as it comes.
        let (sixth, layout) = stream.token(6, "t6")
        socket.connection.sendBehindQueued(sixth, token: layout)
        socket.loop.run()
        stall.drain()
        #expect(try socket.frames() == [#"{"type":"token","stream":"st_7","seq":6,"text":"t6"}"#])
    }

    @Test func tokensHeldForASocketThatTakesNothingCountAgainstItsBound() throws {
        let loop = EmbeddedEventLoop()
        let channel = EmbeddedChannel(loop: loop)
        let stall = Stall()
        try channel.pipeline.syncOperations.addHandlers([stall, WebSocketFrameEncoder()])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let connection = ClientConnection(
            id: "c1", identity: Identity(user: "ann", role: nil), channel: channel, maxQueuedBytes: 4_000, joinsTokens: true)
        try connection.writePastEncoder()
        var stream = Stream("st_8")
        var seq: Int64 = 0
        while connection.isActive, seq < 1_000 {
            seq += 1
            let (frame, layout) = stream.token(seq, String(repeating: "x", count: 50))
            connection.sendBehindQueued(frame, token: layout)
            loop.run()
        }
        // About 4,000 bytes of 100-byte token frames, not a thousand of them.
        #expect(!connection.isActive && seq > 30 && seq < 60)
    }
}
