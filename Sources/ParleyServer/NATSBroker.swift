import CoreMetrics
import Logging
import NIOCore
import NIOPosix
import ParleyCore
import ParleyMongoStore
import ParleyNATS
import Synchronization

/// The NATS subjects the nodes of a cluster share. Topic names and ids become single subject
/// tokens (dots turned into colons; anything a subject cannot hold, hex behind a `~`).
enum BrokerSubjects {
    /// The JetStream stream that keeps every stream's frames (the resume window on every node)
    /// and each stream's head (what its `stream.start` says, and who owns it).
    static let streams = "PARLEY_STREAMS"
    static let captured = ["p.*.s.*", "ph.*"]

    /// Frames published to a topic that is not a stream's.
    static func topic(_ topic: Topic) -> String { "p." + token(topic.name) + ".t" }
    /// Everything a node reads for one topic: its frames, and the frames of the streams it reads.
    static func interest(_ topic: Topic) -> String { "p." + token(topic.name) + ".>" }
    /// A stream's frames, published under the topic whose subscribers read it.
    static func stream(_ id: String, readers: Topic) -> String { "p." + token(readers.name) + ".s." + token(id) }
    /// A voiced stream's audio (#29), published under the topic whose subscribers read it: live
    /// only, not kept by JetStream (its per-subject limit counts a stream's tokens; audio chunks
    /// there would push out the tokens a resume needs).
    static func audio(_ id: String, readers: Topic) -> String { "p." + token(readers.name) + ".a." + token(id) }
    /// A stream's frames whatever topic reads it (a resume on a node that did not follow it).
    static func frames(of id: String) -> String { "p.*.s." + token(id) }
    static func head(of id: String) -> String { "ph." + token(id) }
    /// Where the node generating a stream answers a `chat.cancel` sent to another node.
    static func cancel(_ id: String) -> String { "pc." + token(id) }
    /// Where every node answers an account deletion: one user's, and every user's.
    static func closeUser(_ user: String) -> String { "pu." + token(user) }
    static let closeAnyUser = "pu.*"
    /// Where every node answers a sign-out (#28): one user's, and every user's.
    static func signOut(_ user: String) -> String { "po." + token(user) }
    static let anySignOut = "po.*"
    /// A schedule was created: the node holding its shard arms its timer.
    static func scheduleAdded(shard: Int) -> String { "ps.\(shard)" }
    static let anyScheduleAdded = "ps.*"
    /// A fired schedule's message, for the nodes where its owner has sockets.
    static func delivery(user: String) -> String { "pd." + token(user) }
    static let anyDelivery = "pd.*"
    /// Requests to the node running a room (join, say, control, leave from another node).
    static func roomRequests(_ room: String) -> String { "pr." + token(room) }
    /// A node that took a room over asks every node which of its sockets are in it.
    static func roomMembers(_ room: String) -> String { "pm." + token(room) }
    static let anyRoomMembers = "pm.*"
    /// A room's owner removed a user (every node unsubscribes that user's sockets from it), or
    /// set the language a user reads a translation chat in (every node moves that user's
    /// sockets to it), or a node stopped (its sockets are in no room any more).
    static let roomKicks = "pk"

    /// The topic, and for a stream's frame the stream, a subject of `interest` names.
    static func parse(_ subject: String) -> (topic: Topic, stream: String?)? {
        let parts = subject.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count >= 3, parts[0] == "p", let topic = name(parts[1]) else { return nil }
        if parts.count == 3, parts[2] == "t" { return (Topic(name: topic), nil) }
        if parts.count == 4, parts[2] == "s" || parts[2] == "a", let stream = name(parts[3]) { return (Topic(name: topic), stream) }
        return nil
    }

