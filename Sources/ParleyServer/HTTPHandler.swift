import Logging
import NIOCore
import NIOHTTP1

/// Reads one HTTP request at a time (bodies capped), answers it through `RESTAPI` off the event
/// loop, and writes the response back in order. Pipelined requests wait in NIO's
/// `HTTPServerPipelineHandler` until the previous response has been written.
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    static let name = "parley.http"

    private enum State {
        case idle
        case receiving(HTTPRequestHead, ByteBuffer?, limit: Int)
        /// The body passes the cap: 413 answered (`answered`: once written), the rest of the
        /// request is read and dropped, then the connection closes.
        case discarding(answered: EventLoopFuture<Void>)
        /// The connection is being closed, its last answer given: nothing read now is a request.
        case closing
    }

    private var state = State.idle
    private let api: RESTAPI
    private let maxBodyBytes: Int
    /// Paths allowed a body of another size than `maxBodyBytes`.
    private let bodyLimits: [String: Int]
    /// Told when a request's head and end arrive and when its response went out.
    private let timeouts: HTTPTimeoutHandler?
    /// Added to every response (HSTS over TLS).
    private let extraHeaders: HTTPHeaders

    init(api: RESTAPI, maxBodyBytes: Int, bodyLimits: [String: Int] = [:], timeouts: HTTPTimeoutHandler? = nil, headers: HTTPHeaders = [:]) {
        self.api = api
        self.extraHeaders = headers
        self.timeouts = timeouts
        self.maxBodyBytes = maxBodyBytes
        self.bodyLimits = bodyLimits
    }

    private func limit(for head: HTTPRequestHead) -> Int {
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        return bodyLimits[path] ?? maxBodyBytes
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch (unwrapInboundIn(data), state) {
        case (_, .closing):
            break  // a request pipelined behind one whose answer closes the connection
        case (.head(let head), _):
            timeouts?.headReceived()
            let limit = limit(for: head)
            let declared = head.headers.first(name: "content-length").flatMap(Int.init)
            if let declared, declared > limit {
                // Over the cap by its own account: answered now, so a client that waits for
                // `100 Continue` (curl does past 1 MiB) never sends the body, and one that is
                // sending it hears at once.
                state = .discarding(answered: refuse(head, over: limit, context: context))
                return
            }
            if Self.expectsContinue(head, declaredLength: declared) {
                // Without it such a client waits (curl a second) before it sends the body.
                context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
            }
            state = .receiving(head, nil, limit: limit)
        case (.body(var chunk), .receiving(let head, var body, let limit)):
            if (body?.readableBytes ?? 0) + chunk.readableBytes > limit {
                state = .discarding(answered: refuse(head, over: limit, context: context))
            } else if body == nil {
                state = .receiving(head, chunk, limit: limit)
            } else {
                body!.writeBuffer(&chunk)
                state = .receiving(head, body, limit: limit)
            }
        case (.body, _):
            break
        case (.end, .receiving(let head, let body, _)):
            timeouts?.requestReceived()
            state = .idle
            respond(
                context: context, head: head,
                request: HTTPRequest(
                    head: head, body: body, remoteIP: api.clientIP(context.channel, head.headers),
                    id: api.ids.make(.request)))
        case (.end, .discarding(let answered)):
            // The request is over and its answer said the connection closes.
            timeouts?.requestReceived()
            close(after: answered, context: context)
        case (.end, .idle):
            break
        }
    }

    /// Whether the client waits for `100 Continue` before it sends the body it announced (never
    /// sent to an HTTP/1.0 client, RFC 9110 section 10.1.1).
    static func expectsContinue(_ head: HTTPRequestHead, declaredLength: Int?) -> Bool {
        guard (head.version.major, head.version.minor) >= (1, 1), head.headers["expect"].contains(where: { $0.lowercased() == "100-continue" }) else {
            return false
        }
        return (declaredLength ?? 0) > 0 || head.headers["transfer-encoding"].contains { $0.lowercased().contains("chunked") }
    }

    /// Answers 413 before the request's end (its connection closes once the request is read),
    /// and returns when that answer is written.
    private func refuse(_ head: HTTPRequestHead, over limit: Int, context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        timeouts?.answeredEarly()
        let refusal = APIError(.payloadTooLarge, .tooLarge, "the request body is larger than \(limit) bytes")
        return answer(refusal, for: head, logging: ["method": "\(head.method)"], closing: false, context: context)
    }

    /// Answers `refusal` here, not through the API (with an id and a log line of its own), and
    /// closes the connection once it is written unless `closing` is false (the caller closes it
    /// later). Returns when it is written.
    private func answer(
        _ refusal: APIError, for head: HTTPRequestHead, logging metadata: Logger.Metadata, closing: Bool, context: ChannelHandlerContext
    ) -> EventLoopFuture<Void> {
        let id = api.ids.make(.request)
        api.logger.info("request", metadata: metadata.merging(["request": "\(id)", "status": "\(refusal.status.code)"]) { $1 })
        var response = refusal.response
        response.headers.replaceOrAdd(name: "x-request-id", value: id)
        return write(response, for: head, keepAlive: false, closing: closing, context: context)
    }

    /// Closes the connection once its last answer, `answered`, is written; nothing read
    /// meanwhile is a request.
    private func close(after answered: EventLoopFuture<Void>, context: ChannelHandlerContext) {
        state = .closing
        let channel = context.channel
        answered.whenComplete { _ in channel.close(promise: nil) }
    }

    /// A request NIO's parser refused (a bad method, length, header or chunk): its framing is
    /// lost, so it is answered with a JSON error and the connection closes once that is written,
    /// not left open until the head timeout writes a 408 after it.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parserError = error as? HTTPParserError else { return context.fireErrorCaught(error) }
        switch state {
        case .closing:
            return  // what the parser says about the bytes after it does not matter any more
        case .discarding(let answered):
            close(after: answered, context: context)  // answered already (413)
        case _ where parserError == .closedConnection:
            // Bytes after a request that said `Connection: close`: its answer said so too and
            // closes the connection once written; nothing after it is answered (RFC 9112 9.6).
            state = .closing
        case .idle, .receiving:
            state = .closing
            let refusal =
                parserError == .headerOverflow
                ? APIError(.requestHeaderFieldsTooLarge, .tooLarge, "the request's head is too large")
                : APIError(.badRequest, .badRequest, "the request is not valid HTTP/1.1" + Self.detail(parserError))
            _ = answer(
                refusal, for: HTTPRequestHead(version: .http1_1, method: .GET, uri: ""), logging: ["error": "\(parserError)"], closing: true,
                context: context)
        }
    }

    /// What the parser found, in the client's terms: NIO's own words where they say it, none
    /// where they only name the parser's state.
    static func detail(_ error: HTTPParserError) -> String {
        switch error {
        case .paused: " (it looks like HTTP/2, which this server does not speak)"
        case .unknown, .invalidInternalState, .strictModeAssertion: ""
        default: " (\(error))"
        }
    }

    private func respond(context: ChannelHandlerContext, head: HTTPRequestHead, request: HTTPRequest) {
        let api = self.api
        context.eventLoop.makeFutureWithTask {
            await api.respond(to: request)
        }.assumeIsolated().whenSuccess { response in
            self.write(response, for: head, keepAlive: head.isKeepAlive, context: context)
        }
    }

    /// Writes a response; without `keepAlive` the connection closes once it is written, unless
    /// `closing` is false (the caller closes it later). Returns when it is written.
    @discardableResult
    private func write(
        _ response: HTTPResponse, for request: HTTPRequestHead, keepAlive: Bool, closing: Bool = true, context: ChannelHandlerContext
    ) -> EventLoopFuture<Void> {
        if let stream = response.stream, request.method != .HEAD {
            writeStreamed(response, stream, for: request, keepAlive: keepAlive, context: context)
            return context.eventLoop.makeSucceededVoidFuture()
        }
        var headers = response.headers
        headers.add(contentsOf: extraHeaders)
        if response.stream == nil { headers.replaceOrAdd(name: "content-length", value: String(response.body.count)) }
        headers.replaceOrAdd(name: "connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: response.status, headers: headers))), promise: nil)
        if !response.body.isEmpty, request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: response.body)))), promise: nil)
        }
        let written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            if closing { written.whenComplete { _ in channel.close(promise: nil) } }
        } else if let timeouts {
            written.assumeIsolated().whenSuccess { timeouts.responseSent() }
        }
        return written
    }

    /// Sends the head, then lets the producer write the body off the event loop. Without a
    /// length the encoder frames HTTP/1.1 with chunked encoding; HTTP/1.0 is framed by closing.
    private func writeStreamed(
        _ response: HTTPResponse, _ produce: @escaping @Sendable (inout HTTPBodyWriter) async throws -> Void,
        for request: HTTPRequestHead, keepAlive: Bool, context: ChannelHandlerContext
    ) {
        let keepAlive = keepAlive && (request.version.major, request.version.minor) >= (1, 1)
        var headers = response.headers
        headers.add(contentsOf: extraHeaders)
        headers.remove(name: "content-length")
        headers.replaceOrAdd(name: "connection", value: keepAlive ? "keep-alive" : "close")
        context.writeAndFlush(
            wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: response.status, headers: headers))), promise: nil)
        let channel = context.channel
        let api = self.api
        let timeouts = self.timeouts.map { NIOLoopBound($0, eventLoop: context.eventLoop) }
        Task {
            var writer = HTTPBodyWriter(channel: channel)
            do {
                try await produce(&writer)
                try await writer.flush()
                try await channel.writeAndFlush(HTTPServerResponsePart.end(nil)).get()
                if !keepAlive {
                    try? await channel.close()
                } else if let timeouts {
                    channel.eventLoop.execute { timeouts.value.responseSent() }
                }
            } catch {
                api.logger.warning(
                    "streamed response cut short",
                    metadata: [
                        "request": "\(response.headers.first(name: "x-request-id") ?? "")", "error": "\(error)",
                    ])
                try? await channel.close()
            }
        }
    }
}
