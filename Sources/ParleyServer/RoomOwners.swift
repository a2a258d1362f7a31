import CoreMetrics
import Foundation
import Logging
import ParleyCore
import ParleyMongoStore
import ParleyNATS
import Synchronization

/// In a cluster (#22), which node runs each live debate room: the holder of the room's lease in
/// the store (collection `room_leases`, renewed every third of a lease period). The first node
/// asked about a room with no live lease takes it; every other node sends that node its
/// sockets' joins, words, moderation and leaves as NATS requests (`BrokerSubjects.roomRequests`)
/// and delivers the room's frames, which reach it through the broker, to its own sockets.
///
/// A room whose node stopped is taken over only once that node's leftovers were finished (the
/// cut turn stored as interrupted by `NodeReaper`, which then takes its rooms on): until then a
/// request is answered `unavailable`, to be tried again.
final class RoomOwners: Sendable {
    static let leases = "room_leases"

    enum Owner: Equatable {
        /// This node runs it; `tookOver` when it took it from a stopped node just now.
        case me(tookOver: Bool)
        case other(String)
    }

    private let store: MongoStore
    private let broker: NATSBroker
    let node: String
    private let period: Duration
    private let logger: Logger

    private struct Owned {
        /// Its requests from other nodes.
        var subscription: NATSSubscription
        /// The epoch of this node's lease on it: its writes are fenced with it (`write`).
        var epoch: Int64
    }

    private struct State {
        /// Rooms this node runs.
        var owned: [String: Owned] = [:]
        var answer: (@Sendable (String, [UInt8]) async -> [UInt8])?
        var renewal: Task<Void, Never>?
        var kicks: NATSSubscription?
        var membersAsked: NATSSubscription?
        var nodeGone: (@Sendable (String) -> Void)?
        var superseded: (@Sendable (String) -> Void)?
    }

    private let state = Mutex(State())
    /// `parley_rooms_run`: the rooms this node holds the lease of.
    private let runMeter: Meter

    init(store: MongoStore, broker: NATSBroker, node: String, period: Duration, logger: Logger, metrics: any MetricsFactory) {
        runMeter = Meter(label: "parley_rooms_run", factory: metrics)
        self.store = store
        self.broker = broker
        self.node = node
        self.period = period
        self.logger = logger
    }

    /// Starts answering other nodes' requests for the rooms this node runs (`answer`) and
    /// hearing of kicks (`kicked`), and renewing the leases.
    func start(
        answer: @escaping @Sendable (String, [UInt8]) async -> [UInt8], kicked: @escaping @Sendable (_ room: String, _ user: String) -> Void,
        nodeGone: @escaping @Sendable (String) -> Void,
        languageSet: @escaping @Sendable (_ room: String, _ user: String, _ language: LanguageTag) -> Void,
        superseded: @escaping @Sendable (String) -> Void,
        membersHere: @escaping @Sendable (_ room: String) -> [(user: String, connection: String)]
    ) throws {
        // A node that took a room over asks which sockets here are in it.
        let membersAsked = try broker.subscribe(subject: BrokerSubjects.anyRoomMembers) { [broker, node] request in
            guard let reply = request.reply, let room = BrokerSubjects.name(request.subject.dropFirst(3)) else { return }
            let members = membersHere(room).map { JSONValue.object([("user", .string($0.user)), ("connection", .string($0.connection))]) }
            broker.publish(subject: reply, JSONValue.object([("node", .string(node)), ("members", .array(members))]).serialized())
        }
        let kicks = try broker.subscribe(subject: BrokerSubjects.roomKicks) { message in
            guard let json = try? JSONValue.parse(message.payload) else { return }
            if let node = json["gone"]?.stringValue { return nodeGone(node) }
            guard let room = json["room"]?.stringValue, let user = json["user"]?.stringValue else { return }
            if let language = json["language"]?.stringValue {
                if let tag = LanguageTag(language) { languageSet(room, user, tag) }
                return
            }
            kicked(room, user)
        }
        state.withLock {
            $0.nodeGone = nodeGone
            $0.superseded = superseded
            $0.membersAsked = membersAsked
        }
        let renewal = Task { [weak self, period] in
            while (try? await Task.sleep(for: period / 3)) != nil {
                await self?.renew()
            }
        }
        state.withLock {
            $0.answer = answer
            $0.kicks = kicks
            $0.renewal = renewal
        }
    }

