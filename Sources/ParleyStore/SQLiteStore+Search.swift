import ParleyCore

extension SQLiteStore {
    /// Through the FTS5 tables (schema v11): each kind's newest `limit` hits of the owner, merged.
    public func search(owner: String, query: SearchQuery, limit: Int, before: String?) async throws -> [SearchHit] {
        let messagePage = Self.cursor("m.id", "<", SearchHit.bound(before, prefix: .message))
        let titlePage = Self.cursor("c.id", "<", SearchHit.bound(before, prefix: .conversation))
        let hits = try await read { db -> [SearchHit]? in
            guard try !Self.searchIsBehind(db) else { return nil }
            return try Self.search(db, owner: owner, query: query, limit: limit, messagePage: messagePage, titlePage: titlePage)
        }
        if let hits { return hits }
        // Rows stored since the last catch-up are indexed first (by the writer): a search finds
        // every message and title whose commit was answered before it began.
        try await run { db in try Self.indexForSearch(db, limit: .max) }
        return try await read { db in
            try Self.search(db, owner: owner, query: query, limit: limit, messagePage: messagePage, titlePage: titlePage)
        }
    }

    /// The search indexes (v22's `search_progress`) and what each covers.
    static let searchIndexes = [("messages_fts", column: "text", of: "messages"), ("titles_fts", column: "title", of: "conversations")]

    /// Whether rows were stored since an index last caught up.
    static func searchIsBehind(_ db: SQLiteConnection) throws -> Bool {
        try searchIndexes.contains { index, _, table in
            try db.query(
                "SELECT (SELECT coalesce(max(rowid), 0) FROM \(table)) > (SELECT through FROM search_progress WHERE name = ?) AS behind",
                [.text(index)]
            ).first?["behind"].int == 1
        }
    }

    /// Indexes the rows stored since each index last caught up, `limit` per index at most (one
    /// FTS segment for all of them instead of one per commit).
    static func indexForSearch(_ db: SQLiteConnection, limit: Int) throws {
        for (index, column, table) in searchIndexes {
            let through = try db.query("SELECT through FROM search_progress WHERE name = ?", [.text(index)]).first?["through"].int ?? 0
            guard
                let last = try db.query(
                    "SELECT max(rowid) AS last FROM (SELECT rowid FROM \(table) WHERE rowid > ? ORDER BY rowid LIMIT ?)",
                    [.int(through), .int(Int64(limit))]
                ).first?["last"].int
            else { continue }
            try db.query(
                "INSERT INTO \(index)(rowid, \(column)) SELECT rowid, \(column) FROM \(table) WHERE rowid > ? AND rowid <= ?",
                [.int(through), .int(last)])
            try db.query("UPDATE search_progress SET through = ? WHERE name = ?", [.int(last), .text(index)])
        }
    }

    private static func search(
        _ db: SQLiteConnection, owner: String, query: SearchQuery, limit: Int, messagePage: (sql: String, params: [SQLValue]),
        titlePage: (sql: String, params: [SQLValue])
    ) throws -> [SearchHit] {
        let columns = Self.messageFields.split(separator: ",").map { "m." + $0.trimmingCharacters(in: .whitespaces) }.joined(separator: ", ")
        let match = SQLValue.text(query.ftsExpression)
        let messages = try db.query(
            """
            SELECT \(columns), c.owner AS c_owner, c.clone AS c_clone, c.title AS c_title,
                c.created_at AS c_created_at, c.updated_at AS c_updated_at
            FROM messages_fts f JOIN messages m ON m.rowid = f.rowid JOIN conversations c ON c.id = m.conversation
            WHERE messages_fts MATCH ? AND c.owner = ?\(messagePage.sql) ORDER BY m.id DESC LIMIT ?
            """,
            [match, .text(owner)] + messagePage.params + [.int(Int64(limit))]
        ).map { row in
            let message = Self.message(from: row)
            let conversation = Conversation(
                id: message.conversation, owner: row["c_owner"].text ?? "", clone: row["c_clone"].text ?? "",
                title: row["c_title"].text ?? "", createdAt: row["c_created_at"].int ?? 0, updatedAt: row["c_updated_at"].int ?? 0)
            return SearchHit(kind: .message, id: message.id, conversation: conversation, message: message)
        }
        let titleColumns = Self.conversationColumns.split(separator: ",").map { "c." + $0.trimmingCharacters(in: .whitespaces) }
        let titles = try db.query(
            """
            SELECT \(titleColumns.joined(separator: ", ")) FROM titles_fts f JOIN conversations c ON c.rowid = f.rowid
            WHERE titles_fts MATCH ? AND c.owner = ?\(titlePage.sql) ORDER BY c.id DESC LIMIT ?
            """,
            [match, .text(owner)] + titlePage.params + [.int(Int64(limit))]
        ).map { row in
            let conversation = Self.conversation(from: row)
            return SearchHit(kind: .title, id: conversation.id, conversation: conversation)
        }
        return SearchHit.newestFirst(messages + titles, limit: limit)
    }
}
