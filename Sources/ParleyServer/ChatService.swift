import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore
import Synchronization

/// Clone chat over the protocol: turns `chat.send` into a stored user message, a streamed reply
/// and a stored assistant message; handles `chat.cancel` and `stream.resume`.
final class ChatService: Sendable {
    let store: any Store
    let credits: Credits
    let provider: any LLMProvider
    let hub: StreamHub
    let configuration: ServerConfiguration
    let streamMetrics: StreamMetrics
    let logger: Logger
    let ids: IDGenerator
    private let allocator = ByteBufferAllocator()

    private struct Requests {
        var accepting = true
        var nextKey: UInt64 = 0
        var running: [UInt64: Task<Void, Never>] = [:]
        /// Whose request each running one is (when a user's).
        var owners: [UInt64: String] = [:]
    }

    private let requests = Mutex(Requests())

    init(store: any Store, credits: Credits, provider: any LLMProvider, hub: StreamHub, configuration: ServerConfiguration, logger: Logger, ids: IDGenerator) {
        self.store = store
        self.credits = credits
        self.provider = provider
        self.hub = hub
        self.configuration = configuration
        streamMetrics = StreamMetrics(factory: configuration.metrics)
        self.logger = logger
        self.ids = ids
    }

    /// Serves one client request in its `turn` (see `RequestOrder`). Never throws: every failure
    /// becomes an `error` frame.
    func handle(_ frame: ClientFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
        switch frame {
        case let .chatSend(id, clone, conversation, text):
            serve(frame, from: connection, turn: turn, what: "chat.send") {
                await self.chatSend(ref: id, cloneID: clone, conversationID: conversation, text: text, from: connection)
            }
        // Not tracked: a cancel must work during the drain.
        case let .chatCancel(id, stream):
            turn.runSoon { self.cancel(ref: id, stream: stream, from: connection) }
        case let .streamResume(id, stream, after):
            turn.runSoon { self.resume(ref: id, stream: stream, after: after, from: connection) }
        default:
            preconditionFailure("schedule and room frames are dispatched to their own services")
        }
    }

    private func cancel(ref: String, stream: String, from connection: ClientConnection) {
        guard let live = hub.stream(id: stream, owner: connection.identity.user) else {
            connection.send(ServerFrame.error(ref: ref, code: .notFound, message: "no stream \(stream)"))
            return
        }
        // An already ended stream needs no answer: its stream.end was the answer.
        live.stop(.cancelled)
    }

    private func resume(ref: String, stream: String, after: Int64, from connection: ClientConnection) {
        guard let live = hub.stream(id: stream, owner: connection.identity.user) else {
            connection.send(ServerFrame.error(ref: ref, code: .streamGone, message: "stream \(stream) is no longer buffered"))
            return
        }
        let ack = allocator.buffer(bytes: live.startFrame(ref: ref))
        if live.resume(connection, after: after, ack: ack) == .gone {
            connection.send(ServerFrame.error(ref: ref, code: .streamGone, message: "tokens after seq \(after) of stream \(stream) are no longer buffered"))
        }
    }

    /// Serves a request (of this service or another) in its `turn`, as tracked work off the event
    /// loop: a `FrameError` answered as an `error` frame with `ref`, any other failure logged and
    /// answered `internal`, and `unavailable` once the server is shutting down.
    func serve(_ frame: ClientFrame, from connection: ClientConnection, turn: RequestOrder.Turn, what: String,
               _ body: @escaping @Sendable () async throws -> Void) {
        let started = track(for: connection.identity.user) {
            await turn.run {
                do {
                    try await body()
                } catch var error as FrameError {
                    error.ref = frame.id
                    connection.send(ServerFrame.error(error))
                } catch {
                    var failure = self.internalFailure(error, what: what, connection: connection, ref: frame.id)
                    failure.ref = frame.id
                    connection.send(ServerFrame.error(failure))
                }
            }
        }
        if !started {
            turn.admission.open()
            connection.send(ServerFrame.error(ref: frame.id, code: .unavailable, message: "the server is shutting down"))
        }
    }

    /// Logs a failure the client cannot act on and returns the `internal` error it is told.
    func internalFailure(_ error: any Error, what: String, connection: ClientConnection? = nil, ref: String? = nil) -> FrameError {
        var metadata: Logger.Metadata = ["error": "\(error)"]
        if let connection { metadata["conn"] = "\(connection.id)" }
        if let ref { metadata["ref"] = "\(ref)" }
        logger.error("\(what) failed", metadata: metadata)
        return FrameError(ref: nil, code: .internal, message: "the request failed; try again")
    }

