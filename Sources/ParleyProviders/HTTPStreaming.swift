import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import ParleyCore
import ParleyLLM

/// The request loop both HTTP providers share: retries before the first token, first-token and
/// idle timeouts, SSE parsing, usage, and error mapping to messages safe to show a user.
enum HTTPStreaming {
    /// A JSON POST to `endpoint` under the provider's base URL that asks for an event stream,
    /// with the provider's own `headers` added.
    static func post(_ endpoint: String, json: JSONValue, headers: [(String, String)]) -> Post {
        var fields = HTTPHeaders([("content-type", "application/json"), ("accept", "text/event-stream")])
        for (name, value) in headers { fields.add(name: name, value: value) }
        return Post(endpoint: endpoint, headers: fields, body: ByteBuffer(bytes: json.serialized()))
    }

    struct Post: Sendable {
        /// The path under the provider's base URL (AsyncHTTPClient is given the whole URL; Parley's
        /// own connections, made from that URL, the base path and this).
        var endpoint: String
        var headers: HTTPHeaders
        var body: ByteBuffer
    }

    /// Starts `post` and pushes its reply to `sink` on `loop` (see `Run`).
    static func start(
        _ post: Post, client: HTTPClient, upstream: UpstreamConnections?, options: HTTPProviderOptions, request: CompletionRequest,
        parts: @escaping @Sendable (SSEEvent) throws(ProviderError) -> [StreamPart], on loop: any EventLoop, sink: any LLMEventSink
    ) -> any LLMRun {
        let run = Run(post, client: client, upstream: upstream, options: options, request: request, parts: parts, loop: loop, sink: sink)
        run.attempt()
        return run
    }

    /// A failure of one attempt; `retryable` when trying again may help.
    struct Failure: Error {
        var message: String
        var retryable: Bool
    }

    /// One reply from an HTTP model provider, read on `loop`: each body part is parsed and its
    /// tokens handed to `sink` where they arrive, with no task, stream buffer or thread hop in
    /// between when the connection lives on `loop` too (Parley's own `upstream` connections for
    /// a plain-http provider, or an `HTTPClient` on the server's event loops; any other client's
    /// reads are handed over to `loop`). One timer per attempt
    /// watches the first-token and idle limits, re-armed only when it fires. Its state is
    /// touched only on `loop` (hence unchecked Sendable).
    final class Run: LLMRun, @unchecked Sendable {
        private let post: Post
        private let client: HTTPClient
        private let upstream: UpstreamConnections?
        private let options: HTTPProviderOptions
        private let request: CompletionRequest
        private let parts: @Sendable (SSEEvent) throws(ProviderError) -> [StreamPart]
        private let loop: any EventLoop
        /// Nil once the reply finished or was cancelled: nothing reaches it after that.
        private var sink: (any LLMEventSink)?
        /// The attempt being made (1-based); callbacks of an earlier one are ignored.
        private var attempts = 0
        /// The attempt's response is still awaited: false once it ended, failed or was given up.
        private var awaiting = false
        private var task: HTTPClient.Task<Void>?
        private var exchange: UpstreamExchange?
        private var watchdog: Scheduled<Void>?
        /// When the watchdog fires.
        private var watchdogDue = NIODeadline.distantFuture
        private var retry: Scheduled<Void>?
        private var status: HTTPResponseStatus?
        /// An error answer's body, kept (up to 64 KiB) for its message.
        private var errorBody = ByteBuffer()
        private var parser = SSEParser()
        private var input: Int?
        private var output: Int?
        private var pieces = 0
        private var lastProgress = NIODeadline.now()
        /// `options`' first-token and idle limits, converted once: the idle one is read per token.
        private let firstTokenLimit: TimeAmount
        private let idleLimit: TimeAmount

        init(
            _ post: Post, client: HTTPClient, upstream: UpstreamConnections?, options: HTTPProviderOptions, request: CompletionRequest,
            parts: @escaping @Sendable (SSEEvent) throws(ProviderError) -> [StreamPart], loop: any EventLoop, sink: any LLMEventSink
        ) {
            self.post = post
            self.client = client
            self.upstream = upstream
            self.options = options
            self.request = request
            self.parts = parts
            self.loop = loop
            self.sink = sink
            firstTokenLimit = TimeAmount(options.firstTokenTimeout)
            idleLimit = TimeAmount(options.idleTimeout)
        }

