/// A message a clone sends later: fixed text, or a reply generated from a prompt at firing time.
///
/// Life cycle (every arrow is one conditional, atomic store update):
/// `pending` → `firing` (claimed; the message and stream ids are fixed here) → `fired` (the
/// message is stored in the conversation) → `delivered` (a socket of the owner received it).
/// `pending` → `cancelled` by the owner; `firing` → `failed` when the clone, the conversation or
/// the credits are gone.
public struct Schedule: Sendable, Equatable {
    public enum Status: String, Sendable, Equatable, CaseIterable {
        case pending, firing, fired, delivered, cancelled, failed
    }

    public enum Content: Sendable, Equatable {
        /// The clone writes about this when the schedule fires (a metered, streamed reply).
        case prompt(String)
        /// This exact text is sent.
        case text(String)
    }

    public var id: String
    public var owner: String
    public var clone: String
    /// The conversation it goes to; when created without one, a new conversation is made when
    /// it fires and its id is recorded here.
    public var conversation: String?
    /// When it fires, in milliseconds since the epoch.
    public var at: Int64
    public var content: Content
    public var status: Status
    public var createdAt: Int64
    public var updatedAt: Int64
    /// The id of the message it stores; fixed when it starts firing, so a retry after a crash
    /// stores the same message (once) and charges the same ledger entries (once).
    public var message: String?
    /// Why it failed, for the owner.
    public var failure: String?

    public init(
        id: String, owner: String, clone: String, conversation: String?, at: Int64, content: Content, status: Status,
        createdAt: Int64, updatedAt: Int64, message: String? = nil, failure: String? = nil
    ) {
        self.id = id
        self.owner = owner
        self.clone = clone
        self.conversation = conversation
        self.at = at
        self.content = content
        self.status = status
        self.createdAt = createdAt
        self.updatedAt = updatedAt
        self.message = message
        self.failure = failure
    }

    /// The stream that generates a prompted schedule's message: derived from the message id so a
    /// retried firing reuses its ledger ids.
    public var streamID: String? {
        message.map { "st_" + $0.dropFirst("msg_".count) }
    }

    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("id", .string(id)),
            ("clone", .string(clone)),
            ("conversation", conversation.map(JSONValue.string) ?? .null),
            ("at", .string(Timestamp.rfc3339(millis: at))),
            ("status", .string(status.rawValue)),
        ]
        switch content {
        case .prompt(let prompt): pairs.append(("prompt", .string(prompt)))
        case .text(let text): pairs.append(("text", .string(text)))
        }
        pairs.append(("created_at", .string(Timestamp.rfc3339(millis: createdAt))))
        if let message { pairs.append(("message", .string(message))) }
        if let failure { pairs.append(("failure", .string(failure))) }
        return .object(pairs)
    }
}

/// How far ahead and how much may be scheduled.
public struct ScheduleLimits: Sendable, Equatable {
    /// Furthest `at` from now.
    public var maxAheadMillis: Int64 = 366 * 24 * 3_600_000
    /// Pending schedules one user may hold.
    public var maxPendingPerUser = 100
    /// Longest prompt or text, in characters.
    public var maxTextLength = 8_000

    public init() {}
}

/// The fields of `schedule.create` after validation.
public struct ScheduleRequest: Sendable, Equatable {
    public var clone: String
    public var conversation: String?
    public var at: Int64
    public var content: Schedule.Content

    public init(clone: String, conversation: String?, at: Int64, content: Schedule.Content) {
        self.clone = clone
        self.conversation = conversation
        self.at = at
        self.content = content
    }

