import Logging
import NIOCore
import ParleyCore
import Synchronization

// A cluster's rooms (#22): one node runs each room (`RoomOwners`); this extension forwards
// this node's sockets' requests to it, answers the other nodes' requests for the rooms it runs,
// and takes rooms over.

/// A socket here in a room another node runs, and in a translation chat the topic of the
/// language it reads.
struct ElsewhereMember {
    var connection: ClientConnection
    var readers: Topic?

    func topics(_ room: String) -> [Topic] { [.room(room)] + (readers.map { [$0] } ?? []) }
}

extension RoomService {
    /// Sends a room request to the node running the room, when another does; false when this
    /// node runs it (it serves the request itself).
    func forward(_ frame: RoomFrame, from connection: ClientConnection, _ owners: RoomOwners) async throws -> Bool {
        let room = frame.room
        switch try await owners.owner(of: room) {
        case .me(let tookOver):
            try await adoptOwnSockets(in: room)
            if tookOver { try await continueAfterTakeover(room) }
            return false
        case .other:
            break
        }
        let user = connection.identity.user
        switch frame {
        case let .join(ref, _, language):
            try await joinElsewhere(ref: ref, room: room, language: language, connection, owners)
        case .leave:
            try await leaveElsewhere(room: room, connection, tell: true)
        case let .say(ref, _, text):
            try requireJoinedElsewhere(room, connection)
            let answer = try await owners.request(room, RemoteRoomRequest(.say, user: user, connection: connection.id, ref: ref, text: text))
            if !answer.state.isEmpty { connection.send(ByteBuffer(bytes: answer.state)) }
        case let .control(_, _, action, target):
            try requireJoinedElsewhere(room, connection)
            _ = try await owners.request(
                room,
                RemoteRoomRequest(.control, user: user, connection: connection.id, action: action.rawValue, target: target, ip: connection.remoteIP))
        }
        return true
    }

    /// Joins a socket here to a room another node runs: this node follows the room's frames
    /// (and, in a translation chat, those of the joiner's language) first, then takes its state
    /// as of one frame and every frame after it (`SocketHub.join`), then the streams the joiner
    /// reads that were running then or started since, each from its start.
    private func joinElsewhere(
        ref: String, room: String, language: LanguageTag?, _ connection: ClientConnection, _ owners: RoomOwners
    ) async throws {
        guard let broker = clusterBroker else { return }
        var pinned: [Topic] = []
        defer { for topic in pinned { broker.unpin(topic) } }
        func pin(_ topic: Topic) async throws {
            guard !pinned.contains(topic) else { return }
            try await broker.pin(topic)
            pinned.append(topic)
        }
        try await pin(.room(room))
        if let language { try await pin(.room(room, readers: language)) }
        // Joining again: the room's frames from the new state on, none twice.
        if let previous = state.withLock({ $0.elsewhere[room]?.removeValue(forKey: connection.id) }) {
            for topic in previous.topics(room) { streams.sockets.unsubscribe(connection.id, from: topic) }
        }
        var dropped = 0
        while true {
            let answer = try await owners.request(
                room, RemoteRoomRequest(.join, user: connection.identity.user, connection: connection.id, ref: ref, language: language?.value))
            let readers = answer.language.flatMap(LanguageTag.init).map { Topic.room(room, readers: $0) }
            if let readers, !pinned.contains(readers) {
                // The language the user reads this chat in, learned now: followed, then asked again.
                try await pin(readers)
                continue
            }
            let member = ElsewhereMember(connection: connection, readers: readers)
            guard let started = streams.sockets.join(connection, to: member.topics(room), after: answer.seq, first: ByteBuffer(bytes: answer.state))
            else {
                dropped += 1
                if dropped == 3 { throw FrameError(ref: nil, code: .unavailable, message: "room \(room) moves too fast to join now; try again") }
                continue
            }
            state.withLock { $0.elsewhere[room, default: [:]][connection.id] = member }
            // The socket may have closed while the join travelled, its close handled before this
            // record (`disconnected`): it leaves again, or it would stay a member for good.
            guard connection.isActive else {
                try? await leaveElsewhere(room: room, connection, tell: false)
                return
            }
            for stream in answer.streams + started.filter({ !answer.streams.contains($0) }) {
                await broker.catchUp(stream: stream, connection: connection)
            }
            return
        }
    }

