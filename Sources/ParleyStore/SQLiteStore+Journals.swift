import ParleyCore

/// What this process wrote of each streaming reply's journal: enough to tell whether the next
/// snapshot only adds to the text, so that it goes as a tail row (schema v23) instead of the
/// whole text again. Touched on the store's writer thread only, under the store's lock.
struct JournalTails: Sendable {
    struct Written: Sendable {
        var user: String
        /// UTF-8 bytes of text the row and its tails hold.
        var bytes: Int
        /// The last (up to 8) of those bytes, packed: a snapshot whose text has other bytes
        /// there is not an addition and is written whole.
        var end: UInt64
        var outputTokens: Int
        var updatedAt: Int64
        /// Tails written since the row's own text was.
        var tails: Int
    }

    var written: [String: Written] = [:]
    /// Tails appended since the last compaction.
    var appended = 0

    /// After a rollback: each journal is written whole next.
    mutating func forgetAll() {
        written.removeAll()
    }

    /// The last up to 8 of the first `bytes` UTF-8 bytes of `text`, packed.
    static func end(of text: String, at bytes: Int) -> UInt64 {
        let utf8 = text.utf8
        var packed: UInt64 = 0
        for byte in utf8[utf8.index(utf8.startIndex, offsetBy: max(0, bytes - 8))..<utf8.index(utf8.startIndex, offsetBy: bytes)] {
            packed = packed << 8 | UInt64(byte)
        }
        return packed
    }

    /// What `text` adds to the text `written` describes; nil when it does not begin with it.
    static func added(_ text: String, to written: Written) -> Substring? {
        guard text.utf8.count >= written.bytes, end(of: text, at: written.bytes) == written.end else { return nil }
        // A valid UTF-8 prefix ends on a scalar boundary, so this index is one of the text's.
        return text[text.utf8.index(text.utf8.startIndex, offsetBy: written.bytes)...]
    }
}

/// The journals of replies in flight.
extension SQLiteStore {
    static let journalColumns =
        "stream, user, model, feature, input_tokens, target_kind, target_id, speaker, message_id, text, output_tokens, created_at, updated_at, ended"
    /// Tails a journal takes before its row is written whole again (then its tails are no longer read).
    static let maxTails = 32
    /// Tails appended between two compactions.
    static let compactionInterval = 4_096

    public func saveStreamJournal(_ j: StreamJournal) async throws {
        try await saveStreamJournals([j])
    }

    /// One call, so one group commit, for all of them. A stream's snapshot that only adds to the
    /// text this process last wrote for it goes as a tail row: a reply's text is then written
    /// about once per `maxTails` snapshots, not every time.
    public func saveStreamJournals(_ journals: [StreamJournal], deleting finished: [String]) async throws {
        guard !journals.isEmpty || !finished.isEmpty else { return }
        try await run { db in
            try self.journaled.withLock { state in
                do {
                    try Self.write(journals, deleting: finished, db, &state)
                } catch {
                    // Rolled back to before this call: what it wrote is unknown again. (A failed
                    // commit forgets every journal: see `drain`.)
                    for j in journals { state.written[j.stream] = nil }
                    throw error
                }
            }
        }
    }

