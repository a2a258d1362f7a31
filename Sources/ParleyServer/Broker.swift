import CoreMetrics
import NIOCore
import ParleyCore
import Synchronization

/// Where a frame is published: every socket subscribed to the topic receives it.
struct Topic: Hashable, Sendable, CustomStringConvertible {
    let name: String

    /// Every socket of a user.
    static func user(_ id: String) -> Topic { Topic(name: "user." + id) }
    /// The sockets following one stream (its start, tokens and end).
    static func stream(_ id: String) -> Topic { Topic(name: "stream." + id) }
    /// Every member socket of a room.
    static func room(_ id: String) -> Topic { Topic(name: "room." + id) }
    /// Translation chats: the member sockets reading in `language` (nil: originals as written).
    static func room(_ id: String, readers language: LanguageTag?) -> Topic { Topic(name: "room." + id + ".lang." + (language?.value ?? "-")) }

    var description: String { name }

    /// A stream's topic: its subscribers are this node's readers of that one stream.
    var isStream: Bool { name.hasPrefix("stream.") }

    /// The room whose topic this is (its members', or its readers' of one language); nil for
    /// any other topic.
    var room: String? {
        guard name.hasPrefix("room.") else { return nil }
        return String(name.dropFirst(5).prefix { $0 != "." })
    }
}

/// Told when a topic (other than a stream's) gets its first subscriber on this node and when it
/// loses its last, so a broker between nodes asks for that topic's frames only while someone
/// here reads them. Called under the hub's lock, in order.
protocol TopicInterest: Sendable {
    func began(_ topic: Topic)
    func ended(_ topic: Topic)
}

/// Which of a topic's subscribers get a frame: plain values, so a broker between nodes can carry
/// them with the frame.
struct Audience: Sendable, Equatable {
    var user: String?
    var exceptUser: String?
    var connection: String?
    var exceptConnection: String?

    static let everyone = Audience()
    static func only(user: String) -> Audience { Audience(user: user) }
    static func except(user: String) -> Audience { Audience(exceptUser: user) }
    static func only(connection: String) -> Audience { Audience(connection: connection) }
    static func except(connection: String?) -> Audience { Audience(exceptConnection: connection) }

    func admits(_ connection: ClientConnection) -> Bool {
        (user == nil || connection.identity.user == user) && (exceptUser == nil || connection.identity.user != exceptUser)
            && (self.connection == nil || connection.id == self.connection) && (exceptConnection == nil || connection.id != exceptConnection)
    }
}

/// Carries published frames to the sockets subscribed to their topic, after Centrifugo's
/// hub/broker split: services publish, the broker delivers to each node's `SocketHub`.
///
/// A frame is encoded once per publish and the same buffer goes to every socket. Frames published
/// to one topic by one publisher (a stream, under its lock) reach each socket in that order.
/// `LocalBroker` is the one-process broker; a broker between nodes publishes asynchronously and
/// delivers on its own threads, so callers never assume delivery happened when `publish` returns.
protocol Broker: Sendable {
    func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience)
    /// A room's frame, numbered by the room (`seq` grows with each): a broker between nodes
    /// lets a member joining on another node take the room's state as of one number and every
    /// frame after it, none twice.
    func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience, seq: Int64)

    // A stream's own frames, each called under the stream's lock and so in order: a broker
    // between nodes carries what the other nodes need to follow it and to resume it there.
    func streamStarted(_ stream: LiveStream, frame: ByteBuffer)
    /// `layout`: where the frame's seq and text lie, when it is laid out as a token frame (a
    /// socket that joins tokens needs it; `TokenLayout`).
    func streamToken(_ stream: LiveStream, seq: Int64, frame: ByteBuffer, layout: TokenLayout?)
    /// With `ownerFrame`, the owner's sockets get that one and the others `frame`.
    func streamEnded(_ stream: LiveStream, frame: ByteBuffer, ownerFrame: ByteBuffer?)
    /// Another frame to the stream's readers (those `audience` admits).
    func streamExtra(_ stream: LiveStream, frame: ByteBuffer, audience: Audience)
}

