import NIOCore
import ParleyCore
import ParleyLLM
import Synchronization

/// A translation chat's stream in flight: a clone's reply (written in `stream.lang`) or a
/// translation into `target`.
struct RoomFlight: Sendable {
    let stream: LiveStream
    /// The position of its message in the chat (`LiveRoom.State.placed`).
    let order: Int
    let target: LanguageTag?

    /// Whether a reader of `reader` follows this stream: a translation goes to readers of its
    /// target; a reply to readers who share its language (and to readers with none set).
    func delivers(to reader: LanguageTag?) -> Bool {
        guard let target else { return reader == nil || reader!.sharesLanguage(with: stream.lang!) }
        return reader == target
    }
}

/// Translation chats: every message is shown to its sender's language as written and streamed,
/// translated, to every other language in the chat.
///
/// Order: messages are placed one at a time (`LiveRoom.sequenced`). Placing a message appends
/// it to the transcript and, under the room's lock, sends each member its first frame for it:
/// the original (`room.event said`), or the `stream.start` of its translation, or (a clone's
/// reply) the reply's `stream.start`. So per member the starts arrive in the order the messages
/// were said; the tokens of several streams may then interleave, told apart by `stream`.
extension RoomService {
    /// One translation, priced and paid for.
    struct TranslationJob {
        let target: LanguageTag
        let prepared: StreamRunner.Prepared
    }

    /// Sets `user`'s language on joining (stored for later joins); the first join must give one.
    func setLanguage(_ language: LanguageTag?, of user: String, in live: LiveRoom) async throws {
        let (changed, known) = live.state.withLock { s -> (Room?, Bool) in
            guard let language else { return (nil, s.room.languages[user] != nil) }
            let previous = s.room.languages[user]
            guard previous != language else { return (nil, true) }
            // The user's sockets already in the chat read the new language from now on.
            for member in s.members.values where member.identity.user == user {
                live.hub.unsubscribe(member.id, from: .room(s.room.id, readers: previous))
                live.hub.subscribe(member, to: .room(s.room.id, readers: language))
            }
            s.room.languages[user] = language
            s.room.updatedAt = Int64(Timestamp.nowMillis())
            return (s.room, true)
        }
        guard known else {
            throw FrameError(
                ref: nil, code: .badRequest,
                message: "room.join needs your 'language' (a BCP 47 tag such as en or pt-BR) in translation chat \(live.id)")
        }
        if changed != nil {
            try await live.save()
            // The user's sockets on other nodes read the new language from now on too.
            if let language { owners?.setLanguage(language, of: user, in: live.id) }
        }
    }

    /// A person's message: stored, shown as written to readers of its language, and translated
    /// for every other language, paid by the sender. A language the sender cannot pay for gets
    /// the original flagged `untranslated`, and the sender an `insufficient_credits` error.
    func sayTranslated(ref: String, live: LiveRoom, text: String, _ connection: ClientConnection) async throws {
        let translations = try await placeTranslated(ref: ref, live: live, text: text, by: connection.identity.user) { connection.send($0) }
        Admission.admitCurrent()  // the message is placed; its translations stream on
        // The request ends when its translations have: shutdown waits for them.
        for task in translations { await task.value }
    }