    /// Reads `clone`, `conversation?`, exactly one of `at` (RFC 3339) / `delay_ms`, and exactly one
    /// of `prompt` / `text` from `reader`; `now` is the current time in milliseconds.
    public static func read(_ reader: inout JSONObjectReader, now: Int64, limits: ScheduleLimits) throws(ValidationError) -> ScheduleRequest {
        let clone = try reader.requiredString("clone")
        let conversation = try reader.string("conversation")
        let atText = try reader.string("at")
        let delay = try reader.int("delay_ms")
        let at: Int64
        switch (atText, delay) {
        case (let text?, nil):
            guard let millis = RFC3339.parse(text) else {
                throw ValidationError("'at' must be an RFC 3339 time with a zone, e.g. 2026-11-23T08:00:00Z")
            }
            guard millis > now else { throw ValidationError("'at' is in the past") }
            at = millis
        case (nil, let delay?):
            guard delay >= 0 else { throw ValidationError("'delay_ms' must be 0 or more") }
            guard delay <= limits.maxAheadMillis else { throw Self.tooFar(limits) }
            at = now + delay
        case (nil, nil): throw ValidationError("give either 'at' or 'delay_ms'")
        default: throw ValidationError("give either 'at' or 'delay_ms', not both")
        }
        guard at - now <= limits.maxAheadMillis else { throw Self.tooFar(limits) }
        let prompt = try reader.string("prompt")
        let text = try reader.string("text")
        let content: Schedule.Content
        switch (prompt, text) {
        case (let prompt?, nil): content = .prompt(prompt)
        case (nil, let text?): content = .text(text)
        case (nil, nil): throw ValidationError("give either 'prompt' (the clone writes about it) or 'text' (sent as is)")
        default: throw ValidationError("give either 'prompt' or 'text', not both")
        }
        let body = prompt ?? text ?? ""
        guard !body.trimmedWhitespace.isEmpty else { throw ValidationError("'\(prompt != nil ? "prompt" : "text")' must not be empty") }
        guard body.count <= limits.maxTextLength else {
            throw ValidationError("'\(prompt != nil ? "prompt" : "text")' is longer than \(limits.maxTextLength) characters")
        }
        return ScheduleRequest(clone: clone, conversation: conversation, at: at, content: content)
    }

    private static func tooFar(_ limits: ScheduleLimits) -> ValidationError {
        ValidationError("a schedule may be at most \(limits.maxAheadMillis / 86_400_000) days ahead")
    }
}

/// Strict RFC 3339 date-times: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
public enum RFC3339 {
    /// Milliseconds since the epoch (fractions beyond milliseconds truncated), nil when malformed.
    public static func parse(_ text: String) -> Int64? {
        let c = Array(text.utf8)
        guard c.count >= 20 else { return nil }
        func number(_ from: Int, _ count: Int) -> Int? {
            guard from + count <= c.count else { return nil }
            var value = 0
            for byte in c[from..<from + count] {
                guard (48...57).contains(byte) else { return nil }
                value = value * 10 + Int(byte - 48)
            }
            return value
        }
        guard let year = number(0, 4), c[4] == 45, let month = number(5, 2), c[7] == 45, let day = number(8, 2),
            c[10] == 84 || c[10] == 116 || c[10] == 32,
            let hour = number(11, 2), c[13] == 58, let minute = number(14, 2), c[16] == 58, let second = number(17, 2)
        else {
            return nil
        }
        var index = 19
        var millis = 0
        if index < c.count, c[index] == 46 {
            index += 1
            let start = index
            while index < c.count, (48...57).contains(c[index]) { index += 1 }
            guard index > start else { return nil }
            for (offset, byte) in c[start..<min(index, start + 3)].enumerated() {
                millis += Int(byte - 48) * [100, 10, 1][offset]
            }
        }
        guard index < c.count else { return nil }
        var offsetMinutes = 0
        if c[index] == 90 || c[index] == 122 {
            index += 1
        } else if c[index] == 43 || c[index] == 45 {
            guard let oh = number(index + 1, 2), index + 3 < c.count, c[index + 3] == 58, let om = number(index + 4, 2),
                oh < 24, om < 60
            else { return nil }
            offsetMinutes = (oh * 60 + om) * (c[index] == 45 ? -1 : 1)
            index += 6
        } else {
            return nil
        }
        guard index == c.count else { return nil }
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        let monthDays = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        guard (1...12).contains(month), (1...monthDays[month - 1]).contains(day), hour < 24, minute < 60, second < 61 else {
            return nil
        }
        let days = CivilDate.days(year: year, month: month, day: day)
        let seconds = Int64(days) * 86_400 + Int64(hour * 3600 + minute * 60 + min(second, 59)) - Int64(offsetMinutes * 60)
        return seconds * 1000 + Int64(millis)
    }
}

/// In a cluster, schedules are split into a fixed number of shards by id; the node holding a
/// shard's lease is the one that fires its schedules. Every node must compute the same shard,
/// so the count is fixed and the hash (FNV-1a over the id's UTF-8) is spelled out here.
public enum ScheduleShards {
    public static let count = 64

    public static func shard(of id: String) -> Int {
        var hash: UInt32 = 2_166_136_261
        for byte in id.utf8 {
            hash ^= UInt32(byte)
            hash = hash &* 16_777_619
        }
        return Int(hash % UInt32(count))
    }
}
