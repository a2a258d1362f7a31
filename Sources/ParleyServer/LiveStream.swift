import NIOCore
import ParleyCore
import Synchronization

/// A reply being streamed (or recently ended): who receives its frames, and the last tokens kept
/// for `stream.resume`. All frame writes happen under the stream's lock, so a resume's replay and
/// the live frames that follow it reach a socket in seq order with no gap and no duplicate.
final class LiveStream: Sendable {
    /// What a stream generates, and so what its `stream.start` says.
    enum Kind: Sendable, Equatable {
        /// A clone's reply in a conversation; `schedule` when a scheduled message generates it.
        case reply(conversation: String, clone: String, schedule: String?)
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
    var conversation: String {
        switch kind {
        case .reply(let conversation, _, _): conversation
        case .debateTurn(let room, _), .roomReply(let room, _, _, _), .translation(let room, _, _, _): room
        }
    }

    /// The clone that speaks, nil when a person's message is translated.
    var clone: String? {
        switch kind {
        case .reply(_, let clone, _), .debateTurn(_, let clone), .roomReply(_, let clone, _, _): clone
        case .translation(_, _, _, .clone(let clone)): clone
        case .translation(_, _, _, .user): nil
        }
    }

    var room: String? {
        switch kind {
        case .reply: nil
        case .debateTurn(let room, _), .roomReply(let room, _, _, _), .translation(let room, _, _, _): room
        }
    }

    var schedule: String? {
        if case .reply(_, _, let schedule) = kind { return schedule }
        return nil
    }

    /// Translation chats: the language the stream is written in.
    var lang: LanguageTag? {
        switch kind {
        case .roomReply(_, _, let lang, _), .translation(_, let lang, _, _): lang
        case .reply, .debateTurn: nil
        }
    }

    /// Translation chats: the message the stream translates (or, for a reply, the reply itself).
    var source: String? {
        switch kind {
        case .roomReply(_, _, _, let source), .translation(_, _, let source, _): source
        case .reply, .debateTurn: nil
        }
    }

    enum ResumeOutcome: Equatable {
        /// Replayed `count` tokens; `ended` tells whether `stream.end` was replayed too.
        case replayed(count: Int, ended: Bool)
        /// Tokens after `after` were already evicted from the buffer.
        case gone
    }

    private struct State {
        var subscribers: [String: ClientConnection] = [:]
        /// Encoded token frames; `buffer[i]` holds seq `firstBufferedSeq + i`.
        var buffer = CircularBuffer<ByteBuffer>()
        var firstBufferedSeq: Int64 = 1
        var lastSeq: Int64 = 0
        var endFrame: ByteBuffer?
        var endedAt: ContinuousClock.Instant?
        var stopReason: StreamEndReason?
        var task: Task<Void, Never>?
        /// Uptime nanoseconds of `stream.start` and of the last token, for the latency metrics.
        var startedAt: UInt64?
        var lastTokenAt: UInt64 = 0
    }

    private let capacity: Int
    private let state: Mutex<State>
    private let metrics: StreamMetrics?

    init(id: String, owner: String, model: String, kind: Kind, bufferCapacity: Int, subscribers: [ClientConnection], metrics: StreamMetrics? = nil) {
        self.id = id
        self.metrics = metrics
        self.model = model
        self.owner = owner
        self.kind = kind
        self.capacity = max(1, bufferCapacity)
        var state = State()
        for connection in subscribers { state.subscribers[connection.id] = connection }
        state.buffer.reserveCapacity(min(64, capacity))
        self.state = Mutex(state)
    }

    var isEnded: Bool { state.withLock { $0.endedAt != nil } }
    var endedAt: ContinuousClock.Instant? { state.withLock { $0.endedAt } }
    var stopReason: StreamEndReason? { state.withLock { $0.stopReason } }

    /// The `stream.start` frame of this stream, answering request `ref`.
    func startFrame(ref: String?) -> [UInt8] {
        var user: String?
        if case .translation(_, _, _, .user(let speaker)) = kind { user = speaker }
        return ServerFrame.streamStart(ref: ref, stream: id, conversation: conversation, clone: clone, user: user, model: model,
                                       schedule: schedule, room: room, source: source, lang: lang)
    }

