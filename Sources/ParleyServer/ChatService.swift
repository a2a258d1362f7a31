import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore
import Synchronization

/// Clone chat over the protocol: turns `chat.send` into a stored user message, a streamed reply
/// and a stored assistant message; handles `chat.cancel` and `stream.resume`.
final class ChatService: FrameHandler {
    let store: any Store
    let streams: StreamRunner
    let requests: RequestTracker
    let configuration: ServerConfiguration
    let ids: IDGenerator
    private var slots: ReplySlots? { streams.slots }
    private var hub: StreamHub { streams.hub }
    private let allocator = ByteBufferAllocator()
    private let titles: ConversationTitles
    private let summaries: ConversationSummaries

    /// Who each user is to their clones: their persona's name is what `{{user}}` stands for.
    let personas: Personas

    init(store: any Store, streams: StreamRunner, configuration: ServerConfiguration, ids: IDGenerator, personas: Personas) {
        self.store = store
        self.streams = streams
        self.personas = personas
        titles = ConversationTitles(streams: streams, store: store, ids: ids, configuration: configuration)
        summaries = ConversationSummaries(streams: streams, store: store, ids: ids, configuration: configuration)
        self.requests = streams.requests
        self.configuration = configuration
        self.ids = ids
    }

    /// Serves one client request in its `turn` (see `RequestOrder`). Never throws: every failure
    /// becomes an `error` frame.
    func handle(_ frame: ChatFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
        switch frame {
        case let .send(id, clone, conversation, text, voice, greeting):
            requests.serve(id, from: connection, turn: turn, what: "chat.send") {
                await self.chatSend(
                    ref: id, cloneID: clone, conversationID: conversation, text: text, voice: voice, greeting: greeting, from: connection)
            }
        case let .regenerate(id, message, voice):
            requests.serve(id, from: connection, turn: turn, what: "chat.regenerate") {
                await self.regenerate(ref: id, messageID: message, voice: voice, from: connection)
            }
        case let .edit(id, message, text, voice):
            requests.serve(id, from: connection, turn: turn, what: "chat.edit") {
                await self.edit(ref: id, messageID: message, text: text, voice: voice, from: connection)
            }
        // Not tracked: a cancel must work during the drain.
        case let .cancel(id, stream):
            turn.runSoon { self.cancel(ref: id, stream: stream, from: connection) }
        case let .resume(id, stream, after, audioAfter):
            turn.runSoon { self.resume(ref: id, stream: stream, after: after, audioAfter: audioAfter, from: connection) }
        }
    }

    /// A conversation's stream of the caller (a room's streams are the room's to stop and replay).
    private func ownStream(_ id: String, of connection: ClientConnection) -> LiveStream? {
        guard let live = hub.stream(id: id, owner: connection.identity.user), case .reply = live.kind else { return nil }
        return live
    }

    /// The other nodes' streams, when this node is one of a cluster.
    private var remote: (any RemoteStreams)? { streams.broker as? any RemoteStreams }

    private func cancel(ref: String, stream: String, from connection: ClientConnection) {
        guard let live = ownStream(stream, of: connection) else {
            let notFound = ServerFrame.error(ref: ref, code: .notFound, message: "no stream \(stream)")
            guard let remote else { return connection.send(notFound) }
            Task {
                // Another node's stream ends for every reader, wherever they are.
                if await !remote.cancel(stream: stream, user: connection.identity.user) { connection.send(notFound) }
            }
            return
        }
        // An already ended stream needs no answer: its stream.end was the answer.
        live.stop(.cancelled)
    }

    private func resume(ref: String, stream: String, after: Int64, audioAfter: Int64?, from connection: ClientConnection) {
        guard let live = ownStream(stream, of: connection) else {
            let gone = ServerFrame.error(ref: ref, code: .streamGone, message: "stream \(stream) is no longer buffered")
            guard let remote else { return connection.send(gone) }
            Task {
                if await !remote.resume(stream: stream, after: after, audioAfter: audioAfter, ref: ref, connection: connection) {
                    connection.send(gone)
                }
            }
            return
        }
        let ack = allocator.buffer(bytes: live.startFrame(ref: ref))
        if live.resume(connection, after: after, audioAfter: audioAfter, ack: ack) == .gone {
            connection.send(LiveStream.goneFrame(ref: ref, stream: stream, after: after))
        }
    }

    // MARK: chat.send

    /// What a reply answers and how it and what comes before it are stored; each request makes one.
    private struct ReplyPlan {
        var clone: Clone
        var conversation: Conversation
        var isNew = false
        /// Stored, in order, before anything is generated: a greeting, the user's message.
        var before: [Message] = []
        /// The first of `before` is stored in place of this message (an edit).
        var replacing: String?
        /// The prompt's history, ending with the message answered.
        var history: [Message]
        /// The message answered: the reply's parent.
        var parent: String
        /// The reply is stored in place of this one (a regenerate).
        var replacesReply: String?
    }