extension Broker {
    func publish(_ frame: ByteBuffer, to topic: Topic) { publish(frame, to: topic, audience: .everyone) }
    func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience, seq: Int64) { publish(frame, to: topic, audience: audience) }

    func streamStarted(_ stream: LiveStream, frame: ByteBuffer) { publish(frame, to: stream.topic) }
    func streamToken(_ stream: LiveStream, seq: Int64, frame: ByteBuffer, layout: TokenLayout?) { publish(frame, to: stream.topic) }
    func streamExtra(_ stream: LiveStream, frame: ByteBuffer, audience: Audience) { publish(frame, to: stream.topic, audience: audience) }

    func streamEnded(_ stream: LiveStream, frame: ByteBuffer, ownerFrame: ByteBuffer?) {
        if let ownerFrame {
            publish(ownerFrame, to: stream.topic, audience: .only(user: stream.owner))
            publish(frame, to: stream.topic, audience: .except(user: stream.owner))
        } else {
            publish(frame, to: stream.topic)
        }
    }
}

/// Delivery within this process: straight to the local hub, on the publisher's thread.
struct LocalBroker: Broker {
    let hub: SocketHub

    func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience) {
        hub.deliver(frame, to: topic, audience: audience)
    }

    func streamToken(_ stream: LiveStream, seq: Int64, frame: ByteBuffer, layout: TokenLayout?) {
        hub.deliver(frame, to: stream.topic, audience: .everyone, token: layout)
    }
}

/// The sockets of this process: each user's, and which of them are subscribed to which topic.
/// It owns no I/O beyond handing frames to `FanOut`.
final class SocketHub: Sendable {
    private typealias SignOutTaken = (signOut: SignOut, at: ContinuousClock.Instant)

    private struct State {
        var byUser: [String: [String: ClientConnection]] = [:]
        /// Sign-outs taken lately, by user (`signOut`).
        var signOuts: [String: [SignOutTaken]] = [:]
        var subscribers: [Topic: [String: ClientConnection]] = [:]
        /// Each socket's topics, so closing it unsubscribes it everywhere.
        var topics: [String: Set<Topic>] = [:]
        /// Each topic's subscribers by event loop, built at its first frame and dropped when they
        /// change: a token then costs one lookup here, not a walk over a thousand members.
        var byLoop: [Topic: [FanOut.Group]] = [:]
        /// Told which topics sockets here read (a broker between nodes).
        var interest: (any TopicInterest)?
        /// A cluster's rooms run on other nodes: each one's last numbered frames and stream
        /// starts, for a member joining here (`join(_:to:after:first:)`).
        var rings: [Topic: CircularBuffer<Numbered>] = [:]

        /// Times a topic's groups were built (`groups(of:)`), for tests.
        var groupBuilds = 0

        /// A topic's subscribers by event loop (built at its first frame, kept until they change).
        mutating func groups(of topic: Topic) -> [FanOut.Group] {
            if let groups = byLoop[topic] { return groups }
            guard let subscribers = subscribers[topic] else { return [] }
            let groups = FanOut.groups(subscribers.values)
            byLoop[topic] = groups
            groupBuilds += 1
            return groups
        }

        /// The subscribers of `topic` a frame for `audience` goes to, by event loop. For one
        /// user's sockets (a big room's joins and leaves are told to its moderator only) they are
        /// found from that user's sockets: each join or leave in a room of thousands would
        /// otherwise rebuild the groups its own change dropped and walk every member (#26).
        mutating func groups(of topic: Topic, for audience: Audience) -> [FanOut.Group] {
            guard let user = audience.user else { return groups(of: topic) }
            guard let subscribed = subscribers[topic], let sockets = byUser[user] else { return [] }
            return FanOut.groups(sockets.values.filter { subscribed[$0.id] != nil })
        }

        mutating func drop(_ connection: String, from topic: Topic) {
            guard subscribers[topic]?.removeValue(forKey: connection) != nil else { return }
            if subscribers[topic]?.isEmpty == true {
                subscribers.removeValue(forKey: topic)
                rings.removeValue(forKey: topic)
                if !topic.isStream { interest?.ended(topic) }
            }
            byLoop.removeValue(forKey: topic)
        }
    }

    private let state = Mutex(State())
    private let maxSocketsPerUser: Int
    /// `parley_sockets_open`: authenticated WebSockets the hub holds.
    private let socketsOpen: Meter?
    /// From handing a frame to the fan-out to the last event loop having written it.
    private let fanOutDelay: Timer?

