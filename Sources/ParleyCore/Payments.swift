/// A payment order as the payment provider's events left it (#27): the credit pack bought, its
/// status, and every status change with the event that made it. Kept 7 years for tax and
/// disputes, and under the pseudonym once the user deletes their account.
public struct PaymentOrder: Sendable, Equatable {
    public enum Status: String, Sendable, Equatable, CaseIterable {
        case created
        case failed
        case paid
        case refunded

        /// Later in an order's life: an event for an earlier status (delivered late) records its
        /// change but does not move the order back.
        public var rank: Int {
            switch self {
            case .created: 0
            case .failed: 1
            case .paid: 2
            case .refunded: 3
            }
        }
    }

    public struct Change: Sendable, Equatable {
        public var status: Status
        /// Unix ms, the event's time.
        public var at: Int64
        /// The provider's event id: a change is recorded once per event.
        public var event: String

        public init(status: Status, at: Int64, event: String) {
            self.status = status
            self.at = at
            self.event = event
        }
    }

    /// The provider's order id.
    public var id: String
    /// Parley's own, sortable by when the order was first seen (pages go by it).
    public var key: String
    public var user: String
    public var credits: Int64
    public var status: Status
    public var history: [Change]
    public var createdAt: Int64
    public var updatedAt: Int64

    public init(
        id: String, key: String, user: String, credits: Int64, status: Status, history: [Change], createdAt: Int64, updatedAt: Int64
    ) {
        self.id = id
        self.key = key
        self.user = user
        self.credits = credits
        self.status = status
        self.history = history
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }

    /// This order after `change`, or nil when its event was recorded already (a replay changes
    /// nothing); the status moves on only when `change` is later in an order's life.
    public func applying(_ change: Change, credits newCredits: Int64?) -> PaymentOrder? {
        guard !history.contains(where: { $0.event == change.event }) else { return nil }
        var next = self
        next.history.append(change)
        next.history.sort { ($0.at, $0.status.rank) < ($1.at, $1.status.rank) }
        if change.status.rank > status.rank { next.status = change.status }
        // The pack's credits are the first event's that names them (the order's, when created).
        if let newCredits, credits == 0 { next.credits = newCredits }
        next.updatedAt = max(updatedAt, change.at)
        return next
    }

    public var json: JSONValue {
        .object([
            ("id", .string(id)), ("user", .string(user)), ("credits", .int(credits)), ("status", .string(status.rawValue)),
            (
                "history",
                .array(
                    history.map {
                        .object([
                            ("status", .string($0.status.rawValue)), ("at", .string(Timestamp.rfc3339(millis: $0.at))),
                            ("event", .string($0.event)),
                        ])
                    })
            ),
            ("created_at", .string(Timestamp.rfc3339(millis: createdAt))), ("updated_at", .string(Timestamp.rfc3339(millis: updatedAt))),
        ])
    }

    /// How every backend stores `history`: a JSON array.
    public static func json(_ history: [Change]) -> JSONValue {
        .array(history.map { .object([("status", .string($0.status.rawValue)), ("at", .int($0.at)), ("event", .string($0.event))]) })
    }

    public static func history(_ value: JSONValue?) -> [Change] {
        (value?.arrayValue ?? []).compactMap { item in
            guard let status = item["status"]?.stringValue.flatMap(Status.init(rawValue:)), let at = item["at"]?.intValue,
                let event = item["event"]?.stringValue
            else { return nil }
            return Change(status: status, at: at, event: event)
        }
    }
}

/// One delivery to the payment webhook, accepted or refused (#27): what the operator reads
/// when a payment went missing. Never the body's signature nor the secret.
public struct WebhookDelivery: Sendable, Equatable {
    public var id: String
    public var at: Int64
    /// `order.paid`, `subscription.activated`, …; nil when the body could not be read.
    public var event: String?
    public var eventID: String?
    public var user: String?
    /// `applied`, `duplicate`, `stale` or `refused`.
    public var outcome: String
    /// Why it was refused; nil when accepted.
    public var reason: String?

    public init(id: String, at: Int64, event: String?, eventID: String?, user: String?, outcome: String, reason: String?) {
        self.id = id
        self.at = at
        self.event = event
        self.eventID = eventID
        self.user = user
        self.outcome = outcome
        self.reason = reason
    }

    public var json: JSONValue {
        .object([
            ("id", .string(id)), ("at", .string(Timestamp.rfc3339(millis: at))), ("event", event.map(JSONValue.string) ?? .null),
            ("event_id", eventID.map(JSONValue.string) ?? .null), ("user", user.map(JSONValue.string) ?? .null),
            ("outcome", .string(outcome)), ("reason", reason.map(JSONValue.string) ?? .null),
        ])
    }
}
