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
    /// A debit that would take a spend window past its cap: nothing changed. `available` is what
    /// the tightest window still allows.
    case overLimit(balance: Int64, available: Int64)

    /// Whether this call recorded the entry (not a retry, not a refusal).
    public var isApplied: Bool {
        if case .applied = self { true } else { false }
    }

    public var balance: Int64 {
        switch self {
        case .applied(let b), .alreadyApplied(let b), .insufficient(let b), .overLimit(let b, _): b
        }
    }
}

/// A user's own spending limit over one window (#27): what replies may spend in it, at most.
public struct SpendCap: Sendable, Equatable {
    /// `day:2026-12-04` or `month:2026-12` (UTC).
    public var window: String
    public var max: Int64

    public init(window: String, max: Int64) {
        self.window = window
        self.max = max
    }

    /// The caps `limits` set at `millis`: today's and this month's windows (none without limits).
    public static func caps(_ limits: SpendLimits, at millis: Int64) -> [SpendCap] {
        guard limits.daily != nil || limits.monthly != nil else { return [] }
        let day = "day:" + Timestamp.rfc3339(millis: millis).prefix(10)
        let month = "month:" + BillingPeriod(containing: millis).id
        return (limits.daily.map { [SpendCap(window: day, max: $0)] } ?? []) + (limits.monthly.map { [SpendCap(window: month, max: $0)] } ?? [])
    }
}

/// The limits a user set on their own spending (`PUT /v1/me/limits`), in credits; nil: none.
public struct SpendLimits: Sendable, Equatable {
    public var daily: Int64?
    public var monthly: Int64?

    public init(daily: Int64? = nil, monthly: Int64? = nil) {
        self.daily = daily
        self.monthly = monthly
    }

    public var json: JSONValue {
        .object([("daily", daily.map(JSONValue.int) ?? .null), ("monthly", monthly.map(JSONValue.int) ?? .null)])
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