    init(maxSocketsPerUser: Int = .max, metrics: (any MetricsFactory)? = nil) {
        self.maxSocketsPerUser = maxSocketsPerUser
        socketsOpen = metrics.map { Meter(label: "parley_sockets_open", factory: $0) }
        fanOutDelay = metrics.map { Timer(label: "parley_fanout_delay_seconds", preferredDisplayUnit: .seconds, factory: $0) }
    }

    // MARK: Sockets

    /// Why a socket was not added.
    enum Refusal: Error, Equatable {
        case tooManySockets
        /// A sign-out taken here lately ends its token (checked before the sign-out).
        case signedOut

        /// The close frame's reason.
        var reason: String {
            switch self {
            case .tooManySockets: "too many open sockets for this user"
            case .signedOut: "signed out"
            }
        }
    }

    /// How long a sign-out is remembered for the sockets still being upgraded: far longer than
    /// a handshake takes from its token check to its registration (milliseconds).
    static let signOutMemory: Duration = .seconds(60)

    /// Adds a socket, subscribed to its user's topic; refused when its user has
    /// `maxSocketsPerUser` already, or a sign-out taken here lately ends its token (checked and
    /// added under one lock, the one `signOut` takes).
    func register(_ connection: ClientConnection) -> Refusal? {
        state.withLock { s in
            let user = connection.identity.user
            if let recent = s.signOuts[user] {
                s.signOuts[user] = Self.recent(recent, now: .now)
                if s.signOuts[user]?.contains(where: { $0.signOut.ends(connection.identity) }) == true { return .signedOut }
            }
            guard (s.byUser[user]?.count ?? 0) < maxSocketsPerUser else { return .tooManySockets }
            s.byUser[user, default: [:]][connection.id] = connection
            subscribe(connection, to: .user(user), &s)
            socketsOpen?.increment()
            return nil
        }
    }

    /// `register`, as a yes or no.
    func add(_ connection: ClientConnection) -> Bool { register(connection) == nil }

    /// The sign-outs of `list` younger than `signOutMemory`; nil when none is.
    private static func recent(_ list: [SignOutTaken], now: ContinuousClock.Instant) -> [SignOutTaken]? {
        let kept = list.filter { now - $0.at < signOutMemory }
        return kept.isEmpty ? nil : kept
    }

    /// A sign-out taken here (or told by another node): returns the sockets open now whose token
    /// it ends, to be closed, and refuses those that register after it for `signOutMemory`
    /// (their token was checked before it: without this a connect racing the sign-out kept its
    /// socket until the token expired).
    func signOut(_ signOut: SignOut) -> [ClientConnection] {
        state.withLock { s in
            let now = ContinuousClock.now
            // Sign-outs are rare: the old ones of every user are forgotten here, keeping it small.
            s.signOuts = s.signOuts.compactMapValues { Self.recent($0, now: now) }
            s.signOuts[signOut.user, default: []].append((signOut, now))
            return (s.byUser[signOut.user] ?? [:]).values.filter { signOut.ends($0.identity) }
        }
    }

    /// Removes a closed socket and every subscription it had; returns the topics it was
    /// subscribed to. From now on it cannot be subscribed to any.
    @discardableResult
    func remove(_ connection: ClientConnection) -> Set<Topic> {
        state.withLock { s in
            let user = connection.identity.user
            if s.byUser[user]?.removeValue(forKey: connection.id) != nil { socketsOpen?.decrement() }
            if s.byUser[user]?.isEmpty == true { s.byUser.removeValue(forKey: user) }
            let topics = s.topics.removeValue(forKey: connection.id) ?? []
            for topic in topics { s.drop(connection.id, from: topic) }
            return topics
        }
    }

    func connections(of user: String) -> [ClientConnection] {
        state.withLock { Array(($0.byUser[user] ?? [:]).values) }
    }

    var allConnections: [ClientConnection] {
        state.withLock { $0.byUser.values.flatMap { Array($0.values) } }
    }

    var connectionCount: Int {
        state.withLock { $0.byUser.values.reduce(0) { $0 + $1.count } }
    }

    // MARK: Subscriptions