    /// A socket here leaves a room another node runs (`tell`: it asked, and is told it left).
    func leaveElsewhere(room: String, _ connection: ClientConnection, tell: Bool) async throws {
        let joined = state.withLock { s -> ElsewhereMember? in
            guard let member = s.elsewhere[room]?.removeValue(forKey: connection.id) else { return nil }
            if s.elsewhere[room]?.isEmpty == true { s.elsewhere.removeValue(forKey: room) }
            return member
        }
        guard let joined else { throw FrameError(ref: nil, code: .notFound, message: "you are not in room \(room)") }
        for topic in joined.topics(room) { streams.sockets.unsubscribe(connection.id, from: topic) }
        if tell, connection.isActive {
            connection.send(ServerFrame.roomEvent(room: room, event: "left", [("user", .string(connection.identity.user))]))
        }
        _ = try await owners?.request(room, RemoteRoomRequest(.leave, user: connection.identity.user, connection: connection.id))
    }

    private func requireJoinedElsewhere(_ room: String, _ connection: ClientConnection) throws {
        guard state.withLock({ $0.elsewhere[room]?[connection.id] != nil }) else {
            throw FrameError(ref: nil, code: .notFound, message: "join room \(room) first")
        }
    }

    /// The owner removed `user` from `room`: their sockets here stop reading it.
    func kickedElsewhere(room: String, user: String) {
        let sockets = state.withLock { s -> [ElsewhereMember] in
            let gone = (s.elsewhere[room] ?? [:]).values.filter { $0.connection.identity.user == user }
            for member in gone { s.elsewhere[room]?.removeValue(forKey: member.connection.id) }
            return gone
        }
        for member in sockets {
            for topic in member.topics(room) { streams.sockets.unsubscribe(member.connection.id, from: topic) }
        }
    }

    /// `user` reads translation chat `room` in `language` from now on: their sockets here too.
    func languageSetElsewhere(room: String, user: String, _ language: LanguageTag) {
        let readers = Topic.room(room, readers: language)
        let moved = state.withLock { s -> [(ClientConnection, Topic?)] in
            var moved: [(ClientConnection, Topic?)] = []
            for (id, member) in s.elsewhere[room] ?? [:]
            where member.connection.identity.user == user && member.readers != nil && member.readers != readers {
                moved.append((member.connection, member.readers))
                s.elsewhere[room]?[id]?.readers = readers
            }
            return moved
        }
        for (connection, previous) in moved {
            if let previous { streams.sockets.unsubscribe(connection.id, from: previous) }
            streams.sockets.subscribe(connection, to: readers)
        }
    }

    /// Answers another node's request about a room this node runs.
    func answer(room: String, _ payload: [UInt8]) async -> [UInt8] {
        guard let request = RemoteRoomRequest(decoding: payload) else {
            return RemoteRoomRequest.failure(FrameError(ref: nil, code: .badRequest, message: "a malformed room request"))
        }
        do {
            switch request.operation {
            case .join:
                return try await joinFromElsewhere(room: room, request).encoded()
            case .leave:
                leaveFromElsewhere(room: room, request)
            case .say:
                let live = try await memberElsewhere(room: room, request)
                guard live.state.withLock({ $0.room.kind }) == .translation else {
                    try await say(request.text ?? "", in: live, by: request.user)
                    break
                }
                var warning: ByteBuffer?
                let translations = try await placeTranslated(ref: request.ref ?? "", live: live, text: request.text ?? "", by: request.user) {
                    warning = $0
                }
                // Answered once placed; shutdown waits for the translations.
                _ = requests.track { for task in translations { await task.value } }
                return RemoteRoomRequest.Answer(state: warning.map { Array($0.readableBytesView) } ?? []).encoded()
            case .control:
                guard let action = request.action.flatMap(RoomAction.init(rawValue:)) else {
                    throw FrameError(ref: nil, code: .badRequest, message: "unknown action")
                }
                _ = try await memberElsewhere(room: room, request)
                try await control(
                    room: room, action: action, target: request.target, by: request.user, connection: request.connection, ip: request.ip)
            }
            return RemoteRoomRequest.Answer().encoded()
        } catch let error as FrameError {
            return RemoteRoomRequest.failure(error)
        } catch {
            return RemoteRoomRequest.failure(requests.internalFailure(error, what: "room request"))
        }
    }

