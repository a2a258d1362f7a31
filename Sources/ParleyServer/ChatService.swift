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

    init(store: any Store, streams: StreamRunner, configuration: ServerConfiguration, ids: IDGenerator) {
        self.store = store
        self.streams = streams
        self.requests = streams.requests
        self.configuration = configuration
        self.ids = ids
    }

    /// Serves one client request in its `turn` (see `RequestOrder`). Never throws: every failure
    /// becomes an `error` frame.
    func handle(_ frame: ChatFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
        switch frame {
        case let .send(id, clone, conversation, text):
            requests.serve(id, from: connection, turn: turn, what: "chat.send") {
                await self.chatSend(ref: id, cloneID: clone, conversationID: conversation, text: text, from: connection)
            }
        // Not tracked: a cancel must work during the drain.
        case let .cancel(id, stream):
            turn.runSoon { self.cancel(ref: id, stream: stream, from: connection) }
        case let .resume(id, stream, after):
            turn.runSoon { self.resume(ref: id, stream: stream, after: after, from: connection) }
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

    private func resume(ref: String, stream: String, after: Int64, from connection: ClientConnection) {
        guard let live = ownStream(stream, of: connection) else {
            let gone = ServerFrame.error(ref: ref, code: .streamGone, message: "stream \(stream) is no longer buffered")
            guard let remote else { return connection.send(gone) }
            Task {
                if await !remote.resume(stream: stream, after: after, ref: ref, connection: connection) { connection.send(gone) }
            }
            return
        }
        let ack = allocator.buffer(bytes: live.startFrame(ref: ref))
        if live.resume(connection, after: after, ack: ack) == .gone {
            connection.send(LiveStream.goneFrame(ref: ref, stream: stream, after: after))
        }
    }

    // MARK: chat.send

    private func chatSend(ref: String, cloneID: String, conversationID: String?, text: String, from connection: ClientConnection) async {
        let user = connection.identity.user
        var reservedConversation: String?
        var clusterSlot: String?
        var toRefund: StreamRunner.Prepared?
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
            try refuse(hub.reserve(user: user, conversation: conversation.id), conversation: conversation.id, ref: ref)
            reservedConversation = conversation.id
            if let slots {
                try refuse(try await slots.claim(user: user, conversation: conversation.id), conversation: conversation.id, ref: ref)
                clusterSlot = conversation.id
            }

            // A card's greeting opens a new conversation as its first message (made first, so its
            // id sorts first): the transcript shows it and the prompt answers after it.
            let greeting =
                isNew
                ? PromptAssembler.greeting(of: clone).map {
                    Message(id: ids.make(.message), conversation: conversation.id, role: .assistant, text: $0, createdAt: now)
                } : nil
            let userMessage = Message(id: ids.make(.message), conversation: conversation.id, role: .user, text: text, createdAt: now)
            let history =
                isNew
                ? (greeting.map { [$0] } ?? [])
                : try await store.messages(conversation: conversation.id, limit: configuration.historyMessages - 1, before: nil)
            let prompt = PromptAssembler(contextBudget: configuration.contextBudgetTokens).assemble(clone: clone, history: history + [userMessage])
            let request = CompletionRequest(
                model: configuration.model(for: clone), messages: prompt.messages, speaker: clone.name, maxOutputTokens: configuration.maxOutputTokens
            )

            // The prompt and a minimum reply must be affordable before anything is stored or generated.
            let prepared: StreamRunner.Prepared
            do {
                prepared = try await streams.prepare(prompt, request: request, payer: user, feature: .chat, conversation: conversation.id)
            } catch let refusal as CreditMeter.Refusal {
                throw FrameError(
                    ref: ref, code: .insufficientCredits,
                    message: "this reply needs \(refusal.required) credits; the balance is \(refusal.balance)",
                    balance: refusal.balance, required: refusal.required)
            }
            toRefund = prepared

            // The user's message is durable before anything is generated for it.
            if isNew { try await store.createConversation(conversation) }
            if let greeting { try await store.appendMessage(greeting) }
            try await store.appendMessage(userMessage)
            toRefund = nil

            let live = streams.open(
                id: prepared.id, owner: user, model: prepared.model, kind: .reply(conversation: conversation.id, clone: clone.id, schedule: nil),
                readers: [.user(user)], bufferCapacity: configuration.resumeBufferTokens, ref: ref)
            Admission.admitCurrent()  // the stream exists: a pipelined chat.cancel finds it
            reservedConversation = nil  // the runner releases it when the stream ends
            let store = self.store
            await streams.run(
                live, prepared, ref: ref, requester: connection, messageID: ids.make(.message),
                journal: .conversation(conversation.id)
            ) { try await store.appendMessage($0) }
        } catch let error as FrameError {
            connection.send(ServerFrame.error(error))
        } catch {
            var failure = requests.internalFailure(error, what: "chat.send", connection: connection, ref: ref)
            failure.ref = ref
            connection.send(ServerFrame.error(failure))
        }
        // Charged for a prompt whose message could not be stored: give it back.
        if let toRefund { await streams.abandon(toRefund) }
        if let reservedConversation { hub.release(user: user, conversation: reservedConversation) }
        if let clusterSlot { await slots?.release(conversation: clusterSlot) }
    }

    private func refuse(_ reservation: StreamHub.Reservation, conversation: String, ref: String) throws(FrameError) {
        switch reservation {
        case .reserved: return
        case .conversationBusy:
            throw FrameError(ref: ref, code: .rateLimited, message: "a reply is already streaming in conversation \(conversation)")
        case .tooManyStreams:
            throw FrameError(ref: ref, code: .rateLimited, message: "at most \(configuration.maxConcurrentStreamsPerUser) replies may stream at once")
        }
    }

    static func title(for text: String) -> String {
        let line = text.trimmedWhitespace.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        return line.count <= 60 ? line : String(line.prefix(59)) + "…"
    }
}
