import NIOCore
import ParleyCore
import Synchronization

/// A development and load-test provider: no model, no network. Its replies are deterministic
/// functions of the prompt and speaker (the same prompt always gets the same reply), its token
/// counts are exact, and its pacing (time to first token, tokens per second) is configurable, so
/// tests can predict every frame and load tests can model a real model's rhythm.
/// It is not an LLM and must never be presented to users as one.
public struct SimulatedProvider: PushingLLMProvider {
    public struct Configuration: Sendable, Equatable {
        /// Delay before the first token.
        public var timeToFirstToken: Duration
        /// Pace after the first token; 0 or less means as fast as possible.
        public var tokensPerSecond: Double
        /// Length of every reply in tokens, unless the request asks for fewer.
        public var replyTokens: Int

        public init(timeToFirstToken: Duration = .milliseconds(200), tokensPerSecond: Double = 30, replyTokens: Int = 60) {
            self.timeToFirstToken = timeToFirstToken
            self.tokensPerSecond = tokensPerSecond
            self.replyTokens = replyTokens
        }
    }

    public static let modelName = "simulated"

    public var configuration: Configuration

    /// The clocks pushed replies wait on, one per event loop.
    private let tickers = LoopTickers()

    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
    }

    public func modelName(for request: CompletionRequest) -> String { Self.modelName }

    /// Input tokens as this provider counts them: every prompt message plus its framing.
    public static func inputTokens(_ request: CompletionRequest) -> Int {
        request.messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
    }

    /// The simulated stand-in for a translation into `tag`: the original text, unchanged, behind
    /// a label that says it is not a translation. Tests can predict it exactly.
    public static func translationStandIn(_ text: String, to tag: LanguageTag) -> String {
        "[simulated \(tag) translation] " + text
    }

    /// The exact tokens `stream` will emit for `request`.
    public func replyTokens(for request: CompletionRequest) -> [String] {
        if let task = request.translation {
            return Tokenizer.tokens(Self.translationStandIn(task.text, to: task.to)).prefix(max(0, request.maxOutputTokens)).map(String.init)
        }
        let length = max(0, min(configuration.replyTokens, request.maxOutputTokens))
        guard length > 0 else { return [] }
        var hasher = FNV1a()
        hasher.add(request.speaker ?? "")
        for message in request.messages {
            hasher.add(message.role.rawValue)
            hasher.add(message.text)
        }
        var rng = SplitMix64(seed: hasher.value)
        let lastUser = request.messages.last { $0.role == .user }?.text ?? ""
        let topics = Tokenizer.tokens(lastUser)
            .map { String($0).trimmedWhitespace }
            .filter { $0.count >= 4 && $0.allSatisfy { $0.isLetter } }
            .map { $0.lowercased() }

        var text = ""
        if let speaker = request.speaker, !speaker.isEmpty {
            text += "\(Self.openers[Int(rng.next() % UInt64(Self.openers.count))]) \(speaker) here."
        } else {
            text += Self.openers[Int(rng.next() % UInt64(Self.openers.count))] + "."
        }
        // Generate past the wanted length, then cut to exactly `length` tokens. Counting is
        // additive here (the text ends in punctuation and each sentence starts with " " and a
        // letter), so each sentence is counted once instead of the whole text again (O(n²)).
        var count = Tokenizer.count(text)
        while count < length + 1 {
            let words = 5 + Int(rng.next() % 8)
            var sentence: [String] = []
            for w in 0..<words {
                if !topics.isEmpty, w == 2 || rng.next() % 6 == 0 {
                    sentence.append(topics[Int(rng.next() % UInt64(topics.count))])
                } else {
                    sentence.append(Self.words[Int(rng.next() % UInt64(Self.words.count))])
                }
            }
            let first = sentence[0]
            sentence[0] = first.prefix(1).uppercased() + first.dropFirst()
            let piece = " " + sentence.joined(separator: " ") + (rng.next() % 4 == 0 ? "?" : ".")
            text += piece
            count += Tokenizer.count(piece)
        }
        return Tokenizer.tokens(text).prefix(length).map(String.init)
    }

    /// The reply's tokens and the usage reported after them.
    private func reply(to request: CompletionRequest) -> (tokens: [String], usage: Usage) {
        let tokens = replyTokens(for: request)
        return (tokens, Usage(inputTokens: Self.inputTokens(request), outputTokens: tokens.count))
    }

    public func stream(_ request: CompletionRequest) -> LLMEventStream {
        let (tokens, usage) = reply(to: request)
        let pacing = Pacing(configuration)
        let state = Mutex(StreamState())
        // `unfolding` runs in the consumer's task, so cancelling that task interrupts the sleep.
        return LLMEventStream(unfolding: {
            let (index, start) = state.withLock { s -> (Int, ContinuousClock.Instant) in
                if s.start == nil { s.start = .now }
                defer { s.next += 1 }
                return (s.next, s.start!)
            }
            if index < tokens.count {
                try await ContinuousClock().sleep(until: start.advanced(by: pacing.offset(ofToken: index)))
                return .token(tokens[index])
            }
            if index == tokens.count { return .usage(usage) }
            return nil
        })
    }

    /// The same events as `stream`, pushed from timers on `loop`: no task and no sleep per token.
    public func start(_ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink) -> any LLMRun {
        let (tokens, usage) = reply(to: request)
        let run = PushedRun(
            tokens: tokens, usage: usage, pacing: Pacing(configuration), loop: loop, ticker: tickers.ticker(for: loop), sink: sink)
        run.begin()
        return run
    }

    /// One pushed reply. Its state is touched only on `loop` (hence unchecked Sendable): each
    /// timer delivers every token due by then, so a late tick catches up instead of drifting.
    final class PushedRun: LLMRun, Ticking, @unchecked Sendable {
        /// Most tokens handed over in one fire; the rest follow in the ticker's next, after the
        /// loop polled, so an unpaced reply does not hold its loop for its whole length.
        static let tokensPerTick = 64

        private let tokens: [String]
        private let usage: Usage
        /// `Pacing` in nanoseconds, converted once rather than per token.
        private let firstTokenNanos: Int64
        private let intervalNanos: Int64
        private let loop: any EventLoop
        private let ticker: LoopTicker
        private var sink: (any LLMEventSink)?
        private var next = 0
        private var startedAt = NIODeadline.uptimeNanoseconds(0)
        private var timer: TimerHandle?

        init(tokens: [String], usage: Usage, pacing: Pacing, loop: any EventLoop, ticker: LoopTicker, sink: any LLMEventSink) {
            self.ticker = ticker
            self.tokens = tokens
            self.usage = usage
            firstTokenNanos = TimeAmount(pacing.ttft).nanoseconds
            intervalNanos = TimeAmount(pacing.interval).nanoseconds
            self.loop = loop
            self.sink = sink
        }

        func begin() {
            loop.assertInEventLoop()
            startedAt = loop.now
            schedule()
        }

        func cancel() {
            if loop.inEventLoop {
                stop()
            } else {
                loop.execute { self.stop() }
            }
        }

        private func stop() {
            sink = nil
            if let timer { ticker.cancel(timer) }
            timer = nil
        }

        private func due(_ index: Int) -> NIODeadline {
            startedAt + .nanoseconds(firstTokenNanos + intervalNanos * Int64(index))
        }

        private func schedule() {
            if next < tokens.count {
                timer = ticker.schedule(self, at: due(next))
            } else {
                loop.execute { self.fire() }
            }
        }

        func tick() { fire() }

        private func fire() {
            timer = nil
            let now = loop.now
            var handed = 0
            // The sink may cancel from inside `received`: it is looked up again for every event.
            while let sink, next < tokens.count, due(next) <= now, handed < Self.tokensPerTick {
                next += 1
                handed += 1
                sink.received(.token(tokens[next - 1]))
            }
            guard let sink else { return }
            if next < tokens.count {
                // Through the ticker also when the next token is due already (an unpaced reply,
                // or one behind): it waits for the loop's poll, where a task queued now would run
                // before it (NIO runs every ready task first), holding the loop for the reply.
                schedule()
                return
            }
            self.sink = nil
            sink.received(.usage(usage))
            sink.finished(nil)
        }
    }

    private struct StreamState {
        var next = 0
        var start: ContinuousClock.Instant?
    }

    /// When each token is due, measured from the start of the stream (not from the previous
    /// token, so scheduling jitter does not accumulate).
    struct Pacing {
        var ttft: Duration
        var interval: Duration

        init(_ c: Configuration) {
            ttft = c.timeToFirstToken
            interval = c.tokensPerSecond > 0 ? .nanoseconds(Int64(1e9 / c.tokensPerSecond)) : .zero
        }

        func offset(ofToken index: Int) -> Duration { ttft + interval * index }
    }

    static let openers = ["Well", "Hello", "Right", "Honestly", "So", "Listen", "Ah"]
    static let words = [
        "the", "idea", "seems", "quite", "bright", "and", "I", "would", "say", "it", "really", "depends",
        "on", "how", "we", "look", "at", "small", "things", "every", "day", "maybe", "you", "could",
        "try", "another", "angle", "because", "time", "changes", "what", "matters", "most", "to",
        "people", "who", "care", "about", "stories", "music", "questions", "answers", "together",
    ]
}

/// 64-bit FNV-1a: a stable hash (Swift's `Hasher` is seeded per process, so replies would vary).
struct FNV1a {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325

    mutating func add(_ string: String) {
        for byte in string.utf8 {
            value ^= UInt64(byte)
            value = value &* 0x0000_0100_0000_01B3
        }
        value ^= 0xFF
        value = value &* 0x0000_0100_0000_01B3
    }
}
