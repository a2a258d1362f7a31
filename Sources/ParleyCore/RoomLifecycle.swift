/// What a moderator's `room.control` does to a room, decided without I/O: the room after it, the
/// event members are told, and what the live room must carry out. A room goes open → running ⇄
/// paused → ended (ended from any state); a translation chat has no turns, so only end, mute,
/// unmute and kick apply to it.
public struct RoomControl: Sendable, Equatable {
    /// The room after the action (`updatedAt` set).
    public var room: Room
    /// The `room.event` members get: started, resumed, paused, ended, next, muted, unmuted,
    /// kicked, regenerating.
    public var event: String
    /// What the event names after `by`: `("clone", id)` or `("user", id)`.
    public var subject: Subject?
    /// Stop the turn being streamed (after the token being sent).
    public var stopsTurn = false
    /// Stop every stream of the room (its turn, translations, replies).
    public var stopsAllStreams = false
    /// Run the turn loop (unless one runs).
    public var startsLoop = false
    /// The clone that speaks next, chosen by the moderator or skipping the cut-short speaker.
    public var nextSpeaker: String?
    /// The user whose sockets leave the room.
    public var kickedUser: String?
    /// Run the last turn again, by its clone, in its place: the live room finds that turn.
    public var regeneratesLastTurn = false

    public enum Subject: Sendable, Equatable {
        case clone(String)
        case user(String)
    }
}

public enum RoomLifecycle {
    /// The outcome of `action` (with its `target`) on `room`, whose turn `speaking` (a clone id)
    /// is streaming, at `now`; or the error the moderator is answered with.
    public static func apply(_ action: RoomAction, target: String?, to room: Room, speaking: String?, now: Int64) -> Result<RoomControl, FrameError> {
        var room = room
        let id = room.id
        func refuse(_ code: ErrorCode, _ message: String) -> Result<RoomControl, FrameError> {
            .failure(FrameError(ref: nil, code: code, message: message))
        }
        let notRunning = "room \(id) is \(room.status.rawValue), not running"
        if room.kind == .translation, [.start, .pause, .resume, .next, .regenerate].contains(action) {
            return refuse(.badRequest, "a translation chat has no turns to \(action.rawValue); its owner may end, mute, unmute and kick")
        }
        var control = RoomControl(room: room, event: "")
        switch action {
        case .start, .resume:
            let from: Room.Status = action == .start ? .open : .paused
            guard room.status == from else {
                return refuse(.conflict, "room \(id) is \(room.status.rawValue); \(action.rawValue) needs it \(from.rawValue)")
            }
            room.status = .running
            control.startsLoop = true
            control.event = action == .start ? "started" : "resumed"
        case .pause:
            guard room.status == .running else { return refuse(.conflict, notRunning) }
            room.status = .paused
            control.stopsTurn = true
            control.event = "paused"
        case .end:
            guard room.status != .ended else { return refuse(.conflict, "room \(id) already ended") }
            room.status = .ended
            control.stopsAllStreams = true
            control.event = "ended"
        case .next:
            guard room.status == .running else { return refuse(.conflict, notRunning) }
            if let target {
                guard room.debater(target) != nil else { return refuse(.notFound, "no clone \(target) in room \(id)") }
                control.nextSpeaker = target
                control.subject = .clone(target)
            } else if room.policy == .moderator {
                return refuse(.badRequest, "with turn_policy moderator, 'next' needs a 'target' clone")
            } else if let speaking {
                // Skip the speaker: without this a cut-short turn would be given back to it.
                control.nextSpeaker = TurnTaking.after(speaking, in: room)
            }
            control.stopsTurn = true
            control.startsLoop = true
            control.event = "next"
        case .mute, .unmute:
            guard let target else { return refuse(.badRequest, "\(action.rawValue) needs a 'target'") }
            guard room.debater(target) != nil || target != room.owner else { return refuse(.badRequest, "the moderator cannot be muted") }
            if action == .mute {
                if !room.muted.contains(target) { room.muted.append(target) }
            } else {
                room.muted.removeAll { $0 == target }
            }
            control.subject = room.debater(target) != nil ? .clone(target) : .user(target)
            control.event = action == .mute ? "muted" : "unmuted"
            control.startsLoop = action == .unmute && room.status == .running
        case .regenerate:
            // A running or paused room, between turns: a paused one runs that one turn and stays
            // paused. The moderator pauses a turn that streams (stored, cut short) to regenerate it.
            guard room.status == .running || room.status == .paused else {
                return refuse(.conflict, "room \(id) is \(room.status.rawValue); regenerate needs it running or paused")
            }
            guard speaking == nil else { return refuse(.conflict, "a turn is streaming in room \(id); pause the room to regenerate it") }
            control.regeneratesLastTurn = true
            control.startsLoop = true
            control.event = "regenerating"
        case .kick:
            guard let target else { return refuse(.badRequest, "kick needs a 'target'") }
            guard target != room.owner else { return refuse(.badRequest, "the moderator cannot be kicked") }
            if !room.kicked.contains(target) { room.kicked.append(target) }
            control.kickedUser = target
            control.subject = .user(target)
            control.event = "kicked"
        }
        room.updatedAt = now
        control.room = room
        return .success(control)
    }
}
