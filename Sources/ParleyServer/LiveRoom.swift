import NIOCore
import ParleyCore
import ParleyStore
import Synchronization

/// Where a live room's writes go: the store; in a cluster (`owners`), fenced with the epoch of
/// this node's lease on the room, so a node that lost the room while stalled cannot write over
/// the node that took it.
struct RoomWriter: Sendable {
    let store: any Store
    let owners: RoomOwners?

    func update(_ room: Room) async throws -> Bool {
        guard let owners else { return try await store.updateRoom(room) }
        return try await owners.write(room.id) { store, epoch in try await store.updateRoom(room, fence: epoch) }
    }

    func append(_ entry: RoomEntry) async throws {
        guard let owners else { return try await store.appendRoomEntry(entry) }
        try await owners.write(entry.room) { store, epoch in try await store.appendRoomEntry(entry, fence: epoch) }
    }
}

/// A room in memory: its stored state, recent transcript, members and the turn being streamed.
final class LiveRoom: Sendable {
    struct State {
        var room: Room
        var transcript: [RoomEntry]
        /// Sockets here in the room, by connection id (`subscribe`, `unsubscribe`).
        private(set) var members: [String: ClientConnection] = [:]
        var current: LiveStream?
        /// The clone the moderator asked for with `next`.
        var requested: String?
        /// The turn the moderator asked to regenerate: the loop runs it next, whatever the status.
        var regenerating: RoomEntry?
        var loop: Task<Void, Never>?
        /// Dropped from memory (no members, nothing running); a join must load the room again.
        var retired = false
        /// Translation chats: streams running or waiting to run (clone replies and translations), by stream id.
        var inflight: [String: RoomFlight] = [:]
        /// Translation chats: clone replies queued or running; `replies` is the last one queued.
        var pendingReplies = 0
        var replies: Task<Void, Never>?
        /// Translation chats: counts messages placed, so streams replay in the order they were said.
        var placed: Int = 0
        /// The number of the room's last frame (`Broker.publish(_:to:audience:seq:)`). Starts
        /// from the clock, so a node that takes a room over numbers on from where the last left.
        var seq = Int64(Timestamp.nowMillis()) * 1_000
        /// In a cluster: members whose sockets are on other nodes, by connection id
        /// (`addRemote`, `removeRemote`).
        private(set) var remote: [String: RemoteMember] = [:]
        /// The users of `members` and `remote`.
        private(set) var roster = Roster()
        /// In a cluster, a translation chat's frames go to every language its people read in, not
        /// only to those of the members this node knows of: a node that took the chat over asks
        /// the others for their members, and one that does not answer in time is learnt of only
        /// as its members speak. Set when the room's writes go to a cluster (`RoomWriter.owners`).
        var everyLanguage = false

        /// The users in the room, on this node and on others, in order.
        var users: [String] { roster.users }
        var memberCount: Int { members.count + remote.count }

        /// A socket on another node is a member.
        mutating func addRemote(_ connection: String, _ member: RemoteMember) {
            if let before = remote.updateValue(member, forKey: connection) { roster.remove(before.user) }
            roster.add(member.user)
        }

        /// The sockets on other nodes that `leaving` picks are members no more; returns the
        /// users who left with them (in order), their last socket in the room gone.
        @discardableResult
        mutating func removeRemote(where leaving: (RemoteMember) -> Bool) -> [String] {
            var gone: [String] = []
            for (connection, member) in remote where leaving(member) {
                remote.removeValue(forKey: connection)
                if roster.remove(member.user) { gone.append(member.user) }
            }
            return gone.sorted()
        }

        /// The socket `connection` on another node leaves; nil when it was no member, else
        /// whether its user left with it.
        mutating func removeRemote(_ connection: String) -> Bool? {
            guard let member = remote.removeValue(forKey: connection) else { return nil }
            return roster.remove(member.user)
        }