        func cancel() {
            guard loop.inEventLoop else {
                loop.execute { self.cancel() }
                return
            }
            sink = nil
            endAttempt()
            retry?.cancel()
            retry = nil
        }

        /// Makes the next attempt. Called on `loop`.
        func attempt() {
            guard sink != nil else { return }
            attempts += 1
            status = nil
            errorBody.clear()
            parser = SSEParser()
            lastProgress = .now()
            awaiting = true
            if let upstream {
                let head = HTTPRequestHead(version: .http1_1, method: .POST, uri: upstream.basePath + post.endpoint, headers: post.headers)
                exchange = upstream.send(
                    head, body: post.body, on: loop, deadline: .now() + TimeAmount(options.maxDuration),
                    to: Receiver(run: self, attempt: attempts))
            } else {
                let http: HTTPClient.Request
                do {
                    http = try HTTPClient.Request(
                        url: options.baseURL + post.endpoint, method: .POST, headers: post.headers, body: .byteBuffer(post.body))
                } catch {
                    finish(ProviderError("the model provider's URL is not valid"))
                    return
                }
                // On the client's own loops the connection is made on `loop` (AsyncHTTPClient
                // insists the loop be one of them); otherwise each callback is handed over to `loop`.
                let own = client.eventLoopGroup.makeIterator().contains { $0 === loop }
                task = client.execute(
                    request: http, delegate: Delegate(run: self, attempt: attempts, loop: loop),
                    eventLoop: own ? .delegateAndChannel(on: loop) : .indifferent,
                    deadline: .now() + TimeAmount(options.maxDuration))
            }
            armWatchdog()
        }

        // MARK: The response, on `loop`

        fileprivate func head(_ head: HTTPResponseHead, attempt: Int) {
            guard attempt == attempts, awaiting, sink != nil else { return }
            status = head.status
        }

        fileprivate func body(_ buffer: ByteBuffer, attempt: Int) {
            guard attempt == attempts, awaiting, sink != nil else { return }
            guard status == .ok else {
                if errorBody.readableBytes < 64 * 1024 {
                    var buffer = buffer
                    errorBody.writeBuffer(&buffer)
                }
                return
            }
            let events: [SSEEvent]
            do {
                events = try parser.feed(buffer)
            } catch {
                let what = error == .line ? "a line" : "an event"
                fail(Failure(message: "the model provider sent \(what) too long for an event stream", retryable: false))
                return
            }
            for event in events {
                let parts: [StreamPart]
                do {
                    parts = try self.parts(event)
                } catch {
                    finish(error)
                    return
                }
                for part in parts {
                    switch part {
                    case .text(let text):
                        pieces += 1
                        lastProgress = .now()
                        // The idle limit is usually shorter than the first token's: bring the timer forward.
                        if deadline < watchdogDue { armWatchdog() }
                        sink?.received(.token(text))
                        guard sink != nil else { return }  // cancelled from inside `received`
                    case .usage(let i, let o):
                        input = i ?? input
                        output = o ?? output
                    case .finish:
                        break
                    case .done:
                        succeed()
                        return
                    }
                }
            }
        }

        fileprivate func failed(_ error: any Error, attempt: Int) {
            guard attempt == attempts, awaiting, sink != nil else { return }
            if error is UpstreamDeadlineExceeded || (error as? HTTPClientError) == .deadlineExceeded {
                let limit = options.maxDuration.components.seconds
                fail(Failure(message: "the model provider's reply took longer than its limit of \(limit) s", retryable: false))
                return
            }
            fail(Failure(message: "the model provider could not be reached", retryable: true))
        }

        fileprivate func ended(attempt: Int) {
            guard attempt == attempts, awaiting, sink != nil else { return }
            guard let status, status != .ok else {
                succeed()  // the body ended without `[DONE]`: what came is the reply
                return
            }
            let detail = (try? JSONValue.parse(errorBody.readableBytesView)).map { OpenAIChatDialect.message($0["error"] ?? $0) }
            fail(
                Failure(
                    message: "the model provider answered HTTP \(status.code)" + (detail.map { ": \($0)" } ?? ""),
                    retryable: status.code == 429 || status.code >= 500))
        }

        // MARK: Ending

