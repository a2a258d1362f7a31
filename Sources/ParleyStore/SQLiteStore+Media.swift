import ParleyCore

extension SQLiteStore {
    static let clipColumns = "id, kind, content_type, owner, stream, conversation, room, message, sample_rate, bytes, truncated, saved, created_at"

    public func saveClip(_ clip: VoiceClip) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO voice_clips(\(Self.clipColumns), audio) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    .text(clip.id), .text(clip.kind.rawValue), .text(clip.contentType), .text(clip.owner), .text(clip.stream),
                    clip.conversation.map(SQLValue.text) ?? .null,
                    clip.room.map(SQLValue.text) ?? .null, clip.message.map(SQLValue.text) ?? .null, .int(Int64(clip.sampleRate)),
                    .int(Int64(clip.bytes)), .int(clip.truncated ? 1 : 0), .int(clip.saved ? 1 : 0), .int(clip.createdAt), .blob(clip.audio),
                ])
        }
    }

    public func clip(id: String, owner: String, withAudio: Bool) async throws -> VoiceClip? {
        try await read { db in
            try db.query(
                "SELECT \(Self.clipColumns)\(withAudio ? ", audio" : "") FROM voice_clips WHERE id = ? AND owner = ?", [.text(id), .text(owner)]
            ).first.map { Self.clip(from: $0, withAudio: withAudio) }
        }
    }

    public func clips(owner: String, limit: Int, before: String?) async throws -> [VoiceClip] {
        let page = Self.cursor("id", "<", before)
        return try await read { db in
            try db.query(
                "SELECT \(Self.clipColumns) FROM voice_clips WHERE owner = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map { Self.clip(from: $0, withAudio: false) }
        }
    }

    public func setClipSaved(id: String, owner: String, saved: Bool) async throws -> Bool {
        try await run { db in
            try db.query("UPDATE voice_clips SET saved = ? WHERE id = ? AND owner = ?", [.int(saved ? 1 : 0), .text(id), .text(owner)])
            return db.changes > 0
        }
    }

    public func deleteClip(id: String, owner: String) async throws -> Bool {
        try await run { db in
            try db.query("DELETE FROM voice_clips WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
            return db.changes > 0
        }
    }

    public func purgeClips(createdBefore cutoff: Int64, limit: Int) async throws -> Int {
        try await run { db in
            try db.query(
                "DELETE FROM voice_clips WHERE id IN (SELECT id FROM voice_clips WHERE saved = 0 AND created_at < ? AND kind = 'reply' LIMIT ?)",
                [.int(cutoff), .int(Int64(limit))])
            return db.changes
        }
    }

    static func clip(from row: SQLRow, withAudio: Bool) -> VoiceClip {
        VoiceClip(
            id: row["id"].text ?? "", kind: VoiceClip.Kind(rawValue: row["kind"].text ?? "") ?? .reply,
            contentType: row["content_type"].text ?? "audio/pcm", owner: row["owner"].text ?? "", stream: row["stream"].text ?? "",
            conversation: row["conversation"].text,
            room: row["room"].text, message: row["message"].text, sampleRate: Int(row["sample_rate"].int ?? 24_000),
            audio: withAudio ? row["audio"].blob ?? [] : [], bytes: Int(row["bytes"].int ?? 0),
            truncated: row["truncated"].int == 1, saved: row["saved"].int == 1, createdAt: row["created_at"].int ?? 0)
    }
}
