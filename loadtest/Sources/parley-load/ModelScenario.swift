import ArgumentParser
import AsyncHTTPClient
import Foundation
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyProviders

/// Replies from a real model, closed loop (each stream asks again when its reply ended), either
/// through Parley or, with `--direct`, straight from the model server with the very prompt
/// Parley would send. Run both against the same model server: the difference in time to first
/// token and inter-token gap is what Parley adds.
struct Model: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Closed-loop replies from a real model through Parley, or with --direct from the model server itself: Parley's added latency.")
    @OptionGroup var target: TargetOptions
    @Option(help: "Concurrent streams (one socket, user and clone each).") var streams = 4
    @Option(help: "Replies each stream asks for, one after the other.") var requests = 5
    @Option(help: "An OpenAI-compatible base URL (e.g. http://127.0.0.1:8081/v1): ask the model server directly, not Parley.")
    var direct: String?
    @Option(help: "--direct: the model to ask for.") var model = "smollm2"
    @Option(help: "--direct: max_tokens (give the Parley server's --max-reply-tokens).") var maxTokens = 1024
    @Option(help: "Seconds to wait for all replies.") var timeout = 300.0

    static let text = "Tell me something short about the sea."

    func validate() throws {
        guard (1...256).contains(streams), (1...10_000).contains(requests), maxTokens >= 1 else {
            throw ArgumentParser.ValidationError("--streams 1-256, --requests 1-10000, --max-tokens ≥ 1")
        }
        if let direct {
            guard let host = URL(string: direct)?.host, direct.hasPrefix("http://") || direct.hasPrefix("https://") else {
                throw ArgumentParser.ValidationError("--direct must be an http(s) URL")
            }
            guard TargetOptions.isLoopback(host) || target.allowRemote else {
                throw ArgumentParser.ValidationError("refusing to load \(host): only loopback targets unless --allow-remote")
            }
        }
    }

    func run() async throws {
        let run = target.run(direct == nil ? "model" : "model-direct")
        run.parameters = ["streams": streams, "requests": requests, "via": direct == nil ? "parley" : "direct"]
        try await running(run) {
            if let direct {
                try await runDirect(run, url: direct)
            } else {
                try await runThroughParley(run)
            }
        }
    }

    /// The clone stream `index` chats with, as `RESTClient.createClones` makes it.
    static func clone(_ index: Int) -> Clone {
        Clone(id: "", owner: "", name: "Load \(index)", traits: ["brief"], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
    }

    private func runThroughParley(_ run: LoadRun) async throws {
        let source = try target.tokens()
        let tokens = try (0..<streams).map { try source.token(for: "\(target.userPrefix)-r\($0)") }
        let clones = try await target.rest.createClones(tokens: tokens)
        let connected = try await run.connect(tokens: tokens)
        let ended = Countdown(streams * requests)
        run.startMeasuring()
        for socket in connected {
            let clone = clones[socket.index]
            try await socket.channel.eventLoop.submit {
                let role = ClosedLoopChatRole(clone: clone, text: Self.text, requests: requests, ended: ended)
                socket.role = role
                role.sendNext(on: socket)
            }.get()
        }
        if !(await ended.wait(timeout: .seconds(timeout))) { print("\(ended.left) replies did not end within \(timeout) s") }
        try await run.finish(json: target.json)
        try await close(connected)
    }

    private func runDirect(_ run: LoadRun, url: String) async throws {
        let client = HTTPClient(eventLoopGroup: run.group)
        let provider = OpenAICompatibleProvider(
            options: HTTPProviderOptions(baseURL: url, apiKey: ProcessInfo.processInfo.environment["OPENAI_API_KEY"], model: model), client: client)
        run.startMeasuring()
        let recorders = try await boundedMap(streams, width: streams) { index in
            let recorder = Recorder()
            let request = CompletionRequest(
                messages: [
                    PromptMessage(role: .system, text: PromptAssembler.systemText(for: Self.clone(index))),
                    PromptMessage(role: .user, text: Self.text),
                ],
                maxOutputTokens: maxTokens)
            for _ in 0..<requests {
                let sent = nowNanos()
                var clock = TokenClock()
                do {
                    for try await event in provider.stream(request) {
                        guard case .token = event else { continue }
                        let now = nowNanos()
                        recorder.tokens += 1
                        recorder.frames += 1
                        if let gap = clock.tick(now) { recorder.record(.gap, nanos: gap) } else { recorder.record(.ttft, nanos: now - sent) }
                    }
                    recorder.record(.stream, nanos: nowNanos() - sent)
                    recorder.streams += 1
                } catch {
                    recorder.errors[(error as? ProviderError)?.message ?? "\(error)", default: 0] += 1
                }
            }
            return recorder
        }
        try await run.absorb(recorders)
        try await run.finish(json: target.json)
        try await client.shutdown()
    }
}

/// Asks for a reply, waits for its `stream.end` (or error), asks again, `requests` times; times
/// each reply from its send.
final class ClosedLoopChatRole: SocketRole {
    let clone: String
    let text: String
    var left: Int
    let ended: Countdown
    var sentAt: UInt64 = 0
    var clock = TokenClock()
    /// Whether the current request's `stream.start` came: an error before it is a refusal that
    /// ends the request, one after it comes with a `stream.end` that does.
    var started = false

    init(clone: String, text: String, requests: Int, ended: Countdown) {
        self.clone = clone
        self.text = text
        left = requests
        self.ended = ended
    }

    func sendNext(on socket: LoadSocket) {
        guard left > 0 else { return }
        left -= 1
        sentAt = nowNanos()
        clock = TokenClock()
        started = false
        socket.send(#"{"type":"chat.send","id":"m\#(left)","clone":"\#(clone)","text":"\#(text)"}"#)
    }

    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket) {
        switch type {
        case .streamStart:
            started = true
        case .token:
            for _ in 0..<bytes.tokenCount {
                socket.recorder.tokens += 1
                if let gap = clock.tick(nanos) {
                    socket.recorder.record(.gap, nanos: gap)
                } else {
                    socket.recorder.record(.ttft, nanos: nanos &- sentAt)
                }
            }
        case .streamEnd:
            socket.recorder.record(.stream, nanos: nanos &- sentAt)
            socket.recorder.streams += 1
            ended.tick()
            sendNext(on: socket)
        case .error where !started:
            // A refused request (the socket counted its code).
            ended.tick()
            sendNext(on: socket)
        default:
            break
        }
    }
}
