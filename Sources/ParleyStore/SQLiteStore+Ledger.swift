import ParleyCore

/// Credits: a ledger row and its balance change commit in one transaction.
extension SQLiteStore {
    // MARK: Credits

    static let ledgerColumns = "id, user, kind, credits, tokens, stream, conversation, room, model, feature, note, created_at"

    public func balance(user: String) async throws -> Int64 {
        try await read { db in try Self.balance(db, user) }
    }

    static func balance(_ db: SQLiteConnection, _ user: String) throws -> Int64 {
        try db.query("SELECT balance FROM accounts WHERE user = ?", [.text(user)]).first?["balance"].int ?? 0
    }

    public func apply(_ entry: LedgerEntry, allowOverdraft: Bool, headroom: Int64, caps: [SpendCap]) async throws -> LedgerOutcome {
        try await run { db in try Self.apply(entry, allowOverdraft: allowOverdraft, headroom: headroom, caps: caps, in: db) }
    }

    public func apply(_ debit: LedgerEntry, headroom: Int64, caps: [SpendCap], storing opening: ReplyOpening) async throws -> LedgerOutcome {
        try await run { db in
            // One savepoint for both: an opening that cannot be stored takes the debit back with it.
            try db.transaction {
                let outcome = try Self.apply(debit, allowOverdraft: false, headroom: headroom, caps: caps, in: db)
                switch outcome {
                case .insufficient, .overLimit: return outcome
                case .applied, .alreadyApplied: break
                }
                try Self.storeOpening(opening, in: db)
                return outcome
            }
        }
    }