    static func token(_ name: String) -> String {
        let plain = name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || byte == 0x5F || byte == 0x2D
                || byte == 0x2E
        }
        guard plain, !name.isEmpty else {
            return "~" + name.utf8.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        }
        return String(name.map { $0 == "." ? ":" : $0 })
    }

    static func name(_ token: Substring) -> String? {
        guard token.first == "~" else { return String(token.map { $0 == ":" ? "." : $0 }) }
        let hex = Array(token.utf8.dropFirst())
        guard hex.count % 2 == 0, !hex.isEmpty else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(hex.count / 2)
        for i in stride(from: 0, to: hex.count, by: 2) {
            guard let byte = UInt8(String(decoding: hex[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
            bytes.append(byte)
        }
        return String(validating: bytes, as: UTF8.self)
    }
}

/// One frame as it travels between nodes: what it is (a topic's frame, or a stream's start,
/// token, end or extra), to whom (`audience`) and the frame itself.
struct BrokerEnvelope: Equatable {
    enum Part: UInt8 { case topic, start, token, end, extra }

    var part: Part
    var seq: Int64 = 0
    var audience: Audience = .everyone
    /// `start`: the stream's descriptor (`StreamDescriptor`).
    var descriptor: [UInt8] = []
    /// `end`: the frame its owner gets instead of `frame`.
    var ownerFrame: [UInt8]?
    var frame: [UInt8]

    struct Malformed: Error {}

    func encoded() -> [UInt8] {
        var out: [UInt8] = [part.rawValue]
        out.reserveCapacity(16 + descriptor.count + frame.count + (ownerFrame?.count ?? 0))
        withUnsafeBytes(of: seq.bigEndian) { out.append(contentsOf: $0) }
        for field in [audience.user, audience.exceptUser, audience.connection, audience.exceptConnection] {
            Self.append(field.map { Array($0.utf8) }, to: &out)
        }
        Self.append(descriptor, to: &out)
        Self.append(ownerFrame, to: &out)
        out.append(contentsOf: frame)
        return out
    }

    init(part: Part, seq: Int64 = 0, audience: Audience = .everyone, descriptor: [UInt8] = [], ownerFrame: [UInt8]? = nil, frame: [UInt8]) {
        self.part = part
        self.seq = seq
        self.audience = audience
        self.descriptor = descriptor
        self.ownerFrame = ownerFrame
        self.frame = frame
    }

    init(decoding bytes: [UInt8]) throws(Malformed) {
        var at = 0
        guard bytes.count >= 9, let part = Part(rawValue: bytes[0]) else { throw Malformed() }
        self.part = part
        seq = bytes[1..<9].reduce(0) { $0 << 8 | Int64($1) }
        at = 9
        func field() throws(Malformed) -> [UInt8]? {
            guard at + 4 <= bytes.count else { throw Malformed() }
            let length = bytes[at..<at + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            at += 4
            if length == .max { return nil }
            guard at + Int(length) <= bytes.count else { throw Malformed() }
            defer { at += Int(length) }
            return Array(bytes[at..<at + Int(length)])
        }
        func text() throws(Malformed) -> String? { try field().map { String(decoding: $0, as: UTF8.self) } }
        audience = Audience(user: try text(), exceptUser: try text(), connection: try text(), exceptConnection: try text())
        descriptor = try field() ?? []
        ownerFrame = try field()
        frame = Array(bytes[at...])
    }

    private static func append(_ field: [UInt8]?, to out: inout [UInt8]) {
        let length = field.map { UInt32($0.count) } ?? .max
        withUnsafeBytes(of: length.bigEndian) { out.append(contentsOf: $0) }
        if let field { out.append(contentsOf: field) }
    }
}

/// What another node needs to follow a stream or answer a resume of it: its owner, model and
/// kind, as JSON.
enum StreamDescriptor {
    static func encode(_ stream: LiveStream) -> [UInt8] {
        var fields: [(String, JSONValue)] = [("owner", .string(stream.owner)), ("model", .string(stream.model))]
        switch stream.kind {
        case .reply(let conversation, let clone, let schedule, let message, let parent):
            fields += [("kind", .string("reply")), ("conversation", .string(conversation)), ("clone", .string(clone))]
            if let schedule { fields.append(("schedule", .string(schedule))) }
            if let message { fields.append(("message", .string(message))) }
            if let parent { fields.append(("parent", .string(parent))) }
        case .debateTurn(let room, let clone):
            fields += [("kind", .string("debate_turn")), ("room", .string(room)), ("clone", .string(clone))]
        case .roomReply(let room, let clone, let lang, let source):
            fields += [
                ("kind", .string("room_reply")), ("room", .string(room)), ("clone", .string(clone)), ("lang", .string(lang.value)),
                ("source", .string(source)),
            ]
        case .translation(let room, let lang, let source, let speaker):
            fields += [("kind", .string("translation")), ("room", .string(room)), ("lang", .string(lang.value)), ("source", .string(source))]
            switch speaker {
            case .clone(let clone): fields.append(("clone", .string(clone)))
            case .user(let user): fields.append(("user", .string(user)))
            }
        }
        return JSONValue.object(fields).serialized()
    }

    static func decode(_ bytes: [UInt8]) -> (owner: String, model: String, kind: LiveStream.Kind)? {
        guard let json = try? JSONValue.parse(bytes), let owner = json["owner"]?.stringValue, let model = json["model"]?.stringValue
        else { return nil }
        let room = json["room"]?.stringValue
        let clone = json["clone"]?.stringValue
        let lang = json["lang"]?.stringValue.flatMap(LanguageTag.init)
        let source = json["source"]?.stringValue
        let kind: LiveStream.Kind
        switch json["kind"]?.stringValue {
        case "reply":
            guard let conversation = json["conversation"]?.stringValue, let clone else { return nil }
            kind = .reply(
                conversation: conversation, clone: clone, schedule: json["schedule"]?.stringValue, message: json["message"]?.stringValue,
                parent: json["parent"]?.stringValue)
        case "debate_turn":
            guard let room, let clone else { return nil }
            kind = .debateTurn(room: room, clone: clone)
        case "room_reply":
            guard let room, let clone, let lang, let source else { return nil }
            kind = .roomReply(room: room, clone: clone, lang: lang, source: source)
        case "translation":
            guard let room, let lang, let source else { return nil }
            guard let speaker = clone.map(LiveStream.Speaker.clone) ?? json["user"]?.stringValue.map(LiveStream.Speaker.user) else { return nil }
            kind = .translation(room: room, lang: lang, source: source, speaker: speaker)
        default: return nil
        }
        return (owner, model, kind)
    }
}

/// What a node asks of the others about the streams it does not generate.
protocol RemoteStreams: Sendable {
    /// Resumes another node's reply stream of `connection`'s user for it; false when no node
    /// has a stream of that id and owner. `audioAfter`: a voiced reply's audio too, as far as this
    /// node followed it (JetStream keeps no audio).
    func resume(stream: String, after: Int64, audioAfter: Int64?, ref: String, connection: ClientConnection) async -> Bool
    /// Asks the node generating `stream` to stop it; false when none has a stream of that id
    /// and owner.
    func cancel(stream: String, user: String) async -> Bool
}

/// The broker between nodes (#22), after Centrifugo's NATS broker, with the history it lacks:
/// each frame is delivered here as `LocalBroker` would, and published to NATS for the nodes
/// whose sockets read its topic. A stream's frames go under the topic that reads it (so a node
/// following a user or a room gets them with no subscription race) and are kept by JetStream,
/// which is the resume window on a node that did not follow the stream. A node that follows
/// one keeps a mirror of it (a `LiveStream` delivering locally) that answers resumes and
/// late readers as the generating node would.
final class NATSBroker: Broker, TopicInterest, RemoteStreams {
    private let local: LocalBroker
    private var hub: SocketHub { local.hub }
    private let nats: NATSConnection
    private let jetStream: JetStream
    private let threads: NIOThreadPool
    private let logger: Logger
    private let bufferCapacity: Int
    /// How long a stream's frames stay in JetStream; its head is published again at half of it,
    /// so a long reply stays resumable.
    private let maxAge: Duration
    private let retention: Duration
    private let publishFailures: Counter?
    /// How long a publish takes to reach the NATS server and its answer to come back (a flush),
    /// measured every few seconds (`probe`) and by every `flush`.
    private let roundTrips: Timer?
    private let probe = Mutex<Task<Void, Never>?>(nil)
    private let failures = Atomic<Int>(0)
    /// How long a frame published now takes to be kept by JetStream (from then on another
    /// node can resume from it), measured with the round trip (`measureJetStreamLag`).
    private let jetStreamLag: Timer?
    /// Where this node's lag probes go (a stream head's subject no stream has).
    private let probeSubject = BrokerSubjects.head(of: "probe-\(UInt64.random(in: 0 ... .max))")

    private struct Origin {
        let stream: LiveStream
        var cancels: NATSSubscription?
        var headAt: ContinuousClock.Instant
        /// Its last token's seq.
        var lastSeq: Int64 = 0
        /// Its frames wait in its history: the link to NATS was lost, and what the server had
        /// not kept yet is sent again once it is back (`publishAgain`), before anything newer.
        var held: Bool
        var endedAt: ContinuousClock.Instant?
    }

    private struct Mirror {
        let stream: LiveStream
        var lastSeq: Int64 = 0
        var touched: ContinuousClock.Instant = .now
    }

    private let userClosing = Mutex<NATSSubscription?>(nil)
    private let signOuts = Mutex<NATSSubscription?>(nil)
    /// Topics some socket here reads, each with its NATS subscription.
    private let interests = Mutex<[Topic: NATSSubscription]>([:])
    /// Topics followed with no socket reading them yet (a member joining a room run elsewhere).
    private let pins = Mutex<[Topic: Int]>([:])
    /// Streams this node generates, and those it ended in the last `settled` (a link lost
    /// just after may have lost their last frames).
    private let origins = Mutex<[String: Origin]>([:])
    private static let settled: Duration = .seconds(30)
    /// The run of `publishAgain` after the last reconnect; the next one waits for it.
    private let republishing = Mutex<Task<Void, Never>?>(nil)
    /// Streams another node generates that sockets here read.
    private let mirrors = Mutex<[String: Mirror]>([:])

    /// Connects to the NATS server at `url`, makes sure the JetStream stream exists, and tells
    /// `hub` to report which topics its sockets read.
    static func connect(url: String, hub: SocketHub, configuration: ServerConfiguration, logger: Logger) async throws -> NATSBroker {
        // nats.c's blocking calls (connecting, JetStream requests, a remote cancel) wait here.
        let threads = NIOThreadPool(numberOfThreads: 2)
        threads.start()
        do {
            let nats = try await NATSConnection.connect(url: url, name: "parley", noEcho: true, threads: threads)
            let jetStream = try nats.jetStream()
            try await jetStream.addStream(
                jetStreamConfiguration(bufferCapacity: configuration.resumeBufferTokens, retention: configuration.resumeRetention))
            let broker = NATSBroker(
                hub: hub, nats: nats, jetStream: jetStream, threads: threads, bufferCapacity: configuration.resumeBufferTokens,
                retention: configuration.resumeRetention, logger: logger, metrics: configuration.metrics)
            hub.attach(interest: broker)
            nats.observeLink { [weak broker] event in broker?.linkChanged(event) }
            broker.probe.withLock {
                $0 = Task { [weak broker] in
                    while (try? await Task.sleep(for: .seconds(5))) != nil {
                        try? await broker?.flush(timeout: .seconds(2))
                        try? await broker?.measureJetStreamLag(timeout: .seconds(2))
                    }
                }
            }
            return broker
        } catch {
            try? await threads.shutdownGracefully()
            throw ConfigurationError("cannot use the broker at \(url): \(error)")
        }
    }

    private init(
        hub: SocketHub, nats: NATSConnection, jetStream: JetStream, threads: NIOThreadPool, bufferCapacity: Int, retention: Duration,
        logger: Logger, metrics: (any MetricsFactory)?
    ) {
        local = LocalBroker(hub: hub)
        self.threads = threads
        self.nats = nats
        self.jetStream = jetStream
        self.bufferCapacity = bufferCapacity
        self.retention = retention
        maxAge = Self.maxAge(retention: retention)
        self.logger = logger
        publishFailures = metrics.map { Counter(label: "parley_broker_publish_failures_total", factory: $0) }
        roundTrips = metrics.map { Timer(label: "parley_broker_round_trip_seconds", factory: $0) }
        jetStreamLag = metrics.map { Timer(label: "parley_jetstream_lag_seconds", factory: $0) }
    }

    /// A stream's frames stay in JetStream for twice the resume retention (at least a minute).
    static func maxAge(retention: Duration) -> Duration { max(retention * 2, .seconds(60)) }

    /// The JetStream stream every node shares, made by the first node that starts.
    static func jetStreamConfiguration(bufferCapacity: Int, retention: Duration) -> JetStream.StreamConfiguration {
        var configuration = JetStream.StreamConfiguration(name: BrokerSubjects.streams, subjects: BrokerSubjects.captured)
        // A stream's start, its tokens, an error or paywall frame, and its end.
        configuration.maxMessagesPerSubject = Int64(bufferCapacity) + 4
        configuration.maxAge = maxAge(retention: retention)
        return configuration
    }

    // MARK: Publishing

    func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience) {
        publish(frame, to: topic, audience: audience, seq: 0)
    }

    func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience, seq: Int64) {
        local.publish(frame, to: topic, audience: audience)
        send(BrokerSubjects.topic(topic), BrokerEnvelope(part: .topic, seq: seq, audience: audience, frame: Array(frame.readableBytesView)))
    }

    func streamStarted(_ stream: LiveStream, frame: ByteBuffer) {
        local.streamStarted(stream, frame: frame)
        var cancels: NATSSubscription?
        if case .reply = stream.kind {
            // Answers a chat.cancel that reached another node; the stream's lock is not held by then.
            cancels = try? nats.subscribe(BrokerSubjects.cancel(stream.id)) { [nats] request in
                let user = String(decoding: request.payload, as: UTF8.self)
                let mine = user == stream.owner
                if mine { stream.stop(.cancelled) }
                if let reply = request.reply { try? nats.publish(reply, Array((mine ? "ok" : "no").utf8)) }
            }
        }
        let held = !nats.isConnected
        origins.withLock { origins in
            let now = ContinuousClock.now
            origins = origins.filter { _, o in o.held || (o.endedAt.map { now - $0 < Self.settled } ?? true) }
            origins[stream.id] = Origin(stream: stream, cancels: cancels, headAt: now, held: held)
        }
        guard !held else { return }
        let descriptor = StreamDescriptor.encode(stream)
        send(BrokerSubjects.head(of: stream.id), descriptor)
        sendStream(stream, BrokerEnvelope(part: .start, seq: stream.roomSeq, descriptor: descriptor, frame: Array(frame.readableBytesView)))
    }

    /// Applies `change` to the origin of `stream` under the lock, after holding it when the link
    /// to NATS is down; the origin as changed, nil when this node does not generate the stream.
    private func updateOrigin<R>(_ stream: LiveStream, _ change: (inout Origin) -> R) -> (origin: Origin, result: R)? {
        let connected = nats.isConnected
        return origins.withLock { o in
            guard var origin = o[stream.id] else { return nil }
            if !connected { origin.held = true }
            let result = change(&origin)
            o[stream.id] = origin
            return (origin, result)
        }
    }

    func streamToken(_ stream: LiveStream, seq: Int64, frame: ByteBuffer, layout: TokenLayout?) {
        local.streamToken(stream, seq: seq, frame: frame, layout: layout)
        let updated = updateOrigin(stream) { origin -> Bool in
            origin.lastSeq = seq
            let headDue = !origin.held && ContinuousClock.now - origin.headAt > maxAge / 2
            if headDue { origin.headAt = .now }
            return headDue
        }
        guard updated?.origin.held != true else { return }
        sendStream(stream, BrokerEnvelope(part: .token, seq: seq, frame: Array(frame.readableBytesView)))
        if updated?.result == true { send(BrokerSubjects.head(of: stream.id), StreamDescriptor.encode(stream)) }
    }

    func streamEnded(_ stream: LiveStream, frame: ByteBuffer, ownerFrame: ByteBuffer?) {
        local.streamEnded(stream, frame: frame, ownerFrame: ownerFrame)
        let origin = updateOrigin(stream) { $0.endedAt = .now }?.origin
        origin?.cancels?.cancel()
        guard origin?.held != true else { return }
        sendStream(
            stream, BrokerEnvelope(part: .end, ownerFrame: ownerFrame.map { Array($0.readableBytesView) }, frame: Array(frame.readableBytesView)))
        // Resumable for the retention from now, however long the reply ran.
        send(BrokerSubjects.head(of: stream.id), StreamDescriptor.encode(stream))
    }

    /// Ends a stream whose node stopped (`NodeReaper`): for the readers of this node's copy, for
    /// every other node's, and in JetStream, so a later resume replays it to this end.
    func endOrphan(stream id: String, readers: Topic, frame: ByteBuffer) {
        mirrors.withLock { mirrors in
            guard let mirror = mirrors[id], !mirror.stream.isEnded else { return }
            mirror.stream.finish(frame, reason: .interrupted)
            mirrors[id]?.touched = .now
        }
        send(BrokerSubjects.stream(id, readers: readers), BrokerEnvelope(part: .end, frame: Array(frame.readableBytesView)))
    }

    func streamExtra(_ stream: LiveStream, frame: ByteBuffer, audience: Audience) {
        local.streamExtra(stream, frame: frame, audience: audience)
        let origin = updateOrigin(stream) { _ in }?.origin
        // Held, it is not sent again: like a resume on one node, a republish has tokens and end only.
        guard origin?.held != true else { return }
        // Its seq says after which token it came (`publishAgain` reads it so).
        let envelope = BrokerEnvelope(part: .extra, seq: origin?.lastSeq ?? 0, audience: audience, frame: Array(frame.readableBytesView))
        guard WireFrame.opcode(of: frame) == .binary else { return sendStream(stream, envelope) }
        let bytes = envelope.encoded()
        for readers in stream.readers { send(BrokerSubjects.audio(stream.id, readers: readers), bytes) }
    }

    private func sendStream(_ stream: LiveStream, _ envelope: BrokerEnvelope) {
        let bytes = envelope.encoded()
        for readers in stream.readers { send(BrokerSubjects.stream(stream.id, readers: readers), bytes) }
    }

    private func send(_ subject: String, _ envelope: BrokerEnvelope) { send(subject, envelope.encoded()) }

    private func send(_ subject: String, _ bytes: [UInt8]) {
        do {
            try nats.publish(subject, bytes)
        } catch {
            publishFailures?.increment()
            // Every token fails while NATS is away: the 1st, 2nd, 4th, 8th… failure is logged.
            let count = failures.add(1, ordering: .relaxed).newValue
            if count & (count - 1) == 0 {
                logger.warning("publishing to the broker failed", metadata: ["subject": "\(subject)", "error": "\(error)", "failures": "\(count)"])
            }
        }
    }

    // MARK: Outages

    /// A lost link holds every stream's frames (the server may have died with the last ones
    /// unread); once it is back, each stream sends what JetStream lacks, then goes on.
    private func linkChanged(_ event: NATSLinkEvent) {
        switch event {
        case .lost:
            logger.warning("lost the link to the broker; streams hold their frames until it is back")
            origins.withLock { origins in
                for id in origins.keys { origins[id]?.held = true }
            }
        case .restored:
            republishing.withLock { last in
                let previous = last
                last = Task {
                    await previous?.value
                    await self.publishAgain()
                }
            }
        }
    }

    /// Where JetStream's copy of a stream under one subject stops.
    private enum Kept: Equatable {
        case nothing
        case through(token: Int64)
        case end
    }

    /// Sends every held stream's frames that JetStream lacks, in order, and lets it go on.
    private func publishAgain() async {
        let held = origins.withLock { $0.values.filter(\.held).map(\.stream) }
        guard !held.isEmpty else { return }
        var sent = 0
        for stream in held {
            var kept: [Topic: Kept] = [:]
            for readers in stream.readers { kept[readers] = await self.kept(under: BrokerSubjects.stream(stream.id, readers: readers)) }
            sent += stream.withPublished { published -> Int in
                var count = 0
                let descriptor = StreamDescriptor.encode(stream)
                send(BrokerSubjects.head(of: stream.id), descriptor)
                for readers in stream.readers {
                    let subject = BrokerSubjects.stream(stream.id, readers: readers)
                    let after: Int64
                    switch kept[readers] ?? .nothing {
                    case .end:
                        continue
                    case .nothing:
                        guard let start = published.start else { continue }
                        send(
                            subject, BrokerEnvelope(part: .start, seq: stream.roomSeq, descriptor: descriptor, frame: Array(start.readableBytesView)))
                        count += 1
                        after = 0
                    case .through(let token):
                        after = token
                    }
                    let tokens = published.history.kept(after: after)
                    for (offset, frame) in tokens.frames.enumerated() {
                        send(subject, BrokerEnvelope(part: .token, seq: tokens.first + Int64(offset), frame: Array(frame.readableBytesView)))
                    }
                    count += tokens.frames.count
                    if let end = published.end {
                        send(
                            subject,
                            BrokerEnvelope(
                                part: .end, ownerFrame: published.ownerEnd.map { Array($0.readableBytesView) }, frame: Array(end.readableBytesView)))
                        count += 1
                    }
                }
                // Under the stream's lock: its next frame goes out after these.
                origins.withLock { $0[stream.id]?.held = false }
                return count
            }
        }
        logger.notice(
            "the link to the broker is back; streams sent again what it had not kept", metadata: ["streams": "\(held.count)", "frames": "\(sent)"])
    }

    /// What JetStream keeps of a stream under `subject`: its last frame there says up to where.
    /// Asked up to three times (a restarted server may still be recovering its streams); when it
    /// never answers, every token kept here is sent again (every reader skips tokens it has).
    private func kept(under subject: String) async -> Kept {
        for attempt in 1...3 {
            do {
                guard let last = try await jetStream.lastMessage(stream: BrokerSubjects.streams, subject: subject),
                    let envelope = try? BrokerEnvelope(decoding: last.payload)
                else { return .nothing }
                switch envelope.part {
                case .start, .topic: return .through(token: 0)
                case .token, .extra: return .through(token: envelope.seq)
                case .end: return .end
                }
            } catch {
                logger.warning(
                    "reading what the broker keeps of a stream failed",
                    metadata: ["subject": "\(subject)", "attempt": "\(attempt)", "error": "\(error)"])
                try? await Task.sleep(for: .seconds(1))
            }
        }
        return .through(token: 0)
    }

    // MARK: Receiving

    func began(_ topic: Topic) {
        interests.withLock { interests in
            guard interests[topic] == nil else { return }
            do {
                interests[topic] = try nats.subscribe(BrokerSubjects.interest(topic)) { [weak self] in self?.receive($0) }
            } catch {
                logger.error("subscribing to a topic on the broker failed", metadata: ["topic": "\(topic)", "error": "\(error)"])
            }
        }
    }

    func ended(_ topic: Topic) {
        guard pins.withLock({ $0[topic, default: 0] }) == 0 else { return }
        interests.withLock { $0.removeValue(forKey: topic) }?.cancel()
    }

    /// Follows `topic` until `unpin`, whether or not a socket here reads it, and waits until the
    /// NATS server has the subscription.
    func pin(_ topic: Topic) async throws {
        pins.withLock { $0[topic, default: 0] += 1 }
        began(topic)
        try await flush()
    }

    func unpin(_ topic: Topic) {
        let last = pins.withLock { pins -> Bool in
            pins[topic, default: 1] -= 1
            guard pins[topic]! <= 0 else { return false }
            pins.removeValue(forKey: topic)
            return true
        }
        guard last, !hub.hasSubscribers(topic) else { return }
        hub.forgetFrames(of: topic)
        interests.withLock { $0.removeValue(forKey: topic) }?.cancel()
    }

    /// A frame another node published (nats.c's delivery thread; one subject's frames in order).
    private func receive(_ message: NATSMessage) {
        guard let (topic, stream) = BrokerSubjects.parse(message.subject), let envelope = try? BrokerEnvelope(decoding: message.payload) else {
            logger.warning("dropped a malformed broker message", metadata: ["subject": "\(message.subject)"])
            return
        }
        let frame = ByteBuffer(bytes: envelope.frame)
        guard let stream else {
            if envelope.seq > 0 {
                hub.deliver(frame, to: topic, audience: envelope.audience, seq: envelope.seq)
            } else {
                hub.deliver(frame, to: topic, audience: envelope.audience)
            }
            return
        }
        mirrors.withLock { mirrors in
            switch envelope.part {
            case .start:
                // A room's stream: a member joining here as of an earlier frame follows it too.
                if envelope.seq > 0 { hub.noteStream(stream, started: envelope.seq, on: topic) }
                if let mirror = mirrors[stream] {
                    // Read under a second topic here too (a clone's reply read in two tags of one
                    // language): that topic's readers follow it as well, from its start.
                    let ack = ByteBuffer(bytes: mirror.stream.startFrame(ref: nil))
                    for connection in hub.subscribers(of: topic) where !hub.isSubscribed(connection.id, to: mirror.stream.topic) {
                        _ = mirror.stream.resume(connection, after: 0, ack: ack)
                    }
                    return
                }
                guard let (owner, model, kind) = StreamDescriptor.decode(envelope.descriptor) else { return }
                expire(&mirrors)
                let live = LiveStream(
                    id: stream, owner: owner, model: model, kind: kind, bufferCapacity: bufferCapacity, readers: [topic], broker: local, hub: hub)
                live.start(frame)
                mirrors[stream] = Mirror(stream: live)
            case .token:
                guard var mirror = mirrors[stream], envelope.seq > mirror.lastSeq else { return }
                guard envelope.seq == mirror.lastSeq + 1 else {
                    // A frame was lost on the way (a slow node): its readers resume from JetStream.
                    logger.warning("a followed stream skipped tokens; its readers here must resume it", metadata: ["stream": "\(stream)"])
                    mirrors.removeValue(forKey: stream)
                    hub.close(mirror.stream.topic)
                    return
                }
                mirror.stream.publish(seq: envelope.seq, frame: frame)
                mirror.lastSeq = envelope.seq
                mirror.touched = .now
                mirrors[stream] = mirror
            case .extra:
                // Audio is kept by the mirror as by its origin, so a resume here replays it too.
                if WireFrame.opcode(of: frame) == .binary, let chunk = AudioFrame.decode(envelope.frame)?.header["chunk"]?.intValue {
                    mirrors[stream]?.stream.publishAudio(chunk: chunk, frame: frame)
                } else {
                    mirrors[stream]?.stream.publish(frame, audience: envelope.audience)
                }
            case .end:
                guard let mirror = mirrors[stream], !mirror.stream.isEnded else { return }
                mirror.stream.finish(frame, ownerFrame: envelope.ownerFrame.map { ByteBuffer(bytes: $0) }, reason: .complete)
                mirrors[stream]?.touched = .now
                expire(&mirrors)
            case .topic:
                return
            }
        }
    }

    /// Forgets mirrors ended longer ago than the retention, or silent for longer than JetStream
    /// keeps frames (their node is gone).
    private func expire(_ mirrors: inout [String: Mirror]) {
        let now = ContinuousClock.now
        mirrors = mirrors.filter { _, mirror in
            now - mirror.touched < (mirror.stream.isEnded ? retention : maxAge)
        }
    }

    // MARK: Remote streams

    func resume(stream id: String, after: Int64, audioAfter: Int64?, ref: String, connection: ClientConnection) async -> Bool {
        let user = connection.identity.user
        return await follow(stream: id, after: after, audioAfter: audioAfter, ref: ref, connection: connection) { owner, kind in
            guard owner == user, case .reply = kind else { return false }
            return true
        }
    }

    /// What stream `id` is, as the head JetStream keeps of it says (nil when it keeps none).
    func kind(of id: String) async -> LiveStream.Kind? {
        guard let head = try? await jetStream.lastMessage(stream: BrokerSubjects.streams, subject: BrokerSubjects.head(of: id)) else { return nil }
        return StreamDescriptor.decode(head.payload)?.kind
    }

    /// Sends a member who joined a room here the turn streaming in it on another node, from its
    /// start, then live to its end.
    func catchUp(stream id: String, connection: ClientConnection) async {
        _ = await follow(stream: id, after: 0, ref: nil, connection: connection) { _, _ in true }
    }

    /// Sends `connection` the stream from token `after + 1`, from this node's copy or JetStream's,
    /// when `admits` its owner and kind; false when no node has it.
    private func follow(
        stream id: String, after: Int64, audioAfter: Int64? = nil, ref: String?, connection: ClientConnection,
        admits: (String, LiveStream.Kind) -> Bool
    ) async -> Bool {
        if let mirror = mirrors.withLock({ $0[id]?.stream }) {
            guard admits(mirror.owner, mirror.kind) else { return false }
            // A member catching up on a room's stream that it began to read as it started here
            // (its start came while it joined): it has all of it already.
            if ref == nil, hub.isSubscribed(connection.id, to: mirror.topic) { return true }
            let ack = ByteBuffer(bytes: mirror.startFrame(ref: ref))
            if mirror.resume(connection, after: after, audioAfter: audioAfter, ack: ack) == .gone, let ref {
                connection.send(LiveStream.goneFrame(ref: ref, stream: id, after: after))
            }
            return true
        }
        do {
            guard let head = try await jetStream.lastMessage(stream: BrokerSubjects.streams, subject: BrokerSubjects.head(of: id)),
                let (owner, model, kind) = StreamDescriptor.decode(head.payload), admits(owner, kind)
            else { return false }
            let ack = ByteBuffer(bytes: LiveStream.startFrame(ref: ref, id: id, model: model, kind: kind))
            let replay = RemoteReplay(connection: connection, after: after, ack: ack, ref: ref, stream: id)
            let subscription = try await jetStream.subscribeOrdered(BrokerSubjects.frames(of: id), from: 1) { replay.take($0) }
            replay.attach(subscription)
            connection.channel.closeFuture.whenComplete { _ in replay.stop() }
            return true
        } catch {
            logger.error("resuming a stream from the broker failed", metadata: ["stream": "\(id)", "error": "\(error)"])
            return false
        }
    }

    func cancel(stream id: String, user: String) async -> Bool {
        do {
            let answer = try await nats.request(BrokerSubjects.cancel(id), Array(user.utf8))
            return answer == Array("ok".utf8)
        } catch let error as NATSError where error.isNoResponders || error.isTimeout {
            return false
        } catch {
            logger.error("asking the broker to cancel a stream failed", metadata: ["stream": "\(id)", "error": "\(error)"])
            return false
        }
    }

    /// The texts of the tokens of `id` that JetStream keeps under `readers`, from token
    /// `after + 1` on, in order and without a gap (none when it no longer keeps token
    /// `after + 1`): what the stream's readers were sent after its journal's last write. Waits
    /// at most `timeout` for JetStream.
    func publishedTokens(of id: String, readers: Topic, after: Int, timeout: Duration = .seconds(5)) async -> [String] {
        let subject = BrokerSubjects.stream(id, readers: readers)
        guard let last = try? await jetStream.lastMessage(stream: BrokerSubjects.streams, subject: subject) else { return [] }
        let collected = Mutex<(tokens: [String], next: Int64, done: Bool)>(([], Int64(after) + 1, false))
        let (read, reading) = AsyncStream<Void>.makeStream()
        let subscription = try? await jetStream.subscribeOrdered(subject, from: 1) { message in
            let done = collected.withLock { c -> Bool in
                guard !c.done else { return false }
                if let envelope = try? BrokerEnvelope(decoding: message.payload), envelope.part == .token, envelope.seq == c.next,
                    let text = (try? JSONValue.parse(envelope.frame))?["text"]?.stringValue
                {
                    c.tokens.append(text)
                    c.next += 1
                }
                c.done = message.payload == last.payload
                return c.done
            }
            if done { reading.finish() }
        }
        guard let subscription else { return [] }
        await withTaskGroup(of: Void.self) { race in
            race.addTask { for await _ in read {} }
            race.addTask { try? await Task.sleep(for: timeout) }
            await race.next()
            race.cancelAll()
        }
        subscription.cancel()
        return collected.withLock { $0.tokens }
    }

    // MARK: Other cluster messages

    /// A request to the one node that serves `subject` (a room's owner); its answer.
    func request(subject: String, _ payload: [UInt8], timeout: Duration = .seconds(5)) async throws -> [UInt8] {
        try await nats.request(subject, payload, timeout: timeout)
    }

    /// Answers requests to `subject` with what `answer` returns.
    func serve(subject: String, _ answer: @escaping @Sendable ([UInt8]) async -> [UInt8]) throws -> NATSSubscription {
        try nats.subscribe(subject) { [nats] request in
            Task {
                let reply = await answer(request.payload)
                if let to = request.reply { try? nats.publish(to, reply) }
            }
        }
    }

    /// Publishes a message that is not a frame (a schedule's arrival or delivery); a failure
    /// is counted and logged like a frame's.
    func publish(subject: String, _ payload: [UInt8]) { send(subject, payload) }

    /// Receives what `publish(subject:_:)` sends, on nats.c's delivery threads.
    func subscribe(subject: String, _ handler: @escaping @Sendable (NATSMessage) -> Void) throws -> NATSSubscription {
        try nats.subscribe(subject, handler: handler)
    }

    // MARK: Users across nodes

    /// Answers another node's account deletion: `close` closes the user's sockets here and
    /// stops their replies; the answer goes once it is done.
    func serveUserClosing(_ close: @escaping @Sendable (String) async -> Void) throws {
        let subscription = try nats.subscribe(BrokerSubjects.closeAnyUser) { [nats] request in
            let user = String(decoding: request.payload, as: UTF8.self)
            Task {
                await close(user)
                if let reply = request.reply { try? nats.publish(reply, Array("closed".utf8)) }
            }
        }
        userClosing.withLock { $0 = subscription }
    }

    /// Answers another node's sign-out: `close` closes the sockets of the session signed out
    /// here and forgets what this node cached of the user's sessions; the answer goes once done.
    func serveSignOuts(_ close: @escaping @Sendable (SignOut) async -> Void) throws {
        let subscription = try nats.subscribe(BrokerSubjects.anySignOut) { [nats, logger] request in
            guard let signOut = SignOut(payload: request.payload) else {
                logger.warning("a sign-out from another node could not be read; ignored")
                return
            }
            Task {
                await close(signOut)
                if let reply = request.reply { try? nats.publish(reply, Array("closed".utf8)) }
            }
        }
        signOuts.withLock { $0 = subscription }
    }

    /// Asks the other nodes (`replies` of them) to close the sockets `signOut` ended; returns
    /// how many did within `timeout`.
    func signOutEverywhere(_ signOut: SignOut, replies: Int, timeout: Duration) async -> Int {
        do {
            return try await nats.gather(BrokerSubjects.signOut(signOut.user), signOut.payload, replies: replies, timeout: timeout).count
        } catch {
            logger.error("asking the other nodes to close a signed-out session's sockets failed", metadata: ["error": "\(error)"])
            return 0
        }
    }

    /// Asks `replies` other nodes on `subject` and returns the answers that came within `timeout`.
    func gather(subject: String, _ payload: [UInt8], replies: Int, timeout: Duration) async throws -> [[UInt8]] {
        try await nats.gather(subject, payload, replies: replies, timeout: timeout)
    }

    /// Asks the other nodes (`replies` of them) to close `user`'s sockets and stop their replies;
    /// returns how many did within `timeout`.
    func closeEverywhere(user: String, replies: Int, timeout: Duration) async -> Int {
        do {
            return try await nats.gather(BrokerSubjects.closeUser(user), Array(user.utf8), replies: replies, timeout: timeout).count
        } catch {
            logger.error("asking the other nodes to close a user's sockets failed", metadata: ["error": "\(error)"])
            return 0
        }
    }

    /// Streams of other nodes this node follows (ended ones until they expire).
    var mirrorCount: Int { mirrors.withLock { $0.count } }

    /// Connected to the NATS server now: a node cut off from it serves no other node's frames.
    var isConnected: Bool { nats.isConnected }

    /// Waits until the NATS server has every subscription and frame sent so far.
    func flush(timeout: Duration = .seconds(5)) async throws {
        let started = ContinuousClock.now
        try await nats.flush(timeout: timeout)
        roundTrips?.recordNanoseconds(Int64((ContinuousClock.now - started) / .nanoseconds(1)))
    }

    /// Publishes a probe the way frames are published (core NATS; JetStream keeps it on its
    /// own time) and reads it back from JetStream until it is there: the lag of a resume on
    /// another node behind the stream's node. Throws when it is not there within `timeout`.
    func measureJetStreamLag(timeout: Duration = .seconds(5)) async throws {
        let payload = Array("\(UInt64.random(in: 0 ... .max))".utf8)
        let started = ContinuousClock.now
        try nats.publish(probeSubject, payload)
        while ContinuousClock.now - started < timeout {
            if try await jetStream.lastMessage(stream: BrokerSubjects.streams, subject: probeSubject)?.payload == payload {
                jetStreamLag?.recordNanoseconds(Int64((ContinuousClock.now - started) / .nanoseconds(1)))
                return
            }
        }
        throw NATSError(status: "not kept within \(timeout)", action: "measuring JetStream's lag")
    }

    /// Stops following topics and closes the connection (after the sockets closed).
    func close() async {
        probe.withLock { $0 }?.cancel()
        let subscriptions = interests.withLock { interests in
            defer { interests = [:] }
            return interests.values
        }
        for subscription in subscriptions { subscription.cancel() }
        userClosing.withLock { $0 }?.cancel()
        signOuts.withLock { $0 }?.cancel()
        // The last streams' ends reach the server before the connection goes.
        try? await nats.flush(timeout: .seconds(1))
        nats.close()
        try? await threads.shutdownGracefully()
    }
}

/// A resume of a stream this node neither generates nor follows: JetStream's copy of its frames
/// (an ordered consumer, so nothing is skipped or repeated) sent to one socket, from the token
/// after `after` to its end.
final class RemoteReplay: Sendable {
    private struct State {
        var next: Int64
        var acked = false
        var done = false
        var subscription: NATSSubscription?
    }

    private let connection: ClientConnection
    private let ack: ByteBuffer
    /// The client's `stream.resume` id; nil for a room member's catch-up (nothing to answer).
    private let ref: String?
    private let stream: String
    private let after: Int64
    private let state: Mutex<State>

    init(connection: ClientConnection, after: Int64, ack: ByteBuffer, ref: String?, stream: String) {
        self.connection = connection
        self.after = after
        self.ack = ack
        self.ref = ref
        self.stream = stream
        state = Mutex(State(next: after + 1))
    }

    func attach(_ subscription: NATSSubscription) {
        let stopNow = state.withLock { s -> Bool in
            s.subscription = subscription
            return s.done
        }
        if stopNow { subscription.cancel() }
    }

    func stop() {
        state.withLock { s -> NATSSubscription? in
            s.done = true
            return s.subscription
        }?.cancel()
    }

    func take(_ message: NATSMessage) {
        guard let envelope = try? BrokerEnvelope(decoding: message.payload) else { return }
        let finished = state.withLock { s -> Bool in
            guard !s.done else { return true }
            switch envelope.part {
            case .topic:
                return false
            case .start:
                ackOnce(&s)
            case .token:
                if envelope.seq < s.next { return false }
                guard envelope.seq == s.next else {
                    // The tokens the client lacks were evicted before it came back.
                    if !s.acked, let ref { connection.send(LiveStream.goneFrame(ref: ref, stream: stream, after: after)) }
                    s.done = true
                    return true
                }
                ackOnce(&s)
                connection.send(ByteBuffer(bytes: envelope.frame))
                s.next += 1
            case .extra:
                if s.acked, envelope.audience.admits(connection) { connection.send(ByteBuffer(bytes: envelope.frame)) }
            case .end:
                ackOnce(&s)
                connection.send(ByteBuffer(bytes: envelope.frame))
                s.done = true
                return true
            }
            return false
        }
        if finished { stop() }
    }

    private func ackOnce(_ s: inout State) {
        guard !s.acked else { return }
        s.acked = true
        connection.send(ack)
    }
}

/// What a node asks of a cluster's other nodes about a user.
protocol OtherNodes: Sendable {
    /// Has every other live node close `user`'s sockets and stop their replies, and waits until
    /// they did; returns how many answered.
    func closeEverywhere(user: String) async -> Int
    /// Has every other live node close the sockets `signOut` ended, and waits until they did;
    /// returns how many answered.
    func signOutEverywhere(_ signOut: SignOut) async -> Int
}

/// A sign-out as nodes tell each other: one session of a user, or (`session` nil) every
/// session of theirs whose token was issued by `at` (Unix ms).
struct SignOut: Sendable, Equatable {
    var user: String
    var session: String?
    var at: Int64

    /// Whether a socket signed in as `identity` is ended by this sign-out.
    func ends(_ identity: Identity) -> Bool {
        guard identity.user == user else { return false }
        if let session { return identity.session == session }
        return identity.issuedAt.map { Int64($0.timeIntervalSince1970 * 1000) <= at } ?? true
    }

    var payload: [UInt8] {
        JSONValue.object([("user", .string(user)), ("session", session.map(JSONValue.string) ?? .null), ("at", .int(at))]).serialized()
    }

    init(user: String, session: String?, at: Int64) {
        self.user = user
        self.session = session
        self.at = at
    }

    init?(payload: [UInt8]) {
        guard let json = try? JSONValue.parse(payload), let user = json["user"]?.stringValue, let at = json["at"]?.intValue else { return nil }
        self.init(user: user, session: json["session"]?.stringValue, at: at)
    }
}

/// The other nodes of a cluster: how many are alive comes from their leases on the store.
struct ClusterPeers: OtherNodes {
    let broker: NATSBroker
    /// Nil only for nodes that share no store (tests): then no other node is asked.
    let store: MongoStore?
    let node: String
    var timeout: Duration = .seconds(10)

    func closeEverywhere(user: String) async -> Int {
        guard let store else { return 0 }
        let peers = (try? await store.otherLiveNodes(than: node, now: Int64(Timestamp.nowMillis())).count) ?? 0
        return await broker.closeEverywhere(user: user, replies: peers, timeout: timeout)
    }

    func signOutEverywhere(_ signOut: SignOut) async -> Int {
        guard let store else { return 0 }
        let peers = (try? await store.otherLiveNodes(than: node, now: Int64(Timestamp.nowMillis())).count) ?? 0
        return await broker.signOutEverywhere(signOut, replies: peers, timeout: timeout)
    }
}