    private func chatSend(
        ref: String, cloneID: String, conversationID: String?, text: String, voice: Bool, greeting choice: Int?,
        from connection: ClientConnection
    ) async {
        await reply(ref: ref, what: "chat.send", voice: voice, from: connection) { [self] in
            let user = connection.identity.user
            guard let clone = try await store.clone(id: cloneID, owner: user) else {
                throw FrameError(ref: ref, code: .notFound, message: "no clone \(cloneID)")
            }
            let now = Int64(Timestamp.nowMillis())
            guard let conversationID else {
                let conversation = Conversation(
                    id: ids.make(.conversation), owner: user, clone: clone.id, title: Self.title(for: text), createdAt: now, updatedAt: now)
                // A card's greeting opens a new conversation as its first message (made first, so its
                // id sorts first): the transcript shows it and the prompt answers after it.
                let alternates = clone.profile.alternateGreetings.count
                if let choice, choice > alternates {
                    throw FrameError(
                        ref: ref, code: .badRequest,
                        message: "clone \(clone.id) has \(alternates) alternate greeting\(alternates == 1 ? "" : "s"): 'greeting' is 0-\(alternates)")
                }
                let persona = try await personas.persona(of: user)
                let greeting = PromptAssembler.greeting(of: clone, choice: choice ?? 0, user: persona).map {
                    Message(id: ids.make(.message), conversation: conversation.id, role: .assistant, text: $0, createdAt: now)
                }
                let message = Message(
                    id: ids.make(.message), conversation: conversation.id, role: .user, text: text, createdAt: now, parent: greeting?.id)
                let opening = (greeting.map { [$0] } ?? []) + [message]
                return ReplyPlan(clone: clone, conversation: conversation, isNew: true, before: opening, history: opening, parent: message.id)
            }
            guard let conversation = try await store.conversation(id: conversationID, owner: user) else {
                throw FrameError(ref: ref, code: .notFound, message: "no conversation \(conversationID)")
            }
            guard conversation.clone == clone.id else {
                throw FrameError(ref: ref, code: .badRequest, message: "conversation \(conversationID) is with another clone")
            }
            let history = try await store.messages(conversation: conversation.id, limit: configuration.historyMessages - 1, before: nil)
            let message = Message(
                id: ids.make(.message), conversation: conversation.id, role: .user, text: text, createdAt: now, parent: history.last?.id)
            return ReplyPlan(clone: clone, conversation: conversation, before: [message], history: history + [message], parent: message.id)
        }
    }

    /// `chat.regenerate`: a new reply to the message the assistant message `messageID` answered,
    /// stored in its place on the path once it ends (the old one stays, as an alternative).
    private func regenerate(ref: String, messageID: String, voice: Bool, from connection: ClientConnection) async {
        await reply(ref: ref, what: "chat.regenerate", voice: voice, from: connection) { [self] in
            let (old, conversation, clone) = try await ownMessage(messageID, ref: ref, of: connection)
            guard old.role == .assistant else {
                throw FrameError(ref: ref, code: .badRequest, message: "message \(messageID) is not a reply; edit it with chat.edit")
            }
            let history = try await store.messages(conversation: conversation.id, limit: configuration.historyMessages, before: old.id)
            guard let answered = history.last, answered.role == .user else {
                throw FrameError(ref: ref, code: .badRequest, message: "message \(messageID) answers no message of yours (a greeting)")
            }
            return ReplyPlan(clone: clone, conversation: conversation, history: history, parent: answered.id, replacesReply: old.id)
        }
    }

    /// `chat.edit`: `text` in place of the user message `messageID` (which stays, with what
    /// followed it, as an alternative), and a reply to it.
    private func edit(ref: String, messageID: String, text: String, voice: Bool, from connection: ClientConnection) async {
        await reply(ref: ref, what: "chat.edit", voice: voice, from: connection) { [self] in
            let (old, conversation, clone) = try await ownMessage(messageID, ref: ref, of: connection)
            guard old.role == .user else {
                throw FrameError(
                    ref: ref, code: .badRequest, message: "message \(messageID) is not yours to edit; regenerate it with chat.regenerate")
            }
            let history = try await store.messages(conversation: conversation.id, limit: configuration.historyMessages - 1, before: old.id)
            let message = Message(
                id: ids.make(.message), conversation: conversation.id, role: .user, text: text, createdAt: Int64(Timestamp.nowMillis()),
                parent: history.last?.id)
            return ReplyPlan(
                clone: clone, conversation: conversation, before: [message], replacing: old.id, history: history + [message], parent: message.id)
        }
    }

