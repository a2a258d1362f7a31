import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Parley's own HTTP/1.1 connections to a model provider reached over plain `http://` (a model
/// server on the same host or network: the local model, vLLM, llama.cpp, Ollama). A reply's
/// connection is made, written and read on the event loop it asks for (the one writing its
/// tokens), and each part of the response goes straight to the reply there: no request state
/// machine, lock or future per body part between the socket and the SSE parser (#26: the HTTP
/// layer's share of the provider path's CPU samples fell from about 18% to 6%).
/// Connections stay open between replies, each parked on its loop until the next reply there,
/// until it was idle for `idleTimeout` or until the server closes it. `https://` providers go
/// through AsyncHTTPClient.
/// A provider makes its own from its base URL, so the two cannot name different servers.
final class UpstreamConnections: Sendable {
    let host: String
    let port: Int
    /// The base URL's path, to which a request's endpoint is appended: empty or `/v1`.
    let basePath: String
    /// The request's `host` header: an IPv6 literal in brackets, the port unless 80.
    let hostHeader: String
    /// How long connecting may take; a refused connection is tried again every 100 ms until
    /// then (a model server restarting is back within it).
    let connectTimeout: TimeAmount
    /// How long a parked connection is kept unused before it is closed.
    let idleTimeout: TimeAmount
    /// Idle connections by event loop.
    private let parked = Mutex<[ObjectIdentifier: [any Channel]]>([:])
    private let closed = Atomic<Bool>(false)

    /// A plain-http provider's own connections, as its options say: nil unless its base URL is
    /// `http://host[:port][/path]`.
    init?(_ options: HTTPProviderOptions) {
        guard let target = Self.target(of: options.baseURL) else { return nil }
        (host, port) = (target.host, target.port)
        basePath = target.path.hasSuffix("/") ? String(target.path.dropLast()) : target.path
        let name = host.contains(":") ? "[\(host)]" : host
        hostHeader = port == 80 ? name : "\(name):\(port)"
        connectTimeout = TimeAmount(options.connectTimeout)
        idleTimeout = TimeAmount(options.idleConnectionTimeout)
    }

    /// The host, port and path of an `http://` URL; nil for any other.
    static func target(of url: String) -> (host: String, port: Int, path: String)? {
        guard url.lowercased().hasPrefix("http://") else { return nil }
        let rest = url.dropFirst("http://".count)
        let authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        var path = String(rest.dropFirst(authority.count))
        if path.isEmpty || path.first != "/" { path = "/" + path }
        guard !authority.isEmpty, !authority.contains("@") else { return nil }
        var host = Substring(authority)
        var port = 80
        if host.first == "[" {  // an IPv6 literal
            guard let close = host.firstIndex(of: "]") else { return nil }
            let after = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if !after.isEmpty {
                guard after.first == ":", let number = Int(after.dropFirst()) else { return nil }
                port = number
            }
        } else if let colon = host.lastIndex(of: ":") {
            guard let number = Int(host[host.index(after: colon)...]) else { return nil }
            port = number
            host = host[..<colon]
        }
        guard !host.isEmpty, (1...65_535).contains(port) else { return nil }
        return (String(host), port, path)
    }

    /// Sends `head` and `body` on `loop` (an idle connection there, or a new one) and hands the
    /// response to `receiver` on `loop`, until `deadline`. Called on `loop`.
    func send(
        _ head: HTTPRequestHead, body: ByteBuffer, on loop: any EventLoop, deadline: NIODeadline, to receiver: any UpstreamReceiver
    ) -> UpstreamExchange {
        let exchange = UpstreamExchange(connections: self, loop: loop, head: head, body: body, receiver: receiver)
        exchange.start(deadline: deadline)
        return exchange
    }

    /// Closes every idle connection; those in use close when their replies end.
    func close() {
        closed.store(true, ordering: .releasing)
        let all = parked.withLock { parked in
            defer { parked.removeAll() }
            return parked.values.flatMap { $0 }
        }
        for channel in all { channel.close(promise: nil) }
    }

    fileprivate func takeParked(on loop: any EventLoop) -> (any Channel)? {
        parked.withLock { parked in
            let key = ObjectIdentifier(loop)
            while let channel = parked[key]?.popLast() {
                if channel.isActive { return channel }
            }
            return nil
        }
    }

    fileprivate func park(_ channel: any Channel) {
        guard !closed.load(ordering: .acquiring) else {
            channel.close(promise: nil)
            return
        }
        parked.withLock { $0[ObjectIdentifier(channel.eventLoop), default: []].append(channel) }
    }

    fileprivate func unpark(_ channel: any Channel) {
        parked.withLock { parked in
            let key = ObjectIdentifier(channel.eventLoop)
            parked[key]?.removeAll { $0 === channel }
        }
    }

    fileprivate func connect(on loop: any EventLoop) -> EventLoopFuture<any Channel> {
        ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(UpstreamHandler(connections: self))
                }
            }
            .connect(host: host, port: port)
    }
}

/// What a reply hears of its response, on its loop: the head, each part of the body, then the
/// end or a failure (exactly one of them, and nothing after it).
protocol UpstreamReceiver: AnyObject, Sendable {
    func head(_ head: HTTPResponseHead)
    func body(_ buffer: ByteBuffer)
    func end()
    func failed(_ error: any Error)
}

/// A request's connection ended before its response did.
struct UpstreamConnectionClosed: Error {}
/// The request's deadline passed.
struct UpstreamDeadlineExceeded: Error {}

