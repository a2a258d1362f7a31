import NIOCore
import NIOPosix

/// One `GET` of a health URL on a loopback port, answered by its status code: a connection
/// refused fails at once (AsyncHTTPClient would retry it until the deadline, and a starting
/// server refuses for seconds).
enum HealthCheck {
    /// The status code of `GET path` on 127.0.0.1:`port`, or nil when nothing answers within `timeout`.
    static func status(port: Int, path: String, timeout: TimeAmount = .seconds(2)) async -> Int? {
        let promise = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: Int?.self)
        let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(StatusLineReader(promise: promise)) }
            }
        do {
            let channel = try await bootstrap.connect(host: "127.0.0.1", port: port).get()
            let request = "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n\r\n"
            try await channel.writeAndFlush(channel.allocator.buffer(string: request)).get()
            let deadline = channel.eventLoop.scheduleTask(in: timeout) { promise.succeed(nil) }
            let status = try await promise.futureResult.get()
            deadline.cancel()
            try? await channel.close()
            return status
        } catch {
            promise.succeed(nil)
            return nil
        }
    }

    /// Reads up to the end of the status line ("HTTP/1.1 200 OK") and reports its code.
    private final class StatusLineReader: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        private let promise: EventLoopPromise<Int?>
        private var head = ""

        init(promise: EventLoopPromise<Int?>) { self.promise = promise }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            head += buffer.readString(length: buffer.readableBytes) ?? ""
            guard let end = head.firstIndex(of: "\r\n") ?? (head.count > 1024 ? head.endIndex : nil) else { return }
            let parts = head[..<end].split(separator: " ")
            promise.succeed(parts.count >= 2 && parts[0].hasPrefix("HTTP/") ? Int(parts[1]) : nil)
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) { promise.succeed(nil) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            promise.succeed(nil)
            context.close(promise: nil)
        }
    }
}