    /// A message of one of the caller's conversations, on that conversation's path, with its
    /// conversation and clone.
    private func ownMessage(_ id: String, ref: String, of connection: ClientConnection) async throws -> (Message, Conversation, Clone) {
        let user = connection.identity.user
        guard let message = try await store.message(id: id), let conversation = try await store.conversation(id: message.conversation, owner: user)
        else { throw FrameError(ref: ref, code: .notFound, message: "no message \(id)") }
        guard message.onPath else {
            throw FrameError(
                ref: ref, code: .badRequest, message: "message \(id) is an alternative not on the conversation's path; choose it first")
        }
        guard let clone = try await store.clone(id: conversation.clone, owner: user) else {
            throw FrameError(ref: ref, code: .notFound, message: "no clone \(conversation.clone)")
        }
        return (message, conversation, clone)
    }

    /// Streams a reply as `plan` (made once the request's turn came) says: the conversation is
    /// held, the prompt and a minimum reply paid for, `plan.before` stored, then the reply
    /// generated and stored. Returns once the stream has started: its own task stores it and
    /// writes the title and summary after it. `voice`: spoken too, in the clone's voice (#29).
    private func reply(
        ref: String, what: String, voice: Bool, from connection: ClientConnection, plan makePlan: () async throws -> ReplyPlan
    ) async {
        let user = connection.identity.user
        var reservedConversation: String?
        var clusterSlot: String?
        do {
            let plans = streams.credits.plans
            try await plans?.require(.chat, user: user, ref: ref, what: "chat")
            if voice { try await streams.requireVoice(user: user, ref: ref, what: "voiced replies") }
            try await plans?.takeMessage(user: user, ref: ref)
            let userPlan = try await plans?.plan(of: user)
            // A reply of theirs the store refused goes first, where it now can: before the next
            // message, and in the history its prompt reads.
            try await streams.kept.storeNow(owner: user)
            let plan = try await makePlan()
            let conversation = plan.conversation
            let reservation = hub.reserve(user: user, conversation: conversation.id, planLimit: userPlan?.limits.concurrentStreams)
            if reservation == .overPlan, let plans, let userPlan {
                let limit = userPlan.limits.concurrentStreams ?? 0
                throw plans.refusal(limit + 1, of: .concurrentStreams, on: userPlan, ref: ref, what: "replies streaming at once")
            }
            try refuse(reservation, conversation: conversation.id, ref: ref)
            reservedConversation = conversation.id
            if let slots {
                try refuse(
                    try await slots.claim(user: user, conversation: conversation.id), conversation: conversation.id, ref: ref, acrossNodes: true)
                clusterSlot = conversation.id
            }
            let (summary, turns) = plan.isNew ? (nil, plan.history) : try await store.promptHistory(of: conversation, plan.history)
            let prompt = PromptAssembler(contextBudget: configuration.contextBudgetTokens).assemble(
                clone: plan.clone, history: turns, summary: summary?.text, user: try await personas.persona(of: user))
            let request = CompletionRequest(
                model: configuration.model(for: plan.clone), messages: prompt.messages, speaker: plan.clone.name,
                maxOutputTokens: configuration.maxOutputTokens)

            // The prompt and a minimum reply must be affordable before anything is stored or
            // generated; the user's message is durable before anything is generated for it. One
            // write does both (one commit before the first token, not two).
            let opening: ReplyOpening? =
                plan.isNew
                ? .conversation(conversation, messages: plan.before)
                : plan.before.isEmpty ? nil : .messages(plan.before, replacing: plan.replacing)
            let prepared: StreamRunner.Prepared
            do {
                prepared = try await streams.prepare(
                    prompt, request: request, payer: user, feature: .chat, conversation: conversation.id, storing: opening)
            } catch let gone as ReplacedMessageLeftPath {
                throw FrameError(ref: ref, code: .conflict, message: "message \(gone.id) left the conversation's path; try again")
            } catch let gone as ParentMessageGone {
                throw FrameError(ref: ref, code: .conflict, message: "message \(gone.id) was deleted; try again")
            } catch let refusal as CreditMeter.Refusal where refusal.bySpendLimit {
                throw FrameError(
                    ref: ref, code: .spendLimit,
                    message: "this reply needs \(refusal.required) credits; your spending limits allow \(refusal.balance) more for now",
                    required: refusal.required)
            } catch let refusal as CreditMeter.Refusal {
                throw FrameError(
                    ref: ref, code: .insufficientCredits,
                    message: "this reply needs \(refusal.required) credits; the balance is \(refusal.balance)",
                    balance: refusal.balance, required: refusal.required)
            }

            let messageID = ids.make(.message)
            let live = streams.open(
                id: prepared.id, owner: user, model: prepared.model,
                kind: .reply(conversation: conversation.id, clone: plan.clone.id, schedule: nil, message: messageID, parent: plan.parent),
                readers: [.user(user)], bufferCapacity: configuration.resumeBufferTokens, ref: ref)
            Admission.admitCurrent()  // the stream exists: a pipelined chat.cancel finds it
            reservedConversation = nil  // the runner releases it when the stream ends
            let (store, logger, parent, replaced) = (self.store, streams.logger, plan.parent, plan.replacesReply)
            let journal: StreamJournal.Target =
                replaced.map { .alternative(conversation: conversation.id, replacing: $0) } ?? .conversation(conversation.id, parent: plan.parent)
            let speaking = voice ? configuration.voice(of: plan.clone) : nil
            // The cluster's hold on the conversation goes, like this node's, before stream.end: a
            // tab on another node that sends on seeing the end is never told a reply still streams.
            // Before the title and the summary too: they take the model's time, and the next
            // message may come meanwhile. A reply the store refused keeps it until stored, so no
            // node stores the next message before it.
            var releaseSlot: (@Sendable () async -> Void)?
            if let slots, let slot = clusterSlot {
                releaseSlot = { await slots.release(conversation: slot) }
            }
            clusterSlot = nil  // released once the stream ends
            streams.launch(
                live, prepared, ref: ref, requester: connection, messageID: messageID, journal: journal, voice: speaking, hold: releaseSlot
            ) {
                var reply = $0
                reply.parent = parent
                // The conversation is held while it streams: only a deletion makes the original leave
                // the path, or a retry's late store find the path gone on (the user wrote on meanwhile).
                if try await !store.appendReply(reply, replacing: replaced), let replaced {
                    logger.notice(
                        "a regenerated reply could not take its original's place; stored after the message it answers",
                        metadata: ["message": "\(replaced)"])
                }
            } then: { [self] stored in
                if plan.isNew, configuration.generatedTitles, let stored, stored.reason == .complete, let message = plan.before.last {
                    await titles.title(conversation, clone: plan.clone, message: message, reply: stored)
                }
                if let stored, stored.reason == .complete {
                    await summaries.fold(conversation, clone: plan.clone, summary: summary, turns: turns + [stored])
                }
            }
        } catch let error as FrameError {
            connection.send(ServerFrame.error(error))
        } catch {
            var failure = requests.internalFailure(error, what: what, connection: connection, ref: ref)
            failure.ref = ref
            connection.send(ServerFrame.error(failure))
        }
        if let reservedConversation { hub.release(user: user, conversation: reservedConversation) }
        if let clusterSlot { await slots?.release(conversation: clusterSlot) }
    }

