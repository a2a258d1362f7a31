import NIOCore
import ParleyCore
import Synchronization

/// A reply being streamed (or recently ended): its frames, published to its topic, and the last
/// tokens kept for `stream.resume`. Every publish happens under the stream's lock, so a resume's
/// replay and the live frames that follow it reach a socket in seq order with no gap and no
/// duplicate.
final class LiveStream: Sendable {
    /// What a stream generates, and so what its `stream.start` says.
    enum Kind: Sendable, Equatable {
        /// A clone's reply in a conversation; `schedule` when a scheduled message generates it;
        /// `message` is the id it will be stored under, `parent` the message it answers.
        case reply(conversation: String, clone: String, schedule: String?, message: String? = nil, parent: String? = nil)
        /// A clone's turn in a debate room.
        case debateTurn(room: String, clone: String)
        /// Translation chats: a clone's reply written in `lang` (`source` names the reply itself,
        /// so readers group it with its translations).
        case roomReply(room: String, clone: String, lang: LanguageTag, source: String)
        /// Translation chats: the message `source`, said by `speaker`, translated into `lang`.
        case translation(room: String, lang: LanguageTag, source: String, speaker: Speaker)
    }

    enum Speaker: Sendable, Equatable {
        case clone(String)
        case user(String)
    }

    let id: String
    /// Who pays for the stream, and who may resume or cancel it.
    let owner: String
    let model: String
    let kind: Kind

    /// The conversation, or the room, the stream belongs to.
    var conversation: String { kind.conversation }
    /// The clone that speaks, nil when a person's message is translated.
    var clone: String? { kind.clone }
    var room: String? { kind.room }
    /// A chat reply's conversation; nil for a room's streams (whose `conversation` is the room).
    var chatConversation: String? { room == nil ? conversation : nil }
    var schedule: String? { kind.schedule }
    /// Translation chats: the language the stream is written in.
    var lang: LanguageTag? { kind.lang }
    /// Translation chats: the message the stream translates (or, for a reply, the reply itself).
    var source: String? { kind.source }

    /// The answer to a resume whose tokens after `after` were evicted (here or in JetStream).
    static func goneFrame(ref: String, stream: String, after: Int64) -> [UInt8] {
        ServerFrame.error(ref: ref, code: .streamGone, message: "tokens after seq \(after) of stream \(stream) are no longer buffered")
    }

    enum ResumeOutcome: Equatable {
        /// Replayed `count` tokens; `ended` tells whether `stream.end` was replayed too.
        case replayed(count: Int, ended: Bool)
        /// Tokens after `after` were already evicted from the history.
        case gone
    }

    private struct State {
        var history: StreamHistory
        /// A voiced reply's audio chunks, for resumes that ask for them (#29).
        var audio: AudioHistory?
        var startFrame: ByteBuffer?
        var endFrame: ByteBuffer?
        /// The payer's `stream.end` of a room's stream, when it differs from `endFrame`.
        var ownerEndFrame: ByteBuffer?
        var endedAt: ContinuousClock.Instant?
        var stopReason: StreamEndReason?
        var task: Task<Void, Never>?
        /// Uptime nanoseconds of `stream.start` and of the last token, for the latency metrics.
        var startedAt: UInt64?
        var lastTokenAt: UInt64 = 0
    }

    /// Its frames go here; its readers are the topic's subscribers.
    let topic: Topic
    /// Whose subscribers read it from its start (on every node, through a broker between nodes).
    let readers: [Topic]
    /// A room's stream: the room's frame number its start takes (`LiveRoom.numberStream`), so a
    /// member joining on another node as of an earlier frame follows it; 0 otherwise.
    let roomSeq: Int64
    private let broker: any Broker
    private let hub: SocketHub
    private let state: Mutex<State>
    private let metrics: StreamMetrics?
    /// The most audio bytes kept for resumes; older chunks are evicted first.
    private let audioBufferBytes: Int