    /// Subscribes `connection` to `topic`; false when its socket closed already (it is not held).
    @discardableResult
    func subscribe(_ connection: ClientConnection, to topic: Topic) -> Bool {
        state.withLock { subscribe(connection, to: topic, &$0) }
    }

    /// Subscribes every socket subscribed to one of `sources` (now) to `topic`: a stream's
    /// readers are whoever follows its user, room or language at its start.
    func subscribe(subscribersOf sources: [Topic], to topic: Topic) {
        state.withLock { s in
            for source in sources {
                for connection in (s.subscribers[source] ?? [:]).values { subscribe(connection, to: topic, &s) }
            }
        }
    }

    func unsubscribe(_ connection: String, from topic: Topic) {
        state.withLock { s in
            s.drop(connection, from: topic)
            s.topics[connection]?.remove(topic)
        }
    }

    /// Forgets a topic that gets no more frames (an ended stream, a room out of memory).
    func close(_ topic: Topic) {
        state.withLock { s in
            s.byLoop.removeValue(forKey: topic)
            s.rings.removeValue(forKey: topic)
            guard let subscribers = s.subscribers.removeValue(forKey: topic) else { return }
            for id in subscribers.keys { s.topics[id]?.remove(topic) }
            if !topic.isStream { s.interest?.ended(topic) }
        }
    }

    /// Tells `interest` which topics sockets here read from now on (before any socket is added).
    func attach(interest: any TopicInterest) {
        state.withLock { $0.interest = interest }
    }

    /// The users with a socket subscribed to `topic`.
    func users(in topic: Topic) -> Set<String> {
        state.withLock { Set(($0.subscribers[topic] ?? [:]).values.map(\.identity.user)) }
    }

    /// Whether any socket here reads `topic`.
    func hasSubscribers(_ topic: Topic) -> Bool {
        state.withLock { $0.subscribers[topic] != nil }
    }

    func subscribers(of topic: Topic) -> [ClientConnection] {
        state.withLock { Array(($0.subscribers[topic] ?? [:]).values) }
    }

    func isSubscribed(_ connection: String, to topic: Topic) -> Bool {
        state.withLock { $0.subscribers[topic]?[connection] != nil }
    }

    var topicCount: Int { state.withLock { $0.subscribers.count } }

    /// Times a topic's subscribers were grouped by event loop, for tests.
    var groupBuilds: Int { state.withLock { $0.groupBuilds } }

    // MARK: A room on another node

    /// How many numbered frames of a room run elsewhere are kept for a member joining here.
    static let ringCapacity = 512

    /// A room's frame, or the start of one of its streams (`stream`), as numbered by the room.
    struct Numbered {
        var seq: Int64
        var audience: Audience = .everyone
        var frame: ByteBuffer?
        var stream: String?
    }

    /// Delivers a room's numbered frame from another node, keeping it for joiners.
    func deliver(_ frame: ByteBuffer, to topic: Topic, audience: Audience, seq: Int64) {
        let groups = state.withLock { s -> [FanOut.Group] in
            keep(Numbered(seq: seq, audience: audience, frame: frame), of: topic, &s)
            return s.groups(of: topic, for: audience)
        }
        FanOut.send(frame, to: groups, audience: audience, delay: fanOutDelay)
    }

    /// Notes that a stream of a room run on another node started as the room's frame `seq`
    /// (its readers here follow it from then on): a member joining as of an earlier frame
    /// follows it from its start.
    func noteStream(_ stream: String, started seq: Int64, on topic: Topic) {
        state.withLock { keep(Numbered(seq: seq, stream: stream), of: topic, &$0) }
    }

    private func keep(_ entry: Numbered, of topic: Topic, _ s: inout State) {
        s.rings[topic, default: CircularBuffer(initialCapacity: 16)].append(entry)
        if s.rings[topic]!.count > Self.ringCapacity { s.rings[topic]!.removeFirst() }
    }