    /// Whether this node runs `room` (as far as it knows: `renew` finds out otherwise).
    func runs(_ room: String) -> Bool { state.withLock { $0.owned[room] != nil } }

    /// Renews this node's room leases; a room whose lease another node took meanwhile (this
    /// node stalled past it) is that node's: this one stops running it.
    func renew() async {
        do {
            let held = try await store.renewLeases(node: node, expires: Int64(Timestamp.nowMillis()) + Timestamp.millis(period), in: Self.leases)
            guard held < state.withLock({ $0.owned.count }) else { return }
            let mine = Set(try await store.nodeLeases(in: Self.leases).filter { $0.value.node == node }.keys)
            for room in state.withLock({ Array($0.owned.keys) }) where !mine.contains(room) { supersede(room) }
        } catch {
            logger.error("renewing the room leases failed; trying again", metadata: ["error": "\(error)"])
        }
    }

    /// Another node took `room`'s lease: this node stops serving it (without touching the
    /// lease) and `superseded` stops running it.
    private func supersede(_ room: String) {
        guard let (owned, superseded) = state.withLock({ s in s.owned.removeValue(forKey: room).map { ($0, s.superseded) } }) else { return }
        owned.subscription.cancel()
        count()
        logger.warning("another node took over a room this node ran; it stops running it", metadata: ["room": "\(room)"])
        superseded?(room)
    }

    /// Writes room `room` with `body`, fenced with this node's lease epoch on it; a write that
    /// finds the room fenced by a newer holder (or a room this node does not run) is refused
    /// `unavailable`, and the room is let go as in `renew`.
    func write<T: Sendable>(_ room: String, _ body: (MongoStore, Int64) async throws -> T) async throws -> T {
        guard let epoch = state.withLock({ $0.owned[room]?.epoch }) else {
            throw FrameError(ref: nil, code: .unavailable, message: "room \(room) is run by another node now; try again")
        }
        do {
            return try await body(store, epoch)
        } catch is MongoStore.Superseded {
            supersede(room)
            throw FrameError(ref: nil, code: .unavailable, message: "room \(room) is run by another node now; try again")
        }
    }

    /// The sockets on the other live nodes that are in `room` (asked of each node, for up to
    /// `timeout`): a node that takes a room over learns who its members elsewhere are.
    func membersElsewhere(of room: String, timeout: Duration = .seconds(2)) async -> [(user: String, connection: String, node: String)] {
        do {
            let peers = try await store.otherLiveNodes(than: node, now: Int64(Timestamp.nowMillis())).count
            let answers = try await broker.gather(subject: BrokerSubjects.roomMembers(room), Array(node.utf8), replies: peers, timeout: timeout)
            var members: [(user: String, connection: String, node: String)] = []
            for answer in answers {
                guard let json = try? JSONValue.parse(answer), let from = json["node"]?.stringValue else { continue }
                for member in json["members"]?.arrayValue ?? [] {
                    guard let user = member["user"]?.stringValue, let connection = member["connection"]?.stringValue else { continue }
                    members.append((user, connection, from))
                }
            }
            return members
        } catch {
            logger.error("asking the other nodes for a room's members failed", metadata: ["room": "\(room)", "error": "\(error)"])
            return []
        }
    }

    /// Stops renewing and lets every room go (a clean shutdown, after the rooms were stored).
    func stop() async {
        let (owned, renewal, kicks, membersAsked) = state.withLock { s in
            defer {
                s.owned = [:]
                s.answer = nil
            }
            return (s.owned, s.renewal, s.kicks, s.membersAsked)
        }
        renewal?.cancel()
        await renewal?.value
        kicks?.cancel()
        membersAsked?.cancel()
        count()
        for (room, owned) in owned {
            owned.subscription.cancel()
            try? await store.releaseNodeLease(node: node, key: room, in: Self.leases)
        }
    }

