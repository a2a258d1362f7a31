import NIOCore
import Synchronization
import ParleyCore

/// What a provider is asked to complete.
public struct CompletionRequest: Sendable, Equatable {
    /// The model to use; nil means the provider's default.
    public var model: String?
    /// System message first, then the conversation, ending with the message to answer.
    public var messages: [PromptMessage]
    /// The name the reply speaks as (a clone's name), for providers that can use it.
    public var speaker: String?
    public var maxOutputTokens: Int
    /// Set when the completion is a translation (the prompt asks for it; real providers need
    /// nothing more). The simulated provider uses it to give a predictable stand-in.
    public var translation: TranslationTask?

    public init(model: String? = nil, messages: [PromptMessage], speaker: String? = nil, maxOutputTokens: Int, translation: TranslationTask? = nil) {
        self.model = model
        self.messages = messages
        self.speaker = speaker
        self.maxOutputTokens = maxOutputTokens
        self.translation = translation
    }
}

/// What a translation completion translates.
public struct TranslationTask: Sendable, Equatable {
    public var text: String
    public var from: LanguageTag
    public var to: LanguageTag

    public init(text: String, from: LanguageTag, to: LanguageTag) {
        self.text = text
        self.from = from
        self.to = to
    }
}

/// One event of a streamed completion: text tokens in order, then usage once at the end.
public enum LLMEvent: Sendable, Equatable {
    case token(String)
    case usage(Usage)
}

/// A streamed completion: tokens, then exactly one `.usage` when generation finished. Cancelling
/// the consuming task stops generation early: iteration then throws `CancellationError` or
/// simply ends, in either case without a `.usage` event (which is how a consumer tells a
/// stopped stream from a finished one).
public typealias LLMEventStream = AsyncThrowingStream<LLMEvent, any Error>

/// The one interface every LLM backend implements.
public protocol LLMProvider: Sendable {
    /// The model name reported to clients in `stream.start`.
    func modelName(for request: CompletionRequest) -> String
    func stream(_ request: CompletionRequest) -> LLMEventStream
}

/// A provider failure whose message is safe to show the client.
public struct ProviderError: Error, Equatable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
}

/// Receives a pushed completion (`PushingLLMProvider.start`) on the event loop it was started on,
/// and only there: tokens in order, then `.usage` once, then `finished(nil)`; or `finished` with
/// the error that cut it short. Nothing arrives after `finished`, or after the run was cancelled.
public protocol LLMEventSink: AnyObject {
    func received(_ event: LLMEvent)
    func finished(_ error: (any Error)?)
}

/// A pushed completion in progress.
public protocol LLMRun: Sendable {
    /// Stops generation; from any thread. Once the run's loop has taken the cancel, no event
    /// and no `finished` reach the sink.
    func cancel()
}

/// A provider that can hand each event to its reader on an event loop as it is made, with no
/// task, stream buffer or thread hop between a token and the code that sends it on: the token
/// path of a reply then runs on the loop of the socket it is written to.
public protocol PushingLLMProvider: LLMProvider {
    /// Starts generating `request`; every call to `sink` happens on `loop`. Call it on `loop`.
    func start(_ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink) -> any LLMRun
}

/// Starts `request` on `provider` with every event handed to `sink` on `loop`: through the
/// provider's own push when it has one, otherwise by reading its stream in a task and handing
/// each event over to `loop` (one hop per event). Call it on `loop`.
public func startPushing(
    _ provider: any LLMProvider, _ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink
) -> any LLMRun {
    if let pushing = provider as? any PushingLLMProvider { return pushing.start(request, on: loop, sink: sink) }
    return PulledRun(provider.stream(request), on: loop, sink: sink)
}

/// A pulled stream pushed to a sink: a task reads it and hands each event to `loop`. `sink` and
/// `reader` are touched only on `loop` (hence unchecked Sendable); a cancel clears the sink.
final class PulledRun: LLMRun, @unchecked Sendable {
    private let loop: any EventLoop
    private var sink: (any LLMEventSink)?
    private var reader: Task<Void, Never>?

    init(_ events: LLMEventStream, on loop: any EventLoop, sink: any LLMEventSink) {
        self.loop = loop
        self.sink = sink
        reader = Task { [loop] in
            do {
                for try await event in events { loop.execute { self.sink?.received(event) } }
                loop.execute { self.end(nil) }
            } catch {
                loop.execute { self.end(error) }
            }
        }
    }

    private func end(_ error: (any Error)?) {
        let sink = self.sink
        self.sink = nil
        reader = nil
        sink?.finished(error)
    }

    func cancel() {
        if loop.inEventLoop {
            sink = nil
            reader?.cancel()
            reader = nil
        } else {
            loop.execute { self.cancel() }
        }
    }
}

extension PushingLLMProvider {
    /// The pushed events of `request` as a stream, for a reader that pulls (tests, tools): the
    /// run is started on `loop`, and ending the stream (its reader cancelled or gone) cancels it.
    public func pulledStream(_ request: CompletionRequest, on loop: any EventLoop) -> LLMEventStream {
        let (stream, continuation) = LLMEventStream.makeStream()
        let sink = ContinuationSink(continuation)
        continuation.onTermination = { _ in sink.terminate() }
        loop.execute { sink.started(self.start(request, on: loop, sink: sink)) }
        return stream
    }
}

/// Yields pushed events into a stream's continuation; cancels the run when the stream ends first.
private final class ContinuationSink: LLMEventSink, Sendable {
    private let continuation: LLMEventStream.Continuation
    /// The run once started, and whether the reader is gone (then the run is cancelled).
    private let state = Mutex<(run: (any LLMRun)?, terminated: Bool)>((nil, false))

    init(_ continuation: LLMEventStream.Continuation) { self.continuation = continuation }

    func started(_ run: any LLMRun) {
        let terminated = state.withLock { s -> Bool in
            s.run = run
            return s.terminated
        }
        if terminated { run.cancel() }
    }

    func terminate() {
        let run = state.withLock { s -> (any LLMRun)? in
            s.terminated = true
            defer { s.run = nil }
            return s.run
        }
        run?.cancel()
    }

    func received(_ event: LLMEvent) { continuation.yield(event) }

    func finished(_ error: (any Error)?) {
        state.withLock { $0.run = nil }
        if let error { continuation.finish(throwing: error) } else { continuation.finish() }
    }
}