        /// Stops the turn being streamed and every translation or reply in flight.
        mutating func stopStreams(_ reason: StreamEndReason) {
            current?.stop(reason)
            for flight in inflight.values { flight.stream.stop(reason) }
        }

        /// A socket becomes a member: it follows the room's topic and, in a translation chat, the
        /// topic of the language it reads. False when the socket closed already: a join that
        /// lands after its socket's close was handled (`RoomService.disconnected`) would stay a
        /// member nobody removes, keeping the room in memory.
        @discardableResult
        mutating func subscribe(_ connection: ClientConnection, hub: SocketHub) -> Bool {
            guard hub.subscribe(connection, to: .room(room.id)) else { return false }
            if let before = members.updateValue(connection, forKey: connection.id) { roster.remove(before.identity.user) }
            roster.add(connection.identity.user)
            if room.kind == .translation { hub.subscribe(connection, to: .room(room.id, readers: language(of: connection))) }
            return true
        }

        /// A socket leaves: it is no member and follows no topic or stream of the room any more.
        mutating func unsubscribe(_ connection: String, hub: SocketHub) {
            guard let member = members.removeValue(forKey: connection) else { return }
            roster.remove(member.identity.user)
            hub.unsubscribe(connection, from: .room(room.id))
            if room.kind == .translation { hub.unsubscribe(connection, from: .room(room.id, readers: language(of: member))) }
            current?.unsubscribe(connection)
            for flight in inflight.values { flight.stream.unsubscribe(connection) }
        }

        /// Every socket of `user` leaves (a kick).
        mutating func removeMembers(of user: String, hub: SocketHub) {
            for id in members.values.filter({ $0.identity.user == user }).map(\.id) { unsubscribe(id, hub: hub) }
        }

        /// The language a user reads in (nil: originals as written).
        func language(of connection: ClientConnection) -> LanguageTag? { room.languages[connection.identity.user] }

        /// The languages the members read in (nil among them: originals as written), one topic each.
        var readerLanguages: Set<LanguageTag?> {
            var languages = Set(members.values.map { language(of: $0) }).union(remote.values.map { room.languages[$0.user] })
            if everyLanguage {
                for (user, language) in room.languages where room.debater(user) == nil { languages.insert(language) }
            }
            return languages
        }

        mutating func append(_ entry: RoomEntry) {
            transcript.append(entry)
            if transcript.count > RoomService.keptEntries { transcript.removeFirst(transcript.count - RoomService.keptEntries) }
        }
    }

    /// The users of a room's sockets, each counted by its sockets and kept in order: a join or a
    /// leave costs a lookup and a binary search, where sorting every member's user each time
    /// made a room's thousandth join cost milliseconds (#26).
    struct Roster {
        private var sockets: [String: Int] = [:]
        /// Each user once, in order.
        private(set) var users: [String] = []

        func contains(_ user: String) -> Bool { sockets[user] != nil }

        /// One more socket of `user`; true when it is the user's first.
        @discardableResult
        mutating func add(_ user: String) -> Bool {
            sockets[user, default: 0] += 1
            guard sockets[user] == 1 else { return false }
            users.insert(user, at: index(of: user))
            return true
        }

        /// One socket of `user` fewer; true when it was the user's last.
        @discardableResult
        mutating func remove(_ user: String) -> Bool {
            guard let count = sockets[user] else { return false }
            guard count == 1 else {
                sockets[user] = count - 1
                return false
            }
            sockets.removeValue(forKey: user)
            users.remove(at: index(of: user))
            return true
        }

        /// Where `user` is or would go in `users`.
        private func index(of user: String) -> Int {
            var (low, high) = (0, users.count)
            while low < high {
                let middle = (low + high) / 2
                if users[middle] < user { low = middle + 1 } else { high = middle }
            }
            return low
        }
    }

    /// A member whose socket is on another node of a cluster.
    struct RemoteMember: Equatable {
        var user: String
        var node: String
    }