    /// Runs `body` as a request the shutdown waits for; false (and `body` never runs) once the
    /// server stopped accepting work.
    func track(for user: String? = nil, _ body: @escaping @Sendable () async -> Void) -> Bool {
        requests.withLock { r -> Bool in
            guard r.accepting else { return false }
            let key = r.nextKey
            r.nextKey += 1
            if let user { r.owners[key] = user }
            r.running[key] = Task {
                await body()
                self.requests.withLock {
                    $0.running.removeValue(forKey: key)
                    $0.owners.removeValue(forKey: key)
                }
            }
            return true
        }
    }

    /// Waits for the user's requests in flight (their sockets are closed, so no new ones come).
    func settle(user: String) async {
        let running = requests.withLock { r in r.owners.filter { $0.value == user }.compactMap { r.running[$0.key] } }
        for task in running { await task.value }
    }

    /// Stops every stream, lets each store its partial reply and send `stream.end` with reason
    /// `shutdown`, and returns when all requests in flight have finished.
    func shutdown() async {
        let running = requests.withLock { r -> [Task<Void, Never>] in
            r.accepting = false
            return Array(r.running.values)
        }
        for stream in hub.liveStreams { stream.stop(.shutdown) }
        for task in running { await task.value }
    }

    var isAccepting: Bool { requests.withLock { $0.accepting } }

    /// From now on requests are answered `unavailable` (the first step of a shutdown).
    func stopAccepting() {
        requests.withLock { $0.accepting = false }
    }

