import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore
import Synchronization

/// Debate rooms: creation (REST), membership, interjections and moderation (protocol), and the
/// turn loop that has clones argue while every member watches the same stream.
///
/// Fan-out: members subscribe to the room's topic, and each turn is a `LiveStream` read by the
/// room's subscribers; every frame is published once through the broker, and the same buffer is
/// written to every member's socket. Sockets have
/// bounded outbound queues (`ClientConnection`), so a member who reads too slowly is cut off
/// instead of slowing the others, and can join again to catch up.
final class RoomService: FrameHandler {
    let store: any Store
    let streams: StreamRunner
    let requests: RequestTracker
    let configuration: ServerConfiguration
    let logger: Logger
    let ids: IDGenerator
    let allocator = ByteBufferAllocator()
    /// Room creates per owner (`create`).
    private let creates = StripedLocks()
    /// Transcript entries kept in memory per room for prompts and `room.state`.
    static let keptEntries = 200

    /// Shared with the cluster's extension (`RoomService+Cluster.swift`).
    struct State {
        var rooms: [String: LiveRoom] = [:]
        var accepting = true
        /// In a cluster: this node's sockets in rooms another node runs (room → connection id).
        var elsewhere: [String: [String: ElsewhereMember]] = [:]
    }

    let state = Mutex(State())

    /// Where moderation actions are recorded.
    let audit: AuditLog?
    /// In a cluster: which node runs each room.
    let owners: RoomOwners?
    var clusterBroker: NATSBroker? { streams.broker as? NATSBroker }

    init(
        store: any Store, streams: StreamRunner, configuration: ServerConfiguration, logger: Logger, ids: IDGenerator, audit: AuditLog? = nil,
        owners: RoomOwners? = nil
    ) {
        self.owners = owners
        self.audit = audit
        self.store = store
        self.streams = streams
        self.requests = streams.requests
        self.configuration = configuration
        self.logger = logger
        self.ids = ids
    }

    // MARK: Start and stop

    /// A room that was running when the server stopped is paused: its moderator resumes it.
    /// In a cluster, only the rooms this node ran (the others run elsewhere).
    func start() async throws {
        if let owners {
            for id in try await owners.rooms(of: owners.node) {
                if var room = try await store.room(id: id), room.status == .running {
                    room.status = .paused
                    room.updatedAt = Int64(Timestamp.nowMillis())
                    _ = try await store.updateRoom(room)
                }
                await owners.release(id)
            }
            try owners.start(
                answer: { [weak self] room, request in await self?.answer(room: room, request) ?? [] },
                kicked: { [weak self] room, user in self?.kickedElsewhere(room: room, user: user) },
                nodeGone: { [weak self] node in self?.forgetNode(node) },
                languageSet: { [weak self] room, user, language in self?.languageSetElsewhere(room: room, user: user, language) },
                superseded: { [weak self] room in self?.superseded(room) },
                membersHere: { [weak self] room in self?.membersHere(room) ?? [] })
            return
        }
        var after: String?
        while true {
            let page = try await store.rooms(statuses: [.running], limit: 500, after: after)
            for var room in page {
                room.status = .paused
                room.updatedAt = Int64(Timestamp.nowMillis())
                _ = try await store.updateRoom(room)
            }
            guard page.count == 500 else { break }
            after = page.last?.id
        }
    }

    /// Ends every turn in flight (its partial text stored, marked interrupted) and waits for the
    /// turn loops; rooms stay `running` in memory only, and are stored `paused`.
    func shutdown() async {
        let rooms = state.withLock { s -> [LiveRoom] in
            s.accepting = false
            return Array(s.rooms.values)
        }
        for room in rooms {
            await room.halt(.shutdown)
            if room.state.withLock({ $0.room.status }) == .running {
                try? await room.save { $0.status = .paused }
                // In a cluster its members on other nodes stay connected: they are told.
                if owners != nil {
                    room.broadcast(allocator.buffer(bytes: ServerFrame.roomEvent(room: room.id, event: "paused", [("reason", .string("shutdown"))])))
                }
            }
        }
        await owners?.stop()
    }