    let id: String
    let state: Mutex<State>
    /// Translation chats: messages are placed one at a time (`sequenced`).
    let placement = FIFOLock()
    /// One write of the room at a time (`save`).
    private let saves = FIFOLock()
    /// Its frames go to its members through the broker; the hub knows who they are.
    let broker: any Broker
    let hub: SocketHub
    /// Where the room and its transcript are stored.
    let writer: RoomWriter

    init(room: Room, transcript: [RoomEntry], broker: any Broker, hub: SocketHub, writer: RoomWriter) {
        id = room.id
        var initial = State(room: room, transcript: transcript)
        initial.everyLanguage = writer.owners != nil
        state = Mutex(initial)
        self.broker = broker
        self.hub = hub
        self.writer = writer
    }

    /// Stops every stream of the room (after `change`, under the same lock) and waits for its turn
    /// loop and its queued replies to finish.
    func halt(_ reason: StreamEndReason, _ change: (inout State) -> Void = { _ in }) async {
        let (loop, replies) = state.withLock { s -> (Task<Void, Never>?, Task<Void, Never>?) in
            change(&s)
            s.stopStreams(reason)
            return (s.loop, s.replies)
        }
        await loop?.value
        await replies?.value
    }

    /// Runs `body` after every body sequenced before it has finished: a translation chat's
    /// messages are placed in order one at a time (FIFO), so every member sees them in the order
    /// they were said and the transcript's ids follow that order.
    func sequenced<T>(_ body: () async throws -> T) async throws -> T {
        try await placement.run(body)
    }

    /// Stores the room as it is when the write starts (after `change`, applied to the stored copy
    /// only). Writes of one room never overlap, so an older state can never land over a newer
    /// one: a moderator's control and the end of a turn both store the room, from other tasks.
    func save(_ change: @Sendable (inout Room) -> Void = { _ in }) async throws {
        try await saves.run {
            var room = state.withLock { $0.room }
            change(&room)
            _ = try await writer.update(room)
        }
    }

    /// Announces a join or leave: to every member while the room has at most `limit` sockets,
    /// past that to the moderator's sockets only (N joins must not cost N² frames).
    func announce(_ frame: ByteBuffer, except: String?, limit: Int) {
        state.withLock { s in
            var audience = Audience.except(connection: except)
            if s.memberCount > limit { audience.user = s.room.owner }
            publish(frame, audience: audience, &s)
        }
    }

    /// Publishes a frame to the room's members, numbered; called under the room's lock.
    func publish(_ frame: ByteBuffer, audience: Audience = .everyone, _ s: inout State) {
        s.seq += 1
        broker.publish(frame, to: .room(id), audience: audience, seq: s.seq)
    }

    /// Publishes a frame to a translation chat's readers of `language`, numbered with the
    /// room's other frames; called under the room's lock.
    func publish(_ frame: ByteBuffer, readers language: LanguageTag?, _ s: inout State) {
        s.seq += 1
        broker.publish(frame, to: .room(id, readers: language), audience: .everyone, seq: s.seq)
    }

    /// The number the start of a stream opened now takes among the room's frames (pass it to
    /// `StreamRunner.open`); called under the room's lock.
    func numberStream(_ s: inout State) -> Int64 {
        s.seq += 1
        return s.seq
    }

    /// Sends one frame (encoded once) to every member (but `except`), or to `user`'s member
    /// sockets, in order with the room's other frames.
    func broadcast(_ frame: ByteBuffer, except: String? = nil, onlyTo user: String? = nil) {
        state.withLock { s in
            var audience = Audience.except(connection: except)
            audience.user = user
            publish(frame, audience: audience, &s)
        }
    }

    /// Where a stream's paywall goes: the payer's sockets in the room.
    func payer(_ user: String) -> StreamRunner.Recipients { StreamRunner.Recipients(topic: .room(id), audience: .only(user: user)) }
}
