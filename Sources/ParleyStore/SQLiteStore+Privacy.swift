import ParleyCore

/// Saved messages, deleting a user, retention and the audit log.
extension SQLiteStore {
    // MARK: Privacy

    public func setMessageSaved(id: String, conversation: String, saved: Bool) async throws -> Bool {
        try await run { db in
            try db.query("UPDATE messages SET saved = ? WHERE id = ? AND conversation = ?", [.int(saved ? 1 : 0), .text(id), .text(conversation)])
            return db.changes > 0
        }
    }

    public func revokeSessions(user: String, session: String?, at: Int64) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO session_revocations(user, session, at) VALUES(?, ?, ?) ON CONFLICT(user, session) DO UPDATE SET at = max(at, excluded.at)",
                [.text(user), .text(session ?? ""), .int(at)])
        }
    }

    public func sessionRevocations(user: String) async throws -> SessionRevocations {
        try await read { db in
            var revocations = SessionRevocations()
            for row in try db.query("SELECT session, at FROM session_revocations WHERE user = ?", [.text(user)]) {
                let session = row["session"].text ?? ""
                if session.isEmpty { revocations.allBefore = row["at"].int } else { revocations.sessions.insert(session) }
            }
            return revocations
        }
    }

    public func deleteUser(_ id: String, pseudonym: String) async throws -> UserDeletion {
        defer { decodedClones.written(owner: id) }
        return try await run { db in
            try db.transaction {
                var report = UserDeletion()
                let user: [SQLValue] = [.text(id)]
                try db.query("DELETE FROM session_revocations WHERE user = ?", user)
                try db.query("DELETE FROM subscriptions WHERE user = ?", user)
                try db.query("DELETE FROM spend_limits WHERE user = ?", user)
                try db.query("DELETE FROM personas WHERE user = ?", user)
                try db.query("DELETE FROM spend_windows WHERE user = ?", user)
                try db.query("DELETE FROM voice_clips WHERE owner = ?", user)
                report.voiceClips = db.changes
                let count: (String) throws -> Int = { Int(try db.query($0, user).first?["n"].int ?? 0) }
                let mine = "SELECT id FROM conversations WHERE owner = ?"
                report.messages = try count("SELECT count(*) AS n FROM messages WHERE conversation IN (\(mine))")
                try db.query("DELETE FROM messages WHERE conversation IN (\(mine))", user)
                try db.query("DELETE FROM conversations WHERE owner = ?", user)
                report.conversations = db.changes
                try db.query("DELETE FROM clones WHERE owner = ?", user)
                report.clones = db.changes
                try db.query("DELETE FROM schedules WHERE owner = ?", user)
                report.schedules = db.changes
                // Their rooms with every entry (ON DELETE CASCADE), then what they said elsewhere
                // with its translations.
                report.roomEntries = try count("SELECT count(*) AS n FROM room_entries WHERE room IN (SELECT id FROM rooms WHERE owner = ?)")
                try db.query("DELETE FROM rooms WHERE owner = ?", user)
                report.rooms = db.changes
                try db.query(
                    "DELETE FROM room_entries WHERE source IN (SELECT id FROM room_entries WHERE speaker = ? AND speaker_is_clone = 0)", user)
                report.roomEntries += db.changes
                try db.query("DELETE FROM room_entries WHERE speaker = ? AND speaker_is_clone = 0", user)
                report.roomEntries += db.changes
                // Membership elsewhere: the LIKE narrows, `involves` decides (ids may hold '_').
                let quoted = JSONValue.string(id).serializedString()
                let pattern = "%" + quoted + "%"
                let rows = try db.query(
                    "SELECT \(Self.roomColumns) FROM rooms WHERE members LIKE ? OR muted LIKE ? OR kicked LIKE ? OR languages LIKE ?",
                    Array(repeating: .text(pattern), count: 4)
                )
                for room in try rows.map(Self.room(from:)) where room.involves(id) {
                    let values = Self.roomValues(room.removingUser(id))
                    try db.query(
                        "UPDATE rooms SET muted = ?, kicked = ?, members = ?, languages = ? WHERE id = ?",
                        [values[10], values[11], values[15], values[16], values[0]])
                }
                // The books: rows and balance move to the pseudonym, detached from content.
                let alias: SQLValue = .text(pseudonym)
                if let welcome = try db.query("SELECT \(Self.ledgerColumns) FROM ledger WHERE id = ?", [.text(LedgerEntry.welcomeID(for: id))]).first
                {
                    let earlier = try db.query("SELECT 1 FROM ledger WHERE id = ?", [.text(LedgerEntry.welcomeID(for: pseudonym))]).first != nil
                    let entry = Self.ledgerEntry(from: welcome)
                    let moved = earlier ? entry.laterWelcomeID(of: pseudonym) : LedgerEntry.welcomeID(for: pseudonym)
                    try db.query("UPDATE ledger SET id = ? WHERE id = ?", [.text(moved), .text(entry.id)])
                }
                try db.query(
                    "UPDATE ledger SET user = ?, stream = NULL, conversation = NULL, room = NULL, note = NULL WHERE user = ?", [alias, .text(id)])
                report.ledgerRowsKept = Int(try db.query("SELECT count(*) AS n FROM ledger WHERE user = ?", [alias]).first?["n"].int ?? 0)
                if let balance = try db.query("SELECT balance FROM accounts WHERE user = ?", user).first?["balance"].int {
                    try db.query(
                        "INSERT INTO accounts(user, balance) VALUES(?, ?) ON CONFLICT(user) DO UPDATE SET balance = accounts.balance + excluded.balance",
                        [alias, .int(balance)]
                    )
                    try db.query("DELETE FROM accounts WHERE user = ?", user)
                }
                try db.query("UPDATE payment_orders SET user = ? WHERE user = ?", [alias, .text(id)])
                try db.query("UPDATE webhook_deliveries SET user = ? WHERE user = ?", [alias, .text(id)])
                try db.query("UPDATE audit SET actor = ? WHERE actor = ?", [alias, .text(id)])
                try db.query("UPDATE audit SET target = ? WHERE target = ?", [alias, .text(id)])
                try db.query("DELETE FROM stream_journals WHERE user = ?", user)
                // Tails of finished replies too: a compaction might come only later.
                try db.query("DELETE FROM stream_journal_tails WHERE user = ?", user)
                self.journaled.withLock { $0.written = $0.written.filter { $0.value.user != id } }
                try db.query("DELETE FROM users WHERE id = ?", user)
                return report
            }
        }
    }

    public func purge(createdBefore cutoff: Int64, limit: Int) async throws -> PurgeResult {
        try await run { db in
            let bounds: [SQLValue] = [.int(cutoff), .int(Int64(limit))]
            try db.query(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE saved = 0 AND created_at < ? ORDER BY created_at LIMIT ?)", bounds)
            let messages = db.changes
            try db.query(
                "DELETE FROM room_entries WHERE id IN (SELECT id FROM room_entries WHERE created_at < ? ORDER BY created_at LIMIT ?)", bounds)
            return PurgeResult(messages: messages, roomEntries: db.changes)
        }
    }

    public func appendAudit(_ e: AuditEvent) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO audit(id, at, actor, action, target, ip_hash, detail) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [
                    .text(e.id), .int(e.at), .text(e.actor), .text(e.action), Self.optional(e.target), Self.optional(e.ipHash),
                    .text(AuditEvent.json(e.detail).serializedString()),
                ]
            )
        }
    }

    public func auditEvents(limit: Int, before: String?, involving user: String?) async throws -> [AuditEvent] {
        let page = Self.cursor("id", "<", before)
        let whose: (sql: String, params: [SQLValue]) = user.map { (" AND (actor = ? OR target = ?)", [.text($0), .text($0)]) } ?? ("", [])
        return try await read { db in
            try db.query(
                "SELECT id, at, actor, action, target, ip_hash, detail FROM audit WHERE 1 = 1\(whose.sql)\(page.sql) ORDER BY id DESC LIMIT ?",
                whose.params + page.params + [.int(Int64(limit))]
            ).map { r in
                AuditEvent(
                    id: r["id"].text ?? "", at: r["at"].int ?? 0, actor: r["actor"].text ?? "", action: r["action"].text ?? "",
                    target: r["target"].text,
                    ipHash: r["ip_hash"].text, detail: AuditEvent.detail(try? JSONValue.parse(Array((r["detail"].text ?? "{}").utf8))))
            }
        }
    }

    public func purgeAudit(before cutoff: Int64, limit: Int) async throws -> Int {
        try await run { db in
            try db.query("DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at < ? ORDER BY at LIMIT ?)", [.int(cutoff), .int(Int64(limit))])
            return db.changes
        }
    }
}
