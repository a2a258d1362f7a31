import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore
import Synchronization

/// The one place a generated stream lives its whole life, whatever it is for (a chat reply, a
/// scheduled message, a debate turn, a translation chat's reply or translation):
/// 1. `prepare` prices the prompt and charges it up front (or refuses, for lack of credits);
/// 2. `open` makes the `LiveStream`, sends its `stream.start` to the sockets the caller names
///    and registers it with the hub, for resume, cancel and the drain;
/// 3. `run` generates it, releasing each token only once paid for, journals it against a crash,
///    settles the ledger, stores the (partial) reply through the caller's `persist`, and ends it.
/// The services say what to generate, who receives it and where it is stored; none of them
/// touches the credits or registers a stream itself.
final class StreamRunner: Sendable {
    /// Who gets a frame: the subscribers of `topic` that `audience` admits.
    struct Recipients: Sendable {
        let topic: Topic
        let audience: Audience
    }

    /// Whether a refused reply's place is still there to store it in, when its retry comes.
    typealias KeptPlace = @Sendable () async throws -> Bool

    /// A stream whose prompt is paid for, ready to open and run.
    struct Prepared: Sendable {
        let id: String
        let prompt: AssembledPrompt
        let request: CompletionRequest
        let model: String
        let meter: CreditMeter
    }

    let store: any Store
    let credits: Credits
    let provider: any LLMProvider
    let hub: StreamHub
    /// The sockets of this process, and the broker every frame goes through.
    let sockets: SocketHub
    let broker: any Broker
    /// In a cluster: a reply's hold on its conversation across the nodes.
    let slots: ReplySlots?
    let requests: RequestTracker
    let metrics: StreamMetrics
    let logger: Logger
    let ids: IDGenerator
    /// Where a reply's tokens are handled when no requester's socket names a loop.
    let loops: any EventLoopGroup
    /// Speaks voiced replies (#29); nil when the server has no speech service.
    let speech: (any SpeechSynthesizer)?
    /// The journals of the replies in flight, written together.
    private let journals: StreamJournals
    /// Replies whose message or settlement the store refused, tried again while the node runs.
    let kept: KeptReplies
    /// Told of each write the store takes, for what waits for it to come back (`kept`, `slots`).
    private let writes: StoreWrites
    private let audioBufferBytes: Int
    private let allocator = ByteBufferAllocator()

    init(
        store: any Store, credits: Credits, provider: any LLMProvider, hub: StreamHub, sockets: SocketHub, broker: any Broker,
        requests: RequestTracker, loops: any EventLoopGroup,
        configuration: ServerConfiguration, logger: Logger, ids: IDGenerator, slots: ReplySlots? = nil, writes: StoreWrites = StoreWrites()
    ) {
        self.slots = slots
        self.writes = writes
        speech = configuration.speech
        audioBufferBytes = configuration.resumeAudioBytes
        self.loops = loops
        self.store = store
        self.credits = credits
        self.provider = provider
        self.hub = hub
        self.sockets = sockets
        self.broker = broker
        self.requests = requests
        metrics = StreamMetrics(factory: configuration.metrics)
        self.logger = logger
        self.ids = ids
        journals = StreamJournals(store: store, logger: logger)
        kept = KeptReplies(store: store, metrics: metrics, logger: logger, firstDelay: configuration.keptReplyRetry, writes: writes)
    }

    /// Refuses a voiced request (`ref`, nil for REST) where the server has no speech service or
    /// the user's plan no voice (#29).
    func requireVoice(user: String, ref: String?, what: String) async throws {
        guard speech != nil else {
            throw FrameError(ref: ref, code: .badRequest, message: "voice is not available: this server has no speech service")
        }
        try await credits.plans?.require(.voice, user: user, ref: ref, what: what)
    }

    /// False once the server is shutting down: no new stream starts.
    var isAccepting: Bool { requests.isAccepting }

    // MARK: Prepare, open, run

    /// Prices `prompt` for `feature` and charges it to `payer`, with a reserve for a first batch
    /// of the reply, storing `opening` (a chat request's message) in the same write. Throws
    /// `CreditMeter.Refusal` when the balance does not cover that (nothing charged or stored).
    func prepare(
        _ prompt: AssembledPrompt, request: CompletionRequest, payer: String, feature: Feature, conversation: String? = nil,
        room: String? = nil, streamID: String? = nil, storing opening: ReplyOpening? = nil
    ) async throws -> Prepared {
        let model = provider.modelName(for: request)
        let id = streamID ?? ids.make(.stream)
        let meter = credits.meter(user: payer, stream: id, conversation: conversation, room: room, model: model, feature: feature)
        try await meter.begin(inputTokens: prompt.estimatedTokens, storing: opening.map { CreditMeter.Opening(opening: $0, store: store) })
        writes.took()
        return Prepared(id: id, prompt: prompt, request: request, model: model, meter: meter)
    }

