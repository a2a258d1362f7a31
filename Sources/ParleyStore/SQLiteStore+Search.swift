import ParleyCore

extension SQLiteStore {
    /// Through the FTS5 tables (schema v11): each kind's newest `limit` hits of the owner, merged.
    public func search(owner: String, query: SearchQuery, limit: Int, before: String?) async throws -> [SearchHit] {
        let messagePage = Self.cursor("m.id", "<", SearchHit.bound(before, prefix: .message))
        let titlePage = Self.cursor("c.id", "<", SearchHit.bound(before, prefix: .conversation))
        let columns = Self.messageFields.split(separator: ",").map { "m." + $0.trimmingCharacters(in: .whitespaces) }.joined(separator: ", ")
        return try await read { db in
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
            let columns = Self.conversationColumns.split(separator: ",").map { "c." + $0.trimmingCharacters(in: .whitespaces) }
            let titles = try db.query(
                """
                SELECT \(columns.joined(separator: ", ")) FROM titles_fts f JOIN conversations c ON c.rowid = f.rowid
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
}