    /// Runs `body` with `conversation` held as a streaming reply holds it, so that no reply
    /// starts or is stored in it meanwhile; nil (and `body` not run) while one streams in it, or
    /// while one the store refused still waits to be stored there, so that a deletion takes it
    /// with its question and a branch chosen is read with it in place (stored afterwards, the
    /// store's own rule would drop it, or keep it off the path). Such a reply of this node's is
    /// stored first where the store now takes it; a store that refuses as a whole throws that.
    func whileNoReplyStreams<T: Sendable>(user: String, conversation: String, _ body: () async throws -> T) async throws -> T? {
        guard case .reserved = hub.reserve(user: user, conversation: conversation) else { return nil }
        defer { hub.release(user: user, conversation: conversation) }
        try await streams.kept.storeNow(owner: user)
        guard !streams.kept.holdsMessage(owner: user, in: conversation) else { return nil }
        guard let slots else { return try await body() }
        guard case .reserved = try await slots.claim(user: user, conversation: conversation) else { return nil }
        let result: Result<T, any Error>
        do { result = .success(try await body()) } catch { result = .failure(error) }
        await slots.release(conversation: conversation)
        return try result.get()
    }

    /// `acrossNodes`: the cluster's hold refused it, which a reply streaming on another node has,
    /// and also one that ended while the store refused its message, until it is stored.
    private func refuse(_ reservation: StreamHub.Reservation, conversation: String, ref: String, acrossNodes: Bool = false) throws(FrameError) {
        switch reservation {
        case .reserved: return
        case .conversationBusy where acrossNodes:
            throw FrameError(
                ref: ref, code: .rateLimited,
                message: "a reply in conversation \(conversation) is still streaming or waiting to be stored; try again shortly")
        case .conversationBusy:
            throw FrameError(ref: ref, code: .rateLimited, message: "a reply is already streaming in conversation \(conversation)")
        case .tooManyStreams, .overPlan:
            let most = configuration.maxConcurrentStreamsPerUser
            throw FrameError(ref: ref, code: .rateLimited, message: "at most \(most) \(most == 1 ? "reply" : "replies") may stream at once")
        }
    }

    /// A new conversation's first title: the first line of the user's message, cleaned (the
    /// clone's model may write a better one after the first reply).
    static func title(for text: String) -> String {
        let title = ConversationTitles.clean(text)
        return title.isEmpty ? "New conversation" : title
    }
}
