/// What a user spent, summed from their ledger (#27): the replies' debits and settlements (the
/// entries of a stream), grouped one way; grants and refunds as totals beside them.
public struct UsageReport: Sendable, Equatable {
    public enum Grouping: String, Sendable, CaseIterable {
        case day
        case clone
        case conversation
        case feature
        case model
    }

    public struct Group: Sendable, Equatable {
        /// The day (`2026-12-04`, UTC), clone, conversation, feature or model; nil for spending
        /// that has none (a room's replies have no conversation or clone).
        public var key: String?
        public var credits: Int64
    }

    public var grouping: Grouping
    public private(set) var groups: [Group] = []
    /// Credits spent on replies in the range (their debits less their settlements' returns).
    public private(set) var spent: Int64 = 0
    /// Credits granted: starting grant, allowances, admin grants, payments.
    public private(set) var granted: Int64 = 0
    /// Credits taken back by refunded payments (positive).
    public private(set) var refunded: Int64 = 0
    private var index: [String?: Int] = [:]

    public init(by grouping: Grouping) { self.grouping = grouping }

    /// Adds `entry`; `clone` names the clone of a conversation (for `.clone`).
    public mutating func add(_ entry: LedgerEntry, clone: (String) -> String? = { _ in nil }) {
        switch entry.kind {
        case .grant: granted += entry.credits
        case .refund: refunded -= entry.credits
        case .debit, .settlement:
            let key: String? =
                switch grouping {
                case .day: String(Timestamp.rfc3339(millis: entry.createdAt).prefix(10))
                case .clone: entry.conversation.flatMap(clone)
                case .conversation: entry.conversation
                case .feature: entry.feature
                case .model: entry.model
                }
            spent -= entry.credits
            let at =
                index[key]
                ?? {
                    groups.append(Group(key: key, credits: 0))
                    index[key] = groups.count - 1
                    return groups.count - 1
                }()
            groups[at].credits -= entry.credits
        }
    }

    /// Groups by key (days in order), the keyless last.
    public var sortedGroups: [Group] {
        groups.sorted { a, b in
            switch (a.key, b.key) {
            case (let x?, let y?): x < y
            case (.some, nil): true
            default: false
            }
        }
    }

    public var json: JSONValue {
        .object([
            ("by", .string(grouping.rawValue)), ("spent", .int(spent)), ("granted", .int(granted)), ("refunded", .int(refunded)),
            ("groups", groupsJSON),
        ])
    }

    /// The groups in order, each `{"key","credits"}`.
    public var groupsJSON: JSONValue {
        .array(sortedGroups.map { .object([("key", $0.key.map(JSONValue.string) ?? .null), ("credits", .int($0.credits))]) })
    }
}