    /// A user's account is being deleted: the rooms they own end at once and leave memory (the
    /// store deletes them next), and rooms they are in forget them (so no later update of a live
    /// room writes their membership or words back).
    func forget(user: String) async {
        let rooms = state.withLock { Array($0.rooms.values) }
        for live in rooms {
            let owned = live.state.withLock { $0.room.owner == user }
            guard owned else {
                live.state.withLock { s in
                    s.room = s.room.removingUser(user)
                    let said = Set(s.transcript.filter { $0.speaker == user && !$0.speakerIsClone }.map(\.id))
                    s.transcript.removeAll { said.contains($0.id) || $0.source.map(said.contains) == true }
                }
                continue
            }
            await live.halt(.cancelled) { $0.room.status = .ended }
            live.broadcast(allocator.buffer(bytes: ServerFrame.roomEvent(room: live.id, event: "ended", [("by", .string(user))])))
            state.withLock { s in
                if s.rooms[live.id] === live { s.rooms.removeValue(forKey: live.id) }
            }
            live.state.withLock { $0.retired = true }
        }
    }

    // MARK: REST

    /// Whether room `id` runs here and has ended.
    private func endedHere(_ id: String) -> Bool {
        state.withLock { $0.rooms[id] }?.state.withLock { $0.room.status == .ended } ?? false
    }

    /// The rooms `owner` made that have not ended (for a plan's room limit; two creates at the same
    /// moment may both pass: the count is read first). A room run here that ended counts as
    /// ended though its store write may still be on its way: its `ended` event goes out first,
    /// and a moderator who then made a room was refused for the one just ended. (One run on
    /// another node is counted as its store has it: ended once written there.)
    private func openRooms(of owner: String) async throws -> Int {
        var open = 0
        var after: String?
        while true {
            let page = try await store.rooms(owner: owner, limit: 200, after: after)
            open += page.filter { $0.status != .ended && !endedHere($0.id) }.count
            guard page.count == 200, let last = page.last else { return open }
            after = last.id
        }
    }

    func create(owner: String, _ request: RoomRequest) async throws(FrameError) -> Room {
        do {
            switch request {
            case .debate: try await streams.credits.plans?.require(.debate, user: owner, ref: nil, what: "debate rooms")
            case .translation: try await streams.credits.plans?.require(.translation, user: owner, ref: nil, what: "translation chats")
            }
            // One owner's rooms are made one at a time on this node, each counted and written
            // before the next is counted (two nodes at the same moment may still both make the
            // last one a plan allows).
            return try await creates.run(for: owner) {
                if let plans = streams.credits.plans, try await plans.plan(of: owner).limits.rooms != nil {
                    try await plans.require(try await openRooms(of: owner) + 1, of: .rooms, user: owner, ref: nil, what: "open rooms")
                }
                return try await make(owner: owner, request)
            }
        } catch let error as FrameError {
            throw error
        } catch {
            throw requests.internalFailure(error, what: "room request")
        }
    }

    /// The room `request` asks for, stored.
    private func make(owner: String, _ request: RoomRequest) async throws -> Room {
        let now = Int64(Timestamp.nowMillis())
        let room: Room
        switch request {
        case .debate(let request):
            if request.voice { try await streams.requireVoice(user: owner, ref: nil, what: "voiced debates") }
            var debaters: [Room.Debater] = []
            for (clone, stance) in request.clones {
                let found = try await ownClone(clone, owner: owner)
                debaters.append(
                    Room.Debater(
                        clone: clone, stance: stance, name: found.name,
                        voice: request.voice ? configuration.voice(of: found) : nil))
            }
            room = Room(
                id: ids.make(.room), owner: owner, topic: request.topic, debaters: debaters, rounds: request.rounds,
                policy: request.policy, maxTokensPerTurn: request.maxTokensPerTurn, visibility: request.visibility,
                createdAt: now, updatedAt: now)
        case .translation(let request):
            let members = request.members.filter { $0 != owner }
            if let stranger = request.languages.keys.sorted().first(where: { $0 != owner && !members.contains($0) }) {
                throw FrameError(ref: nil, code: .badRequest, message: "'languages' names \(stranger), who is not in 'members'")
            }
            var languages = request.languages
            var debaters: [Room.Debater] = []
            if request.voice { try await streams.requireVoice(user: owner, ref: nil, what: "voiced translation chats") }
            for member in request.clones {
                let found = try await ownClone(member.clone, owner: owner)
                debaters.append(
                    Room.Debater(
                        clone: member.clone, stance: "", name: found.name,
                        voice: request.voice ? configuration.voice(of: found) : nil))
                languages[member.clone] = member.language
            }
            room = Room(
                id: ids.make(.room), kind: .translation, owner: owner, topic: "", debaters: debaters, rounds: 0, policy: .roundRobin,
                maxTokensPerTurn: 0, visibility: .private, members: members, languages: languages, createdAt: now, updatedAt: now)
        }
        try await store.createRoom(room)
        return room
    }