    /// Gives back what `prepare` charged, for a stream that will never run. When the store
    /// refuses the refund (often the very failure that stopped the stream), it is tried again
    /// while the node runs, and a journal of the stream with nothing used keeps it for the next
    /// start-up's recovery meanwhile.
    func abandon(_ prepared: Prepared) async {
        let meter = prepared.meter
        let nothing = Usage(inputTokens: 0, outputTokens: 0)
        guard !(await meter.settle(usage: nothing)).settled else { return }
        let journal = StreamJournal(
            stream: prepared.id, user: meter.user, model: prepared.model, feature: meter.feature.rawValue, inputTokens: 0,
            target: Self.settleOnly(like: meter), messageID: ids.make(.message), createdAt: Int64(Timestamp.nowMillis()))
        do {
            try await store.saveStreamJournal(journal)
        } catch {
            logger.error(
                "an abandoned stream's refund could not be kept for the next start-up; it is tried again while the node runs",
                metadata: ["stream": "\(prepared.id)", "error": "\(error)"])
        }
        metrics.awaitingRecovery.increment()
        kept.retry(KeptReplies.Work(stream: prepared.id, owner: meter.user, settle: { @Sendable in await meter.settle(usage: nothing).settled }))
    }

    /// A settle-only journal of `meter`'s stream: its settlement is linked to the conversation or
    /// room its prompt's charge was, so a refund counts where the charge did.
    private static func settleOnly(like meter: CreditMeter) -> StreamJournal.Target {
        .settleOnly(conversation: meter.conversation, room: meter.room)
    }

    /// Makes the stream, read by the sockets subscribed to `readers` now (a user's, a room's, a
    /// language's), sends them its `stream.start`, and registers it. Synchronous, so a room can
    /// open a stream under its own lock and every member it has then receives all of it.
    func open(
        id: String, owner: String, model: String, kind: LiveStream.Kind, readers: [Topic], bufferCapacity: Int, ref: String? = nil,
        roomSeq: Int64 = 0
    ) -> LiveStream {
        let live = LiveStream(
            id: id, owner: owner, model: model, kind: kind, bufferCapacity: bufferCapacity, readers: readers, broker: broker, hub: sockets,
            metrics: metrics, roomSeq: roomSeq, audioBufferBytes: audioBufferBytes)
        live.start(allocator.buffer(bytes: live.startFrame(ref: ref)))
        hub.register(live)
        return live
    }

    /// Runs an opened stream (see `generate`) in a task the stream owns, so a stop cancels it,
    /// and returns the stored reply once the stream has ended. A stream opened while the server
    /// shuts down ends at once, with reason `shutdown`. `keptPlace`: a reply the store refused
    /// is stored by `persist` when tried again, though its journal names nowhere to store it,
    /// where this finds its place still there (a scheduled message's `persist` completes its
    /// schedule, and its clone and conversation may have been deleted meanwhile). `hold`: as
    /// `launch`'s.
    @discardableResult
    func run(
        _ live: LiveStream, _ prepared: Prepared, ref: String? = nil, requester: ClientConnection? = nil, messageID: String,
        journal: StreamJournal.Target, paywall: Recipients? = nil, voice: CloneVoice? = nil, beforeEnd: (@Sendable () async -> Void)? = nil,
        hold: (@Sendable () async -> Void)? = nil, keptPlace: KeptPlace? = nil, persist: @escaping @Sendable (Message) async throws -> Void
    ) async -> Message? {
        let stored = Mutex<Message?>(nil)
        await start(
            live, prepared, ref: ref, requester: requester, messageID: messageID, journal: journal, paywall: paywall, voice: voice,
            beforeEnd: beforeEnd, hold: hold, trackedFor: nil, keptPlace: keptPlace, persist: persist
        ) { message in stored.withLock { $0 = message } }.value
        return stored.withLock { $0 }
    }