    /// Sends `stream.start` to every subscriber.
    func start(_ frame: ByteBuffer) {
        state.withLock { s in
            if s.startedAt == nil {
                s.startedAt = NIODeadline.now().uptimeNanoseconds
                metrics?.active.increment()
            }
            broadcast(frame, &s)
        }
    }

    /// Sends one token frame (seq `seq`, which must follow the last) and keeps it for resumes.
    func publish(seq: Int64, frame: ByteBuffer) {
        state.withLock { s in
            precondition(seq == s.lastSeq + 1, "token seqs must be contiguous")
            s.lastSeq = seq
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
            if s.buffer.count == capacity {
                s.buffer.removeFirst()
                s.firstBufferedSeq += 1
            }
            s.buffer.append(frame)
            broadcast(frame, &s)
        }
    }

    /// Sends `stream.end` (which says `reason`); later resumes replay it. With `ownerFrame`, the
    /// owner's sockets get that one instead (a room's stream: only the payer sees what it cost and
    /// their balance).
    func finish(_ frame: ByteBuffer, ownerFrame: ByteBuffer? = nil, reason: StreamEndReason) {
        state.withLock { s in
            if s.startedAt != nil, s.endFrame == nil { metrics?.end(reason) }
            s.endFrame = frame
            s.endedAt = .now
            s.task = nil
            if let ownerFrame {
                let owners = s.subscribers.values.filter { $0.identity.user == owner }
                for connection in owners { s.subscribers.removeValue(forKey: connection.id) }
                FanOut.send(ownerFrame, to: owners.filter(\.isActive))
            }
            broadcast(frame, &s)
            s.subscribers.removeAll()
        }
    }

    /// Sends an extra frame to every subscriber, ordered with the stream's own frames.
    func broadcast(_ frame: ByteBuffer) {
        state.withLock { s in broadcast(frame, &s) }
    }

    /// Sends an extra frame to one subscriber, ordered with the stream's own frames.
    func send(_ frame: ByteBuffer, to connection: ClientConnection) {
        state.withLock { _ in connection.send(frame) }
    }

    /// Replays tokens with seq > `after` (and `stream.end` if ended) to `connection`, then keeps
    /// it subscribed while the stream runs. `ack` is sent first.
    func resume(_ connection: ClientConnection, after: Int64, ack: ByteBuffer) -> ResumeOutcome {
        state.withLock { s in
            // Tokens after `after` must all still be buffered.
            if after + 1 < s.firstBufferedSeq { return .gone }
            connection.send(ack)
            var count = 0
            if after < s.lastSeq {
                let skip = Int(max(0, after + 1 - s.firstBufferedSeq))
                for index in skip..<s.buffer.count {
                    connection.send(s.buffer[s.buffer.index(s.buffer.startIndex, offsetBy: index)])
                    count += 1
                }
            }
            if let end = s.endFrame {
                connection.send(end)
                return .replayed(count: count, ended: true)
            }
            s.subscribers[connection.id] = connection
            return .replayed(count: count, ended: false)
        }
    }

    func unsubscribe(_ connectionID: String) {
        state.withLock { _ = $0.subscribers.removeValue(forKey: connectionID) }
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

    private func broadcast(_ frame: ByteBuffer, _ s: inout State) {
        // A chat reply has one subscriber: no array to build per token.
        if s.subscribers.count == 1, let (key, only) = s.subscribers.first {
            if only.isActive { only.send(frame) } else { s.subscribers.removeValue(forKey: key) }
            return
        }
        var active: [ClientConnection] = []
        active.reserveCapacity(s.subscribers.count)
        for (key, connection) in s.subscribers {
            if connection.isActive {
                active.append(connection)
            } else {
                s.subscribers.removeValue(forKey: key)
            }
        }
        FanOut.send(frame, to: active, delay: metrics?.fanOutDelay)
    }
}
