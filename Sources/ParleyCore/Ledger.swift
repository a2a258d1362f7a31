/// One append-only ledger row: credits added to (positive) or taken from (negative) a user's
/// balance. The id is deterministic (e.g. `st_…:3` for a stream's third batch, `order:…` for a
/// payment), so a retried write can never apply twice.
public struct LedgerEntry: Sendable, Equatable {
    public enum Kind: String, Sendable, Equatable, CaseIterable {
        /// Credits given: the starting grant, an admin grant, a payment.
        case grant
        /// Credits spent on tokens.
        case debit
        /// End-of-stream reconciliation: a refund of unused prepaid credits or a last charge.
        case settlement
        /// A payment refunded to the user: its credits taken back (negative), even below zero (#27).
        case refund
    }

    public var id: String
    public var user: String
    public var kind: Kind
    /// Signed: positive adds to the balance, negative takes from it.
    public var credits: Int64
    public var tokens: Int
    public var stream: String?
    public var conversation: String?
    public var room: String?
    public var model: String?
    public var feature: String?
    /// Free text for grants (who granted, which order).
    public var note: String?
    public var createdAt: Int64

    public init(
        id: String, user: String, kind: Kind, credits: Int64, tokens: Int = 0, stream: String? = nil,
        conversation: String? = nil, room: String? = nil, model: String? = nil, feature: String? = nil,
        note: String? = nil, createdAt: Int64
    ) {
        self.id = id
        self.user = user
        self.kind = kind
        self.credits = credits
        self.tokens = tokens
        self.stream = stream
        self.conversation = conversation
        self.room = room
        self.model = model
        self.feature = feature
        self.note = note
        self.createdAt = createdAt
    }
}

/// What applying a ledger entry did.
public enum LedgerOutcome: Sendable, Equatable {
    /// Recorded; the balance after it.
    case applied(balance: Int64)
    /// An entry with this id was applied before (a retry): nothing changed.
    case alreadyApplied(balance: Int64)
    /// A debit the balance does not cover: nothing changed.
    case insufficient(balance: Int64)

    /// Whether this call recorded the entry (not a retry, not a refusal).
    public var isApplied: Bool {
        if case .applied = self { true } else { false }
    }

    public var balance: Int64 {
        switch self {
        case .applied(let b), .alreadyApplied(let b), .insufficient(let b): b
        }
    }
}

extension LedgerEntry {
    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("id", .string(id)), ("kind", .string(kind.rawValue)), ("credits", .int(credits)), ("tokens", .int(Int64(tokens))),
        ]
        if let stream { pairs.append(("stream", .string(stream))) }
        if let conversation { pairs.append(("conversation", .string(conversation))) }
        if let room { pairs.append(("room", .string(room))) }
        if let model { pairs.append(("model", .string(model))) }
        if let feature { pairs.append(("feature", .string(feature))) }
        if let note { pairs.append(("note", .string(note))) }
        pairs.append(("created_at", .string(Timestamp.rfc3339(millis: createdAt))))
        return .object(pairs)
    }
}