    /// Runs an opened reply like `run` without waiting for it: `then` gets the stored reply once
    /// the stream has ended, in a task of its own (a stop that cancelled the stream cancels none
    /// of it). The stream's task is a request of its owner's, so a shutdown, a drain and an
    /// account deletion wait for `then` too. The request that opened the stream need not stay
    /// suspended beside it: at 9,000 replies streaming, those tasks were a quarter of the RSS (#26).
    /// `hold`: gives back the reply's hold on its conversation across the cluster, before
    /// `stream.end`, or, when the store refused the reply's message, once it is stored.
    func launch(
        _ live: LiveStream, _ prepared: Prepared, ref: String, requester: ClientConnection, messageID: String,
        journal: StreamJournal.Target, voice: CloneVoice?, hold: (@Sendable () async -> Void)? = nil,
        persist: @escaping @Sendable (Message) async throws -> Void, then: @escaping @Sendable (Message?) async -> Void
    ) {
        start(
            live, prepared, ref: ref, requester: requester, messageID: messageID, journal: journal, paywall: nil, voice: voice,
            beforeEnd: nil, hold: hold, trackedFor: live.owner, keptPlace: nil, persist: persist
        ) { message in await Task { await then(message) }.value }
    }

    /// Starts `live`'s task: `generate`, then `ended` with the stored reply. Tracked as a request
    /// of `user` when given (an untracked task once the server stops accepting them).
    @discardableResult
    private func start(
        _ live: LiveStream, _ prepared: Prepared, ref: String?, requester: ClientConnection?, messageID: String,
        journal: StreamJournal.Target, paywall: Recipients?, voice: CloneVoice?, beforeEnd: (@Sendable () async -> Void)?,
        hold: (@Sendable () async -> Void)?, trackedFor user: String?, keptPlace: KeptPlace?,
        persist: @escaping @Sendable (Message) async throws -> Void,
        ended: @escaping @Sendable (Message?) async -> Void
    ) -> Task<Void, Never> {
        let body: @Sendable () async -> Void = {
            let message = await self.generate(
                live, prepared, ref: ref, requester: requester, messageID: messageID, journal: journal,
                paywall: paywall, voice: voice, beforeEnd: beforeEnd, hold: hold, keptPlace: keptPlace, persist: persist)
            await ended(message)
        }
        let generation = user.flatMap { requests.start(for: $0, body) } ?? Task(operation: body)
        live.attach(generation)
        if !isAccepting { live.stop(.shutdown) }
        return generation
    }

    /// Ends a stream that was opened but never generated (its source came to nothing, or its
    /// payer could not pay): `stream.end` with `reason` and no usage.
    func end(_ live: LiveStream, reason: StreamEndReason) {
        let usage = Usage(inputTokens: 0, outputTokens: 0)
        live.finish(
            allocator.buffer(bytes: ServerFrame.streamEnd(stream: live.id, reason: reason, usage: usage, message: nil, cost: nil, balance: nil)),
            reason: reason)
        hub.ended(live)
    }

    // MARK: Stop and drain

    /// Stops the owner's streams of `clone` or of `conversation` and waits for them to end, then
    /// runs `deleting` (which deletes it) with the owner's retries of refused replies paused, so
    /// none stores into what is being deleted; they go on after it.
    func stopStreams<T>(
        clone: String? = nil, conversation: String? = nil, owner: String, whileDeleting deleting: () async throws -> T
    ) async rethrows -> T {
        await stopLive(clone: clone, conversation: conversation, owner: owner)
        let paused = await kept.pause(owner: owner)
        defer { kept.resume(paused) }
        return try await deleting()
    }

    /// Stops all the owner's streams and waits for them to end, and drops their retries: the
    /// account is being deleted, with its journals (by this node: `untilDeleted`, see `KeptReplies.forget`).
    func stopStreams(owner: String, untilDeleted: Bool = false) async {
        await stopLive(clone: nil, conversation: nil, owner: owner)
        await kept.forget(owner: owner, untilDeleted: untilDeleted)
    }

    private func stopLive(clone: String?, conversation: String?, owner: String) async {
        let tasks = hub.liveStreams(of: owner).filter {
            (clone == nil || $0.clone == clone) && (conversation == nil || ($0.room == nil && $0.conversation == conversation))
        }.compactMap { $0.stop(.cancelled) }
        for task in tasks { await task.value }
    }

    /// Stops every stream, lets each store its partial reply and send `stream.end` with reason
    /// `shutdown`, and returns when all requests in flight have finished.
    func shutdown() async {
        let running = requests.close()
        for stream in hub.liveStreams { stream.stop(.shutdown) }
        for task in running { await task.value }
        for stream in hub.liveStreams { await stream.task?.value }
        await kept.cancelAll()
        await slots?.stopRetries()
    }

