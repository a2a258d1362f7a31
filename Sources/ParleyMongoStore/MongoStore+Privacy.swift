import Foundation
import ParleyCore
import ParleyStore

/// Export by owner, saved messages, user deletion, retention and the audit log. Without
/// multi-document transactions, deletion removes children before parents and ends with the
/// user record, so a crash part-way leaves something a retried call finishes.
extension MongoStore {
    public func rooms(owner: String, limit: Int, after: String?) async throws -> [Room] {
        try await run { db in
            var filter: [(String, JSONValue)] = [("owner", .string(owner))]
            if let after { filter.append(("_id", .object([("$gt", .string(after))]))) }
            return try db.find("rooms", filter: .object(filter), sort: .object([("_id", .int(1))]), limit: limit).map(Self.room(from:))
        }
    }

    public func setMessageSaved(id: String, conversation: String, saved: Bool) async throws -> Bool {
        try await run { db in
            try db.update(
                "messages", query: .object([("_id", .string(id)), ("conversation", .string(conversation))]),
                update: .object([("$set", .object([("saved", .bool(saved))]))])
            ).matched > 0
        }
    }

    public func revokeSessions(user: String, session: String?, at: Int64) async throws {
        try await run { db in
            let id = JSONValue.string(user + "\u{1F}" + (session ?? ""))
            _ = try db.update(
                "session_revocations", query: .object([("_id", id)]),
                update: .object([
                    ("$set", .object([("user", .string(user)), ("session", .string(session ?? ""))])),
                    ("$max", .object([("at", .long(at))])),
                ]), upsert: true)
        }
    }

    public func sessionRevocations(user: String) async throws -> SessionRevocations {
        try await run { db in
            var revocations = SessionRevocations()
            for row in try db.find("session_revocations", filter: .object([("user", .string(user))])) {
                let session = row["session"]?.stringValue ?? ""
                if session.isEmpty { revocations.allBefore = row["at"]?.int64 } else { revocations.sessions.insert(session) }
            }
            return revocations
        }
    }

    public func deleteUser(_ id: String, pseudonym: String) async throws -> UserDeletion {
        try await run { db in
            var report = UserDeletion()
            let user = JSONValue.string(id)
            _ = try db.delete("session_revocations", query: .object([("user", user)]))
            _ = try db.delete("subscriptions", query: .object([("_id", user)]))
            _ = try db.delete("spend_limits", query: .object([("_id", user)]))
            _ = try db.delete("personas", query: .object([("_id", user)]))
            _ = try db.delete("spend_windows", query: .object([("user", user)]))
            report.voiceClips = Int(try db.delete("voice_clips", query: .object([("owner", user)])))
            let conversations = try Self.ids(db, "conversations", .object([("owner", user)]))
            report.messages = try Self.delete(db, "messages", field: "conversation", in: conversations)
            report.conversations = Int(try db.delete("conversations", query: .object([("owner", user)])))
            report.clones = Int(try db.delete("clones", query: .object([("owner", user)])))
            report.schedules = Int(try db.delete("schedules", query: .object([("owner", user)])))
            let rooms = try Self.ids(db, "rooms", .object([("owner", user)]))
            report.roomEntries = try Self.delete(db, "room_entries", field: "room", in: rooms)
            report.rooms = Int(try db.delete("rooms", query: .object([("owner", user)])))
            // What they said in other rooms, with its translations.
            let said = try Self.ids(db, "room_entries", .object([("speaker", user), ("speaker_is_clone", .object([("$ne", .bool(true))]))]))
            report.roomEntries += try Self.delete(db, "room_entries", field: "source", in: said)
            report.roomEntries += try Self.delete(db, "room_entries", field: "_id", in: said)
            let involved = try db.find(
                "rooms",
                filter: .object([
                    (
                        "$or",
                        .array([
                            .object([("members", user)]), .object([("muted", user)]), .object([("kicked", user)]),
                        ])
                    )
                ]))
            for room in involved.map(Self.room(from:)) where room.involves(id) {
                _ = try db.update(
                    "rooms", query: .object([("_id", .string(room.id))]),
                    update: .object([("$set", Self.mutableFields(Self.document(room.removingUser(id))))]))
            }
            _ = try db.delete("stream_journals", query: .object([("user", user)]))
            report.ledgerRowsKept = try Self.detachLedger(db, user: id, pseudonym: pseudonym)
            for collection in ["payment_orders", "webhook_deliveries"] {
                _ = try db.update(
                    collection, query: .object([("user", user)]), update: .object([("$set", .object([("user", .string(pseudonym))]))]), multi: true)
            }
            for field in ["actor", "target"] {
                _ = try db.update(
                    "audit", query: .object([(field, user)]), update: .object([("$set", .object([(field, .string(pseudonym))]))]), multi: true)
            }
            _ = try db.delete("users", query: .object([("_id", user)]))
            return report
        }
    }