    /// Places `user`'s message (from a socket here or on another node) and starts its
    /// translations, which the returned tasks run; `warn` gets the frame for the speaker's
    /// socket when some language could not be paid for.
    func placeTranslated(
        ref: String, live: LiveRoom, text: String, by user: String, warn: (ByteBuffer) -> Void
    ) async throws -> [Task<Void, Never>] {
        let translations: [(LanguageTag, Task<Void, Never>)] = try await live.sequenced {
            let (room, context) = live.state.withLock { ($0.room, $0.transcript) }
            guard room.status != .ended else { throw FrameError(ref: nil, code: .conflict, message: "translation chat \(room.id) has ended") }
            guard let lang = room.languages[user] else {
                throw FrameError(ref: nil, code: .badRequest, message: "join translation chat \(room.id) with your 'language' first")
            }
            let entry = RoomEntry(
                id: ids.make(.roomEntry), room: room.id, kind: .said, speaker: user, text: text,
                createdAt: Int64(Timestamp.nowMillis()), lang: lang)
            var jobs: [TranslationJob] = []
            var refused: [(LanguageTag, CreditMeter.Refusal)] = []
            do {
                for target in TranslationChat.targets(room: room, speaker: user, lang: lang) {
                    do {
                        jobs.append(try await translationJob(of: entry, to: target, room: room, context: context, payer: user))
                    } catch let refusal as CreditMeter.Refusal {
                        refused.append((target, refusal))
                    }
                }
                try await live.writer.append(entry)
            } catch {
                for job in jobs { await streams.abandon(job.prepared) }
                throw error
            }
            let opened = place(entry, in: live, translations: jobs)
            if let (_, refusal) = refused.first {
                let languages = refused.map(\.0.value).joined(separator: ", ")
                warn(
                    allocator.buffer(
                        bytes: ServerFrame.error(
                            ref: ref, code: .insufficientCredits,
                            message:
                                "translating into \(languages) needs \(refusal.required) credits; the balance is \(refusal.balance). Those readers got your message untranslated",
                            balance: refusal.balance, required: refusal.required)))
            }
            var running: [(LanguageTag, Task<Void, Never>)] = []
            for (job, stream) in zip(jobs, opened) {
                running.append((job.target, translate(job, stream: stream, of: entry, in: live, payer: user)))
            }
            queueReplies(to: entry, in: live, after: running)
            return running
        }
        return translations.map(\.1)
    }

    /// Prices and charges the translation of `original` into `target` to `payer`; throws
    /// `CreditMeter.Refusal` when they cannot pay for it.
    private func translationJob(
        of original: RoomEntry, to target: LanguageTag, room: Room, context: [RoomEntry], payer: String,
        streamID: String? = nil
    ) async throws -> TranslationJob {
        let prompt = TranslationChat.prompt(
            text: original.text, from: original.lang!, to: target,
            context: context.filter { $0.id < original.id }, names: Self.names(room))
        let request = CompletionRequest(
            messages: prompt.messages, maxOutputTokens: TranslationChat.maxOutputTokens(for: original.text, cap: configuration.maxOutputTokens),
            translation: TranslationTask(text: original.text, from: original.lang!, to: target))
        let prepared = try await streams.prepare(prompt, request: request, payer: payer, feature: .translation, room: room.id, streamID: streamID)
        return TranslationJob(target: target, prepared: prepared)
    }

    /// Places a person's message in the chat (see the type's comment) with a stream for each
    /// translation, and returns those streams. Readers whose language has no stream get the
    /// original flagged `untranslated`.
    private func place(_ entry: RoomEntry, in live: LiveRoom, translations: [TranslationJob]) -> [LiveStream] {
        live.state.withLock { s in
            s.append(entry)
            s.placed += 1
            // One topic per language read in the chat: the original goes to the languages that read
            // it as written, flagged untranslated to those no translation is made for.
            let said = allocator.buffer(bytes: ServerFrame.roomEvent(room: s.room.id, event: "said", [("entry", entry.json)]))
            let untranslated = allocator.buffer(
                bytes: ServerFrame.roomEvent(room: s.room.id, event: "said", [("entry", entry.json(untranslated: true))]))
            for lang in s.readerLanguages {
                if lang == nil || lang!.sharesLanguage(with: entry.lang!) {
                    live.publish(said, readers: lang, &s)
                } else if !translations.contains(where: { $0.target == lang }) {
                    live.publish(untranslated, readers: lang, &s)
                }
            }
            return translations.map { t in
                let stream = streams.open(
                    id: t.prepared.id, owner: entry.speaker, model: t.prepared.model,
                    kind: .translation(room: s.room.id, lang: t.target, source: entry.id, speaker: .user(entry.speaker)),
                    readers: [.room(s.room.id, readers: t.target)], bufferCapacity: t.prepared.request.maxOutputTokens,
                    roomSeq: live.numberStream(&s))
                s.inflight[stream.id] = RoomFlight(stream: stream, order: s.placed, target: t.target)
                return stream
            }
        }
    }