    /// Writes what the journals still hold (the deletions of the last replies' journals), once
    /// every stream has ended and before the store closes.
    func flushJournals() async {
        await journals.flush()
    }

    /// Stops taking requests (new ones are answered `unavailable`) and waits up to `grace` for
    /// those in flight and every stream (chat replies, scheduled messages, debate turns,
    /// translations) to finish on their own. True when they all did.
    func drain(grace: Duration) async -> Bool {
        let running = requests.close()
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
                        // A stream is opened a moment before it runs (a translation chat's waits
                        // for the reply it translates).
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

    /// Stores a voiced reply's audio as its owner's clip (#29); its id, nil when storing failed
    /// (the audio was heard; only the copy is missing, and that is logged).
    private func keepClip(_ spoken: VoicedReply.Summary, of live: LiveStream, owner: String, message: String) async -> String? {
        let clip = VoiceClip(
            id: ids.make(.voiceClip), owner: owner, stream: live.id, conversation: live.chatConversation, room: live.room,
            message: message, audio: spoken.audio, truncated: spoken.truncated, createdAt: Int64(Timestamp.nowMillis()))
        let store = self.store
        switch await Task(operation: { try await store.saveClip(clip) }).result {
        case .success: return clip.id
        case .failure(let error):
            logger.error("storing a voiced reply's clip failed", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            return nil
        }
    }

    /// Streams one reply to `live`'s subscribers, metered by the prepared meter, and stores it
    /// under `messageID` with `persist` (even when stopped part-way). Returns the stored message,
    /// nil when storing failed. Releases a conversation's reservation when done. A paywall goes
    /// to every reader, or to `paywall` (a room's moderator) when given.
    private func generate(
        _ live: LiveStream, _ prepared: Prepared, ref: String?, requester: ClientConnection?, messageID: String, journal target: StreamJournal.Target,
        paywall recipients: Recipients?, voice: CloneVoice?, beforeEnd: (@Sendable () async -> Void)?,
        hold: (@Sendable () async -> Void)?, keptPlace: KeptPlace?,
        persist: @escaping @Sendable (Message) async throws -> Void
    ) async -> Message? {
        let (request, prompt, meter) = (prepared.request, prepared.prompt, prepared.meter)
        let target = if case .settleOnly = target { Self.settleOnly(like: meter) } else { target }
        // Journaled as it streams, so a crash loses at most the last moments of what was sent.
        let journal = journals.open(
            StreamJournal(
                stream: live.id, user: meter.user, model: live.model, feature: meter.feature.rawValue, inputTokens: prompt.estimatedTokens,
                target: target, messageID: messageID, createdAt: Int64(Timestamp.nowMillis())))
        // The requester's own loop when there is one: its frames are then written in place.
        let loop = requester?.channel.eventLoop ?? loops.next()
        let voiced = voice.flatMap { voice in
            speech.map { speech in
                VoicedReply(
                    live: live, voice: voice, synthesizer: speech,
                    meter: SpeechMeter(
                        credits: credits, user: meter.user, stream: live.id, conversation: live.chatConversation,
                        room: live.room, model: speech.model),
                    logger: logger)
            }
        }
        let reply = await TokenPump.pump(
            request, with: provider, on: loop, meter: meter,
            reply: ReleasedReply(live: live, journal: journal, allocator: allocator, voice: voiced), metrics: metrics, logger: logger)
        // The voice speaks to the end of what was released (its last sentence may still be in
        // the speech service) before the stream ends; a stop cuts it short.
        var audio: VoicedReply.Summary?
        if let voiced {
            if live.stopReason != nil, reply.reported == nil { voiced.cancel() }
            audio = await voiced.finish()
            if let spoken = audio, !spoken.audio.isEmpty {
                audio?.clip = await keepClip(spoken, of: live, owner: meter.user, message: messageID)
                audio?.audio = []
            }
        }
        let (text, seq, reported, failure, failureCode, outOfCredits) =
            (reply.text, reply.seq, reply.reported, reply.failure, reply.failureCode, reply.outOfCredits)

        let spendLimited = outOfCredits ? await meter.stoppedBySpendLimit : false
        let reason: StreamEndReason
        if outOfCredits {
            reason = spendLimited ? .spendLimit : .insufficientCredits
        } else if failure != nil, live.stopReason == nil {
            reason = .error
        } else if reported != nil, failure == nil {
            reason = .complete  // every token arrived, even if a stop came in just after
        } else {
            reason = live.stopReason ?? .cancelled
        }
        let usage = reason == .complete ? reported! : Usage(inputTokens: prompt.estimatedTokens, outputTokens: Int(seq))
        let message = Message(
            id: messageID, conversation: live.conversation, role: .assistant, text: text,
            createdAt: Int64(Timestamp.nowMillis()), reason: reason, usage: usage, stream: live.id
        )
        // Charging and storing happen outside this (possibly cancelled) task so a stop never skips
        // them, and side by side, so the store commits them together. Neither depends on the
        // other, and the journal goes only once both are done: a crash between them leaves it for
        // the recovery, which completes either (each step idempotent).
        let settling = Task { await meter.settle(usage: usage) }
        let storing = Task { try await persist(message) }
        let (cost, balance, settled) = await settling.value
        let stored = await storing.result
        var storedID: String? = message.id
        if case .failure(let error) = stored {
            logger.error(
                "storing the reply failed; its journal keeps it, and it is tried again", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            storedID = nil
        }
        if !settled { logger.error("settling the reply failed; its journal keeps it, and it is tried again", metadata: ["stream": "\(live.id)"]) }
        // Before stream.end: once a turn's task ends, its room moves on, and whoever awaits the
        // stream (an account deletion) must find no snapshot of it still to be written. (Its
        // deletion goes with the node's next journal write.) A reply not stored or not settled
        // keeps its journal, whole, for the recovery to finish (each of its steps idempotent).
        let keep = storedID == nil || !settled
        // While the message waits for the store, the conversation's hold across the cluster
        // stays, so no node stores the conversation's next message before it.
        let holdWhileKept = storedID == nil && hold != nil
        if keep {
            journal.ended(text: text, outputTokens: Int(seq), reason: reason)
            metrics.awaitingRecovery.increment()
        }
        await Task { await journal.finish(keep: keep) }.value
        if keep {
            let (store, owner, logger) = (self.store, meter.user, self.logger)
            var work = KeptReplies.Work(stream: live.id, owner: owner, place: live.conversation)
            if storedID == nil {
                work.store = { @Sendable in
                    // As the recovery does: nothing is stored where its target has gone (and a
                    // translation, whose target is the room's transcript, is settled only), nor
                    // after a message deleted meanwhile (the reply would have gone with it).
                    let there =
                        if let keptPlace { try await keptPlace() } else { try await StreamRecovery.targetExists(target, owner: owner, in: store) }
                    guard there else { return }
                    do {
                        try await persist(message)
                    } catch is ParentMessageGone {
                        logger.notice("the message a refused reply answers was deleted: the reply is not stored", metadata: ["stream": "\(live.id)"])
                    }
                }
                if holdWhileKept { work.releaseHold = hold }
            }
            if !settled { work.settle = { @Sendable in await meter.settle(usage: usage).settled } }
            kept.retry(work)
        }
        if reason == .error, let failure {
            let frame = allocator.buffer(bytes: ServerFrame.error(ref: ref, code: failureCode, message: failure))
            live.publish(frame, audience: requester.map { .only(connection: $0.id) } ?? .everyone)
        }
        if outOfCredits, !spendLimited {
            let paywall = allocator.buffer(
                bytes: ServerFrame.paywall(stream: live.id, balance: balance, required: await meter.nextTokenCost, room: live.room))
            live.publish(paywall, to: recipients?.topic, audience: recipients?.audience ?? .everyone)
        }
        await beforeEnd?()
        if !holdWhileKept { await hold?() }
        // The reply is stored: its conversation takes the next message before stream.end goes out,
        // so a client that sends on seeing the end is never told a reply is still streaming.
        if case .reply = live.kind { hub.release(user: live.owner, conversation: live.conversation) }
        let end = allocator.buffer(
            bytes: ServerFrame.streamEnd(
                stream: live.id, reason: reason, usage: usage, message: storedID, cost: cost, balance: balance, audio: audio?.json()))
        if live.room != nil {
            // Others in the room see the stream end, not what it cost its payer or their balance.
            live.finish(
                allocator.buffer(
                    bytes: ServerFrame.streamEnd(
                        stream: live.id, reason: reason, usage: usage, message: storedID, cost: nil, balance: nil,
                        audio: audio?.json(withCost: false))),
                ownerFrame: end, reason: reason)
        } else {
            live.finish(end, reason: reason)
        }
        hub.ended(live)
        return storedID == nil ? nil : message
    }

}
