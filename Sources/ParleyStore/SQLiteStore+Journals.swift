import ParleyCore

/// The journals of replies in flight.
extension SQLiteStore {
    static let journalColumns =
        "stream, user, model, feature, input_tokens, target_kind, target_id, speaker, message_id, text, output_tokens, created_at, updated_at"

    public func saveStreamJournal(_ j: StreamJournal) async throws {
        try await saveStreamJournals([j])
    }

    /// One call, so one group commit, for all of them.
    public func saveStreamJournals(_ journals: [StreamJournal], deleting finished: [String]) async throws {
        guard !journals.isEmpty || !finished.isEmpty else { return }
        try await run { db in
            for stream in finished { try db.query("DELETE FROM stream_journals WHERE stream = ?", [.text(stream)]) }
            for j in journals {
                let target = j.target.columns
                try db.query(
                    "INSERT OR REPLACE INTO stream_journals(\(Self.journalColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        .text(j.stream), .text(j.user), .text(j.model), .text(j.feature), .int(Int64(j.inputTokens)), .text(target.kind),
                        target.id.map(SQLValue.text) ?? .null, target.speaker.map(SQLValue.text) ?? .null, .text(j.messageID), .text(j.text),
                        .int(Int64(j.outputTokens)), .int(j.createdAt), .int(j.updatedAt),
                    ]
                )
            }
        }
    }

    public func deleteStreamJournal(stream: String) async throws {
        try await run { db in try db.query("DELETE FROM stream_journals WHERE stream = ?", [.text(stream)]) }
    }

    public func streamJournals(limit: Int, node: String?) async throws -> [StreamJournal] {
        try await read { db in
            try db.query("SELECT \(Self.journalColumns) FROM stream_journals ORDER BY created_at, stream LIMIT ?", [.int(Int64(limit))]).map { r in
                StreamJournal(
                    stream: r["stream"].text ?? "", user: r["user"].text ?? "", model: r["model"].text ?? "", feature: r["feature"].text ?? "",
                    inputTokens: Int(r["input_tokens"].int ?? 0),
                    target: .init(kind: r["target_kind"].text ?? "", id: r["target_id"].text, speaker: r["speaker"].text),
                    messageID: r["message_id"].text ?? "", text: r["text"].text ?? "",
                    outputTokens: Int(r["output_tokens"].int ?? 0), createdAt: r["created_at"].int ?? 0, updatedAt: r["updated_at"].int ?? 0
                )
            }
        }
    }
}