    private static func write(_ journals: [StreamJournal], deleting finished: [String], _ db: SQLiteConnection, _ state: inout JournalTails) throws {
        for stream in finished {
            try db.query("DELETE FROM stream_journals WHERE stream = ?", [.text(stream)])
            state.written[stream] = nil
        }
        for j in journals {
            // An ended reply's journal is written whole once, with how it ended.
            if j.ended == nil, var written = state.written[j.stream], written.tails < maxTails,
                let added = JournalTails.added(j.text, to: written)
            {
                guard !added.isEmpty || j.outputTokens != written.outputTokens || j.updatedAt != written.updatedAt else { continue }
                try db.query(
                    "INSERT INTO stream_journal_tails(stream, user, text, output_tokens, updated_at) VALUES(?, ?, ?, ?, ?)",
                    [.text(j.stream), .text(j.user), .text(String(added)), .int(Int64(j.outputTokens)), .int(j.updatedAt)])
                written.bytes += added.utf8.count
                written.end = JournalTails.end(of: j.text, at: written.bytes)
                written.outputTokens = j.outputTokens
                written.updatedAt = j.updatedAt
                written.tails += 1
                state.written[j.stream] = written
                state.appended += 1
            } else {
                // Whole: the tails written so far for the stream are then no longer its.
                let target = j.target.columns
                try db.query(
                    "INSERT OR REPLACE INTO stream_journals(\(Self.journalColumns), tail_from) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        .text(j.stream), .text(j.user), .text(j.model), .text(j.feature), .int(Int64(j.inputTokens)), .text(target.kind),
                        target.id.map(SQLValue.text) ?? .null, target.speaker.map(SQLValue.text) ?? .null, .text(j.messageID), .text(j.text),
                        .int(Int64(j.outputTokens)), .int(j.createdAt), .int(j.updatedAt), j.ended.map { .text($0.rawValue) } ?? .null,
                        .int(try newestTail(db)),
                    ]
                )
                let bytes = j.text.utf8.count
                state.written[j.stream] = JournalTails.Written(
                    user: j.user, bytes: bytes, end: JournalTails.end(of: j.text, at: bytes), outputTokens: j.outputTokens,
                    updatedAt: j.updatedAt, tails: 0)
            }
        }
        if state.appended >= compactionInterval {
            try compactTails(db, &state)
            state.appended = 0
        }
    }

    /// The id of the newest tail (0: none); AUTOINCREMENT never gives a later tail a lower one.
    private static func newestTail(_ db: SQLiteConnection) throws -> Int64 {
        try db.query("SELECT coalesce(max(id), 0) AS id FROM stream_journal_tails").first?["id"].int ?? 0
    }

    /// The oldest `tail_from` of any journal: tails at or below it are no journal's.
    private static func oldestTailFrom(_ db: SQLiteConnection) throws -> Int64? {
        try db.query("SELECT min(tail_from) AS f FROM stream_journals").first?["f"].int
    }

    /// Deletes the tails no journal reads any more. A journal whose row was not written whole for
    /// long (a reply waiting for its model, one a crash left) holds all the later ones back: once
    /// that backlog is past 64 tails a streaming reply (at least 65,536; tests give their own),
    /// the journals behind the newest half of it take their tails into their row first.
    static func compactTails(_ db: SQLiteConnection, _ state: inout JournalTails, backlog: Int64? = nil) throws {
        let newest = try newestTail(db)
        let backlog = backlog ?? Int64(max(65_536, 64 * state.written.count))
        var oldest = try oldestTailFrom(db)
        if let from = oldest, newest - from > backlog {
            try foldTails(before: newest - backlog / 2, through: newest, db, &state)
            oldest = try oldestTailFrom(db)
        }
        try db.query("DELETE FROM stream_journal_tails WHERE id <= ?", [.int(oldest ?? newest)])
    }

    /// Takes every journal's tails into its row (at open: those a crash left), so that reading
    /// them back at start-up reads rows alone.
    static func foldAllTails(_ db: SQLiteConnection) throws {
        var state = JournalTails()
        try db.transaction {
            let newest = try newestTail(db)
            guard newest > 0 else { return }
            try foldTails(before: .max, through: newest, db, &state)
            try db.query("DELETE FROM stream_journal_tails WHERE id <= ?", [.int(newest)])
        }
    }

    /// Appends to each journal whose `tail_from` is below `cut` its tails (through `newest`),
    /// in one pass over them.
    private static func foldTails(before cut: Int64, through newest: Int64, _ db: SQLiteConnection, _ state: inout JournalTails) throws {
        var from: [String: Int64] = [:]
        for row in try db.query("SELECT stream, tail_from FROM stream_journals WHERE tail_from < ?", [.int(cut)]) {
            if let stream = row["stream"].text { from[stream] = row["tail_from"].int ?? 0 }
        }
        let added = try tails(after: from, through: newest, db)
        for stream in from.keys {
            if let tail = added[stream] {
                try db.query(
                    "UPDATE stream_journals SET text = text || ?, output_tokens = ?, updated_at = ?, tail_from = ? WHERE stream = ?",
                    [.text(tail.text), .int(tail.outputTokens), .int(tail.updatedAt), .int(newest), .text(stream)])
            } else {
                try db.query("UPDATE stream_journals SET tail_from = ? WHERE stream = ?", [.int(newest), .text(stream)])
            }
            state.written[stream]?.tails = 0
        }
    }

    /// What the tails of the streams in `from` add to their rows: each stream's tails numbered
    /// above its `tail_from` (and at most `newest`), in order, read in one pass from the lowest.
    private static func tails(
        after from: [String: Int64], through newest: Int64 = .max, _ db: SQLiteConnection
    ) throws -> [String: (text: String, outputTokens: Int64, updatedAt: Int64)] {
        guard let first = from.values.min() else { return [:] }
        var added: [String: (text: String, outputTokens: Int64, updatedAt: Int64)] = [:]
        let tails = try db.query(
            "SELECT id, stream, text, output_tokens, updated_at FROM stream_journal_tails WHERE id > ? AND id <= ? ORDER BY id",
            [.int(first), .int(newest)])
        for tail in tails {
            guard let stream = tail["stream"].text, let after = from[stream], let id = tail["id"].int, id > after else { continue }
            added[stream, default: ("", 0, 0)].text += tail["text"].text ?? ""
            added[stream]?.outputTokens = tail["output_tokens"].int ?? 0
            added[stream]?.updatedAt = tail["updated_at"].int ?? 0
        }
        return added
    }

    public func deleteStreamJournal(stream: String) async throws {
        try await saveStreamJournals([], deleting: [stream])
    }

    public func streamJournals(limit: Int, node: String?) async throws -> [StreamJournal] {
        try await read { db in
            var from: [String: Int64] = [:]
            let rows = try db.query(
                "SELECT \(Self.journalColumns), tail_from FROM stream_journals ORDER BY created_at, stream LIMIT ?", [.int(Int64(limit))])
            var journals = rows.map { r in
                let journal = StreamJournal(
                    stream: r["stream"].text ?? "", user: r["user"].text ?? "", model: r["model"].text ?? "", feature: r["feature"].text ?? "",
                    inputTokens: Int(r["input_tokens"].int ?? 0),
                    target: .init(kind: r["target_kind"].text ?? "", id: r["target_id"].text, speaker: r["speaker"].text),
                    messageID: r["message_id"].text ?? "", text: r["text"].text ?? "",
                    outputTokens: Int(r["output_tokens"].int ?? 0), createdAt: r["created_at"].int ?? 0, updatedAt: r["updated_at"].int ?? 0,
                    ended: r["ended"].text.flatMap(StreamEndReason.init(rawValue:))
                )
                from[journal.stream] = r["tail_from"].int ?? 0
                return journal
            }
            // Compaction keeps the tails above the oldest `tail_from` few.
            let added = try Self.tails(after: from, db)
            for index in journals.indices {
                guard let tail = added[journals[index].stream] else { continue }
                journals[index].text += tail.text
                journals[index].outputTokens = Int(tail.outputTokens)
                journals[index].updatedAt = tail.updatedAt
            }
            return journals
        }
    }
}