    /// A clone's voice in `room` for a stream written in `language`: nil when the room is not
    /// voiced or the speech service does not speak that language (its readers get text only).
    func voice(of clone: String, in room: Room, language: LanguageTag?) -> CloneVoice? {
        guard let voice = room.debater(clone)?.voice else { return nil }
        return language.map(configuration.speaks) ?? true ? voice : nil
    }

    private func cloneName(_ clone: String, owner: String) async throws -> String {
        try await ownClone(clone, owner: owner).name
    }

    private func ownClone(_ clone: String, owner: String) async throws -> Clone {
        guard let found = try await store.clone(id: clone, owner: owner) else {
            throw FrameError(ref: nil, code: .notFound, message: "no clone \(clone)")
        }
        return found
    }

    /// The room and its transcript as `user` may see it (in a translation chat: in their language).
    func snapshot(id: String, user: String) async throws(FrameError) -> (room: Room, transcript: [JSONValue]) {
        if let live = state.withLock({ $0.rooms[id] }) {
            let (room, transcript) = live.state.withLock { ($0.room, $0.transcript) }
            try Self.checkAccess(room, user)
            return (room, Self.transcript(transcript, of: room, for: user))
        }
        do {
            guard let room = try await store.room(id: id) else { throw Self.noRoom(id) }
            try Self.checkAccess(room, user)
            let transcript = try await store.roomEntries(room: id, limit: Self.keptEntries, before: nil)
            return (room, Self.transcript(transcript, of: room, for: user))
        } catch let error as FrameError {
            throw error
        } catch {
            throw requests.internalFailure(error, what: "room request")
        }
    }

    // MARK: Protocol

    func handle(_ frame: RoomFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
        requests.serve(frame.id, from: connection, turn: turn, what: "room request") {
            if let owners = self.owners, try await self.forward(frame, from: connection, owners) { return }
            switch frame {
            case let .join(id, room, language): try await self.join(ref: id, room: room, language: language, connection)
            case let .leave(_, room): try await self.leave(room: room, connection)
            case let .say(id, room, text): try await self.say(ref: id, room: room, text: text, connection)
            case let .control(_, room, action, target):
                try await self.control(
                    room: room, action: action, target: target, by: connection.identity.user, connection: connection.id, ip: connection.remoteIP)
            }
        }
    }

    /// A socket closed: it leaves every room it was in. `rooms`: the rooms whose topics it
    /// followed when the hub let it go (`SocketHub.remove`). A member here, or of a room another
    /// node runs, always follows its room's topic: it becomes one only if the hub still held
    /// its socket (`LiveRoom.State.subscribe`, `joinElsewhere`), so asking those rooms finds
    /// all of them. Walking every room in memory instead made each close cost what they number,
    /// on its event loop (#26: with 6,000 rooms in memory, 3,000 sockets closing took 7–8 s).
    func disconnected(_ connection: ClientConnection, from rooms: Set<String>) {
        guard !rooms.isEmpty else { return }
        let (elsewhere, here) = state.withLock { s in
            (rooms.filter { s.elsewhere[$0]?[connection.id] != nil }, rooms.compactMap { s.rooms[$0] })
        }
        for room in elsewhere { _ = requests.track { try? await self.leaveElsewhere(room: room, connection, tell: false) } }
        for room in here where room.state.withLock({ $0.members[connection.id] != nil }) {
            _ = requests.track { try? await self.leave(room: room.id, connection) }
        }
    }