    /// Moves the user's ledger rows and balance to the pseudonym (`LedgerEntry.detached`).
    private static func detachLedger(_ db: Database, user: String, pseudonym: String) throws -> Int {
        // The balance first, once: a token parked on the old account makes the move idempotent
        // through the same `recent` check every ledger entry uses.
        _ = try db.update(
            "accounts", query: .object([("_id", .string(user)), ("closing", .object([("$exists", .bool(false))]))]),
            update: .object([("$set", .object([("closing", .string(UUID().uuidString))]))]))
        if let account = try db.find("accounts", filter: .object([("_id", .string(user))]), limit: 1).first,
            let token = account["closing"]?.stringValue
        {
            _ = try settle(db, id: "merge:" + token, user: pseudonym, credits: account["balance"]?.int64 ?? 0, allowOverdraft: true)
            _ = try db.delete("accounts", query: .object([("_id", .string(user))]))
        }
        // `_id` cannot change in place: the welcome row is copied under its new id, then removed.
        let welcomeID = JSONValue.string(LedgerEntry.welcomeID(for: user))
        if let welcome = try db.find("ledger", filter: .object([("_id", welcomeID)]), limit: 1).first {
            var moved = entry(from: welcome).detached(to: pseudonym)
            // A retry finds its own copy; a subject deleted before finds its earlier grant there.
            if let earlier = try db.find("ledger", filter: .object([("_id", .string(moved.id))]), limit: 1).first,
                earlier["created_at"]?.int64 != moved.createdAt
            {
                moved.id = entry(from: welcome).laterWelcomeID(of: pseudonym)
            }
            do {
                try db.insert("ledger", document(moved, state: welcome["state"]?.stringValue ?? "applied"))
            } catch StoreError.duplicateKey {}
            _ = try db.delete("ledger", query: .object([("_id", welcomeID)]))
        }
        _ = try db.update(
            "ledger", query: .object([("user", .string(user))]),
            update: .object([
                ("$set", .object([("user", .string(pseudonym))])),
                ("$unset", .object([("stream", .string("")), ("conversation", .string("")), ("room", .string("")), ("note", .string(""))])),
            ]), multi: true)
        return Int(try db.command(.object([("count", .string("ledger")), ("query", .object([("user", .string(pseudonym))]))]))["n"]?.int64 ?? 0)
    }

    private static func ids(_ db: Database, _ collection: String, _ filter: JSONValue) throws -> [JSONValue] {
        try db.find(collection, filter: filter, projection: .object([("_id", .int(1))])).compactMap { $0["_id"] }
    }

    /// Deletes the documents whose `field` is one of `values`, a bounded `$in` at a time.
    static func delete(_ db: Database, _ collection: String, field: String, in values: [JSONValue]) throws -> Int {
        var deleted = 0
        var start = 0
        while start < values.count {
            let chunk = Array(values[start..<min(values.count, start + 1000)])
            deleted += Int(try db.delete(collection, query: .object([(field, .object([("$in", .array(chunk))]))])))
            start += chunk.count
        }
        return deleted
    }

    public func purge(createdBefore cutoff: Int64, limit: Int) async throws -> PurgeResult {
        try await run { db in
            let old: JSONValue = .object([("$lt", .long(cutoff))])
            let messages = try db.find(
                "messages", filter: .object([("saved", .object([("$ne", .bool(true))])), ("created_at", old)]),
                sort: .object([("created_at", .int(1))]), projection: .object([("_id", .int(1))]), limit: limit)
            let entries = try db.find(
                "room_entries", filter: .object([("created_at", old)]),
                sort: .object([("created_at", .int(1))]), projection: .object([("_id", .int(1))]), limit: limit)
            return PurgeResult(
                messages: try Self.delete(db, "messages", field: "_id", in: messages.compactMap { $0["_id"] }),
                roomEntries: try Self.delete(db, "room_entries", field: "_id", in: entries.compactMap { $0["_id"] })
            )
        }
    }

    public func ping() async throws {
        // One attempt: a health check reports the store as it is now, not after backoff.
        try await run { db in _ = try db.command(.object([("ping", .int(1))]), attempts: 1) }
        try space.check()
    }

    public func saveStreamJournal(_ j: StreamJournal) async throws {
        try await saveStreamJournals([j])
    }