        /// The reply is complete: its usage as reported, or Parley's own count, then `finished`.
        private func succeed() {
            // Not cancelled: after `[DONE]` the response ends on its own and its connection is reused.
            awaiting = false
            task = nil
            exchange = nil
            stopWatchdog()
            let estimated = request.messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
            sink?.received(.usage(Usage(inputTokens: input ?? estimated, outputTokens: output ?? pieces)))
            finish(nil)
        }

        /// This attempt failed: try again if nothing was sent yet and attempts are left.
        private func fail(_ failure: Failure) {
            endAttempt()
            guard failure.retryable, pieces == 0, attempts <= options.retries else {
                finish(ProviderError(failure.message))
                return
            }
            retry = loop.scheduleTask(in: .milliseconds(250 * Int64(attempts))) {
                self.retry = nil
                self.attempt()
            }
        }

        private func finish(_ error: (any Error)?) {
            endAttempt()
            let sink = self.sink
            self.sink = nil
            sink?.finished(error)
        }

        /// Stops the attempt's request (closing its connection) and its timer.
        private func endAttempt() {
            awaiting = false
            task?.cancel()
            task = nil
            exchange?.cancel()
            exchange = nil
            stopWatchdog()
        }

        // MARK: The watchdog

        /// The first token within `firstTokenTimeout` of the attempt, then no gap over `idleTimeout`.
        private var deadline: NIODeadline {
            lastProgress + (pieces == 0 ? firstTokenLimit : idleLimit)
        }

        private func armWatchdog() {
            let attempt = attempts
            watchdog?.cancel()
            watchdogDue = deadline
            watchdog = loop.scheduleTask(deadline: watchdogDue) { self.watch(attempt: attempt) }
        }

        private func stopWatchdog() {
            watchdog?.cancel()
            watchdog = nil
            watchdogDue = .distantFuture
        }

        private func watch(attempt: Int) {
            guard attempt == attempts, awaiting, sink != nil else { return }
            guard NIODeadline.now() >= deadline else {
                armWatchdog()  // tokens came meanwhile: wait for the new limit
                return
            }
            let first = pieces == 0
            fail(Failure(message: first ? "the model provider sent nothing in time" : "the model provider stopped sending", retryable: first))
        }
    }

    /// Hands one attempt's response on Parley's own connection to its run (both on the run's loop).
    final class Receiver: UpstreamReceiver, @unchecked Sendable {
        private let run: Run
        private let attempt: Int

        init(run: Run, attempt: Int) {
            self.run = run
            self.attempt = attempt
        }

        func head(_ head: HTTPResponseHead) { run.head(head, attempt: attempt) }
        func body(_ buffer: ByteBuffer) { run.body(buffer, attempt: attempt) }
        func end() { run.ended(attempt: attempt) }
        func failed(_ error: any Error) { run.failed(error, attempt: attempt) }
    }

    /// Hands one attempt's response to its run on the run's loop. AsyncHTTPClient calls it on
    /// `loop` when the connection lives there, so nothing is handed over then.
    final class Delegate: HTTPClientResponseDelegate, Sendable {
        typealias Response = Void
        private let run: Run
        private let attempt: Int
        private let loop: any EventLoop

        init(run: Run, attempt: Int, loop: any EventLoop) {
            self.run = run
            self.attempt = attempt
            self.loop = loop
        }

        private func onLoop(_ body: @escaping @Sendable () -> Void) {
            if loop.inEventLoop { body() } else { loop.execute(body) }
        }

        func didReceiveHead(task: HTTPClient.Task<Void>, _ head: HTTPResponseHead) -> EventLoopFuture<Void> {
            let (run, attempt) = (self.run, self.attempt)
            onLoop { run.head(head, attempt: attempt) }
            return task.eventLoop.makeSucceededVoidFuture()
        }

        func didReceiveBodyPart(task: HTTPClient.Task<Void>, _ buffer: ByteBuffer) -> EventLoopFuture<Void> {
            let (run, attempt) = (self.run, self.attempt)
            onLoop { run.body(buffer, attempt: attempt) }
            return task.eventLoop.makeSucceededVoidFuture()
        }

        func didReceiveError(task: HTTPClient.Task<Void>, _ error: any Error) {
            let (run, attempt) = (self.run, self.attempt)
            onLoop { run.failed(error, attempt: attempt) }
        }

        func didFinishRequest(task: HTTPClient.Task<Void>) throws {
            let (run, attempt) = (self.run, self.attempt)
            onLoop { run.ended(attempt: attempt) }
        }
    }
}