    private func join(ref: String, room id: String, language: LanguageTag?, _ connection: ClientConnection) async throws {
        let user = connection.identity.user
        var live = try await load(id, for: user)
        if live.state.withLock({ $0.room.kind }) == .translation {
            try await setLanguage(language, of: user, in: live)
        } else if language != nil {
            throw FrameError(ref: nil, code: .badRequest, message: "'language' is for translation chats; room \(id) is a debate")
        }
        // Under the room's lock: the state snapshot, the membership and the catch-up on the turn
        // being streamed happen together, so no token and no later turn falls between them.
        var admission = Admission.retired
        while true {
            admission = live.state.withLock { s in
                s.retired
                    ? .retired
                    : Self.add(
                        connection, to: &s, ref: ref, hub: live.hub, allocator: allocator,
                        presenceLimit: configuration.frameLimits.rooms.presenceBroadcastMembers)
            }
            guard admission == .retired else { break }
            live = try await load(id, for: user)  // it was dropped from memory just now
        }
        let presence = { (event: String) in
            live.announce(
                self.allocator.buffer(bytes: ServerFrame.roomEvent(room: id, event: event, [("user", .string(user))])),
                except: connection.id, limit: self.configuration.frameLimits.rooms.presenceBroadcastMembers)
        }
        switch admission {
        case .first: presence("joined")
        case .closed(let userLeft):
            if userLeft { presence("left") }
            evictIfIdle(live)  // loaded for this join, maybe, with nobody in it
        case .again, .retired: break
        }
    }

    /// What a join came to.
    private enum Admission: Equatable {
        /// The user's first socket in the room: the others hear of it.
        case first
        /// The user was in the room already (this socket or another).
        case again
        /// The socket closed before it could join (`userLeft`: a socket joining again closed,
        /// and the user's last in the room went with it: the others hear of that).
        case closed(userLeft: Bool)
        /// The room left memory just now: load it again.
        case retired
    }

    /// Adds a member and sends it the room's state and the turn being streamed.
    private static func add(
        _ connection: ClientConnection, to s: inout LiveRoom.State, ref: String, hub: SocketHub, allocator: ByteBufferAllocator,
        presenceLimit: Int
    ) -> Admission {
        let user = connection.identity.user
        let alreadyIn = s.roster.contains(user)
        s.unsubscribe(connection.id, hub: hub)  // joining again (maybe in another language)
        guard s.subscribe(connection, hub: hub) else { return .closed(userLeft: alreadyIn && !s.roster.contains(user)) }
        let (frame, streams) = joinState(s, ref: ref, for: user, presenceLimit: presenceLimit)
        connection.send(frame)
        for stream in streams {
            _ = stream.resume(connection, after: 0, ack: allocator.buffer(bytes: stream.startFrame(ref: nil)))
        }
        return alreadyIn ? .again : .first
    }

    /// What `user` gets on joining now, here or from another node: the room's state (a
    /// translation chat's in their language), and the streams they read that are running, to
    /// follow from their start in that order (a debate's turn; the streams of a translation
    /// chat's messages, which its transcript leaves out, in the order the messages were said).
    /// Past `presenceLimit` sockets the members are listed to the room's owner only, as joins
    /// and leaves are announced: nobody else could keep the list current, and at thousands of
    /// viewers the list was most of each join's bytes and of its encoding (#26).
    static func joinState(_ s: LiveRoom.State, ref: String, for user: String, presenceLimit: Int) -> (frame: [UInt8], streams: [LiveStream]) {
        let members = s.memberCount > presenceLimit && user != s.room.owner ? [] : s.users
        guard s.room.kind == .translation else {
            let frame = ServerFrame.roomState(
                ref: ref, room: s.room, members: members, memberCount: s.users.count, transcript: s.transcript.map(\.json),
                speaker: s.current?.clone, stream: s.current?.id)
            return (frame, s.current.map { [$0] } ?? [])
        }
        let lang = s.room.languages[user]
        let flights = s.inflight.values.filter { $0.delivers(to: lang) }.sorted { $0.order < $1.order }
        let pending = Set(flights.compactMap(\.stream.source))
        let transcript = TranslationChat.view(s.transcript, for: lang, pending: pending).map { $0.entry.json(untranslated: $0.untranslated) }
        let frame = ServerFrame.roomState(
            ref: ref, room: s.room, members: members, memberCount: s.users.count, transcript: transcript, speaker: nil, stream: nil)
        return (frame, flights.map(\.stream))
    }