    /// Who runs `room`: this node (taking it when nobody does), or another.
    func owner(of room: String) async throws -> Owner {
        if state.withLock({ $0.owned[room] != nil }) { return .me(tookOver: false) }
        let now = Int64(Timestamp.nowMillis())
        let lease = try await store.lease(room, in: Self.leases)
        if let lease, lease.node != node, lease.expires >= now { return .other(lease.node) }
        var tookOver = false
        if let lease, lease.node != node {
            guard try await store.nodeLeases()[lease.node] == nil else {
                throw FrameError(
                    ref: nil, code: .unavailable,
                    message: "the node running room \(room) stopped; another takes it over within seconds, try again then")
            }
            tookOver = true
        }
        let claim = NodeLease.thisProcess(node: node, expires: now + Timestamp.millis(period))
        if let holder = try await store.claimNodeLease(claim, now: now, key: room, in: Self.leases) { return .other(holder.node) }
        try await adopt(room)
        return .me(tookOver: tookOver)
    }

    /// The rooms `node` holds leases on (its own leftovers at a restart, or a stopped node's).
    func rooms(of node: String) async throws -> [String] {
        try await store.nodeLeases(in: Self.leases).filter { $0.value.node == node }.map(\.key).sorted()
    }

    /// Takes the room of the stopped node `dead` over, whether or not its lease ran out yet
    /// (`NodeReaper`, once its leftovers were finished and before its node lease goes, so no
    /// other node takes the room meanwhile).
    func takeOver(_ room: String, from dead: String) async throws -> Bool {
        let now = Int64(Timestamp.nowMillis())
        let claim = NodeLease.thisProcess(node: node, expires: now + Timestamp.millis(period))
        guard try await store.transferLease(room, from: dead, to: claim, in: Self.leases) else { return false }
        try await adopt(room)
        return true
    }

    /// Runs `room`, whose lease this node just took: fences the room's writes with the lease's
    /// epoch (a stalled former holder's writes are refused from now on), then serves its
    /// requests from other nodes.
    private func adopt(_ room: String) async throws {
        guard state.withLock({ $0.owned[room] == nil }) else { return }
        guard let lease = try await store.lease(room, in: Self.leases), lease.node == node,
            try await store.fenceRoom(room, epoch: lease.epoch)
        else {
            throw FrameError(ref: nil, code: .unavailable, message: "room \(room) changed hands just now; try again")
        }
        let subscription = try broker.serve(subject: BrokerSubjects.roomRequests(room)) { [weak self] payload in
            guard let answer = self?.state.withLock({ $0.answer }) else {
                return RemoteRoomRequest.failure(FrameError(ref: nil, code: .unavailable, message: "this node is shutting down"))
            }
            return await answer(room, payload)
        }
        let raced = state.withLock { s -> Bool in
            guard s.owned[room] == nil else { return true }
            s.owned[room] = Owned(subscription: subscription, epoch: lease.epoch)
            return false
        }
        if raced { subscription.cancel() }
        count()
    }

    private func count() { runMeter.set(state.withLock { $0.owned.count }) }

    /// Lets `room` go (nobody is in it and nothing runs: the store has it all).
    func release(_ room: String) async {
        guard let owned = state.withLock({ $0.owned.removeValue(forKey: room) }) else { return }
        owned.subscription.cancel()
        count()
        try? await store.releaseNodeLease(node: node, key: room, in: Self.leases)
    }

    /// Asks the node running `room`.
    func request(_ room: String, _ request: RemoteRoomRequest) async throws -> RemoteRoomRequest.Answer {
        var request = request
        request.node = node
        let answer: [UInt8]
        do {
            answer = try await broker.request(subject: BrokerSubjects.roomRequests(room), request.encoded())
        } catch let error as NATSError where error.isNoResponders || error.isTimeout {
            throw FrameError(ref: nil, code: .unavailable, message: "the node running room \(room) does not answer; try again in a moment")
        }
        return try RemoteRoomRequest.Answer(decoding: answer)
    }

    /// Tells every node (this one too) that `node` stopped: its sockets are in no room.
    func gone(_ node: String) {
        state.withLock { $0.nodeGone }?(node)
        broker.publish(subject: BrokerSubjects.roomKicks, JSONValue.object([("gone", .string(node))]).serialized())
    }

    /// Tells every node that `user` reads translation chat `room` in `language` from now on.
    func setLanguage(_ language: LanguageTag, of user: String, in room: String) {
        broker.publish(
            subject: BrokerSubjects.roomKicks,
            JSONValue.object([("room", .string(room)), ("user", .string(user)), ("language", .string(language.value))]).serialized())
    }