/// One request on its way, touched only on its loop (hence unchecked Sendable).
final class UpstreamExchange: @unchecked Sendable {
    private let connections: UpstreamConnections
    private let loop: any EventLoop
    private let head: HTTPRequestHead
    private let body: ByteBuffer
    /// Nil once the exchange is over (ended, failed or cancelled): nothing reaches it after that.
    private var receiver: (any UpstreamReceiver)?
    private var channel: (any Channel)?
    private var timer: Scheduled<Void>?
    /// The connection was parked before: if it fails before the response begins, the server
    /// closed it while idle, and the request goes again on a new one.
    private var reused = false
    private var responding = false

    init(connections: UpstreamConnections, loop: any EventLoop, head: HTTPRequestHead, body: ByteBuffer, receiver: any UpstreamReceiver) {
        self.connections = connections
        self.loop = loop
        self.head = head
        self.body = body
        self.receiver = receiver
    }

    fileprivate func start(deadline: NIODeadline) {
        timer = loop.scheduleTask(deadline: deadline) { [self] in fail(UpstreamDeadlineExceeded()) }
        if let channel = connections.takeParked(on: loop) {
            reused = true
            send(on: channel)
        } else {
            connect(until: .now() + connections.connectTimeout)
        }
    }

    /// Stops the request, closing its connection unless its response already ended (then the
    /// connection was parked for the next). Called on the loop.
    func cancel() {
        guard receiver != nil else { return }
        receiver = nil
        close()
    }

    private func connect(until due: NIODeadline) {
        connections.connect(on: loop).whenComplete { [self] result in
            switch result {
            case .success(let channel):
                guard receiver != nil else {
                    channel.close(promise: nil)
                    return
                }
                send(on: channel)
            case .failure(let error):
                guard receiver != nil else { return }
                // Refused (the server is starting): again shortly, while time is left.
                if Self.isRefused(error), NIODeadline.now() + .milliseconds(100) < due {
                    loop.scheduleTask(in: .milliseconds(100)) { [self] in
                        if receiver != nil { connect(until: due) }
                    }
                } else {
                    fail(error)
                }
            }
        }
    }

    private static func isRefused(_ error: any Error) -> Bool {
        if let error = error as? NIOConnectionError {
            return error.connectionErrors.contains { ($0.error as? IOError)?.errnoCode == ECONNREFUSED }
        }
        return (error as? IOError)?.errnoCode == ECONNREFUSED
    }

    private func send(on channel: any Channel) {
        self.channel = channel
        do {
            try channel.pipeline.syncOperations.handler(type: UpstreamHandler.self).exchange = self
        } catch {
            fail(error)
            return
        }
        var head = self.head
        head.headers.replaceOrAdd(name: "host", value: connections.hostHeader)
        head.headers.replaceOrAdd(name: "content-length", value: "\(body.readableBytes)")
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.write(HTTPClientRequestPart.body(.byteBuffer(body)), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
    }

    private func close() {
        timer?.cancel()
        timer = nil
        if let channel {
            self.channel = nil
            if let handler = try? channel.pipeline.syncOperations.handler(type: UpstreamHandler.self), handler.exchange === self {
                handler.exchange = nil
            }
            channel.close(promise: nil)
        }
    }

    private func fail(_ error: any Error) {
        guard let receiver else { return }
        self.receiver = nil
        close()
        receiver.failed(error)
    }

    // MARK: From the connection's handler

    fileprivate func received(_ part: HTTPClientResponsePart) {
        guard let receiver else { return }
        switch part {
        case .head(let head):
            responding = true
            receiver.head(head)
        case .body(let buffer):
            receiver.body(buffer)
        case .end:
            self.receiver = nil
            timer?.cancel()
            timer = nil
            channel = nil
            receiver.end()
        }
    }

    fileprivate func connectionFailed(_ error: any Error) {
        guard receiver != nil else { return }
        channel = nil
        if reused, !responding {
            reused = false
            connect(until: .now() + connections.connectTimeout)
        } else {
            fail(error)
        }
    }
}

/// The last handler of an upstream connection: hands the response's parts to the exchange
/// using the connection, parks the connection once a keep-alive response ended (closing it if
/// no exchange took it within the idle timeout), and drops it from the parked ones when it
/// closes.
private final class UpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    let connections: UpstreamConnections
    /// The exchange using the connection; nil while it is parked.
    var exchange: UpstreamExchange? {
        didSet {
            if exchange != nil {
                idle?.cancel()
                idle = nil
            }
        }
    }
    private var keepAlive = false
    /// Closes the parked connection when it has been idle too long.
    private var idle: Scheduled<Void>?

    init(connections: UpstreamConnections) {
        self.connections = connections
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        guard let exchange else { return }
        switch part {
        case .head(let head):
            keepAlive = head.isKeepAlive
        case .body:
            break
        case .end:
            self.exchange = nil
            if keepAlive {
                let (channel, handler) = (context.channel, NIOLoopBound(self, eventLoop: context.eventLoop))
                idle = context.eventLoop.scheduleTask(in: connections.idleTimeout) {
                    if handler.value.exchange == nil { channel.close(promise: nil) }  // unparked as it goes inactive
                }
                connections.park(context.channel)
            } else {
                context.close(promise: nil)
            }
        }
        exchange.received(part)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let exchange = self.exchange
        self.exchange = nil
        context.close(promise: nil)
        exchange?.connectionFailed(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        idle?.cancel()
        idle = nil
        if let exchange {
            self.exchange = nil
            exchange.connectionFailed(UpstreamConnectionClosed())
        } else {
            connections.unpark(context.channel)
        }
        context.fireChannelInactive()
    }
}