    private func leave(room id: String, _ connection: ClientConnection) async throws {
        guard let live = state.withLock({ $0.rooms[id] }), live.state.withLock({ $0.members[connection.id] != nil }) else {
            throw FrameError(ref: nil, code: .notFound, message: "you are not in room \(id)")
        }
        let user = connection.identity.user
        let gone = live.state.withLock { s -> Bool in
            s.unsubscribe(connection.id, hub: live.hub)
            return !s.roster.contains(user)
        }
        let event = allocator.buffer(bytes: ServerFrame.roomEvent(room: id, event: "left", [("user", .string(user))]))
        if connection.isActive { connection.send(event) }
        if gone { live.announce(event, except: nil, limit: configuration.frameLimits.rooms.presenceBroadcastMembers) }
        evictIfIdle(live)
    }

    /// Drops a room nobody is in and nothing runs in from memory (bounded memory: only rooms
    /// in use are held); the store has everything.
    func evictIfIdle(_ live: LiveRoom) {
        state.withLock { s in
            let idle = live.state.withLock { r -> Bool in
                guard r.members.isEmpty, r.remote.isEmpty, r.loop == nil, r.current == nil, r.inflight.isEmpty, r.pendingReplies == 0,
                    !live.placement.isBusy
                else {
                    return false
                }
                r.retired = true
                return true
            }
            if idle, s.rooms[live.id] === live { s.rooms.removeValue(forKey: live.id) }
        }
        if let owners, live.state.withLock({ $0.retired }) { Task { await owners.release(live.id) } }
    }

    private func say(ref: String, room id: String, text: String, _ connection: ClientConnection) async throws {
        let live = try member(id, connection)
        if live.state.withLock({ $0.room.kind }) == .translation {
            try await sayTranslated(ref: ref, live: live, text: text, connection)
            return
        }
        try await say(text, in: live, by: connection.identity.user)
    }

    /// A member's words in a debate, from this node or another.
    func say(_ text: String, in live: LiveRoom, by user: String) async throws {
        let id = live.id
        guard !live.state.withLock({ $0.room.muted.contains(user) }) else {
            throw FrameError(ref: nil, code: .forbidden, message: "the moderator muted you in room \(id)")
        }
        let entry = RoomEntry(id: ids.make(.roomEntry), room: id, kind: .said, speaker: user, text: text, createdAt: Int64(Timestamp.nowMillis()))
        try await live.writer.append(entry)
        live.state.withLock { s in s.append(entry) }
        live.broadcast(allocator.buffer(bytes: ServerFrame.roomEvent(room: id, event: "said", [("entry", entry.json)])))
    }