    /// Tells every node that `user` was removed from `room`.
    func kick(_ user: String, from room: String) {
        broker.publish(subject: BrokerSubjects.roomKicks, JSONValue.object([("room", .string(room)), ("user", .string(user))]).serialized())
    }
}

/// What a node asks of the node running a room, for one of its sockets.
struct RemoteRoomRequest: Sendable {
    enum Operation: String { case join, say, control, leave }

    var operation: Operation
    var user: String
    var connection: String
    /// The node the socket is on.
    var node: String = ""
    var ref: String?
    var text: String?
    var action: String?
    var target: String?
    var ip: String?
    /// A join of a translation chat: the language the socket's user reads in from now on.
    var language: String?

    func encoded() -> [UInt8] {
        var fields: [(String, JSONValue)] = [
            ("op", .string(operation.rawValue)), ("user", .string(user)), ("connection", .string(connection)), ("node", .string(node)),
        ]
        for (key, value) in [("ref", ref), ("text", text), ("action", action), ("target", target), ("ip", ip), ("language", language)] {
            if let value { fields.append((key, .string(value))) }
        }
        return JSONValue.object(fields).serialized()
    }

    init(
        _ operation: Operation, user: String, connection: String, ref: String? = nil, text: String? = nil, action: String? = nil,
        target: String? = nil, ip: String? = nil, language: String? = nil
    ) {
        self.language = language
        self.operation = operation
        self.user = user
        self.connection = connection
        self.ref = ref
        self.text = text
        self.action = action
        self.target = target
        self.ip = ip
    }

    init?(decoding bytes: [UInt8]) {
        guard let json = try? JSONValue.parse(bytes), let op = json["op"]?.stringValue.flatMap(Operation.init(rawValue:)),
            let user = json["user"]?.stringValue, let connection = json["connection"]?.stringValue
        else { return nil }
        self.init(
            op, user: user, connection: connection, ref: json["ref"]?.stringValue, text: json["text"]?.stringValue,
            action: json["action"]?.stringValue, target: json["target"]?.stringValue, ip: json["ip"]?.stringValue,
            language: json["language"]?.stringValue)
        node = json["node"]?.stringValue ?? ""
    }

    /// The owner's answer: for a join, the room's state as of frame `seq`, the streams the
    /// joiner reads that were running then (in the order to follow them) and, in a translation
    /// chat, the language it reads in; for a word in a translation chat, a frame for the
    /// speaker's socket (`state`); an error; or done.
    struct Answer: Sendable {
        var seq: Int64 = 0
        var streams: [String] = []
        var language: String?
        var state: [UInt8] = []

        init(seq: Int64 = 0, streams: [String] = [], language: String? = nil, state: [UInt8] = []) {
            self.seq = seq
            self.streams = streams
            self.language = language
            self.state = state
        }

        func encoded() -> [UInt8] {
            var header: [(String, JSONValue)] = [("seq", .int(seq))]
            if !streams.isEmpty { header.append(("streams", .array(streams.map(JSONValue.string)))) }
            if let language { header.append(("language", .string(language))) }
            return JSONValue.object(header).serialized() + [0x0A] + state
        }

        /// Throws the owner's `FrameError`.
        init(decoding bytes: [UInt8]) throws {
            let newline = bytes.firstIndex(of: 0x0A) ?? bytes.endIndex
            guard let header = try? JSONValue.parse(Array(bytes[..<newline])) else {
                throw FrameError(ref: nil, code: .internal, message: "the room's node sent an answer that could not be read")
            }
            if let error = header["error"] {
                throw FrameError(
                    ref: nil, code: error["code"]?.stringValue.flatMap(ErrorCode.init(rawValue:)) ?? .internal,
                    message: error["message"]?.stringValue ?? "the room's node refused")
            }
            seq = header["seq"]?.intValue ?? 0
            streams = header["streams"]?.arrayValue?.compactMap(\.stringValue) ?? []
            language = header["language"]?.stringValue
            state = newline < bytes.endIndex ? Array(bytes[(newline + 1)...]) : []
        }
    }

    static func failure(_ error: FrameError) -> [UInt8] {
        JSONValue.object([("error", .object([("code", .string(error.code.rawValue)), ("message", .string(error.message))]))]).serialized()
    }
}
