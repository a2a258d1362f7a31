import NIOCore
import NIOHTTP1
import NIOPosix
import ParleyCore

/// A response as the test client saw it.
public struct TestHTTPResponse: Sendable {
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: [UInt8]

    public var text: String { String(decoding: body, as: UTF8.self) }

    /// The body as JSON; fails the caller's expectation with the raw text when it is not JSON.
    public func json() throws -> JSONValue {
        try JSONValue.parse(body)
    }

    /// `error.code` of a `{"error":{"code","message"}}` body.
    public var errorCode: String? {
        guard let value = try? json(), case .string(let code)? = value["error"]?["code"] else { return nil }
        return code
    }
}

/// A tiny HTTP/1.1 client for tests: one connection per request, closed after the response.
public enum TestHTTPClient {
    public static func request(
        port: Int, _ method: HTTPMethod, _ uri: String, token: String? = nil, headers: HTTPHeaders = [:],
        body: [UInt8]? = nil
    ) async throws -> TestHTTPResponse {
        var headers = headers
        headers.replaceOrAdd(name: "host", value: "127.0.0.1:\(port)")
        // One request per connection; an upgrade attempt keeps its `upgrade` token beside `close`.
        headers.replaceOrAdd(name: "connection", value: (headers["connection"] + ["close"]).joined(separator: ", "))
        if let token { headers.replaceOrAdd(name: "authorization", value: "Bearer \(token)") }
        if let body { headers.replaceOrAdd(name: "content-length", value: String(body.count)) }
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers)

        let promise = MultiThreadedEventLoopGroup.singleton.any().makePromise(of: TestHTTPResponse.self)
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
                    }
                }
                .connect(host: "127.0.0.1", port: port).get()
        } catch {
            // No channel will complete it: a promise left pending is a fatal error in debug builds.
            promise.fail(error)
            throw error
        }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if let body { channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil) }
        try await channel.writeAndFlush(HTTPClientRequestPart.end(nil))
        let response = try await promise.futureResult.get()
        try? await channel.close()
        return response
    }

    public static func json(
        port: Int, _ method: HTTPMethod, _ uri: String, token: String? = nil, json: JSONValue
    ) async throws -> TestHTTPResponse {
        try await request(port: port, method, uri, token: token, headers: ["content-type": "application/json"], body: json.serialized())
    }

    private final class ResponseCollector: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        private let promise: EventLoopPromise<TestHTTPResponse>
        private var head: HTTPResponseHead?
        private var body: [UInt8] = []

        init(promise: EventLoopPromise<TestHTTPResponse>) { self.promise = promise }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h
            case .body(let b): body += Array(b.readableBytesView)
            case .end:
                if let head { promise.succeed(TestHTTPResponse(status: head.status, headers: head.headers, body: body)) }
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            promise.fail(ChannelError.eof)
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            promise.fail(error)
            context.close(promise: nil)
        }
    }
}