    /// A moderator's control, from a socket of theirs `connection` here or on another node
    /// (`ip` read before: the event below may make the moderator close it before the audit record).
    func control(room id: String, action: RoomAction, target: String?, by: String, connection: String, ip: String?) async throws {
        let live = try member(id, connection: connection)
        guard live.state.withLock({ $0.room.owner }) == by else {
            throw FrameError(ref: nil, code: .forbidden, message: "only the moderator may \(action.rawValue) room \(id)")
        }
        let now = Int64(Timestamp.nowMillis())
        // Decided by the pure lifecycle and carried out under the room's lock, which the turn loop
        // reads too. Announced under it as well: a turn the change lets the loop start is
        // announced (under that lock) after the event, never before it.
        let outcome = live.state.withLock { s -> Result<RoomControl, FrameError> in
            let outcome = RoomLifecycle.apply(action, target: target, to: s.room, speaking: s.current?.clone, now: now)
            guard case .success(let control) = outcome else { return outcome }
            var fields: [(String, JSONValue)] = [("by", .string(by))]
            if control.regeneratesLastTurn {
                guard let last = RoomEntry.current(s.transcript).last(where: { $0.kind == .turn }) else {
                    return .failure(FrameError(ref: nil, code: .badRequest, message: "room \(id) has no turn to regenerate"))
                }
                guard !s.room.muted.contains(last.speaker) else {
                    return .failure(FrameError(ref: nil, code: .conflict, message: "the last turn's clone is muted in room \(id)"))
                }
                s.regenerating = last
                fields += [("clone", .string(last.speaker)), ("replaces", .string(last.id))]
            }
            // A stopped turn ends after the token being sent.
            if control.stopsAllStreams { s.stopStreams(.cancelled) } else if control.stopsTurn { s.current?.stop(.cancelled) }
            if let next = control.nextSpeaker { s.requested = next }
            if let user = control.kickedUser {
                s.removeMembers(of: user, hub: live.hub)
                s.removeRemote { $0.user == user }
                owners?.kick(user, from: id)
            }
            s.room = control.room
            switch control.subject {
            case .clone(let clone)?: fields.append(("clone", .string(clone)))
            case .user(let user)?: fields.append(("user", .string(user)))
            case nil: break
            }
            let frame = allocator.buffer(bytes: ServerFrame.roomEvent(room: id, event: control.event, fields))
            // The kicked user is no member any more: told on their own topic, every socket of theirs.
            if let kicked = control.kickedUser { live.broker.publish(frame, to: .user(kicked)) }
            live.publish(frame, &s)
            return outcome
        }
        let control = try outcome.get()
        try await live.save()
        await audit?.record("room.\(control.event)", actor: by, target: id, ip: ip, detail: target.map { ["subject": $0] } ?? [:])
        if control.startsLoop { runTurns(live) }
    }

    // MARK: Turns

    /// Starts the room's turn loop unless one is running.
    func runTurns(_ live: LiveRoom) {
        guard isAccepting else { return }
        live.state.withLock { s in
            guard s.loop == nil else { return }  // the running loop re-decides after its turn
            s.loop = Task { await self.turns(live) }
        }
    }

    private func turns(_ live: LiveRoom) async {
        while true {
            // A draining server lets the turn in flight finish and starts no other.
            let accepting = isAccepting
            // Decide under the lock whether another turn runs, and whose.
            let decision = live.state.withLock { s -> (room: Room, transcript: [RoomEntry], speaker: String, replacing: RoomEntry?)? in
                // A regenerated turn first, in a paused room too: in place of the last one.
                if accepting, let last = s.regenerating {
                    s.regenerating = nil
                    return (s.room, s.transcript.filter { $0.id != last.id }, last.speaker, last)
                }
                guard accepting, s.room.status == .running, s.room.turnsTaken < s.room.totalTurns,
                    let speaker = TurnTaking.next(room: s.room, transcript: s.transcript, requested: s.requested)
                else {
                    s.loop = nil
                    return nil
                }
                s.requested = nil
                return (s.room, s.transcript, speaker, nil)
            }
            guard let (room, transcript, speaker, replacing) = decision else {
                await finishIfDone(live)
                return
            }
            await turn(live, room: room, transcript: transcript, speaker: speaker, replacing: replacing)
        }
    }

    /// Ends the debate when its last turn was taken.
    private func finishIfDone(_ live: LiveRoom) async {
        let ended = live.state.withLock { s -> Room? in
            guard s.room.status == .running, s.room.turnsTaken >= s.room.totalTurns else { return nil }
            s.room.status = .ended
            s.room.updatedAt = Int64(Timestamp.nowMillis())
            return s.room
        }
        guard let ended else { return }
        try? await live.save()
        live.broadcast(allocator.buffer(bytes: ServerFrame.roomEvent(room: ended.id, event: "ended", [("reason", .string("rounds_done"))])))
    }

