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

    private struct State {
        /// Rooms this node runs, each with its subscription to their requests.
        var owned: [String: NATSSubscription] = [:]
        var answer: (@Sendable (String, [UInt8]) async -> [UInt8])?
        var renewal: Task<Void, Never>?
        var kicks: NATSSubscription?
        var nodeGone: (@Sendable (String) -> Void)?
    }

    private let state = Mutex(State())

    init(store: MongoStore, broker: NATSBroker, node: String, period: Duration, logger: Logger) {
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
        languageSet: @escaping @Sendable (_ room: String, _ user: String, _ language: LanguageTag) -> Void
    ) throws {
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
        state.withLock { $0.nodeGone = nodeGone }
        let renewal = Task { [store, node, period, logger] in
            while (try? await Task.sleep(for: period / 3)) != nil {
                do {
                    try await store.renewLeases(node: node, expires: Int64(Timestamp.nowMillis()) + Timestamp.millis(period), in: Self.leases)
                } catch {
                    logger.error("renewing the room leases failed; trying again", metadata: ["error": "\(error)"])
                }
            }
        }
        state.withLock {
            $0.answer = answer
            $0.kicks = kicks
            $0.renewal = renewal
        }
    }

    /// Stops renewing and lets every room go (a clean shutdown, after the rooms were stored).
    func stop() async {
        let (owned, renewal, kicks) = state.withLock { s in
            defer {
                s.owned = [:]
                s.answer = nil
            }
            return (s.owned, s.renewal, s.kicks)
        }
        renewal?.cancel()
        await renewal?.value
        kicks?.cancel()
        for (room, subscription) in owned {
            subscription.cancel()
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
        try adopt(room)
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
        try adopt(room)
        return true
    }

    private func adopt(_ room: String) throws {
        guard state.withLock({ $0.owned[room] == nil }) else { return }
        let subscription = try broker.serve(subject: BrokerSubjects.roomRequests(room)) { [weak self] payload in
            guard let answer = self?.state.withLock({ $0.answer }) else {
                return RemoteRoomRequest.failure(FrameError(ref: nil, code: .unavailable, message: "this node is shutting down"))
            }
            return await answer(room, payload)
        }
        let raced = state.withLock { s -> Bool in
            guard s.owned[room] == nil else { return true }
            s.owned[room] = subscription
            return false
        }
        if raced { subscription.cancel() }
    }

    /// Lets `room` go (nobody is in it and nothing runs: the store has it all).
    func release(_ room: String) async {
        guard let subscription = state.withLock({ $0.owned.removeValue(forKey: room) }) else { return }
        subscription.cancel()
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