    /// A stream read by every socket subscribed to one of `readers` now (and by whoever resumes
    /// it later); all its frames go through `broker`.
    init(
        id: String, owner: String, model: String, kind: Kind, bufferCapacity: Int, readers: [Topic], broker: any Broker, hub: SocketHub,
        metrics: StreamMetrics? = nil, roomSeq: Int64 = 0, audioBufferBytes: Int = 2 << 20
    ) {
        self.audioBufferBytes = audioBufferBytes
        self.id = id
        self.roomSeq = roomSeq
        self.metrics = metrics
        self.model = model
        self.owner = owner
        self.kind = kind
        self.broker = broker
        self.hub = hub
        topic = .stream(id)
        self.readers = readers
        state = Mutex(State(history: StreamHistory(capacity: bufferCapacity, stream: id)))
        hub.subscribe(subscribersOf: readers, to: topic)
    }

    var isEnded: Bool { state.withLock { $0.endedAt != nil } }
    var endedAt: ContinuousClock.Instant? { state.withLock { $0.endedAt } }
    var stopReason: StreamEndReason? { state.withLock { $0.stopReason } }

    /// The `stream.start` frame of this stream, answering request `ref`.
    func startFrame(ref: String?) -> [UInt8] { Self.startFrame(ref: ref, id: id, model: model, kind: kind) }

    /// The `stream.start` frame of a stream known by its description (one another node runs).
    static func startFrame(ref: String?, id: String, model: String, kind: Kind) -> [UInt8] {
        var user: String?
        if case .translation(_, _, _, .user(let speaker)) = kind { user = speaker }
        return ServerFrame.streamStart(
            ref: ref, stream: id, conversation: kind.conversation, clone: kind.clone, user: user, model: model,
            schedule: kind.schedule, room: kind.room, source: kind.source, lang: kind.lang, message: kind.message, parent: kind.parent)
    }

    /// Sends `stream.start` to every reader.
    func start(_ frame: ByteBuffer) {
        state.withLock { s in
            if s.startedAt == nil {
                s.startedAt = NIODeadline.now().uptimeNanoseconds
                metrics?.active.increment()
            }
            s.startFrame = frame
            broker.streamStarted(self, frame: frame)
        }
    }

    /// Sends one token frame (seq `seq`, which must follow the last) and keeps it for resumes.
    func publish(seq: Int64, frame: ByteBuffer) {
        state.withLock { s in
            if let metrics {
                let now = NIODeadline.now().uptimeNanoseconds
                metrics.tokens.increment()
                if seq == 1, let started = s.startedAt {
                    metrics.firstToken.recordNanoseconds(Int64(now - started))
                } else if seq > 1 {
                    metrics.interToken.recordNanoseconds(Int64(now - s.lastTokenAt))
                }
                s.lastTokenAt = now
            }
            let layout = s.history.append(seq: seq, frame: frame)
            broker.streamToken(self, seq: seq, frame: frame, layout: layout)
        }
    }

    /// Sends a voiced reply's audio chunk `chunk` (numbered from 1, in order) and keeps it for
    /// resumes that ask for audio.
    func publishAudio(chunk: Int64, frame: ByteBuffer) {
        state.withLock { s in
            guard s.endedAt == nil else { return }
            if s.audio == nil { s.audio = AudioHistory(capacityBytes: audioBufferBytes) }
            s.audio!.append(chunk: chunk, frame: frame)
            broker.streamExtra(self, frame: frame, audience: .everyone)
        }
    }

    /// Sends `stream.end` (which says `reason`); later resumes replay it. With `ownerFrame`, the
    /// owner's sockets get that one instead (a room's stream: only the payer sees what it cost and
    /// their balance).
    func finish(_ frame: ByteBuffer, ownerFrame: ByteBuffer? = nil, reason: StreamEndReason) {
        state.withLock { s in
            if s.startedAt != nil, s.endFrame == nil { metrics?.end(reason) }
            s.endFrame = frame
            s.ownerEndFrame = ownerFrame
            s.endedAt = .now
            s.task = nil
            broker.streamEnded(self, frame: frame, ownerFrame: ownerFrame)
            hub.close(topic)
        }
    }

    /// Publishes an extra frame, ordered with the stream's own frames: to its readers (or those
    /// of them `audience` admits), or to another topic (a room's payer who does not read it).
    func publish(_ frame: ByteBuffer, to topic: Topic? = nil, audience: Audience = .everyone) {
        state.withLock { _ in
            if let topic, topic != self.topic {
                broker.publish(frame, to: topic, audience: audience)
            } else {
                broker.streamExtra(self, frame: frame, audience: audience)
            }
        }
    }