    /// One turn of `speaker`; `replacing` names the turn it regenerates (its entry says so in
    /// `source`, and it counts as a turn only when the one it replaces did not).
    private func turn(_ live: LiveRoom, room: Room, transcript: [RoomEntry], speaker: String, replacing: RoomEntry? = nil) async {
        do {
            guard let clone = try await store.clone(id: speaker, owner: room.owner) else {
                try await muteDeletedClone(speaker, in: live)
                return
            }
            let prompt = TurnTaking.prompt(
                room: room, speaker: clone, transcript: transcript, names: Self.names(room), budget: configuration.contextBudgetTokens)
            let request = CompletionRequest(
                model: configuration.model(for: clone), messages: prompt.messages, speaker: clone.name, maxOutputTokens: room.maxTokensPerTurn)
            let prepared: StreamRunner.Prepared
            do {
                prepared = try await streams.prepare(prompt, request: request, payer: room.owner, feature: .debate, room: room.id)
            } catch let refusal as CreditMeter.Refusal {
                try await pauseForCredits(live, room: room.id, refusal: refusal)
                return
            }
            // The turn starts under the room's lock: whoever is a member now receives all of it.
            let stream = live.state.withLock { s -> LiveStream? in
                guard s.room.status == .running || (replacing != nil && s.room.status == .paused) else { return nil }
                var fields: [(String, JSONValue)] = [
                    ("clone", .string(clone.id)), ("stream", .string(prepared.id)),
                    ("turn", .int(Int64(s.room.turnsTaken + (replacing?.reason == .complete ? 0 : 1)))),
                ]
                if let replacing { fields.append(("replaces", .string(replacing.id))) }
                let announcement = allocator.buffer(bytes: ServerFrame.roomEvent(room: room.id, event: "turn", fields))
                live.publish(announcement, &s)
                s.current = streams.open(
                    id: prepared.id, owner: room.owner, model: prepared.model, kind: .debateTurn(room: room.id, clone: clone.id),
                    readers: [.room(room.id)], bufferCapacity: max(room.maxTokensPerTurn, 1), roomSeq: live.numberStream(&s))
                return s.current
            }
            guard let stream else {
                await streams.abandon(prepared)  // paused or ended meanwhile
                return
            }
            let entryID = ids.make(.roomEntry)
            let recorded = Mutex<RoomEntry?>(nil)
            let owner = room.owner
            // The room moves past the turn before its stream.end goes out: a control the moderator
            // sends on seeing it finds the turn over and counted.
            let turnOver: @Sendable () -> Void = {
                let entry = recorded.withLock { $0 }
                live.state.withLock { s in
                    s.current = nil
                    if let entry {
                        s.append(entry)
                        if entry.reason == .complete, replacing?.reason != .complete { s.room.turnsTaken += 1 }
                    }
                    s.room.updatedAt = Int64(Timestamp.nowMillis())
                }
            }
            await streams.run(
                stream, prepared, messageID: entryID, journal: .roomTurn(room: room.id, speaker: clone.id),
                paywall: live.payer(owner), voice: room.debater(clone.id)?.voice, beforeEnd: turnOver
            ) { message in
                let entry = RoomEntry(
                    id: entryID, room: room.id, kind: .turn, speaker: clone.id, text: message.text,
                    createdAt: message.createdAt, reason: message.reason, stream: prepared.id, source: replacing?.id)
                try await live.writer.append(entry)
                recorded.withLock { $0 = entry }
            }
            let entry = recorded.withLock { $0 }
            try await live.save()
            if entry?.reason == .insufficientCredits {
                try await pauseForCredits(live, room: room.id, refusal: nil)  // the stream sent its paywall
            }
        } catch {
            logger.error("a debate turn failed; pausing the room", metadata: ["room": "\(room.id)", "error": "\(error)"])
            try? await changeRoom(live) { $0.status = .paused }
            live.broadcast(allocator.buffer(bytes: ServerFrame.roomEvent(room: room.id, event: "paused", [("reason", .string("error"))])))
        }
    }

