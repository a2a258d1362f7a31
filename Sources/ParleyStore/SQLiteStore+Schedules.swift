import ParleyCore

/// Scheduled messages: compare-and-set transitions, and a firing's message stored with it.
extension SQLiteStore {
    // MARK: Schedules

    static let scheduleColumns = "id, owner, clone, conversation, at, kind, body, status, created_at, updated_at, message, failure"

    public func createSchedule(_ s: Schedule) async throws {
        let (kind, body): (String, String) =
            switch s.content {
            case .prompt(let prompt): ("prompt", prompt)
            case .text(let text): ("text", text)
            }
        try await run { db in
            try db.query(
                "INSERT INTO schedules(\(Self.scheduleColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    .text(s.id), .text(s.owner), .text(s.clone), Self.optional(s.conversation), .int(s.at), .text(kind), .text(body),
                    .text(s.status.rawValue), .int(s.createdAt), .int(s.updatedAt), Self.optional(s.message), Self.optional(s.failure),
                ]
            )
        }
    }

    public func schedule(id: String, owner: String) async throws -> Schedule? {
        try await read { db in
            try db.query("SELECT \(Self.scheduleColumns) FROM schedules WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
                .first.map(Self.schedule(from:))
        }
    }

    public func schedules(owner: String, limit: Int, before: String?) async throws -> [Schedule] {
        let page = Self.cursor("id", "<", before)
        return try await read { db in
            try db.query(
                "SELECT \(Self.scheduleColumns) FROM schedules WHERE owner = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map(Self.schedule(from:))
        }
    }

    public func schedules(statuses: [Schedule.Status], owner: String?, limit: Int, after: String?) async throws -> [Schedule] {
        guard !statuses.isEmpty else { return [] }
        return try await read { db in
            let marks = Array(repeating: "?", count: statuses.count).joined(separator: ", ")
            let (mine, page) = (Self.cursor("owner", "=", owner), Self.cursor("id", ">", after))
            return try db.query(
                "SELECT \(Self.scheduleColumns) FROM schedules WHERE status IN (\(marks))\(mine.sql)\(page.sql) ORDER BY id LIMIT ?",
                statuses.map { .text($0.rawValue) } + mine.params + page.params + [
                    .int(Int64(limit))
                ]
            ).map(Self.schedule(from:))
        }
    }

    public func transitionSchedule(id: String, from: Schedule.Status, to change: ScheduleChange) async throws -> Schedule? {
        try await run { db in try db.transaction { try Self.transition(db, id: id, from: from, change) } }
    }

    static func transition(_ db: SQLiteConnection, id: String, from: Schedule.Status, _ change: ScheduleChange) throws -> Schedule? {
        try db.query(
            """
            UPDATE schedules SET status = ?, updated_at = ?, conversation = coalesce(?, conversation),
                message = coalesce(?, message), failure = coalesce(?, failure)
            WHERE id = ? AND status = ?
            """,
            [
                .text(change.status.rawValue), .int(change.updatedAt), Self.optional(change.conversation), Self.optional(change.message),
                Self.optional(change.failure), .text(id), .text(from.rawValue),
            ]
        )
        guard db.changes > 0 else { return nil }
        return try db.query("SELECT \(Self.scheduleColumns) FROM schedules WHERE id = ?", [.text(id)]).first.map(Self.schedule(from:))
    }

    public func completeSchedule(id: String, message: Message, newConversation: Conversation?, now: Int64) async throws -> Schedule? {
        try await run { db in
            try db.transaction {
                guard try db.query("SELECT status FROM schedules WHERE id = ?", [.text(id)]).first?["status"].text == Schedule.Status.firing.rawValue
                else {
                    return nil
                }
                if let newConversation { try Self.insert(newConversation, into: db, orIgnore: true) }
                try Self.insert(message, into: db, orIgnore: true)
                return try Self.transition(
                    db, id: id, from: .firing,
                    ScheduleChange(status: .fired, updatedAt: now, conversation: message.conversation, message: message.id))
            }
        }
    }

    static func schedule(from r: SQLRow) -> Schedule {
        let body = r["body"].text ?? ""
        return Schedule(
            id: r["id"].text ?? "", owner: r["owner"].text ?? "", clone: r["clone"].text ?? "", conversation: r["conversation"].text,
            at: r["at"].int ?? 0,
            content: r["kind"].text == "prompt" ? .prompt(body) : .text(body), status: Schedule.Status(rawValue: r["status"].text ?? "") ?? .failed,
            createdAt: r["created_at"].int ?? 0, updatedAt: r["updated_at"].int ?? 0, message: r["message"].text, failure: r["failure"].text
        )
    }
}
