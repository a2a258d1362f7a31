import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import ParleyCore
import ParleyLLM
import Synchronization

/// Where an HTTP model provider is and how long Parley waits for it.
public struct HTTPProviderOptions: Sendable {
    /// e.g. `http://127.0.0.1:8081/v1` (OpenAI-compatible) or `https://api.anthropic.com` (Anthropic).
    public var baseURL: String
    /// Sent as a bearer token (OpenAI) or `x-api-key` (Anthropic); never logged.
    public var apiKey: String?
    /// The model asked for when a request names none.
    public var model: String
    /// From the request to the first token.
    public var firstTokenTimeout: Duration = .seconds(60)
    /// Between two tokens.
    public var idleTimeout: Duration = .seconds(30)
    /// Attempts after the first when the request fails before any token was sent (connection
    /// refused, 429, 5xx). After the first token nothing is retried: the user already saw it.
    public var retries = 2
    /// The longest a whole reply may take.
    public var maxDuration: Duration = .seconds(600)
    /// How long connecting may take on Parley's own connections (a plain-http provider); a
    /// refused connect is tried again until then. An `HTTPClient` has its own
    /// (`HTTPClient.forProvider(connectTimeout:)`).
    public var connectTimeout: Duration = .seconds(10)
    /// How long one of Parley's own connections (a plain-http provider) stays open unused
    /// between replies before Parley closes it: what a burst of replies opened is given back.
    public var idleConnectionTimeout: Duration = .seconds(60)

    public init(baseURL: String, apiKey: String? = nil, model: String) {
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.apiKey = apiKey
        self.model = model
    }
}

/// OpenAI's Chat Completions with `stream: true`, as OpenAI, vLLM, llama.cpp's server, Ollama,
/// LM Studio and OpenRouter speak it.
///
/// Each token event is one `delta.content` piece; the usage chunk (asked for with
/// `stream_options.include_usage`) becomes the final `.usage`; a server that reports none gets
/// Parley's own count (the prompt estimate and the pieces delivered). Cancelling the reply
/// cancels the HTTP request, which closes its connection: no orphaned upstream stream.
public struct OpenAICompatibleProvider: PushingLLMProvider {
    public let options: HTTPProviderOptions
    let client: HTTPClient
    /// Parley's own connections for a plain-http provider; `client` for the rest.
    let upstream: UpstreamConnections?

    /// `ownConnections`: an `http://` base URL is read through Parley's own connections (on
    /// the loop each reply asks for, #26) rather than `client`, which serves `https://`.
    public init(options: HTTPProviderOptions, client: HTTPClient = .shared, ownConnections: Bool = true) {
        self.options = options
        self.client = client
        upstream = ownConnections ? UpstreamConnections(options) : nil
    }

    public func modelName(for request: CompletionRequest) -> String { request.model ?? options.model }

    public func start(_ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink) -> any LLMRun {
        let body = JSONValue.object([
            ("model", .string(modelName(for: request))),
            ("messages", .array(request.messages.map { .object([("role", .string($0.role.rawValue)), ("content", .string($0.text))]) })),
            ("stream", .bool(true)),
            ("stream_options", .object([("include_usage", .bool(true))])),
            ("max_tokens", .int(Int64(request.maxOutputTokens))),
        ])
        let auth = options.apiKey.map { [("authorization", "Bearer \($0)")] } ?? []
        let http = HTTPStreaming.post("/chat/completions", json: body, headers: auth)
        return HTTPStreaming.start(
            http, client: client, upstream: upstream, options: options, request: request, parts: OpenAIChatDialect.parts(of:), on: loop, sink: sink)
    }

    public func stream(_ request: CompletionRequest) -> LLMEventStream { pulledStream(request, on: client.eventLoopGroup.any()) }
}

extension HTTPClient {
    /// A client of its own for one model provider, allowed as many HTTP/1 connections to the
    /// provider's host as replies may stream at once. `HTTPClient.shared` allows 8 per host: at
    /// 100 concurrent replies the other 92 waited seconds for a connection (#26). Shut it down
    /// when the server is done with it. On the server's event loops (`group`), a reply's upstream
    /// connection is read on the loop that writes its tokens to the requester's socket.
    /// `connectTimeout`: how long a connection may take to open; AsyncHTTPClient keeps trying a
    /// refused one until then (a model server restarting is back within it), after which the
    /// attempt fails and is retried before the first token like any other.
    public static func forProvider(
        connections: Int, connectTimeout: Duration = .seconds(10), on group: (any EventLoopGroup)? = nil
    ) -> HTTPClient {
        var configuration = HTTPClient.Configuration.singletonConfiguration
        configuration.connectionPool = .init(idleTimeout: .seconds(600), concurrentHTTP1ConnectionsPerHostSoftLimit: max(8, connections))
        // Parley asks for no compression; none is decoded (a decompressor per connection cost
        // CPU on every read).
        configuration.decompression = .disabled
        configuration.timeout.connect = TimeAmount(connectTimeout)
        // A reply's own watchdog times its stream (the first token, then each gap); the
        // browser-like 90 s read timeout would re-arm a timer on every read (#26: 3.5% of the
        // provider path's CPU). Requests without a watchdog (voice) carry a deadline of their own.
        configuration.timeout.read = nil
        return HTTPClient(eventLoopGroupProvider: group.map { .shared($0) } ?? .singleton, configuration: configuration)
    }
}