    /// The moderator's credits ran out: the room pauses; the moderator's sockets get a
    /// `paywall` when a turn was refused before it started (a stream that ran out sent its own)
    /// and everyone the `paused` event.
    private func pauseForCredits(_ live: LiveRoom, room: String, refusal: CreditMeter.Refusal?) async throws {
        try await changeRoom(live) { $0.status = .paused }
        if let refusal {
            let owner = live.state.withLock { $0.room.owner }
            live.broadcast(
                allocator.buffer(bytes: ServerFrame.paywall(stream: nil, balance: refusal.balance, required: refusal.required, room: room)),
                onlyTo: owner)
        }
        live.broadcast(allocator.buffer(bytes: ServerFrame.roomEvent(room: room, event: "paused", [("reason", .string("insufficient_credits"))])))
    }

    /// A clone deleted since the room was made sits out the rest of it.
    func muteDeletedClone(_ clone: String, in live: LiveRoom) async throws {
        try await changeRoom(live) { if !$0.muted.contains(clone) { $0.muted.append(clone) } }
        live.broadcast(
            allocator.buffer(
                bytes: ServerFrame.roomEvent(room: live.id, event: "muted", [("clone", .string(clone)), ("reason", .string("clone_deleted"))])))
    }

    /// False once the server is shutting down: no new turn, reply or translation starts.
    var isAccepting: Bool { state.withLock { $0.accepting } && streams.isAccepting }

    private func changeRoom(_ live: LiveRoom, _ change: (inout Room) -> Void) async throws {
        live.state.withLock { s in
            change(&s.room)
            s.room.updatedAt = Int64(Timestamp.nowMillis())
        }
        try await live.save()
    }

    // MARK: Helpers

    /// The live room, loaded from the store on first use, if `user` may see it.
    /// (`user` nil: this node's own use, no access check.)
    func load(_ id: String, for user: String?) async throws(FrameError) -> LiveRoom {
        let live: LiveRoom
        if let loaded = state.withLock({ $0.rooms[id] }) {
            live = loaded
        } else {
            do {
                guard let room = try await store.room(id: id) else { throw Self.noRoom(id) }
                let transcript = try await store.roomEntries(room: id, limit: Self.keptEntries, before: nil)
                let fresh = LiveRoom(
                    room: room, transcript: transcript, broker: streams.broker, hub: streams.sockets,
                    writer: RoomWriter(store: store, owners: owners))
                live = state.withLock { s in
                    if let raced = s.rooms[id] { return raced }
                    s.rooms[id] = fresh
                    return fresh
                }
            } catch let error as FrameError {
                throw error
            } catch {
                throw requests.internalFailure(error, what: "room request")
            }
        }
        if let user { try Self.checkAccess(live.state.withLock { $0.room }, user) }
        return live
    }

    /// Private rooms are the moderator's alone (others get `not_found`, as for anything not
    /// theirs); link rooms are open to anyone with the id except who was kicked.
    private static func checkAccess(_ room: Room, _ user: String) throws(FrameError) {
        guard !room.kicked.contains(user) else {
            throw FrameError(ref: nil, code: .forbidden, message: "the moderator removed you from room \(room.id)")
        }
        guard room.admits(user) else { throw noRoom(room.id) }
    }

    func member(_ id: String, _ connection: ClientConnection) throws(FrameError) -> LiveRoom {
        try member(id, connection: connection.id)
    }

    /// The room `connection` (a socket here, or on another node) is a member of.
    func member(_ id: String, connection: String) throws(FrameError) -> LiveRoom {
        guard let live = state.withLock({ $0.rooms[id] }), live.state.withLock({ $0.members[connection] != nil || $0.remote[connection] != nil })
        else {
            throw FrameError(ref: nil, code: .notFound, message: "join room \(id) first")
        }
        return live
    }

    private static func noRoom(_ id: String) -> FrameError { FrameError(ref: nil, code: .notFound, message: "no room \(id)") }

}