    /// A socket on another node joins: it is a member here (for the members list, presence and
    /// kicks) and gets the room's state as of the room's last frame number.
    private func joinFromElsewhere(room id: String, _ request: RemoteRoomRequest) async throws -> RemoteRoomRequest.Answer {
        while true {
            let live = try await load(id, for: request.user)
            let language = try request.language.map { tag in
                guard let language = LanguageTag(tag) else {
                    throw FrameError(ref: nil, code: .badRequest, message: "'language' must be a BCP 47 tag such as en or pt-BR")
                }
                return language
            }
            if live.state.withLock({ $0.room.kind }) == .translation {
                try await setLanguage(language, of: request.user, in: live)
            } else if language != nil {
                throw FrameError(ref: nil, code: .badRequest, message: "'language' is for translation chats; room \(id) is a debate")
            }
            let joined = live.state.withLock { s -> (RemoteRoomRequest.Answer, Bool)? in
                guard !s.retired else { return nil }
                let first = !s.roster.contains(request.user)
                s.addRemote(request.connection, LiveRoom.RemoteMember(user: request.user, node: request.node))
                let (state, streams) = Self.joinState(
                    s, ref: request.ref ?? "", for: request.user, presenceLimit: configuration.frameLimits.rooms.presenceBroadcastMembers)
                let language = s.room.kind == .translation ? s.room.languages[request.user]?.value : nil
                return (RemoteRoomRequest.Answer(seq: s.seq, streams: streams.map(\.id), language: language, state: state), first)
            }
            guard let (answer, first) = joined else { continue }  // dropped from memory just now
            if first {
                live.announce(
                    allocator.buffer(bytes: ServerFrame.roomEvent(room: id, event: "joined", [("user", .string(request.user))])),
                    except: request.connection, limit: configuration.frameLimits.rooms.presenceBroadcastMembers)
            }
            return answer
        }
    }

    private func leaveFromElsewhere(room id: String, _ request: RemoteRoomRequest) {
        guard let live = state.withLock({ $0.rooms[id] }) else { return }
        let gone = live.state.withLock { s -> Bool in
            s.removeRemote(request.connection) ?? false
        }
        if gone {
            live.announce(
                allocator.buffer(bytes: ServerFrame.roomEvent(room: id, event: "left", [("user", .string(request.user))])), except: nil,
                limit: configuration.frameLimits.rooms.presenceBroadcastMembers)
        }
        evictIfIdle(live)
    }

    /// The room a socket on another node speaks in. After a takeover this node does not know
    /// it yet: its node joined it (it forwards only for sockets it joined), so it is a member.
    private func memberElsewhere(room id: String, _ request: RemoteRoomRequest) async throws -> LiveRoom {
        let live = try await load(id, for: request.user)
        live.state.withLock { s in
            if s.members[request.connection] == nil { s.addRemote(request.connection, LiveRoom.RemoteMember(user: request.user, node: request.node)) }
        }
        return live
    }

