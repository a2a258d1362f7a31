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
        let loop = EmbeddedEventLoop()
        let channel: EmbeddedChannel
        let counter = FlushCounter()
        let connection: ClientConnection

        init(batch: FlushBatch? = nil) throws {
            channel = EmbeddedChannel(loop: loop)
            try channel.pipeline.syncOperations.addHandlers([counter, WebSocketFrameEncoder()])
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            connection = ClientConnection(id: "c1", identity: Identity(user: "ann", role: nil), channel: channel, flushes: batch)
            try connection.writePastEncoder()
        }

        /// The bytes that reached the socket, buffer by buffer.
        func written() throws -> [[UInt8]] {
            var out: [[UInt8]] = []
            while let buffer = try channel.readOutbound(as: ByteBuffer.self) { out.append(Array(buffer.readableBytesView)) }
            return out
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

    @Test func framesWrittenInOneTickLeaveWithOneFlushInOrder() throws {
        let socket = try Socket()
        for text in ["a", "b", "c"] { socket.connection.send(ByteBuffer(string: text)) }
        #expect(socket.counter.flushes == 0)
        socket.loop.run()
        #expect(socket.counter.flushes == 1)
        let expected = ["a", "b", "c"].map { Array(WireFrame.text(ByteBuffer(string: $0), allocator: ByteBufferAllocator()).readableBytesView) }
        #expect(try socket.written() == expected)
        // The next tick's frame gets a flush of its own.
        socket.connection.send(ByteBuffer(string: "d"))
        socket.loop.run()
        #expect(socket.counter.flushes == 2)
        #expect(try socket.written().count == 1)
    }

    @Test func aFrameThroughThePipelineKeepsItsPlaceAfterBatchedOnes() throws {
        let socket = try Socket()
        socket.connection.send(ByteBuffer(string: "token"))
        socket.connection.close(code: .goingAway, reason: "bye")  // through the encoder, flushed at once
        socket.loop.run()
        let written = try socket.written()
        #expect(written.first == Array(WireFrame.text(ByteBuffer(string: "token"), allocator: ByteBufferAllocator()).readableBytesView))
        #expect(written.dropFirst().joined().first == 0x88)  // FIN + close
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