    /// `apply`'s body, inside the caller's transaction.
    static func apply(
        _ entry: LedgerEntry, allowOverdraft: Bool, headroom: Int64, caps: [SpendCap], in db: SQLiteConnection
    ) throws -> LedgerOutcome {
        let headroom = entry.headroom(headroom, allowOverdraft: allowOverdraft)
        return try db.transaction {
            let current = try Self.balance(db, entry.user)
            if try !db.query("SELECT 1 FROM ledger WHERE id = ?", [.text(entry.id)]).isEmpty {
                return .alreadyApplied(balance: current)
            }
            if entry.credits < 0 || headroom > 0, !allowOverdraft, current + entry.credits < headroom {
                return .insufficient(balance: current)
            }
            if !caps.isEmpty {
                var available = Int64.max
                for cap in caps {
                    let spent =
                        try db.query("SELECT spent FROM spend_windows WHERE user = ? AND span = ?", [.text(entry.user), .text(cap.window)])
                        .first?["spent"].int ?? 0
                    available = min(available, max(0, cap.max - spent))
                }
                if entry.credits < 0 || headroom > 0, -entry.credits + headroom > available {
                    return .overLimit(balance: current, available: available)
                }
                for cap in caps {
                    try db.query(
                        """
                        INSERT INTO spend_windows(user, span, spent) VALUES(?, ?, max(0, ?))
                        ON CONFLICT(user, span) DO UPDATE SET spent = max(0, spent + ?)
                        """,
                        [.text(entry.user), .text(cap.window), .int(-entry.credits), .int(-entry.credits)])
                }
            }
            let optional: (String?) -> SQLValue = { $0.map(SQLValue.text) ?? .null }
            try db.query(
                "INSERT INTO ledger(\(Self.ledgerColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    .text(entry.id), .text(entry.user), .text(entry.kind.rawValue), .int(entry.credits), .int(Int64(entry.tokens)),
                    optional(entry.stream), optional(entry.conversation), optional(entry.room), optional(entry.model),
                    optional(entry.feature), optional(entry.note), .int(entry.createdAt),
                ]
            )
            let updated = current + entry.credits
            try db.query(
                "INSERT INTO accounts(user, balance) VALUES(?, ?) ON CONFLICT(user) DO UPDATE SET balance = excluded.balance",
                [.text(entry.user), .int(updated)]
            )
            return .applied(balance: updated)
        }
    }

    public func ledgerEntry(id: String) async throws -> LedgerEntry? {
        try await read { db in
            try db.query("SELECT \(Self.ledgerColumns) FROM ledger WHERE id = ?", [.text(id)]).first.map(Self.ledgerEntry(from:))
        }
    }

    static func ledgerEntry(from r: SQLRow) -> LedgerEntry {
        LedgerEntry(
            id: r["id"].text ?? "", user: r["user"].text ?? "", kind: LedgerEntry.Kind(rawValue: r["kind"].text ?? "") ?? .debit,
            credits: r["credits"].int ?? 0, tokens: Int(r["tokens"].int ?? 0), stream: r["stream"].text, conversation: r["conversation"].text,
            room: r["room"].text,
            model: r["model"].text, feature: r["feature"].text, note: r["note"].text, createdAt: r["created_at"].int ?? 0
        )
    }

    public func ledger(user: String, limit: Int, before: String?) async throws -> [LedgerEntry] {
        try await read { db in try Self.ledger(db, user: user, limit: limit, before: before) }
    }

    /// One read transaction: both reads see the same snapshot.
    public func ledgerPage(user: String, limit: Int, before: String?) async throws -> (entries: [LedgerEntry], balance: Int64) {
        try await read { db in (try Self.ledger(db, user: user, limit: limit, before: before), try Self.balance(db, user)) }
    }

    private static func ledger(_ db: SQLiteConnection, user: String, limit: Int, before: String?) throws -> [LedgerEntry] {
        var cursor: (Int64, String)?
        if let before {
            guard let row = try db.query("SELECT created_at, id FROM ledger WHERE id = ? AND user = ?", [.text(before), .text(user)]).first else {
                return []
            }
            cursor = (row["created_at"].int ?? 0, row["id"].text ?? "")
        }
        // A row-value comparison, so the (user, created_at, id) index serves the range; the
        // first page has no condition at all (see `cursor`).
        let page: (sql: String, params: [SQLValue]) = cursor.map { (" AND (created_at, id) < (?, ?)", [.int($0.0), .text($0.1)]) } ?? ("", [])
        let rows = try db.query(
            "SELECT \(Self.ledgerColumns) FROM ledger WHERE user = ?\(page.sql) ORDER BY created_at DESC, id DESC LIMIT ?",
            [.text(user)] + page.params + [.int(Int64(limit))]
        )
        return rows.map(Self.ledgerEntry(from:))
    }

    /// Applying is one transaction here: nothing is ever left half-applied.
    public func recoverLedger(node: String?) async throws -> Int { 0 }

    public func costs(user: String, link: LedgerLink, ids: [String]) async throws -> [String: Int64] {
        guard !ids.isEmpty else { return [:] }
        let column = link.rawValue  // an enum's raw value: never user input
        return try await read { db in
            var costs: [String: Int64] = [:]
            // In chunks, below SQLite's limit on bound parameters.
            for start in stride(from: 0, to: ids.count, by: 500) {
                let chunk = ids[start..<min(ids.count, start + 500)]
                let marks = Array(repeating: "?", count: chunk.count).joined(separator: ", ")
                for row in try db.query(
                    "SELECT \(column) AS link, -SUM(credits) AS cost FROM ledger WHERE user = ? AND \(column) IN (\(marks)) GROUP BY \(column)",
                    [.text(user)] + chunk.map(SQLValue.text))
                {
                    if let id = row["link"].text { costs[id] = row["cost"].int ?? 0 }
                }
            }
            return costs
        }
    }

    public func ledgerEntries(from: Int64, to: Int64?, after: (createdAt: Int64, id: String)?, limit: Int) async throws -> [LedgerEntry] {
        try await read { db in
            var sql = "SELECT \(Self.ledgerColumns) FROM ledger WHERE created_at >= ?"
            var params: [SQLValue] = [.int(from)]
            if let to {
                sql += " AND created_at < ?"
                params.append(.int(to))
            }
            if let after {
                sql += " AND (created_at, id) > (?, ?)"
                params += [.int(after.createdAt), .text(after.id)]
            }
            return try db.query(sql + " ORDER BY created_at, id LIMIT ?", params + [.int(Int64(limit))]).map(Self.ledgerEntry(from:))
        }
    }
}