    /// Another node took `id` over while this node still ran it (this node stalled past its
    /// lease): its streams here stop, its turns end, and it leaves memory; its members here read
    /// it as members of a room run elsewhere (the new node learns of them as they speak, or
    /// when it asks the nodes on taking a room over from a stopped one).
    func superseded(_ id: String) {
        guard let live = state.withLock({ $0.rooms.removeValue(forKey: id) }) else { return }
        let members = live.state.withLock { s -> [ElsewhereMember] in
            s.retired = true
            s.room.status = .paused  // in memory only: its turn loop stops
            s.stopStreams(.interrupted)
            return s.members.values.map { connection in
                ElsewhereMember(connection: connection, readers: s.room.kind == .translation ? .room(id, readers: s.language(of: connection)) : nil)
            }
        }
        state.withLock { s in
            for member in members { s.elsewhere[id, default: [:]][member.connection.id] = member }
        }
    }

    /// A node stopped (`NodeReaper` took it over): its sockets are in no room here any more.
    func forgetNode(_ node: String) {
        for live in state.withLock({ Array($0.rooms.values) }) {
            let gone = live.state.withLock { s -> [String] in
                s.removeRemote { $0.node == node }
            }
            for user in gone {
                live.announce(
                    allocator.buffer(bytes: ServerFrame.roomEvent(room: live.id, event: "left", [("user", .string(user))])), except: nil,
                    limit: configuration.frameLimits.rooms.presenceBroadcastMembers)
            }
            evictIfIdle(live)
        }
    }

    /// This node runs `room` now (it took it over, or took it up after its node let it go): its
    /// sockets that joined it while another node ran it are its members here.
    private func adoptOwnSockets(in room: String) async throws {
        guard state.withLock({ $0.elsewhere[room] != nil }) else { return }
        let live = try await load(room, for: nil)
        let sockets = state.withLock { $0.elsewhere.removeValue(forKey: room) ?? [:] }
        live.state.withLock { s in
            for member in sockets.values where member.connection.isActive { s.subscribe(member.connection, hub: live.hub) }
        }
    }

    /// This node's sockets in `room`, run by another node.
    func membersHere(_ room: String) -> [(user: String, connection: String)] {
        state.withLock { s in (s.elsewhere[room] ?? [:]).values.map { ($0.connection.identity.user, $0.connection.id) } }
    }

    /// This node took over a room whose node stopped (its cut turn is stored): it learns which
    /// sockets on the other nodes are in it (for its members list, presence and a translation
    /// chat's languages), and a running debate goes on with the next turn.
    func continueAfterTakeover(_ id: String) async throws {
        let live = try await load(id, for: nil)
        if let owners {
            let elsewhere = await owners.membersElsewhere(of: id)
            live.state.withLock { s in
                for member in elsewhere where s.members[member.connection] == nil {
                    s.addRemote(member.connection, LiveRoom.RemoteMember(user: member.user, node: member.node))
                }
            }
        }
        if live.state.withLock({ $0.room.status }) == .running { runTurns(live) }
    }

    /// Takes over the rooms a stopped node ran (`NodeReaper`, after its leftovers were
    /// finished, before its lease goes); `continueRooms` then goes on with them.
    func adoptRooms(of dead: String) async throws -> [String] {
        guard let owners else { return [] }
        var adopted: [String] = []
        for room in try await owners.rooms(of: dead) where try await owners.takeOver(room, from: dead) { adopted.append(room) }
        return adopted
    }

    /// Up to 16 rooms at once: each asks the other nodes for its members, which takes up to
    /// two seconds when one of them does not answer.
    func continueRooms(_ rooms: [String]) async {
        await withTaskGroup(of: Void.self) { group in
            for (index, room) in rooms.enumerated() {
                if index >= 16 { await group.next() }
                group.addTask {
                    do {
                        try await self.adoptOwnSockets(in: room)
                        try await self.continueAfterTakeover(room)
                    } catch {
                        self.logger.error("going on with a stopped node's room failed", metadata: ["room": "\(room)", "error": "\(error)"])
                    }
                }
            }
        }
    }
}