    /// Streams one translation and stores it linked to its original.
    private func translate(_ job: TranslationJob, stream: LiveStream, of original: RoomEntry, in live: LiveRoom, payer: String) -> Task<Void, Never> {
        return Task {
            // A clone's words are spoken in the reader's language where the speech service has it.
            let room = live.state.withLock { $0.room }
            let voice = original.speakerIsClone ? self.voice(of: original.speaker, in: room, language: job.target) : nil
            let message = await self.streams.run(
                stream, job.prepared, messageID: self.ids.make(.roomEntry), journal: .settleOnly(),
                paywall: live.payer(payer), voice: voice
            ) { message in
                try await live.writer.append(Self.translation(message, of: original, into: job.target, stream: stream.id))
            }
            self.landed(
                stream, entry: message.map { Self.translation($0, of: original, into: job.target, stream: stream.id) }, original: original, in: live)
        }
    }

    private static func translation(_ message: Message, of original: RoomEntry, into target: LanguageTag, stream: String) -> RoomEntry {
        RoomEntry(
            id: message.id, room: original.room, kind: .translation, speaker: original.speaker, text: message.text, createdAt: message.createdAt,
            reason: message.reason, stream: stream, lang: target, source: original.id, speakerIsClone: original.speakerIsClone)
    }

    /// A stream of the chat ended: its entry joins the transcript; readers of a translation that
    /// did not complete get the original, flagged `untranslated`.
    private func landed(_ stream: LiveStream, entry: RoomEntry?, original: RoomEntry?, in live: LiveRoom) {
        live.state.withLock { s in
            guard let flight = s.inflight.removeValue(forKey: stream.id) else { return }
            if let entry { s.append(entry) }
            if let target = flight.target, entry?.reason != .complete, let original {
                let frame = ServerFrame.roomEvent(room: s.room.id, event: "said", [("entry", original.json(untranslated: true))])
                live.publish(allocator.buffer(bytes: frame), readers: target, &s)
            }
        }
        evictIfIdle(live)
    }

    /// Ends a stream that never generated (its reply was empty, or its payer could not pay).
    private func endUnstarted(_ stream: LiveStream, reason: StreamEndReason, original: RoomEntry?, in live: LiveRoom) {
        streams.end(stream, reason: reason)
        landed(stream, entry: nil, original: original, in: live)
    }

    // MARK: Clone members

    /// Every clone member not muted answers a person's message, one reply at a time per chat,
    /// once the message's translation into its language (if any) has ended.
    private func queueReplies(to entry: RoomEntry, in live: LiveRoom, after translations: [(LanguageTag, Task<Void, Never>)]) {
        let clones = live.state.withLock { s in s.room.debaters.filter { !s.room.muted.contains($0.clone) } }
        for clone in clones {
            let wait = live.state.withLock { $0.room.languages[clone.clone] }.flatMap { lang in translations.first { $0.0 == lang }?.1 }
            live.state.withLock { s in
                s.pendingReplies += 1
                let previous = s.replies
                s.replies = Task {
                    await previous?.value
                    await wait?.value
                    await self.reply(as: clone.clone, in: live)
                    live.state.withLock { $0.pendingReplies -= 1 }
                    self.evictIfIdle(live)
                }
            }
        }
    }

