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
    /// Until the response head arrives (connecting included).
    public var connectTimeout: Duration = .seconds(10)
    /// From the request to the first token.
    public var firstTokenTimeout: Duration = .seconds(60)
    /// Between two tokens.
    public var idleTimeout: Duration = .seconds(30)
    /// Attempts after the first when the request fails before any token was sent (connection
    /// refused, 429, 5xx). After the first token nothing is retried: the user already saw it.
    public var retries = 2
    /// The longest a whole reply may take.
    public var maxDuration: Duration = .seconds(600)

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
/// Parley's own count (the prompt estimate and the pieces delivered). Cancelling the consuming
/// task cancels the HTTP request, which closes its connection: no orphaned upstream stream.
public struct OpenAICompatibleProvider: LLMProvider {
    public let options: HTTPProviderOptions
    let client: HTTPClient

    public init(options: HTTPProviderOptions, client: HTTPClient = .shared) {
        self.options = options
        self.client = client
    }

    public func modelName(for request: CompletionRequest) -> String { request.model ?? options.model }

    public func stream(_ request: CompletionRequest) -> LLMEventStream {
        let body = JSONValue.object([
            ("model", .string(modelName(for: request))),
            ("messages", .array(request.messages.map { .object([("role", .string($0.role.rawValue)), ("content", .string($0.text))]) })),
            ("stream", .bool(true)),
            ("stream_options", .object([("include_usage", .bool(true))])),
            ("max_tokens", .int(Int64(request.maxOutputTokens))),
        ])
        let auth = options.apiKey.map { [("authorization", "Bearer \($0)")] } ?? []
        let http = HTTPStreaming.post(options.baseURL + "/chat/completions", json: body, headers: auth)
        return HTTPStreaming.stream(http, client: client, options: options, request: request, parts: OpenAIChatDialect.parts(of:))
    }
}

/// The request loop both HTTP providers share: retries before the first token, first-token and
/// idle timeouts, SSE parsing, usage, and error mapping to messages safe to show a user.
enum HTTPStreaming {
    /// A streaming JSON POST with the provider's own `headers` added.
    static func post(_ url: String, json: JSONValue, headers: [(String, String)]) -> HTTPClientRequest {
        var http = HTTPClientRequest(url: url)
        http.method = .POST
        http.headers.add(name: "content-type", value: "application/json")
        http.headers.add(name: "accept", value: "text/event-stream")
        for (name, value) in headers { http.headers.add(name: name, value: value) }
        http.body = .bytes(ByteBuffer(bytes: json.serialized()))
        return http
    }

    static func stream(
        _ http: HTTPClientRequest, client: HTTPClient, options: HTTPProviderOptions, request: CompletionRequest,
        parts: @escaping @Sendable (SSEEvent) throws(ProviderError) -> [StreamPart]
    ) -> LLMEventStream {
        let (stream, continuation) = LLMEventStream.makeStream()
        let task = Task {
            var attempt = 0
            while true {
                let progress = Progress()
                do {
                    try await once(
                        http, client: client, options: options, request: request, parts: parts, continuation: continuation, progress: progress)
                    continuation.finish()
                    return
                } catch is CancellationError {
                    continuation.finish()
                    return
                } catch let failure as Failure
                    where failure.retryable && progress.delivered.load(ordering: .relaxed) == 0 && attempt < options.retries
                {
                    attempt += 1
                    try? await Task.sleep(for: .milliseconds(250 * attempt))
                    if Task.isCancelled {
                        continuation.finish()
                        return
                    }
                } catch let failure as Failure {
                    continuation.finish(throwing: ProviderError(failure.message))
                    return
                } catch let error as ProviderError {
                    continuation.finish(throwing: error)
                    return
                } catch {
                    if Task.isCancelled {
                        continuation.finish()
                    } else {
                        continuation.finish(throwing: ProviderError("the model provider could not be reached"))
                    }
                    return
                }
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    /// What one attempt delivered and when it last did, shared with its watchdog.
    final class Progress: Sendable {
        let delivered = Atomic<Int>(0)
        let last = Mutex(ContinuousClock.now)
    }

    /// A failure of one attempt; `retryable` when trying again may help.
    struct Failure: Error {
        var message: String
        var retryable: Bool
    }

    private static func once(
        _ http: HTTPClientRequest, client: HTTPClient, options: HTTPProviderOptions, request: CompletionRequest,
        parts: @escaping @Sendable (SSEEvent) throws(ProviderError) -> [StreamPart], continuation: LLMEventStream.Continuation,
        progress: Progress
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                let response: HTTPClientResponse
                do {
                    response = try await client.execute(http, deadline: .now() + .seconds(options.maxDuration.components.seconds))
                } catch is CancellationError {
                    throw CancellationError()
                } catch {
                    throw Failure(message: "the model provider could not be reached", retryable: true)
                }
                guard response.status == .ok else {
                    let body = (try? await response.body.collect(upTo: 64 * 1024)) ?? ByteBuffer()
                    let detail = (try? JSONValue.parse(body.readableBytesView)).map { OpenAIChatDialect.message($0["error"] ?? $0) }
                    let code = response.status.code
                    throw Failure(
                        message: "the model provider answered HTTP \(code)" + (detail.map { ": \($0)" } ?? ""),
                        retryable: code == 429 || code >= 500)
                }
                var parser = SSEParser()
                var input: Int?
                var output: Int?
                var pieces = 0
                stream: for try await chunk in response.body {
                    for event in try parser.feed(chunk.readableBytesView) {
                        for part in try parts(event) {
                            switch part {
                            case .text(let text):
                                pieces += 1
                                progress.delivered.store(pieces, ordering: .relaxed)
                                progress.last.withLock { $0 = .now }
                                continuation.yield(.token(text))
                            case .usage(let i, let o):
                                input = i ?? input
                                output = o ?? output
                            case .finish:
                                break
                            case .done:
                                break stream
                            }
                        }
                    }
                }
                let estimated = request.messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
                continuation.yield(.usage(Usage(inputTokens: input ?? estimated, outputTokens: output ?? pieces)))
            }
            // The watchdog: the first token within `firstTokenTimeout`, then no gap over `idleTimeout`.
            group.addTask {
                while true {
                    let (since, first) = (progress.last.withLock { $0 }, progress.delivered.load(ordering: .relaxed) == 0)
                    let limit = first ? options.firstTokenTimeout : options.idleTimeout
                    let due = since + limit
                    if ContinuousClock.now >= due {
                        throw Failure(
                            message: first ? "the model provider sent nothing in time" : "the model provider stopped sending",
                            retryable: first)
                    }
                    try await Task.sleep(until: min(due, .now + .milliseconds(500)))
                }
            }
            try await group.next()  // the reply ended (or failed): stop the watchdog
            group.cancelAll()
        }
    }
}

extension HTTPClient {
    /// A client of its own for one model provider, allowed as many HTTP/1 connections to the
    /// provider's host as replies may stream at once. `HTTPClient.shared` allows 8 per host: at
    /// 100 concurrent replies the other 92 waited seconds for a connection (#26). Shut it down
    /// when the server is done with it.
    public static func forProvider(connections: Int) -> HTTPClient {
        var configuration = HTTPClient.Configuration.singletonConfiguration
        configuration.connectionPool = .init(idleTimeout: .seconds(600), concurrentHTTP1ConnectionsPerHostSoftLimit: max(8, connections))
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }
}
