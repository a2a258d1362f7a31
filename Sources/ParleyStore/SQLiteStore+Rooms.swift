import ParleyCore

/// Debate rooms and translation chats with their transcripts.
extension SQLiteStore {
    // MARK: Rooms

    static let roomColumns =
        "id, owner, topic, debaters, rounds, policy, max_tokens, visibility, status, turns_taken, muted, kicked, created_at, updated_at, kind, members, languages"

    static func roomValues(_ r: Room) -> [SQLValue] {
        let debaters = JSONValue.array(r.debaters.map(\.json))
        return [
            .text(r.id), .text(r.owner), .text(r.topic), .text(debaters.serializedString()), .int(Int64(r.rounds)),
            .text(r.policy.rawValue), .int(Int64(r.maxTokensPerTurn)), .text(r.visibility.rawValue), .text(r.status.rawValue),
            .int(Int64(r.turnsTaken)), .text(JSONValue.array(r.muted.map(JSONValue.string)).serializedString()),
            .text(JSONValue.array(r.kicked.map(JSONValue.string)).serializedString()), .int(r.createdAt), .int(r.updatedAt),
            .text(r.kind.rawValue), .text(JSONValue.array(r.members.map(JSONValue.string)).serializedString()),
            .text(RoomCoding.languages(r.languages).serializedString()),
        ]
    }

    static func room(from r: SQLRow) throws -> Room {
        let debaters = (try JSONValue.parse(Array((r["debaters"].text ?? "[]").utf8))).arrayValue ?? []
        return Room(
            id: r["id"].text ?? "", kind: Room.Kind(rawValue: r["kind"].text ?? "") ?? .debate, owner: r["owner"].text ?? "",
            topic: r["topic"].text ?? "",
            debaters: debaters.map(Room.Debater.init(json:)),
            rounds: Int(r["rounds"].int ?? 0), policy: Room.TurnPolicy(rawValue: r["policy"].text ?? "") ?? .roundRobin,
            maxTokensPerTurn: Int(r["max_tokens"].int ?? 0), visibility: Room.Visibility(rawValue: r["visibility"].text ?? "") ?? .private,
            status: Room.Status(rawValue: r["status"].text ?? "") ?? .ended, turnsTaken: Int(r["turns_taken"].int ?? 0),
            muted: try Self.strings(r["muted"]), kicked: try Self.strings(r["kicked"]), members: try Self.strings(r["members"]),
            languages: RoomCoding.languages(try JSONValue.parse(Array((r["languages"].text ?? "{}").utf8))),
            createdAt: r["created_at"].int ?? 0, updatedAt: r["updated_at"].int ?? 0
        )
    }

    public func createRoom(_ room: Room) async throws {
        try await run { db in
            try db.query("INSERT INTO rooms(\(Self.roomColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", Self.roomValues(room))
        }
    }

    public func room(id: String) async throws -> Room? {
        try await read { db in
            try db.query("SELECT \(Self.roomColumns) FROM rooms WHERE id = ?", [.text(id)]).first.map(Self.room(from:))
        }
    }

    public func updateRoom(_ room: Room) async throws -> Bool {
        try await run { db in
            let values = Self.roomValues(room)
            try db.query(
                """
                UPDATE rooms SET topic = ?, debaters = ?, rounds = ?, policy = ?, max_tokens = ?, visibility = ?, status = ?, turns_taken = ?,
                muted = ?, kicked = ?, updated_at = ?, members = ?, languages = ? WHERE id = ? AND owner = ?
                """,
                Array(values[2...11]) + [values[13], values[15], values[16], values[0], values[1]]
            )
            return db.changes > 0
        }
    }

    public func rooms(statuses: [Room.Status], limit: Int, after: String?) async throws -> [Room] {
        guard !statuses.isEmpty else { return [] }
        return try await read { db in
            let marks = Array(repeating: "?", count: statuses.count).joined(separator: ", ")
            let page = Self.cursor("id", ">", after)
            return try db.query(
                "SELECT \(Self.roomColumns) FROM rooms WHERE status IN (\(marks))\(page.sql) ORDER BY id LIMIT ?",
                statuses.map { .text($0.rawValue) } + page.params + [.int(Int64(limit))]
            ).map(Self.room(from:))
        }
    }

    static let entryColumns = "id, room, kind, speaker, text, created_at, reason, stream, lang, source, speaker_is_clone"

    public func appendRoomEntry(_ e: RoomEntry) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO room_entries(\(Self.entryColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    .text(e.id), .text(e.room), .text(e.kind.rawValue), .text(e.speaker), .text(e.text), .int(e.createdAt),
                    Self.optional(e.reason?.rawValue), Self.optional(e.stream), Self.optional(e.lang?.value), Self.optional(e.source),
                    .int(e.speakerIsClone ? 1 : 0),
                ]
            )
        }
    }

    public func roomEntries(room: String, limit: Int, before: String?) async throws -> [RoomEntry] {
        let page = Self.cursor("id", "<", before)
        return try await read { db in
            try db.query(
                "SELECT \(Self.entryColumns) FROM room_entries WHERE room = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(room)] + page.params + [.int(Int64(limit))]
            ).reversed().map { r in
                RoomEntry(
                    id: r["id"].text ?? "", room: r["room"].text ?? "", kind: RoomEntry.Kind(rawValue: r["kind"].text ?? "") ?? .said,
                    speaker: r["speaker"].text ?? "", text: r["text"].text ?? "", createdAt: r["created_at"].int ?? 0,
                    reason: r["reason"].text.flatMap(StreamEndReason.init(rawValue:)), stream: r["stream"].text,
                    lang: r["lang"].text.flatMap(LanguageTag.init), source: r["source"].text, speakerIsClone: r["speaker_is_clone"].int == 1)
            }
        }
    }

    public func rooms(owner: String, limit: Int, after: String?) async throws -> [Room] {
        let page = Self.cursor("id", ">", after)
        return try await read { db in
            try db.query(
                "SELECT \(Self.roomColumns) FROM rooms WHERE owner = ?\(page.sql) ORDER BY id LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map(Self.room(from:))
        }
    }
}