    /// One clone reply: streamed in the clone's language to its readers and, once complete,
    /// translated for the others. The chat's owner pays for both.
    private func reply(as cloneID: String, in live: LiveRoom) async {
        let room = live.state.withLock { $0.room }
        guard isAccepting, room.status != .ended, !room.muted.contains(cloneID), let lang = room.languages[cloneID] else { return }
        do {
            guard let clone = try await store.clone(id: cloneID, owner: room.owner) else {
                try await muteDeletedClone(cloneID, in: live)
                return
            }
            let view = TranslationChat.view(live.state.withLock { $0.transcript }, for: lang).map(\.entry)
            let prompt = TranslationChat.replyPrompt(
                room: room, clone: clone, lang: lang, view: view, names: Self.names(room), budget: configuration.contextBudgetTokens)
            let request = CompletionRequest(
                model: configuration.model(for: clone), messages: prompt.messages, speaker: clone.name, maxOutputTokens: configuration.maxOutputTokens
            )
            let prepared: StreamRunner.Prepared
            do {
                prepared = try await streams.prepare(prompt, request: request, payer: room.owner, feature: .chat, room: room.id)
            } catch let refusal as CreditMeter.Refusal {
                live.broadcast(
                    allocator.buffer(bytes: ServerFrame.paywall(stream: nil, balance: refusal.balance, required: refusal.required, room: room.id)),
                    onlyTo: room.owner)
                return
            }
            let entryID = ids.make(.roomEntry)
            let (stream, pending) = try await live.sequenced {
                placeReply(clone: clone.id, lang: lang, entryID: entryID, prepared: prepared, in: live)
            }
            let owner = room.owner
            let toEntry = { @Sendable (message: Message) in
                RoomEntry(
                    id: entryID, room: room.id, kind: .turn, speaker: clone.id, text: message.text, createdAt: message.createdAt,
                    reason: message.reason, stream: prepared.id, lang: lang)
            }
            let recorded = await streams.run(
                stream, prepared, messageID: entryID, journal: .settleOnly(), paywall: live.payer(owner),
                voice: voice(of: clone.id, in: room, language: lang)
            ) { message in
                try await live.writer.append(toEntry(message))
            }
            let said = recorded.map(toEntry)
            landed(stream, entry: said, original: nil, in: live)

            var running: [Task<Void, Never>] = []
            for waiting in pending {
                let target = waiting.lang!
                guard let said, !said.text.isEmpty, isAccepting else {
                    endUnstarted(waiting, reason: isAccepting ? (said?.reason ?? .error) : .shutdown, original: said, in: live)
                    continue
                }
                let context = live.state.withLock { $0.transcript }
                let job: TranslationJob
                do {
                    job = try await translationJob(of: said, to: target, room: room, context: context, payer: owner, streamID: waiting.id)
                } catch let refusal as CreditMeter.Refusal {
                    live.broadcast(
                        allocator.buffer(
                            bytes: ServerFrame.paywall(stream: waiting.id, balance: refusal.balance, required: refusal.required, room: room.id)),
                        onlyTo: owner)
                    endUnstarted(waiting, reason: .insufficientCredits, original: said, in: live)
                    continue
                }
                running.append(translate(job, stream: waiting, of: said, in: live, payer: owner))
            }
            for task in running { await task.value }
        } catch {
            logger.error(
                "a clone's reply in a translation chat failed", metadata: ["room": "\(room.id)", "clone": "\(cloneID)", "error": "\(error)"])
        }
    }

    /// Places a clone's reply: its stream for readers of its language, and a translation stream
    /// (started now, generated once the reply is complete) for every other language.
    private func placeReply(
        clone: String, lang: LanguageTag, entryID: String, prepared: StreamRunner.Prepared, in live: LiveRoom
    ) -> (LiveStream, [LiveStream]) {
        live.state.withLock { s in
            s.placed += 1
            let targets = TranslationChat.targets(room: s.room, speaker: clone, lang: lang)
            let readers = s.readerLanguages.filter { $0 == nil || $0!.sharesLanguage(with: lang) }.map { Topic.room(s.room.id, readers: $0) }
            // `source` names the reply itself, so every reader groups the reply's streams by one id.
            let reply = streams.open(
                id: prepared.id, owner: s.room.owner, model: prepared.model,
                kind: .roomReply(room: s.room.id, clone: clone, lang: lang, source: entryID),
                readers: readers, bufferCapacity: configuration.maxOutputTokens, roomSeq: live.numberStream(&s))
            s.inflight[reply.id] = RoomFlight(stream: reply, order: s.placed, target: nil)
            let translations = targets.map { target in
                let stream = streams.open(
                    id: ids.make(.stream), owner: s.room.owner, model: prepared.model,
                    kind: .translation(room: s.room.id, lang: target, source: entryID, speaker: .clone(clone)),
                    readers: [.room(s.room.id, readers: target)], bufferCapacity: configuration.maxOutputTokens, roomSeq: live.numberStream(&s))
                s.inflight[stream.id] = RoomFlight(stream: stream, order: s.placed, target: target)
                return stream
            }
            return (reply, translations)
        }
    }

    // MARK: Helpers

    /// Display names of the chat's clones (users are shown by id).
    static func names(_ room: Room) -> [String: String] {
        Dictionary(room.debaters.map { ($0.clone, $0.name) }, uniquingKeysWith: { a, _ in a })
    }

    /// A transcript as `user` reads it: a debate's as it is; a translation chat's in their language.
    static func transcript(_ entries: [RoomEntry], of room: Room, for user: String) -> [JSONValue] {
        guard room.kind == .translation else { return entries.map(\.json) }
        return TranslationChat.view(entries, for: room.languages[user]).map { $0.entry.json(untranslated: $0.untranslated) }
    }
}