    /// A member joins a room run on another node: sends it `first` (the room's state as of frame
    /// `after`), then the frames of `topics` numbered after it that arrived since, in their
    /// order, then subscribes it to them, all under the hub's lock, so it misses none and gets
    /// none twice. Returns the streams of those topics that started after frame `after`, to be
    /// followed from their start; nil when frames it needs were already dropped (then nothing
    /// was sent: ask for the state again).
    func join(_ connection: ClientConnection, to topics: [Topic], after: Int64, first: ByteBuffer) -> [String]? {
        state.withLock { s in
            var later: [Numbered] = []
            for topic in topics {
                let ring = s.rings[topic] ?? CircularBuffer()
                if let oldest = ring.first?.seq, oldest > after + 1, ring.count >= Self.ringCapacity { return nil }
                later += ring.filter { $0.seq > after }
            }
            connection.send(first)
            var streams: [String] = []
            for entry in later.sorted(by: { $0.seq < $1.seq }) where entry.audience.admits(connection) {
                if let frame = entry.frame { connection.send(frame) }
                if let stream = entry.stream, !streams.contains(stream) { streams.append(stream) }
            }
            for topic in topics { subscribe(connection, to: topic, &s) }
            return streams
        }
    }

    /// Forgets the frames kept for a topic nobody here reads (a join that did not happen).
    func forgetFrames(of topic: Topic) {
        state.withLock { s in if s.subscribers[topic] == nil { s.rings.removeValue(forKey: topic) } }
    }

    // MARK: Delivery

    /// Writes `frame` to every subscriber of `topic` that `audience` admits (a socket cut off or
    /// closed since it subscribed writes nothing; its close unsubscribes it).
    /// `token`: the frame is that token of a stream (sockets that join tokens may join it with
    /// the ones before or after it).
    func deliver(_ frame: ByteBuffer, to topic: Topic, audience: Audience, token: TokenLayout? = nil) {
        let groups = state.withLock { $0.groups(of: topic, for: audience) }
        FanOut.send(frame, to: groups, audience: audience, delay: fanOutDelay, token: token)
    }

    @discardableResult
    private func subscribe(_ connection: ClientConnection, to topic: Topic, _ s: inout State) -> Bool {
        // A socket that closed already (a join or resume racing its disconnect) is not held:
        // nothing would ever unsubscribe it.
        guard s.byUser[connection.identity.user]?[connection.id] != nil else { return false }
        if s.subscribers[topic] == nil, !topic.isStream { s.interest?.began(topic) }
        s.subscribers[topic, default: [:]][connection.id] = connection
        s.topics[connection.id, default: []].insert(topic)
        s.byLoop.removeValue(forKey: topic)
        return true
    }
}

/// The last tokens of a stream, kept for `stream.resume` and for members who join a room while a
/// stream runs. Kept compactly (#26): a token frame of this stream (`ServerFrame.token`) is kept
/// as its text (as the frame escapes it, quotes included) and closing brace, all of them back to
/// back in one array, and made whole again when replayed; any other frame is kept whole. One
/// `ByteBuffer` per token (about 200 bytes with its storage) made a 400-token reply's history
/// 80 KB where its text is a few. Not thread-safe: its stream's lock guards it.
struct StreamHistory {
    enum Replay {
        /// Frames with seq > `after`, oldest first.
        case frames(ArraySlice<ByteBuffer>)
        /// Some of them were already evicted.
        case gone
    }

    /// Where a kept entry ends in `bytes` (the low 31 bits), and whether it is a whole frame (the
    /// top bit): four bytes a token.
    private struct Entry {
        private var bits: UInt32
        init(end: Int, whole: Bool) { bits = UInt32(end) | (whole ? 1 << 31 : 0) }
        var end: Int {
            get { Int(bits & ~(1 << 31)) }
            set { bits = UInt32(newValue) | (bits & (1 << 31)) }
        }
        var whole: Bool { bits & (1 << 31) != 0 }
    }

