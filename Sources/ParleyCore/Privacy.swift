/// One state change worth answering for later: who did what to which thing, when, and from
/// where. The address is only ever a keyed hash (`ip_hash`), never the raw IP; `detail` holds
/// ids and amounts, never message text.
public struct AuditEvent: Sendable, Equatable {
    public var id: String
    public var at: Int64
    /// The user who acted, `system` for the server itself, or a deleted user's pseudonym.
    public var actor: String
    /// What happened, dotted: `clone.created`, `credits.granted`, `room.kicked`, `user.deleted`…
    public var action: String
    /// What it happened to (a clone, room or user id), when anything.
    public var target: String?
    /// HMAC-SHA256 of the client address under the server's secret, hex; nil when unknown.
    public var ipHash: String?
    public var detail: [String: String]

    public init(id: String, at: Int64, actor: String, action: String, target: String? = nil, ipHash: String? = nil, detail: [String: String] = [:]) {
        self.id = id
        self.at = at
        self.actor = actor
        self.action = action
        self.target = target
        self.ipHash = ipHash
        self.detail = detail
    }

    public var json: JSONValue {
        .object([
            ("id", .string(id)),
            ("at", .string(Timestamp.rfc3339(millis: at))),
            ("actor", .string(actor)),
            ("action", .string(action)),
            ("target", target.map(JSONValue.string) ?? .null),
            ("ip_hash", ipHash.map(JSONValue.string) ?? .null),
            ("detail", AuditEvent.json(detail)),
        ])
    }

    /// How every backend stores `detail`: a JSON object with its keys sorted.
    public static func json(_ detail: [String: String]) -> JSONValue {
        .object(detail.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) })
    }

    public static func detail(_ value: JSONValue?) -> [String: String] {
        guard case .object(let pairs)? = value else { return [:] }
        var out: [String: String] = [:]
        for (key, value) in pairs { if let text = value.stringValue { out[key] = text } }
        return out
    }
}

/// What `Store.deleteUser` removed, for the audit log and the response.
public struct UserDeletion: Sendable, Equatable {
    public var clones = 0
    public var conversations = 0
    public var messages = 0
    public var schedules = 0
    public var rooms = 0
    public var roomEntries = 0
    /// Voiced replies' audio (#29).
    public var voiceClips = 0
    /// Ledger rows kept (the law requires them), now under the pseudonym and without links to content.
    public var ledgerRowsKept = 0

    public init() {}

    /// Two passes of one deletion: what each removed, and the ledger rows the last one counted.
    public static func + (a: UserDeletion, b: UserDeletion) -> UserDeletion {
        var sum = a
        sum.clones += b.clones
        sum.conversations += b.conversations
        sum.messages += b.messages
        sum.schedules += b.schedules
        sum.rooms += b.rooms
        sum.roomEntries += b.roomEntries
        sum.voiceClips += b.voiceClips
        sum.ledgerRowsKept = b.ledgerRowsKept
        return sum
    }

    public var detail: [String: String] {
        [
            "clones": "\(clones)", "conversations": "\(conversations)", "messages": "\(messages)", "schedules": "\(schedules)",
            "rooms": "\(rooms)", "room_entries": "\(roomEntries)", "voice_clips": "\(voiceClips)", "ledger_rows_kept": "\(ledgerRowsKept)",
        ]
    }
}

/// What one retention pass deleted.
public struct PurgeResult: Sendable, Equatable {
    public var messages: Int
    public var roomEntries: Int

    public init(messages: Int = 0, roomEntries: Int = 0) {
        self.messages = messages
        self.roomEntries = roomEntries
    }

    public static func + (a: PurgeResult, b: PurgeResult) -> PurgeResult {
        PurgeResult(messages: a.messages + b.messages, roomEntries: a.roomEntries + b.roomEntries)
    }

    public var total: Int { messages + roomEntries }
}

extension LedgerEntry {
    /// The id of a user's starting grant: one per user, so granting it again changes nothing.
    public static func welcomeID(for user: String) -> String { "welcome:\(user)" }

    /// The row a deleted user's entry becomes: amounts, kind, model and time stay (the books
    /// must balance and be auditable); who it was and what it paid for go.
    public func detached(to pseudonym: String) -> LedgerEntry {
        var entry = self
        entry.user = pseudonym
        entry.stream = nil
        entry.conversation = nil
        entry.room = nil
        entry.note = nil
        // The starting grant's id names the user; nothing else does.
        if id == Self.welcomeID(for: user) { entry.id = Self.welcomeID(for: pseudonym) }
        return entry
    }

    /// The id a deleted user's starting grant moves to when the pseudonym already holds one (a
    /// subject deleted before, granted again by a version that re-granted returning users).
    public func laterWelcomeID(of pseudonym: String) -> String { Self.welcomeID(for: pseudonym) + ":" + String(createdAt) }
}

extension Room {
    /// The room with every trace of a (deleted) member gone: membership, language, mutes, kicks.
    public func removingUser(_ user: String) -> Room {
        var room = self
        room.members.removeAll { $0 == user }
        room.languages[user] = nil
        room.muted.removeAll { $0 == user }
        room.kicked.removeAll { $0 == user }
        return room
    }

    public func involves(_ user: String) -> Bool {
        members.contains(user) || languages[user] != nil || muted.contains(user) || kicked.contains(user)
    }
}