    /// What a stream has published so far, as it keeps it.
    struct Published {
        var start: ByteBuffer?
        /// The tokens it still keeps.
        var history: StreamHistory
        var end: ByteBuffer?
        var ownerEnd: ByteBuffer?
    }

    /// Runs `body` under the stream's lock with what it published so far, so that frames a
    /// broker sends again (`NATSBroker` after a NATS outage) come before its next frame.
    func withPublished<R>(_ body: (Published) -> R) -> R {
        state.withLock { s in
            body(Published(start: s.startFrame, history: s.history, end: s.endFrame, ownerEnd: s.ownerEndFrame))
        }
    }

    /// Replays tokens with seq > `after`, with `audioAfter` the audio chunks after that one (and
    /// `stream.end` if ended) to `connection`, then keeps it subscribed while the stream runs.
    /// `ack` is sent first. Gone when either was evicted.
    func resume(_ connection: ClientConnection, after: Int64, audioAfter: Int64? = nil, ack: ByteBuffer) -> ResumeOutcome {
        state.withLock { s in
            guard case .frames(let missed) = s.history.replay(after: after) else { return .gone }
            var audio: ArraySlice<ByteBuffer> = []
            if let audioAfter, let kept = s.audio {
                guard case .frames(let chunks) = kept.replay(after: audioAfter) else { return .gone }
                audio = chunks
            }
            connection.send(ack)
            for frame in missed { connection.send(frame) }
            for frame in audio { connection.send(frame) }
            if let end = s.endFrame {
                connection.send(end)
                return .replayed(count: missed.count, ended: true)
            }
            hub.subscribe(connection, to: topic)
            return .replayed(count: missed.count, ended: false)
        }
    }

    func unsubscribe(_ connectionID: String) {
        hub.unsubscribe(connectionID, from: topic)
    }

    /// Adopts the generating task, so `stop` can cancel it. A stop that came first cancels it now.
    func attach(_ task: Task<Void, Never>) {
        let cancelNow = state.withLock { s -> Bool in
            guard s.endedAt == nil else { return false }
            s.task = task
            return s.stopReason != nil
        }
        if cancelNow { task.cancel() }
    }

    /// Asks generation to stop; the first reason given is the one reported. Returns the task to
    /// await for the stream's end, nil when it already ended.
    @discardableResult
    func stop(_ reason: StreamEndReason) -> Task<Void, Never>? {
        let task = state.withLock { s -> Task<Void, Never>? in
            guard s.endedAt == nil else { return nil }
            if s.stopReason == nil { s.stopReason = reason }
            return s.task
        }
        task?.cancel()
        return task
    }

    var task: Task<Void, Never>? { state.withLock { $0.task } }
}

extension LiveStream.Kind {
    /// The conversation, or the room, the stream belongs to.
    var conversation: String {
        switch self {
        case .reply(let conversation, _, _, _, _): conversation
        case .debateTurn(let room, _), .roomReply(let room, _, _, _), .translation(let room, _, _, _): room
        }
    }

    /// The clone that speaks, nil when a person's message is translated.
    var clone: String? {
        switch self {
        case .reply(_, let clone, _, _, _), .debateTurn(_, let clone), .roomReply(_, let clone, _, _): clone
        case .translation(_, _, _, .clone(let clone)): clone
        case .translation(_, _, _, .user): nil
        }
    }

    var room: String? {
        switch self {
        case .reply: nil
        case .debateTurn(let room, _), .roomReply(let room, _, _, _), .translation(let room, _, _, _): room
        }
    }

    var schedule: String? {
        if case .reply(_, _, let schedule, _, _) = self { return schedule }
        return nil
    }

    /// A conversation's reply: the id it will be stored under.
    var message: String? {
        if case .reply(_, _, _, let message, _) = self { return message }
        return nil
    }

    /// A conversation's reply: the message it answers.
    var parent: String? {
        if case .reply(_, _, _, _, let parent) = self { return parent }
        return nil
    }

    /// Translation chats: the language the stream is written in.
    var lang: LanguageTag? {
        switch self {
        case .roomReply(_, _, let lang, _), .translation(_, let lang, _, _): lang
        case .reply, .debateTurn: nil
        }
    }

    /// Translation chats: the message the stream translates (or, for a reply, the reply itself).
    var source: String? {
        switch self {
        case .roomReply(_, _, _, let source), .translation(_, _, let source, _): source
        case .reply, .debateTurn: nil
        }
    }
}