    private let capacity: Int
    private let stream: String
    /// What every token frame of the stream starts with, `{"type":"token","stream":"…","seq":`
    /// (empty when frames are not laid out as expected: each is then kept whole).
    private let head: [UInt8]
    /// What follows a token frame's seq, before its text.
    private static let middle = Array(#","text":"#.utf8)
    /// The kept entries back to back from `start`, oldest first.
    private var bytes: [UInt8] = []
    private var start = 0
    private var entries = CircularBuffer<Entry>()
    private var firstSeq: Int64 = 1
    private(set) var lastSeq: Int64 = 0

    init(capacity: Int, stream: String) {
        self.capacity = max(1, capacity)
        self.stream = stream
        let empty = ServerFrame.token(stream: stream, seq: 0, text: "")
        let seq = Array(#""seq":"#.utf8)
        let cut = empty.indices.first { empty[$0...].starts(with: seq) }.map { $0 + seq.count } ?? 0
        // Kept compactly only while frames are laid out as this one is; else each is kept whole.
        let laidOut = cut > 0 && empty[cut...].elementsEqual(Array("0".utf8) + Self.middle + Array("\"\"}".utf8))
        head = laidOut ? Array(empty[..<cut]) : []
        entries.reserveCapacity(min(64, self.capacity))
    }

    /// Bytes the kept entries take (the array's spare capacity aside).
    var keptBytes: Int { bytes.count - start }

    /// Keeps token `seq`, which must follow the last, evicting the oldest beyond capacity.
    /// Returns where the frame's seq and text lie when it is laid out as a token frame of the
    /// stream (a socket that joins tokens needs them), nil otherwise.
    @discardableResult
    mutating func append(seq: Int64, frame: ByteBuffer) -> TokenLayout? {
        precondition(seq == lastSeq + 1, "token seqs must be contiguous")
        lastSeq = seq
        if entries.count == capacity {
            start = entries.removeFirst().end
            firstSeq += 1
            if entries.isEmpty {
                bytes.removeAll(keepingCapacity: true)
                start = 0
            } else if start >= 4_096, start * 2 >= bytes.count {
                // Amortised: at most once per as many bytes evicted as remain.
                bytes.removeFirst(start)
                for index in entries.indices { entries[index].end -= start }
                start = 0
            }
        }
        let text = frame.withUnsafeReadableBytes { raw -> Int? in
            guard let rest = Self.rest(of: raw, head: head, seq: seq) else {
                bytes.append(contentsOf: raw)
                return nil
            }
            bytes.append(contentsOf: UnsafeRawBufferPointer(rebasing: raw[rest...]))
            return rest
        }
        entries.append(Entry(end: bytes.count, whole: text == nil))
        return text.flatMap { TokenLayout(frame, stream: stream, seq: seq, seqAt: head.count, textAt: $0 + 1) }
    }

    /// Where the text starts in a token frame of seq `seq` that is `head`, the seq, `middle`,
    /// then the text; nil for any other frame.
    private static func rest(of raw: UnsafeRawBufferPointer, head: [UInt8], seq: Int64) -> Int? {
        guard !head.isEmpty, raw.count > head.count, raw.starts(with: head) else { return nil }
        var index = head.count
        var value: Int64 = 0
        while index < raw.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(raw[index]), index - head.count < 19 {
            value = value * 10 + Int64(raw[index] - UInt8(ascii: "0"))
            index += 1
        }
        guard index > head.count, value == seq, raw[index...].starts(with: middle) else { return nil }
        return index + middle.count
    }

    /// The kept frame at `index` (0 for seq `firstSeq`), whole again.
    private func frame(at index: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
        let entry = entries[entries.index(entries.startIndex, offsetBy: index)]
        let begin = index == 0 ? start : entries[entries.index(entries.startIndex, offsetBy: index - 1)].end
        let kept = bytes[begin..<entry.end]
        guard !entry.whole else { return allocator.buffer(bytes: kept) }
        let seq = String(firstSeq + Int64(index)).utf8
        var frame = allocator.buffer(capacity: head.count + seq.count + Self.middle.count + kept.count)
        frame.writeBytes(head)
        frame.writeBytes(seq)
        frame.writeBytes(Self.middle)
        frame.writeBytes(kept)
        return frame
    }

    private func frames(from first: Int64) -> ArraySlice<ByteBuffer> {
        let allocator = ByteBufferAllocator()
        return ArraySlice((Int(first - firstSeq)..<entries.count).map { frame(at: $0, allocator: allocator) })
    }

    /// The tokens kept with seq > `after` (all kept ones when some of those were evicted), and
    /// the seq of the first of them.
    func kept(after: Int64) -> (first: Int64, frames: ArraySlice<ByteBuffer>) {
        let first = max(after + 1, firstSeq)
        guard first <= lastSeq else { return (first, []) }
        return (first, frames(from: first))
    }

    func replay(after: Int64) -> Replay {
        if after + 1 < firstSeq { return .gone }
        guard after < lastSeq else { return .frames([]) }
        return .frames(frames(from: max(after + 1, firstSeq)))
    }
}
