import Foundation
import NIOCore

// Every role below lives on its socket's event loop: the handler calls it there, and its sends
// are scheduled there.

/// One stream's token arrivals, for its inter-token gaps.
struct TokenClock {
    var last: UInt64 = 0
    var tokens = 0

    /// Records a token arriving at `nanos`: the gap since the previous one, nil for the first.
    mutating func tick(_ nanos: UInt64) -> UInt64? {
        defer {
            tokens += 1
            last = nanos
        }
        return tokens == 0 ? nil : nanos &- last
    }
}

/// Calls `send` with each scheduled time `first`, `first + interval`, … before `until`, on the
/// socket's event loop, whatever happened to earlier sends (open loop: no coordinated omission).
func openLoop(on socket: LoadSocket, first: UInt64, interval: UInt64, until: UInt64, _ send: @escaping (UInt64) -> Void) {
    guard first < until else { return }
    let loop = socket.channel.eventLoop
    let bound = NIOLoopBound(send, eventLoop: loop)
    loop.scheduleTask(deadline: .uptimeNanoseconds(first)) {
        bound.value(first)
        openLoop(on: socket, first: first + interval, interval: interval, until: until, bound.value)
    }
}

// MARK: chat

/// Sends `chat.send` on an open-loop schedule (at fixed times, whether or not replies came
/// back) and times each reply from its *scheduled* send, so a stalled server cannot hide the
/// wait it caused (no coordinated omission).
final class ChatRole: SocketRole {
    struct Track {
        var scheduled: UInt64
        var clock = TokenClock()
    }

    let clone: String
    let nominalGap: UInt64
    var pending: [Int: UInt64] = [:]  // ref number → scheduled send
    var streams: [UInt64: Track] = [:]
    var sent = 0
    let ended: Countdown

    init(clone: String, nominalGap: UInt64, ended: Countdown) {
        self.clone = clone
        self.nominalGap = nominalGap
        self.ended = ended
    }

    /// Sends a message at `first`, `first + interval`, … while before `until`.
    func schedule(on socket: LoadSocket, first: UInt64, interval: UInt64, until: UInt64) {
        openLoop(on: socket, first: first, interval: interval, until: until) { scheduled in
            let number = self.sent
            self.sent += 1
            self.pending[number] = scheduled
            socket.send(#"{"type":"chat.send","id":"m\#(number)","clone":"\#(self.clone)","text":"Tell me something short about the sea."}"#)
        }
    }

    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket) {
        switch type {
        case .token:
            guard let stream = bytes.hash(.stream), var track = streams[stream] else { return }
            // A joined frame's tokens all arrive with it.
            for _ in 0..<bytes.tokenCount {
                socket.recorder.tokens += 1
                if let gap = track.clock.tick(nanos) {
                    socket.recorder.recordGap(gap, nominal: nominalGap)
                } else {
                    socket.recorder.record(.ttft, nanos: nanos &- track.scheduled)
                }
            }
            streams[stream] = track
        case .streamStart:
            guard let ref = bytes.string(.ref), let number = Int(ref.dropFirst()), let stream = bytes.hash(.stream),
                let scheduled = pending.removeValue(forKey: number)
            else { return }
            streams[stream] = Track(scheduled: scheduled)
        case .streamEnd:
            guard let stream = bytes.hash(.stream), let track = streams.removeValue(forKey: stream) else { return }
            socket.recorder.record(.stream, nanos: nanos &- track.scheduled)
            socket.recorder.streams += 1
            ended.tick()
        case .error:
            if let ref = bytes.string(.ref), let number = Int(ref.dropFirst()), pending.removeValue(forKey: number) != nil { ended.tick() }
        default:
            break
        }
    }
}

// MARK: debate

/// A member listening to a debate: records each token's arrival, keyed by (stream, seq), so
/// the fan-out delay (arrival minus the first member's arrival) is computed after the run.
final class ListenerRole: SocketRole {
    let joined: Countdown
    let ended: Countdown

    init(joined: Countdown, ended: Countdown) {
        self.joined = joined
        self.ended = ended
    }

    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket) {
        switch type {
        case .token:
            guard let seqs = bytes.tokenSeqs else { return }
            socket.recorder.tokens += seqs.count
            guard let stream = bytes.hash(.stream) else { return }
            for seq in seqs { socket.recorder.arrivals.append((key(stream, mixing: UInt64(seq)), nanos)) }
        case .roomState:
            joined.tick()
        case .roomEvent:
            if bytes.string(.event) == "ended" { ended.tick() }
        case .streamEnd:
            socket.recorder.streams += 1
        default:
            break
        }
    }
}