    /// Stops taking requests (new ones are answered `unavailable`) and waits up to `grace` for
    /// those in flight and every reply streaming (chats, scheduled messages, debate turns) to
    /// finish on their own. True when they all did.
    func drain(grace: Duration) async -> Bool {
        let running = requests.withLock { r -> [Task<Void, Never>] in
            r.accepting = false
            return Array(r.running.values)
        }
        let hub = self.hub
        guard !running.isEmpty || !hub.liveStreams.isEmpty else { return true }
        guard grace > .zero else { return false }
        return await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let pending = Mutex<CheckedContinuation<Bool, Never>?>(continuation)
            let finish: @Sendable (Bool) -> Void = { done in pending.withLock { $0.take() }?.resume(returning: done) }
            let timer = Task {
                try? await Task.sleep(for: grace)
                finish(false)
            }
            Task {
                // A finished request may have started a stream, a debate its next turn: look again.
                var waiting = running
                while true {
                    let live = hub.liveStreams
                    waiting += live.compactMap(\.task)
                    if waiting.isEmpty {
                        guard !live.isEmpty else { break }
                        // A stream registered a moment before its task is attached.
                        try? await Task.sleep(for: .milliseconds(5))
                        continue
                    }
                    for task in waiting { await task.value }
                    waiting = []
                }
                timer.cancel()
                finish(true)
            }
        }
    }

    /// Stops the owner's streams (on `clone`, or all of them) and waits for them to end, before
    /// the clone or the whole account is deleted.
    func stopStreams(clone: String? = nil, owner: String) async {
        let tasks = hub.liveStreams.filter { $0.owner == owner && (clone == nil || $0.clone == clone) }.compactMap { $0.stop(.cancelled) }
        for task in tasks { await task.value }
    }

    // MARK: chat.send

    private func chatSend(ref: String, cloneID: String, conversationID: String?, text: String, from connection: ClientConnection) async {
        let user = connection.identity.user
        var reservedConversation: String?
        var meterToRefund: CreditMeter?
        do {
            guard let clone = try await store.clone(id: cloneID, owner: user) else {
                throw FrameError(ref: ref, code: .notFound, message: "no clone \(cloneID)")
            }
            let now = Int64(Timestamp.nowMillis())
            let conversation: Conversation
            var isNew = false
            if let conversationID {
                guard let existing = try await store.conversation(id: conversationID, owner: user) else {
                    throw FrameError(ref: ref, code: .notFound, message: "no conversation \(conversationID)")
                }
                guard existing.clone == clone.id else {
                    throw FrameError(ref: ref, code: .badRequest, message: "conversation \(conversationID) is with another clone")
                }
                conversation = existing
            } else {
                conversation = Conversation(
                    id: ids.make(.conversation), owner: user, clone: clone.id, title: Self.title(for: text),
                    createdAt: now, updatedAt: now
                )
                isNew = true
            }
            switch hub.reserve(user: user, conversation: conversation.id) {
            case .reserved: reservedConversation = conversation.id
            case .conversationBusy:
                throw FrameError(ref: ref, code: .rateLimited, message: "a reply is already streaming in conversation \(conversation.id)")
            case .tooManyStreams:
                throw FrameError(ref: ref, code: .rateLimited, message: "at most \(configuration.maxConcurrentStreamsPerUser) replies may stream at once")
            }

            // A card's greeting opens a new conversation as its first message (made first, so its
            // id sorts first): the transcript shows it and the prompt answers after it.
            let greeting = isNew ? PromptAssembler.greeting(of: clone).map {
                Message(id: ids.make(.message), conversation: conversation.id, role: .assistant, text: $0, createdAt: now)
            } : nil
            let userMessage = Message(id: ids.make(.message), conversation: conversation.id, role: .user, text: text, createdAt: now)
            let history = isNew ? (greeting.map { [$0] } ?? [])
                : try await store.messages(conversation: conversation.id, limit: configuration.historyMessages - 1, before: nil)
            let prompt = PromptAssembler(contextBudget: configuration.contextBudgetTokens).assemble(clone: clone, history: history + [userMessage])
            let request = CompletionRequest(model: configuration.model(for: clone), messages: prompt.messages, speaker: clone.name, maxOutputTokens: configuration.maxOutputTokens)
            let model = provider.modelName(for: request)
            let streamID = ids.make(.stream)

            // The prompt and a minimum reply must be affordable before anything is stored or generated.
            let meter = credits.meter(user: user, stream: streamID, conversation: conversation.id, model: model, feature: .chat)
            do {
                try await meter.begin(inputTokens: prompt.estimatedTokens)
            } catch let refusal as CreditMeter.Refusal {
                throw FrameError(ref: ref, code: .insufficientCredits,
                                 message: "this reply needs \(refusal.required) credits; the balance is \(refusal.balance)",
                                 balance: refusal.balance, required: refusal.required)
            }
            meterToRefund = meter

            // The user's message is durable before anything is generated for it.
            if isNew { try await store.createConversation(conversation) }
            if let greeting { try await store.appendMessage(greeting) }
            try await store.appendMessage(userMessage)
            meterToRefund = nil

            let live = LiveStream(
                id: streamID, owner: user, conversation: conversation.id, clone: clone.id, model: model,
                bufferCapacity: configuration.resumeBufferTokens, subscribers: hub.connections(of: user),
                metrics: streamMetrics
            )
            live.start(allocator.buffer(bytes: live.startFrame(ref: ref)))
            hub.register(live)
            Admission.admitCurrent()  // the stream exists: a pipelined chat.cancel finds it
            if !isAccepting { live.stop(.shutdown) }
            let store = self.store
            let generation = Task {
                _ = await self.generate(live, request: request, prompt: prompt, meter: meter, ref: ref, requester: connection,
                                        messageID: self.ids.make(.message), journal: .conversation(conversation.id)) { try await store.appendMessage($0) }
            }
            live.attach(generation)
            reservedConversation = nil  // `generate` releases it when the stream ends
            await generation.value
        } catch let error as FrameError {
            connection.send(ServerFrame.error(error))
        } catch {
            logger.error("chat.send failed", metadata: ["conn": "\(connection.id)", "ref": "\(ref)", "error": "\(error)"])
            connection.send(ServerFrame.error(ref: ref, code: .internal, message: "the request failed; try again"))
        }
        // Charged for a prompt whose message could not be stored: give it back.
        if let meterToRefund { _ = await meterToRefund.settle(usage: Usage(inputTokens: 0, outputTokens: 0)) }
        if let reservedConversation { hub.release(user: user, conversation: reservedConversation) }
    }

    /// Streams one reply to `live`'s subscribers, metered by `meter`, and stores it under
    /// `messageID` with `persist` (even when stopped part-way). Returns the stored message, nil
    /// when storing failed. Releases the conversation's reservation when done. A paywall goes to
    /// every subscriber, or to `paywallTo` (a room's moderator) when given.
    func generate(
        _ live: LiveStream, request: CompletionRequest, prompt: AssembledPrompt, meter: CreditMeter, ref: String?,
        requester: ClientConnection?, messageID: String, journal target: StreamJournal.Target,
        paywallTo: (@Sendable () -> [ClientConnection])? = nil, persist: @escaping @Sendable (Message) async throws -> Void
    ) async -> Message? {
        // Journaled as it streams, so a crash loses at most the last moments of what was sent.
        let journal = StreamJournalWriter(
            StreamJournal(stream: live.id, user: meter.user, model: live.model, feature: meter.feature.rawValue, inputTokens: prompt.estimatedTokens,
                          target: target, messageID: messageID, createdAt: Int64(Timestamp.nowMillis())),
            store: store, logger: logger
        )
        var journaledAt = NIODeadline.now().uptimeNanoseconds
        var text = ""
        var seq: Int64 = 0
        var scratch: [UInt8] = []  // one token frame's bytes, reused: no allocation per token
        var reported: Usage?
        var failure: String?
        var failureCode = ErrorCode.providerError
        var outOfCredits = false
        do {
            tokens: for try await event in provider.stream(request) {
                switch event {
                case .token(let token):
                    // Released only once paid for: the stream stops exactly at the last covered token.
                    // Paid batches are checked without a hop onto the meter; it is asked once per batch.
                    var boughtBatch = false
                    if !meter.isPaid(token: Int(seq) + 1) {
                        guard try await meter.authorize(token: Int(seq) + 1) else {
                            outOfCredits = true
                            break tokens
                        }
                        boughtBatch = true
                    }
                    seq += 1
                    text += token
                    ServerFrame.token(stream: live.id, seq: seq, text: token[...], into: &scratch)
                    live.publish(seq: seq, frame: allocator.buffer(bytes: scratch))
                    let now = NIODeadline.now().uptimeNanoseconds
                    if boughtBatch || now &- journaledAt >= StreamJournalWriter.interval {
                        journaledAt = now
                        journal.offer(text: text, outputTokens: Int(seq))
                    }
                case .usage(let usage):
                    reported = usage
                }
            }
        } catch is CancellationError {
        } catch let error as ProviderError {
            streamMetrics.providerFailed.increment()
            logger.warning("provider failed", metadata: ["stream": "\(live.id)", "error": "\(error.message)"])
            failure = error.message
        } catch is ProviderBusy {
            streamMetrics.providerBusy.increment()
            failure = "the model is busy: too many replies are waiting for it; try again shortly"
            failureCode = .rateLimited
        } catch let error as StoreError {
            logger.error("metering failed; stopping the stream", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            failure = "credits could not be charged; try again"
        } catch {
            streamMetrics.providerFailed.increment()
            logger.error("provider failed", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            failure = "the model provider failed"
        }

        let reason: StreamEndReason
        if outOfCredits {
            reason = .insufficientCredits
        } else if failure != nil, live.stopReason == nil {
            reason = .error
        } else if reported != nil, failure == nil {
            reason = .complete  // every token arrived, even if a stop came in just after
        } else {
            reason = live.stopReason ?? .cancelled
        }
        let usage = reason == .complete ? reported! : Usage(inputTokens: prompt.estimatedTokens, outputTokens: Int(seq))
        // Charging and storing happen outside this (possibly cancelled) task so a stop never skips them.
        let (cost, balance) = await Task { await meter.settle(usage: usage) }.value

        let message = Message(
            id: messageID, conversation: live.conversation, role: .assistant, text: text,
            createdAt: Int64(Timestamp.nowMillis()), reason: reason, usage: usage, stream: live.id
        )
        let stored = await Task { try await persist(message) }.result
        var storedID: String? = message.id
        if case .failure(let error) = stored {
            logger.error("storing the reply failed; its journal keeps it for the next start-up", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            storedID = nil
            journal.offer(text: text, outputTokens: Int(seq))
        }
        // Before stream.end: once a turn's task ends, its room moves on, and whoever awaits the
        // stream (an account deletion) must find no journal left behind.
        await journal.finish(keep: storedID == nil)
        if reason == .error, let failure {
            let frame = allocator.buffer(bytes: ServerFrame.error(ref: ref, code: failureCode, message: failure))
            if let requester { live.send(frame, to: requester) } else { live.broadcast(frame) }
        }
        if outOfCredits {
            let paywall = allocator.buffer(bytes: ServerFrame.paywall(stream: live.id, balance: balance, required: await meter.nextTokenCost, room: live.room))
            if let paywallTo = paywallTo?() {
                for connection in paywallTo { live.send(paywall, to: connection) }
            } else {
                live.broadcast(paywall)
            }
        }
        let end = allocator.buffer(bytes: ServerFrame.streamEnd(stream: live.id, reason: reason, usage: usage, message: storedID, cost: cost, balance: balance))
        if live.room != nil {
            // Others in the room see the stream end, not what it cost its payer or their balance.
            live.finish(allocator.buffer(bytes: ServerFrame.streamEnd(stream: live.id, reason: reason, usage: usage, message: storedID, cost: nil, balance: nil)),
                        ownerFrame: end, reason: reason)
        } else {
            live.finish(end, reason: reason)
        }
        hub.ended(live)
        hub.release(user: live.owner, conversation: live.conversation)
        return storedID == nil ? nil : message
    }

    static func title(for text: String) -> String {
        let line = text.trimmedWhitespace.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        return line.count <= 60 ? line : String(line.prefix(59)) + "…"
    }
}
