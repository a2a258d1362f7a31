/// Protocol version spoken by this server; sent in `welcome`.
public let parleyProtocolVersion = 1

/// Error codes of `error` frames (and of REST error bodies).
public enum ErrorCode: String, Sendable, Equatable, CaseIterable {
    case badRequest = "bad_request"
    case unauthorized
    case forbidden
    case notFound = "not_found"
    case rateLimited = "rate_limited"
    case insufficientCredits = "insufficient_credits"
    case tooLarge = "too_large"
    case providerError = "provider_error"
    case streamGone = "stream_gone"
    /// The resource is not in a state that allows the request (e.g. cancelling a fired schedule).
    case conflict
    /// A per-user quota is used up (e.g. pending schedules).
    case limitExceeded = "limit_exceeded"
    /// The caller's plan does not allow it (#27); `plan` names one that does.
    case planRequired = "plan_required"
    /// A limit the caller set on their own spending leaves too little for the request (#27).
    case spendLimit = "spend_limit"
    /// The server is shutting down and takes no new work.
    case unavailable
    case `internal`
}

/// A request the client sent over the WebSocket.
public enum ClientFrame: Sendable, Equatable {
    /// Grouped by the service that serves them, so routing is a switch the compiler checks.
    case chat(ChatFrame)
    case schedule(ScheduleFrame)
    case room(RoomFrame)

    public var id: String {
        switch self {
        case .chat(let frame): frame.id
        case .schedule(let frame): frame.id
        case .room(let frame): frame.id
        }
    }
}

/// Clone chat: a message, stopping a reply, and catching up on one.
/// `voice`: the reply is spoken too, as binary audio frames (#29).
public enum ChatFrame: Sendable, Equatable {
    /// `greeting`: which of the clone's greetings opens a new conversation (0: `first_mes`, k:
    /// the k-th of `alternate_greetings`); nil: the first.
    case send(id: String, clone: String, conversation: String?, text: String, voice: Bool = false, greeting: Int? = nil)
    /// A new reply in place of the assistant message `message` (kept as an alternative).
    case regenerate(id: String, message: String, voice: Bool = false)
    /// `text` in place of the user message `message` (kept, with its branch), and a reply to it.
    case edit(id: String, message: String, text: String, voice: Bool = false)
    case cancel(id: String, stream: String)
    /// Tokens after seq `after` and, with `audioAfter`, a voiced reply's audio chunks after that one.
    case resume(id: String, stream: String, after: Int64, audioAfter: Int64? = nil)

    public var id: String {
        switch self {
        case .send(let id, _, _, _, _, _), .regenerate(let id, _, _), .edit(let id, _, _, _), .cancel(let id, _), .resume(let id, _, _, _): id
        }
    }
}

public enum ScheduleFrame: Sendable, Equatable {
    case create(id: String, ScheduleRequest)
    case cancel(id: String, schedule: String)

    public var id: String {
        switch self {
        case .create(let id, _), .cancel(let id, _): id
        }
    }
}

public enum RoomFrame: Sendable, Equatable {
    /// `language`: the joiner's language in a translation chat (stored for later joins).
    case join(id: String, room: String, language: LanguageTag?)
    case leave(id: String, room: String)
    case say(id: String, room: String, text: String)
    case control(id: String, room: String, action: RoomAction, target: String?)

    public var id: String {
        switch self {
        case .join(let id, _, _), .leave(let id, _), .say(let id, _, _), .control(let id, _, _, _): id
        }
    }

    /// The room it is about.
    public var room: String {
        switch self {
        case .join(_, let room, _), .leave(_, let room), .say(_, let room, _), .control(_, let room, _, _): room
        }
    }
}

/// What a moderator can do to a room.
public enum RoomAction: String, Sendable, Equatable, CaseIterable {
    case start, pause, resume, next, end, mute, unmute, kick
    /// A new take of the last turn by the same clone, in its place (#24).
    case regenerate

    /// Actions that name a clone or user in `target`.
    public var needsTarget: Bool { self == .mute || self == .unmute || self == .kick }
}

/// Why a client frame was refused; becomes an `error` frame with `ref` set when the id was readable.
public struct FrameError: Error, Equatable, Sendable {
    public var ref: String?
    public var code: ErrorCode
    public var message: String
    /// For `insufficient_credits`: the balance, and what the request needed.
    public var balance: Int64?
    public var required: Int64?
    /// For `plan_required`: a plan that allows the request (nil when none does).
    public var plan: String?

    public init(ref: String?, code: ErrorCode, message: String, balance: Int64? = nil, required: Int64? = nil, plan: String? = nil) {
        self.ref = ref
        self.code = code
        self.message = message
        self.balance = balance
        self.required = required
        self.plan = plan
    }
}

