import Foundation
import NIOCore
import NIOHTTP1
import ParleyCore

/// An HTTP request, fully read.
struct HTTPRequest: Sendable {
    var method: HTTPMethod
    var version: HTTPVersion = .http1_1
    var uri: String
    var path: String
    var query: [String: String]
    var headers: HTTPHeaders
    var body: ByteBuffer?
    /// The client's IP address, when the socket has one.
    var remoteIP: String?
    /// Names the request in every log line about it and in the `x-request-id` response header.
    var id: String

    init(head: HTTPRequestHead, body: ByteBuffer?, remoteIP: String? = nil, id: String = "") {
        self.remoteIP = remoteIP
        self.id = id
        method = head.method
        version = head.version
        uri = head.uri
        headers = head.headers
        self.body = body
        let components = URLComponents(string: head.uri)
        path = components?.percentEncodedPath ?? head.uri
        switch Self.parameters(of: head.uri) {
        case .success(let parameters):
            query = parameters
            queryError = nil
        case .failure(let error):
            query = [:]
            queryError = error
        }
    }

    /// Why the query cannot be read, answered 400 before anything else: a parameter given twice
    /// (readers disagree on which one counts: the first here once, the last in many frameworks)
    /// or one that is not percent-encoded UTF-8 (it was read as empty and answered as missing).
    var queryError: APIError?

    /// The parameters of `uri`'s query (between `?` and any `#`), percent-decoded; `+` stays a
    /// plus, as in RFC 3986 (a space is `%20`).
    static func parameters(of uri: String) -> Result<[String: String], APIError> {
        guard let start = uri.firstIndex(of: "?") else { return .success([:]) }
        let query = uri[uri.index(after: start)...].prefix { $0 != "#" }
        var parameters: [String: String] = [:]
        for item in query.split(separator: "&", omittingEmptySubsequences: true) {
            let (rawName, rawValue) = item.firstIndex(of: "=").map { (item[..<$0], item[item.index(after: $0)...]) } ?? (item, "")
            let shown = rawName.count > 64 ? rawName.prefix(64) + "…" : rawName
            guard let name = String(rawName).removingPercentEncoding, let value = String(rawValue).removingPercentEncoding else {
                return .failure(APIError(.badRequest, .badRequest, "the query parameter '\(shown)' is not percent-encoded UTF-8"))
            }
            guard parameters.updateValue(value, forKey: name) == nil else {
                return .failure(APIError(.badRequest, .badRequest, "the query parameter '\(shown)' is given twice"))
            }
        }
        return .success(parameters)
    }

    /// The body parsed as JSON; a 400 when absent or malformed, saying what is wrong and where.
    /// A member named twice is refused: readers disagree on which value counts (the first here,
    /// the last in JavaScript), so a request must not mean two things.
    func json() throws(APIError) -> JSONValue {
        guard let body, body.readableBytes > 0 else { throw APIError(.badRequest, .badRequest, "the request needs a JSON body") }
        do {
            return try JSONValue.parse(body.readableBytesView, refusingRepeatedKeys: true)
        } catch {
            throw APIError(.badRequest, .badRequest, "the body is not valid JSON: \(error.explanation)")
        }
    }
}

/// An HTTP response with a JSON (or empty) body, or a body streamed as it is produced.
struct HTTPResponse: Sendable {
    var status: HTTPResponseStatus
    var headers: HTTPHeaders
    var body: [UInt8]
    /// Produces the body piece by piece (sent chunked); `body` is ignored when set. A producer
    /// that throws part-way gets the connection closed, so the client sees a truncated body and
    /// never mistakes it for a whole one.
    var stream: (@Sendable (inout HTTPBodyWriter) async throws -> Void)?

    init(_ status: HTTPResponseStatus, json: JSONValue? = nil, headers: HTTPHeaders = [:]) {
        self.status = status
        self.headers = headers
        if let json {
            self.body = json.serialized()
            self.headers.replaceOrAdd(name: "content-type", value: "application/json; charset=utf-8")
        } else {
            self.body = []
        }
    }
}

/// Where a streamed body goes: bytes gather up to `chunkBytes`, then go out as one chunk, and
/// the producer waits until the socket took it, so a slow reader holds one chunk in memory, not
/// the whole document.
struct HTTPBodyWriter {
    static let chunkBytes = 32 * 1024
    private let channel: any Channel
    private var pending: [UInt8] = []

    init(channel: any Channel) {
        self.channel = channel
        pending.reserveCapacity(Self.chunkBytes)
    }

    mutating func write(_ bytes: [UInt8]) async throws {
        pending += bytes
        if pending.count >= Self.chunkBytes { try await flush() }
    }

    mutating func write(_ text: String) async throws { try await write(Array(text.utf8)) }

    mutating func flush() async throws {
        guard !pending.isEmpty else { return }
        let buffer = channel.allocator.buffer(bytes: pending)
        pending.removeAll(keepingCapacity: true)
        try await channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(buffer))).get()
    }
}

extension HTTPResponse {
    /// A response whose body `produce` writes as it goes (chunked transfer encoding).
    init(_ status: HTTPResponseStatus, contentType: String, stream produce: @escaping @Sendable (inout HTTPBodyWriter) async throws -> Void) {
        self.init(status, headers: ["content-type": contentType])
        stream = produce
    }

    /// A response with a body that is not JSON (the web client's files); headers give its type.
    init(_ status: HTTPResponseStatus, body: [UInt8], headers: HTTPHeaders) {
        self.init(status, headers: headers)
        self.body = body
    }
}

/// A failed request: an HTTP status and a `{"error":{"code","message"}}` body.
struct APIError: Error, Sendable {
    var status: HTTPResponseStatus
    var code: ErrorCode
    var message: String
    var headers: HTTPHeaders = [:]
    /// For `plan_required`: a plan that allows the request.
    var plan: String?

    init(_ status: HTTPResponseStatus, _ code: ErrorCode, _ message: String, headers: HTTPHeaders = [:]) {
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
    }

    var response: HTTPResponse {
        var fields: [(String, JSONValue)] = [("code", .string(code.rawValue)), ("message", .string(message))]
        if let plan { fields.append(("plan", .string(plan))) }
        return HTTPResponse(status, json: .object([("error", .object(fields))]), headers: headers)
    }

    /// The REST form of a protocol error: the same code and message, with the matching status.
    init(_ error: FrameError) {
        let status: HTTPResponseStatus =
            switch error.code {
            case .badRequest, .tooLarge: .badRequest
            case .unauthorized: .unauthorized
            case .forbidden: .forbidden
            case .notFound, .streamGone: .notFound
            case .conflict: .conflict
            case .rateLimited, .limitExceeded: .tooManyRequests
            case .insufficientCredits, .planRequired, .spendLimit: .paymentRequired
            case .providerError: .badGateway
            case .unavailable: .serviceUnavailable
            case .internal: .internalServerError
            }
        self.init(status, error.code, error.message)
        plan = error.plan
    }

    static func unauthorized(_ error: AuthError) -> APIError {
        APIError(.unauthorized, .unauthorized, error.description, headers: ["www-authenticate": "Bearer"])
    }
}
