import NIOHTTP1
import ParleyCore
import ParleyLLM
import ParleyServer
import ParleyTestSupport
import Testing

/// One streamed reply as a client saw it.
struct StreamedReply {
    var start: JSONValue
    var tokens: [JSONValue]
    var end: JSONValue

    var stream: String { start["stream"]!.stringValue! }
    var conversation: String { start["conversation"]!.stringValue! }
    var text: String { tokens.map { $0["text"]!.stringValue! }.joined() }
    var seqs: [Int64] { tokens.map { $0["seq"]!.intValue! } }
    var reason: String? { end["reason"]?.stringValue }
}

extension TestWebSocket {
    func chatSend(id: String, clone: String, conversation: String? = nil, text: String) async throws {
        var pairs: [(String, JSONValue)] = [("type", .string("chat.send")), ("id", .string(id)), ("clone", .string(clone))]
        if let conversation { pairs.append(("conversation", .string(conversation))) }
        pairs.append(("text", .string(text)))
        try await send(.object(pairs))
    }

    func chatCancel(id: String, stream: String) async throws {
        try await send(.object([("type", .string("chat.cancel")), ("id", .string(id)), ("stream", .string(stream))]))
    }

    /// Reads a whole stream: `stream.start`, its tokens, `stream.end`. Fails on an `error` frame.
    func readReply() async throws -> StreamedReply {
        let start = try await nextJSON()
        guard start["type"] == .string("stream.start") else {
            throw TestTimeout(description: "expected stream.start, got \(start)")
        }
        var tokens: [JSONValue] = []
        while true {
            let frame = try await nextJSON()
            switch frame["type"]?.stringValue {
            case "token": tokens.append(frame)
            case "stream.end": return StreamedReply(start: start, tokens: tokens, end: frame)
            default: throw TestTimeout(description: "unexpected frame in a stream: \(frame)")
            }
        }
    }

    /// Reads up to and including the next token frame.
    func readUntilToken() async throws -> JSONValue {
        try await next(type: "token").frame
    }
}

extension TestServer {
    func get(_ uri: String, token: String?) async throws -> TestHTTPResponse {
        try await TestHTTPClient.request(port: port, .GET, uri, token: token)
    }

    /// The raw upgrade request a browser sends, answered with whatever status the server chose.
    func upgradeAttempt(uri: String = "/v1/ws", token: String? = nil) async throws -> TestHTTPResponse {
        try await TestHTTPClient.request(
            port: port, .GET, uri, token: token,
            headers: [
                "upgrade": "websocket", "connection": "upgrade",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13",
            ])
    }
}

typealias ExpectedReply = (tokens: [String], inputTokens: Int)

/// The reply the simulated provider gives a clone for a transcript, computed the way the server does.
func expectedReply(configuration: ServerConfiguration, clone: Clone, history: [Message], user: Persona? = nil) -> ExpectedReply {
    let prompt = PromptAssembler(contextBudget: configuration.contextBudgetTokens).assemble(clone: clone, history: history, user: user)
    let request = CompletionRequest(messages: prompt.messages, speaker: clone.name, maxOutputTokens: configuration.maxOutputTokens)
    let provider = SimulatedProvider(configuration: configuration.simulated)
    return (provider.replyTokens(for: request), SimulatedProvider.inputTokens(request))
}

func cloneValue(_ json: JSONValue, owner: String) -> Clone {
    var sliders: [String: Int] = [:]
    if case .object(let pairs)? = json["sliders"] { for (k, v) in pairs { sliders[k] = Int(v.intValue!) } }
    return Clone(
        id: json["id"]!.stringValue!, owner: owner, name: json["name"]!.stringValue!,
        traits: json["traits"]!.arrayValue!.map { $0.stringValue! }, systemPrompt: json["system_prompt"]!.stringValue!,
        sliders: sliders, memory: json["memory"]!.arrayValue!.map { $0.stringValue! }, createdAt: 0, updatedAt: 0
    )
}

/// A server whose replies are long and paced, with one reply already streaming.
struct LongReply {
    var server: TestServer
    var token: String
    var clone: String
    var socket: TestWebSocket
    var start: JSONValue
    /// The tokens read so far (at least the first, so generation is under way).
    var tokens: [JSONValue]

    var stream: JSONValue { start["stream"]! }
    var conversation: String { start["conversation"]!.stringValue! }

    static func start(tokensPerSecond: Double = 20) async throws -> LongReply {
        let server = try await TestServer.start {
            $0.simulated.tokensPerSecond = tokensPerSecond
            $0.simulated.replyTokens = 1000
        }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Talk for a long time")
        let start = try await socket.nextJSON()
        let first = try await socket.readUntilToken()
        return LongReply(server: server, token: token, clone: clone, socket: socket, start: start, tokens: [first])
    }
}