public struct FrameLimits: Sendable, Equatable {
    /// Longest `chat.send` text, in characters.
    public var maxTextLength = 8_000
    public var maxIDLength = 128
    public var schedule = ScheduleLimits()
    public var rooms = RoomLimits()

    public init() {}
}

extension ClientFrame {
    /// A chat message's `text`: not blank, at most `limits.maxTextLength` characters.
    static func messageText(_ reader: inout JSONObjectReader, limits: FrameLimits, ref: String?) throws -> String {
        let text = try reader.requiredString("text")
        guard !text.trimmedWhitespace.isEmpty else { throw ValidationError("'text' must not be empty") }
        guard text.fits(characters: limits.maxTextLength) else {
            throw FrameError(ref: ref, code: .tooLarge, message: "'text' is longer than \(limits.maxTextLength) characters")
        }
        return text
    }

    /// Parses one text message. Every failure is a `FrameError` the socket can answer and survive.
    /// `now` (milliseconds) turns a schedule's `delay_ms` into a time.
    public static func parse(
        _ bytes: some Sequence<UInt8>, limits: FrameLimits = FrameLimits(), now: Int64 = Int64(Timestamp.nowMillis())
    ) throws(FrameError) -> ClientFrame {
        let value: JSONValue
        do {
            value = try JSONValue.parse(bytes, refusingRepeatedKeys: true)
        } catch {
            // A repeated member too (`HTTPRequest.json` says why).
            throw FrameError(ref: nil, code: .badRequest, message: "malformed JSON: \(error.explanation)")
        }
        guard case .object = value else {
            throw FrameError(ref: nil, code: .badRequest, message: "a frame must be a JSON object")
        }
        var ref: String?
        if case .string(let id)? = value["id"], !id.isEmpty, id.utf8.count <= limits.maxIDLength { ref = id }
        do {
            var reader = try JSONObjectReader(value, what: "frame")
            guard let type = try reader.string("type") else { throw ValidationError("missing field 'type'") }
            let id = try reader.requiredString("id")
            guard !id.isEmpty, id.utf8.count <= limits.maxIDLength else {
                throw ValidationError("'id' must be 1-\(limits.maxIDLength) bytes")
            }
            let frame: ClientFrame
            switch type {
            case "chat.send":
                let clone = try reader.requiredString("clone")
                let conversation = try reader.string("conversation")
                let text = try Self.messageText(&reader, limits: limits, ref: ref)
                let greeting = try reader.int("greeting")
                if let greeting, greeting < 0 { throw ValidationError("'greeting' must be 0 or more") }
                if greeting != nil, conversation != nil {
                    throw ValidationError("'greeting' chooses how a new conversation opens: leave out 'conversation'")
                }
                frame = .chat(
                    .send(
                        id: id, clone: clone, conversation: conversation, text: text, voice: try reader.bool("voice") ?? false,
                        greeting: greeting.map { Int(clamping: $0) }))
            case "chat.regenerate":
                let message = try reader.requiredString("message")
                frame = .chat(.regenerate(id: id, message: message, voice: try reader.bool("voice") ?? false))
            case "chat.edit":
                let message = try reader.requiredString("message")
                let text = try Self.messageText(&reader, limits: limits, ref: ref)
                frame = .chat(.edit(id: id, message: message, text: text, voice: try reader.bool("voice") ?? false))
            case "chat.cancel":
                frame = .chat(.cancel(id: id, stream: try reader.requiredString("stream")))
            case "stream.resume":
                let stream = try reader.requiredString("stream")
                guard let after = try reader.int("after") else { throw ValidationError("missing field 'after'") }
                guard after >= 0 else { throw ValidationError("'after' must be 0 or more") }
                let audioAfter = try reader.int("audio_after")
                if let audioAfter, audioAfter < 0 { throw ValidationError("'audio_after' must be 0 or more") }
                frame = .chat(.resume(id: id, stream: stream, after: after, audioAfter: audioAfter))
            case "schedule.create":
                frame = .schedule(.create(id: id, try ScheduleRequest.read(&reader, now: now, limits: limits.schedule)))
            case "schedule.cancel":
                frame = .schedule(.cancel(id: id, schedule: try reader.requiredString("schedule")))
            case "room.join":
                let room = try reader.requiredString("room")
                var language: LanguageTag?
                if let tag = try reader.string("language") {
                    guard let parsed = LanguageTag(tag) else {
                        throw ValidationError("'language' must be a BCP 47 language tag such as en, pt-BR or zh-Hant")
                    }
                    language = parsed
                }
                frame = .room(.join(id: id, room: room, language: language))
            case "room.leave":
                frame = .room(.leave(id: id, room: try reader.requiredString("room")))
            case "room.say":
                let room = try reader.requiredString("room")
                let text = try reader.requiredString("text")
                guard !text.trimmedWhitespace.isEmpty else { throw ValidationError("'text' must not be empty") }
                guard text.fits(characters: limits.rooms.maxSayLength) else {
                    throw FrameError(ref: ref, code: .tooLarge, message: "'text' is longer than \(limits.rooms.maxSayLength) characters")
                }
                frame = .room(.say(id: id, room: room, text: text))
            case "room.control":
                let room = try reader.requiredString("room")
                let actionText = try reader.requiredString("action")
                guard let action = RoomAction(rawValue: actionText) else {
                    throw ValidationError("'action' must be one of \(RoomAction.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                let target = try reader.string("target")
                if action.needsTarget, target == nil { throw ValidationError("'\(action.rawValue)' needs a 'target'") }
                frame = .room(.control(id: id, room: room, action: action, target: target))
            default:
                throw ValidationError("unknown frame type '\(type)'")
            }
            try reader.rejectUnknown()
            return frame
        } catch let error as ValidationError {
            throw FrameError(ref: ref, code: .badRequest, message: error.message)
        } catch let error as FrameError {
            throw error
        } catch {
            throw FrameError(ref: ref, code: .badRequest, message: "\(error)")
        }
    }
}

/// Encoders for every frame the server sends. Each returns the UTF-8 JSON text of one message.
public enum ServerFrame {
    /// `coalesce`: what the socket asked to have joined (`?coalesce=tokens`), when it did.
    public static func welcome(user: String, coalesce: String? = nil) -> [UInt8] {
        var pairs: [(String, JSONValue)] = [
            ("type", .string("welcome")),
            ("user", .string(user)),
            ("protocol", .int(Int64(parleyProtocolVersion))),
        ]
        if let coalesce { pairs.append(("coalesce", .string(coalesce))) }
        return JSONValue.object(pairs).serialized()
    }

    /// `schedule` is set when a scheduled message is being generated. In a translation chat,
    /// `lang` is the language the stream is written in and `source` the message it translates
    /// (whose speaker is `clone` or `user`).
    public static func streamStart(
        ref: String?, stream: String, conversation: String, clone: String?, user: String? = nil, model: String, schedule: String? = nil,
        room: String? = nil, source: String? = nil, lang: LanguageTag? = nil, message: String? = nil, parent: String? = nil
    ) -> [UInt8] {
        var pairs: [(String, JSONValue)] = [("type", .string("stream.start"))]
        if let ref { pairs.append(("ref", .string(ref))) }
        pairs += [
            ("stream", .string(stream)),
            // A room's turn belongs to the room, not to a conversation.
            room.map { ("room", .string($0)) } ?? ("conversation", .string(conversation)),
        ]
        if let clone { pairs.append(("clone", .string(clone))) }
        if let user { pairs.append(("user", .string(user))) }
        pairs.append(("model", .string(model)))
        if let schedule { pairs.append(("schedule", .string(schedule))) }
        if let source { pairs.append(("source", .string(source))) }
        if let lang { pairs.append(("lang", .string(lang.value))) }
        if let message { pairs.append(("message", .string(message))) }
        if let parent { pairs.append(("parent", .string(parent))) }
        return JSONValue.object(pairs).serialized()
    }

    public static func scheduleOK(ref: String, schedule: Schedule) -> [UInt8] {
        JSONValue.object([("type", .string("schedule.ok")), ("ref", .string(ref)), ("schedule", schedule.json)]).serialized()
    }

    public static func scheduleCancelled(ref: String, schedule: Schedule) -> [UInt8] {
        JSONValue.object([("type", .string("schedule.cancelled")), ("ref", .string(ref)), ("schedule", schedule.json)]).serialized()
    }

    /// A schedule could not fire (its clone or conversation was deleted, or credits ran out).
    public static func scheduleFailed(schedule: Schedule) -> [UInt8] {
        JSONValue.object([("type", .string("schedule.failed")), ("schedule", schedule.json)]).serialized()
    }

    /// A scheduled message, stored in `conversation`; sent to every open socket of the owner, or
    /// on their next connect.
    /// A conversation got its generated title (#24).
    public static func conversationTitle(conversation: String, title: String) -> [UInt8] {
        JSONValue.object([("type", .string("conversation.title")), ("conversation", .string(conversation)), ("title", .string(title))])
            .serialized()
    }

    public static func delivery(schedule: String, conversation: String, message: Message) -> [UInt8] {
        JSONValue.object([
            ("type", .string("delivery")), ("schedule", .string(schedule)), ("conversation", .string(conversation)),
            ("message", message.json),
        ]).serialized()
    }

    /// The hot path: one per generated token, written without building a JSON tree.
    public static func token(stream: String, seq: Int64, text: Substring) -> [UInt8] {
        var out = [UInt8]()
        token(stream: stream, seq: seq, text: text, into: &out)
        return out
    }

    /// Writes a token frame into `out` (emptied first, its capacity kept for the next one).
    public static func token(stream: String, seq: Int64, text: Substring, into out: inout [UInt8]) {
        out.removeAll(keepingCapacity: true)
        out.reserveCapacity(48 + stream.utf8.count + text.utf8.count)
        out.append(contentsOf: #"{"type":"token","stream":"#.utf8)
        JSONString.append(stream, to: &out)
        out.append(contentsOf: #","seq":"#.utf8)
        out.append(contentsOf: String(seq).utf8)
        out.append(contentsOf: #","text":"#.utf8)
        JSONString.append(String(text), to: &out)
        out.append(UInt8(ascii: "}"))
    }

    /// `cost` is what the stream charged in total; `balance` the payer's balance after it (both
    /// left out of the frame other members of a room receive).
    /// `audio`: what a voiced reply's voice did (#29).
    public static func streamEnd(
        stream: String, reason: StreamEndReason, usage: Usage, message: String?, cost: Int64?, balance: Int64?, audio: JSONValue? = nil
    ) -> [UInt8] {
        var pairs: [(String, JSONValue)] = [
            ("type", .string("stream.end")),
            ("stream", .string(stream)),
            ("reason", .string(reason.rawValue)),
            ("usage", usage.json),
        ]
        if let message { pairs.append(("message", .string(message))) }
        if let cost { pairs.append(("cost", .int(cost))) }
        if let balance { pairs.append(("balance", .int(balance))) }
        if let audio { pairs.append(("audio", audio)) }
        return JSONValue.object(pairs).serialized()
    }

    /// A stream stopped because the next token was not affordable; for a room, also a turn that
    /// could not start at all (no `stream` then).
    public static func paywall(stream: String?, balance: Int64, required: Int64, room: String? = nil) -> [UInt8] {
        var pairs: [(String, JSONValue)] = [("type", .string("paywall"))]
        if let stream { pairs.append(("stream", .string(stream))) }
        if let room { pairs.append(("room", .string(room))) }
        pairs += [("balance", .int(balance)), ("required", .int(required))]
        return JSONValue.object(pairs).serialized()
    }

    /// The answer to `room.join`: everything a late joiner needs; the turn being streamed follows
    /// as `stream.start` and its tokens so far, then live.
    /// `transcript` is as the joiner reads it (see `TranslationChat.view` for translation chats);
    /// `members` the users listed to the joiner, `memberCount` how many users are in the room.
    public static func roomState(
        ref: String, room: Room, members: [String], memberCount: Int, transcript: [JSONValue], speaker: String?, stream: String?
    ) -> [UInt8] {
        JSONValue.object([
            ("type", .string("room.state")), ("ref", .string(ref)), ("room", room.json),
            ("members", .array(members.map(JSONValue.string))), ("member_count", .int(Int64(memberCount))),
            ("speaker", speaker.map(JSONValue.string) ?? .null),
            ("stream", stream.map(JSONValue.string) ?? .null),
            ("transcript", .array(transcript)),
        ]).serialized()
    }

    /// Something happened in a room; `fields` are the event's own (`user`, `clone`, `entry`…).
    public static func roomEvent(room: String, event: String, _ fields: [(String, JSONValue)] = []) -> [UInt8] {
        JSONValue.object([("type", .string("room.event")), ("room", .string(room)), ("event", .string(event))] + fields).serialized()
    }

    public static func error(
        ref: String?, code: ErrorCode, message: String, balance: Int64? = nil, required: Int64? = nil, plan: String? = nil
    ) -> [UInt8] {
        var pairs: [(String, JSONValue)] = [("type", .string("error"))]
        if let ref { pairs.append(("ref", .string(ref))) }
        pairs += [("code", .string(code.rawValue)), ("message", .string(message))]
        if let balance { pairs.append(("balance", .int(balance))) }
        if let required { pairs.append(("required", .int(required))) }
        if let plan { pairs.append(("plan", .string(plan))) }
        return JSONValue.object(pairs).serialized()
    }

    public static func error(_ error: FrameError) -> [UInt8] {
        Self.error(ref: error.ref, code: error.code, message: error.message, balance: error.balance, required: error.required, plan: error.plan)
    }
}
