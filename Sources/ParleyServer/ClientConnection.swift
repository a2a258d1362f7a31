import NIOCore
import NIOWebSocket
import ParleyCore

/// One authenticated WebSocket. Sendable: frames may be sent from any thread; NIO hops them onto
/// the channel's event loop in order.
public final class ClientConnection: Sendable {
    public let id: String
    public let identity: Identity
    let channel: any Channel

    init(id: String, identity: Identity, channel: any Channel) {
        self.id = id
        self.identity = identity
        self.channel = channel
    }

    var isActive: Bool { channel.isActive }

    /// Sends one text message. The buffer is shared, not copied, when fanned out to many sockets.
    func send(_ buffer: ByteBuffer) {
        channel.writeAndFlush(WebSocketFrame(fin: true, opcode: .text, data: buffer), promise: nil)
    }

    /// Sends one text message; the future succeeds once it was written to the socket.
    func write(_ buffer: ByteBuffer) -> EventLoopFuture<Void> {
        channel.writeAndFlush(WebSocketFrame(fin: true, opcode: .text, data: buffer))
    }

    func send(_ bytes: [UInt8]) {
        send(channel.allocator.buffer(bytes: bytes))
    }

    /// Starts the closing handshake with `code`; the channel closes once the frame is written.
    func close(code: WebSocketErrorCode, reason: String) -> EventLoopFuture<Void> {
        var data = channel.allocator.buffer(capacity: 2 + reason.utf8.count)
        data.write(webSocketErrorCode: code)
        data.writeString(reason)
        let frame = WebSocketFrame(fin: true, opcode: .connectionClose, data: data)
        let channel = self.channel
        return channel.writeAndFlush(frame).flatMap {
            channel.close()
        }.recover { _ in }
    }
}