    /// A hundred upserts per command (a journal holds a reply's text: a command stays far below
    /// the 16 MB document limit).
    public func saveStreamJournals(_ journals: [StreamJournal], deleting finished: [String]) async throws {
        let statements: [JSONValue] = journals.map { j in
            let target = j.target.columns
            let fields: JSONValue = .object(
                (node.map { [("node", JSONValue.string($0))] } ?? []) + [
                    ("user", .string(j.user)), ("model", .string(j.model)), ("feature", .string(j.feature)),
                    ("input_tokens", .long(Int64(j.inputTokens))),
                    ("target_kind", .string(target.kind)), ("target_id", target.id.map(JSONValue.string) ?? .null),
                    ("speaker", target.speaker.map(JSONValue.string) ?? .null), ("message_id", .string(j.messageID)), ("text", .string(j.text)),
                    ("output_tokens", .long(Int64(j.outputTokens))), ("created_at", .long(j.createdAt)), ("updated_at", .long(j.updatedAt)),
                    ("ended", j.ended.map { .string($0.rawValue) } ?? .null),
                ])
            return .object([("q", .object([("_id", .string(j.stream))])), ("u", .object([("$set", fields)])), ("upsert", .bool(true))])
        }
        for start in stride(from: 0, to: statements.count, by: 100) {
            let chunk = Array(statements[start..<min(start + 100, statements.count)])
            try await run { db in _ = try db.updates("stream_journals", chunk) }
        }
        if !finished.isEmpty {
            try await run { db in _ = try Self.delete(db, "stream_journals", field: "_id", in: finished.map(JSONValue.string)) }
        }
    }

    public func deleteStreamJournal(stream: String) async throws {
        try await run { db in _ = try db.delete("stream_journals", query: .object([("_id", .string(stream))])) }
    }

    public func streamJournals(limit: Int, node: String?) async throws -> [StreamJournal] {
        let filter = leftovers(of: node)
        return try await run { db in
            try db.find("stream_journals", filter: filter, sort: .object([("created_at", .int(1)), ("_id", .int(1))]), limit: limit).map { d in
                StreamJournal(
                    stream: d["_id"]?.stringValue ?? "", user: d["user"]?.stringValue ?? "", model: d["model"]?.stringValue ?? "",
                    feature: d["feature"]?.stringValue ?? "", inputTokens: Int(d["input_tokens"]?.int64 ?? 0),
                    target: .init(kind: d["target_kind"]?.stringValue ?? "", id: d["target_id"]?.stringValue, speaker: d["speaker"]?.stringValue),
                    messageID: d["message_id"]?.stringValue ?? "", text: d["text"]?.stringValue ?? "",
                    outputTokens: Int(d["output_tokens"]?.int64 ?? 0),
                    createdAt: d["created_at"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0,
                    ended: d["ended"]?.stringValue.flatMap(StreamEndReason.init(rawValue:))
                )
            }
        }
    }

    public func appendAudit(_ e: AuditEvent) async throws {
        try await run { db in
            try db.insert(
                "audit",
                .object([
                    ("_id", .string(e.id)), ("at", .long(e.at)), ("actor", .string(e.actor)), ("action", .string(e.action)),
                    ("target", e.target.map(JSONValue.string) ?? .null), ("ip_hash", e.ipHash.map(JSONValue.string) ?? .null),
                    ("detail", AuditEvent.json(e.detail)),
                ]))
        }
    }

    public func auditEvents(limit: Int, before: String?, involving user: String?) async throws -> [AuditEvent] {
        try await run { db in
            var clauses: [(String, JSONValue)] = []
            if let before { clauses.append(("_id", .object([("$lt", .string(before))]))) }
            if let user { clauses.append(("$or", .array([.object([("actor", .string(user))]), .object([("target", .string(user))])]))) }
            let filter: JSONValue = .object(clauses)
            return try db.find("audit", filter: filter, sort: .object([("_id", .int(-1))]), limit: limit).map { d in
                AuditEvent(
                    id: d["_id"]?.stringValue ?? "", at: d["at"]?.int64 ?? 0, actor: d["actor"]?.stringValue ?? "",
                    action: d["action"]?.stringValue ?? "", target: d["target"]?.stringValue, ipHash: d["ip_hash"]?.stringValue,
                    detail: AuditEvent.detail(d["detail"]))
            }
        }
    }

    public func purgeAudit(before cutoff: Int64, limit: Int) async throws -> Int {
        try await run { db in
            let old = try db.find(
                "audit", filter: .object([("at", .object([("$lt", .long(cutoff))]))]), sort: .object([("at", .int(1))]),
                projection: .object([("_id", .int(1))]), limit: limit)
            return try Self.delete(db, "audit", field: "_id", in: old.compactMap { $0["_id"] })
        }
    }
}
