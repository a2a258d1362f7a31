import AsyncHTTPClient
import NIOCore
import ParleyCore
import ParleyLLM

/// Anthropic's Messages API with `stream: true` (`x-api-key`, `anthropic-version`): input usage
/// from `message_start`, text from `content_block_delta`, the stop reason and output usage from
/// `message_delta`. Shares timeouts, retries and cancellation with the OpenAI-compatible provider.
public struct AnthropicProvider: PushingLLMProvider {
    public static let apiVersion = "2023-06-01"
    public let options: HTTPProviderOptions
    let client: HTTPClient
    /// Parley's own connections for a plain-http provider; `client` for the rest.
    let upstream: UpstreamConnections?

    /// `ownConnections`: as for `OpenAICompatibleProvider`.
    public init(options: HTTPProviderOptions, client: HTTPClient = .shared, ownConnections: Bool = true) {
        self.options = options
        self.client = client
        upstream = ownConnections ? UpstreamConnections(options) : nil
    }

    public func modelName(for request: CompletionRequest) -> String { request.model ?? options.model }

    public func start(_ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink) -> any LLMRun {
        let system = request.messages.filter { $0.role == .system }.map(\.text).joined(separator: "\n\n")
        var body: [(String, JSONValue)] = [
            ("model", .string(modelName(for: request))),
            ("max_tokens", .int(Int64(request.maxOutputTokens))),
            ("stream", .bool(true)),
            ("messages", .array(Self.turns(request.messages).map { .object([("role", .string($0.role)), ("content", .string($0.text))]) })),
        ]
        if !system.isEmpty { body.append(("system", .string(system))) }
        var headers = [("anthropic-version", Self.apiVersion)]
        if let key = options.apiKey { headers.append(("x-api-key", key)) }
        let http = HTTPStreaming.post("/v1/messages", json: .object(body), headers: headers)
        return HTTPStreaming.start(
            http, client: client, upstream: upstream, options: options, request: request, parts: AnthropicMessagesDialect.parts(of:), on: loop,
            sink: sink)
    }

    public func stream(_ request: CompletionRequest) -> LLMEventStream { pulledStream(request, on: client.eventLoopGroup.any()) }

    /// The conversation as Messages wants it: user and assistant turns, starting with the user,
    /// consecutive turns of one role merged.
    static func turns(_ messages: [PromptMessage]) -> [(role: String, text: String)] {
        var out: [(role: String, text: String)] = []
        for message in messages where message.role != .system {
            let role = message.role == .assistant ? "assistant" : "user"
            if out.last?.role == role {
                out[out.count - 1].text += "\n\n" + message.text
            } else {
                out.append((role, message.text))
            }
        }
        if out.first?.role == "assistant" { out.insert(("user", "(The conversation so far.)"), at: 0) }
        return out
    }
}