/// Fan-out delay: for each token, every member's arrival minus the earliest member's.
func recordFanOut(_ total: Recorder) {
    var first: [UInt64: UInt64] = [:]
    for (key, at) in total.arrivals { first[key] = min(first[key] ?? .max, at) }
    for (key, at) in total.arrivals { total.record(.fanout, nanos: at - first[key]!) }
}

// MARK: translation

/// A member of a translation chat: says something on an open-loop schedule, and records when
/// each message (its original, or the first token of its translation) reaches it.
final class TranslatorRole: SocketRole {
    let room: String
    let user: String
    let nominalGap: UInt64
    let joined: Countdown
    var sent = 0
    /// Text of each message said → its scheduled time; joined with the entry id on the echo.
    var scheduled: [Substring: UInt64] = [:]
    var streams: [UInt64: (source: UInt64, clock: TokenClock)] = [:]

    init(room: String, user: String, nominalGap: UInt64, joined: Countdown) {
        self.room = room
        self.user = user
        self.nominalGap = nominalGap
        self.joined = joined
    }

    func schedule(on socket: LoadSocket, first: UInt64, interval: UInt64, until: UInt64) {
        openLoop(on: socket, first: first, interval: interval, until: until) { scheduled in
            let text = "m\(self.sent) from \(self.user)"
            self.sent += 1
            self.scheduled[Substring(text)] = scheduled
            socket.send(#"{"type":"room.say","id":"s\#(self.sent)","room":"\#(self.room)","text":"\#(text)"}"#)
        }
    }

    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket) {
        switch type {
        case .roomState:
            joined.tick()
        case .roomEvent:
            guard bytes.string(.event) == "said", let id = bytes.hash(.id) else { return }
            if bytes.string(.user) == Substring(user), let text = bytes.string(.text), let at = scheduled.removeValue(forKey: text) {
                socket.recorder.origins.append((id, at))
            } else {
                socket.recorder.arrivals.append((id, nanos))
            }
        case .streamStart:
            guard let stream = bytes.hash(.stream), let source = bytes.hash(.source) else { return }
            streams[stream] = (source, TokenClock())
        case .token:
            let count = bytes.tokenCount
            socket.recorder.tokens += count
            guard let stream = bytes.hash(.stream), var track = streams[stream] else { return }
            for _ in 0..<count {
                if let gap = track.clock.tick(nanos) {
                    socket.recorder.recordGap(gap, nominal: nominalGap)
                } else {
                    socket.recorder.arrivals.append((track.source, nanos))
                }
            }
            streams[stream] = track
        case .streamEnd:
            socket.recorder.streams += 1
            if let stream = bytes.hash(.stream) { streams.removeValue(forKey: stream) }
        default:
            break
        }
    }
}

/// Delivery delay: each member's first frame of a message minus the time its sender was
/// scheduled to say it.
func recordDelivery(_ total: Recorder) {
    let origins = Dictionary(total.origins, uniquingKeysWith: { a, _ in a })
    for (key, at) in total.arrivals {
        if let said = origins[key] { total.record(.delivery, nanos: at &- said) }
    }
}

// MARK: schedule

/// A user with many schedules due at one instant: counts `schedule.ok`s, then records each
/// `delivery`'s lateness against the due time (wall clock, same machine).
final class ScheduleRole: SocketRole {
    let due: Int64
    let created: Countdown
    let delivered: Countdown

    init(due: Int64, created: Countdown, delivered: Countdown) {
        self.due = due
        self.created = created
        self.delivered = delivered
    }

    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket) {
        switch type {
        case .delivery:
            let late = max(0, wallMillis() - due)
            socket.recorder.record(.delivery, nanos: UInt64(late) * 1_000_000)
            socket.recorder.streams += 1
            delivered.tick()
        case .other where bytes.starts(with: #"{"type":"schedule.ok""#.utf8):
            created.tick()
        default:
            break
        }
    }
}

/// A socket that only listens (the idle scenario).
final class IdleRole: SocketRole {
    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket) {}
}
