import ParleyCore

/// Users, clones, conversations and messages.
extension SQLiteStore {
    // MARK: Users

    public func ensureUser(_ id: String, now: Int64) async throws -> User {
        try await run { db in
            try db.query("INSERT INTO users(id, created_at) VALUES(?, ?) ON CONFLICT(id) DO NOTHING", [.text(id), .int(now)])
            let row = try db.query("SELECT created_at FROM users WHERE id = ?", [.text(id)]).first
            return User(id: id, createdAt: row?["created_at"].int ?? now)
        }
    }

    // MARK: Clones

    static let cloneColumns = "id, owner, name, traits, system_prompt, sliders, memory, model, profile, created_at, updated_at"

    public func createClone(_ clone: Clone) async throws {
        defer { decodedClones.written(ids: [clone.id]) }
        try await run { db in
            try db.query(
                "INSERT INTO clones(\(Self.cloneColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [.text(clone.id), .text(clone.owner)] + Self.cloneValues(clone) + [.int(clone.createdAt), .int(clone.updatedAt)]
            )
        }
    }

    // A clone decoded lately is not read again (`DecodedClones`). A clone's row is decoded after
    // the read connection is let go: its profile may hold a megabyte of lorebook to parse, and
    // every other read (the reply's own history among them) would wait for it.
    public func clone(id: String, owner: String) async throws -> Clone? {
        if let decoded = decodedClones.clone(id: id, owner: owner) { return decoded }
        let generation = decodedClones.generation
        guard
            let row = try await read({ db in
                try db.query("SELECT \(Self.cloneColumns) FROM clones WHERE id = ? AND owner = ?", [.text(id), .text(owner)]).first
            })
        else { return nil }
        let clone = try Self.clone(from: row)
        let bytes = ["profile", "system_prompt", "traits", "memory", "sliders"].reduce(0) { $0 + (row[$1].text?.utf8.count ?? 0) }
        decodedClones.keep(clone, bytes: bytes, readAt: generation)
        return clone
    }

    public func clones(owner: String, limit: Int, after: String?) async throws -> [Clone] {
        let page = Self.cursor("id", ">", after)
        return try await read { db in
            try db.query(
                "SELECT \(Self.cloneColumns) FROM clones WHERE owner = ?\(page.sql) ORDER BY id LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            )
        }.map(Self.clone(from:))
    }

    public func cloneCount(owner: String) async throws -> Int {
        try await read { db in
            Int(try db.query("SELECT count(*) AS n FROM clones WHERE owner = ?", [.text(owner)]).first?["n"].int ?? 0)
        }
    }

    public func updateClone(_ clone: Clone) async throws -> Bool {
        defer { decodedClones.written(ids: [clone.id]) }
        return try await run { db in
            try db.query(
                "UPDATE clones SET name = ?, traits = ?, system_prompt = ?, sliders = ?, memory = ?, model = ?, profile = ?, updated_at = ? WHERE id = ? AND owner = ?",
                Self.cloneValues(clone) + [.int(clone.updatedAt), .text(clone.id), .text(clone.owner)]
            )
            return db.changes > 0
        }
    }

    public func deleteClone(id: String, owner: String) async throws -> Bool {
        defer { decodedClones.written(ids: [id]) }
        return try await run { db in
            // Conversations and messages go with it through ON DELETE CASCADE.
            try db.query("DELETE FROM clones WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
            return db.changes > 0
        }
    }

    static func cloneValues(_ clone: Clone) -> [SQLValue] {
        [
            .text(clone.name),
            .text(JSONValue.array(clone.traits.map(JSONValue.string)).serializedString()),
            .text(clone.systemPrompt),
            .text(clone.slidersJSON.serializedString()),
            .text(JSONValue.array(clone.memory.map(JSONValue.string)).serializedString()),
            clone.model.map(SQLValue.text) ?? .null,
            clone.profile.isEmpty ? .null : .text(CharacterCard.storageText(clone.profile)),
        ]
    }

    static func clone(from row: SQLRow) throws -> Clone {
        var sliders: [String: Int] = [:]
        if case .object(let pairs) = try JSONValue.parse(Array((row["sliders"].text ?? "{}").utf8)) {
            for (key, value) in pairs { if case .int(let v) = value { sliders[key] = Int(v) } }
        }
        return Clone(
            id: row["id"].text ?? "", owner: row["owner"].text ?? "", name: row["name"].text ?? "",
            traits: try Self.strings(row["traits"]), systemPrompt: row["system_prompt"].text ?? "", sliders: sliders,
            memory: try Self.strings(row["memory"]), createdAt: row["created_at"].int ?? 0, updatedAt: row["updated_at"].int ?? 0,
            model: row["model"].text,
            profile: CharacterCard.profile(fromStorage: row["profile"].text)
        )
    }

    // MARK: Conversations

    static let conversationColumns = "id, owner, clone, title, created_at, updated_at, summary, summary_through"

    public func createConversation(_ c: Conversation, messages: [Message]) async throws {
        try await run { db in try Self.storeOpening(.conversation(c, messages: messages), in: db) }
    }

    /// Stores a reply's opening inside the caller's transaction.
    static func storeOpening(_ opening: ReplyOpening, in db: SQLiteConnection) throws {
        switch opening {
        case .conversation(let c, let messages):
            try insert(c, into: db, orIgnore: false)
            for message in messages { try insert(message, into: db, orIgnore: false) }
        case .messages(let messages, let replacing):
            for (index, message) in messages.enumerated() {
                if index == 0, let replacing {
                    guard try appendAlternative(message, replacing: replacing, in: db) != nil else { throw ReplacedMessageLeftPath(id: replacing) }
                } else {
                    try insert(message, into: db, orIgnore: false)
                }
            }
        }
    }

    static func insert(_ c: Conversation, into db: SQLiteConnection, orIgnore: Bool) throws {
        try db.query(
            "INSERT INTO conversations(\(Self.conversationColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?)" + (orIgnore ? " ON CONFLICT(id) DO NOTHING" : ""),
            [
                .text(c.id), .text(c.owner), .text(c.clone), .text(c.title), .int(c.createdAt), .int(c.updatedAt),
                c.summary.map { .text($0.text) } ?? .null, c.summary.map { .text($0.through) } ?? .null,
            ]
        )
    }

    public func conversation(id: String, owner: String) async throws -> Conversation? {
        try await read { db in
            try db.query("SELECT \(Self.conversationColumns) FROM conversations WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
                .first.map(Self.conversation(from:))
        }
    }

    public func renameConversation(id: String, owner: String, title: String) async throws -> Conversation? {
        try await run { db in
            try db.query("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?", [.text(title), .text(id), .text(owner)])
            guard db.changes > 0 else { return nil }
            return try db.query("SELECT \(Self.conversationColumns) FROM conversations WHERE id = ?", [.text(id)]).first.map(Self.conversation(from:))
        }
    }

    public func setSummary(_ summary: ConversationSummary, conversation id: String, owner: String, replacing previous: String?) async throws -> Bool {
        try await run { db in
            try db.query(
                "UPDATE conversations SET summary = ?, summary_through = ? WHERE id = ? AND owner = ? AND summary_through IS ?",
                [.text(summary.text), .text(summary.through), .text(id), .text(owner), previous.map(SQLValue.text) ?? .null])
            return db.changes > 0
        }
    }

    public func deleteConversation(id: String, owner: String) async throws -> Bool {
        try await run { db in
            // Its messages go with it through ON DELETE CASCADE.
            try db.query("DELETE FROM conversations WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
            return db.changes > 0
        }
    }

    public func conversations(owner: String, limit: Int, before: String?) async throws -> [Conversation] {
        let page = Self.cursor("id", "<", before)
        return try await read { db in
            try db.query(
                "SELECT \(Self.conversationColumns) FROM conversations WHERE owner = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map(Self.conversation(from:))
        }
    }

    static func conversation(from row: SQLRow) -> Conversation {
        Conversation(
            id: row["id"].text ?? "", owner: row["owner"].text ?? "", clone: row["clone"].text ?? "", title: row["title"].text ?? "",
            createdAt: row["created_at"].int ?? 0, updatedAt: row["updated_at"].int ?? 0,
            summary: row["summary"].text.flatMap { text in row["summary_through"].text.map { ConversationSummary(text: text, through: $0) } }
        )
    }

    // MARK: Messages

    static let messageColumns = "id, conversation, role, text, created_at, reason, input_tokens, output_tokens, stream, saved, parent"
    /// What a read returns: the stored columns and whether it is on the path.
    static let messageFields = messageColumns + ", off_path"

    public func appendMessage(_ m: Message) async throws {
        try await run { db in
            try db.transaction { try Self.insert(m, into: db, orIgnore: false) }
        }
    }

    /// Inserts a message and moves its conversation's `updated_at`; `orIgnore` keeps an existing
    /// message with the same id instead of failing.
    static func insert(_ m: Message, into db: SQLiteConnection, orIgnore: Bool) throws {
        // Without a parent it follows the path's last message ('' when it is the first); with
        // one, it is on the path only when that is its parent (`ChatStore.appendMessage`).
        let last =
            try db.query(
                "SELECT id FROM messages WHERE conversation = ? AND off_path = 0 ORDER BY id DESC LIMIT 1", [.text(m.conversation)]
            ).first?["id"].text ?? ""
        let parent = m.parent ?? last
        if parent != last, !parent.isEmpty,
            try db.query("SELECT 1 FROM messages WHERE id = ? AND conversation = ?", [.text(parent), .text(m.conversation)]).isEmpty
        {
            throw ParentMessageGone(id: parent)
        }
        try db.query(
            "INSERT INTO messages(\(Self.messageFields)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                + (orIgnore ? " ON CONFLICT(id) DO NOTHING" : ""),
            [
                .text(m.id), .text(m.conversation), .text(m.role.rawValue), .text(m.text), .int(m.createdAt),
                m.reason.map { .text($0.rawValue) } ?? .null,
                m.usage.map { .int(Int64($0.inputTokens)) } ?? .null,
                m.usage.map { .int(Int64($0.outputTokens)) } ?? .null,
                m.stream.map(SQLValue.text) ?? .null,
                .int(m.saved ? 1 : 0),
                .text(parent), .int(parent == last ? 0 : 1),
            ]
        )
        try db.query(
            "UPDATE conversations SET updated_at = max(updated_at, ?) WHERE id = ?",
            [.int(m.createdAt), .text(m.conversation)]
        )
    }

    public func message(id: String, conversation: String) async throws -> Message? {
        try await read { db in
            try db.query("SELECT \(Self.messageFields) FROM messages WHERE id = ? AND conversation = ?", [.text(id), .text(conversation)])
                .first.map(Self.message(from:))
        }
    }

    public func message(id: String) async throws -> Message? {
        try await read { db in
            try db.query("SELECT \(Self.messageFields) FROM messages WHERE id = ?", [.text(id)]).first.map(Self.message(from:))
        }
    }

    public func messages(conversation: String, limit: Int, before: String?) async throws -> [Message] {
        try await messages(conversation: conversation, limit: limit, before: before, pathOnly: true)
    }

    public func everyMessage(conversation: String, limit: Int, before: String?) async throws -> [Message] {
        try await messages(conversation: conversation, limit: limit, before: before, pathOnly: false)
    }

    private func messages(conversation: String, limit: Int, before: String?, pathOnly: Bool) async throws -> [Message] {
        let page = Self.cursor("id", "<", before)
        return try await read { db in
            try db.query(
                "SELECT \(Self.messageFields) FROM messages WHERE conversation = ?\(pathOnly ? " AND off_path = 0" : "")\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(conversation)] + page.params + [.int(Int64(limit))]
            ).reversed().map(Self.message(from:))
        }
    }

    public func appendAlternative(_ message: Message, replacing replaced: String) async throws -> Message? {
        try await run { db in try Self.appendAlternative(message, replacing: replaced, in: db) }
    }

    static func appendAlternative(_ message: Message, replacing replaced: String, in db: SQLiteConnection) throws -> Message? {
        try db.transaction { () throws -> Message? in
            let conversation = SQLValue.text(message.conversation)
            guard
                let row = try db.query(
                    "SELECT parent FROM messages WHERE id = ? AND conversation = ? AND off_path = 0", [.text(replaced), conversation]
                ).first
            else { return nil }
            var parent = row["parent"].text
            if parent == nil {
                // Stored before messages had parents: its parent is the path's message before it.
                parent =
                    try db.query(
                        "SELECT id FROM messages WHERE conversation = ? AND off_path = 0 AND id < ? ORDER BY id DESC LIMIT 1",
                        [conversation, .text(replaced)]
                    ).first?["id"].text ?? ""
                try db.query("UPDATE messages SET parent = ? WHERE id = ?", [.text(parent!), .text(replaced)])
            }
            try db.query("UPDATE messages SET off_path = 1 WHERE conversation = ? AND off_path = 0 AND id >= ?", [conversation, .text(replaced)])
            var stored = message
            stored.parent = parent
            try Self.insert(stored, into: db, orIgnore: false)
            stored.parent = parent!.isEmpty ? nil : parent
            return stored
        }
    }

    public func activate(message: String, conversation: String) async throws -> Bool {
        try await run { db in
            try db.transaction { () throws -> Bool in
                guard let path = try Self.tree(conversation, db).path(through: message) else { return false }
                try Self.setPath(path, of: conversation, db)
                return true
            }
        }
    }

    public func deleteMessage(id: String, conversation: String) async throws -> Int {
        try await run { db in
            try db.transaction { () throws -> Int in
                let tree = try Self.tree(conversation, db)
                let doomed = tree.subtree(of: id)
                guard let parent = tree.parent(of: id),
                    let onPath = try db.query("SELECT off_path FROM messages WHERE id = ?", [.text(id)]).first?["off_path"].int
                else { return 0 }
                for chunk in Self.chunks(doomed) {
                    try db.query(
                        "DELETE FROM messages WHERE conversation = ? AND id IN (\(Self.marks(chunk.count)))",
                        [.text(conversation)] + chunk.map(SQLValue.text))
                }
                if onPath == 0, let path = tree.pathAfterRemoving(Set(doomed), parent: parent) { try Self.setPath(path, of: conversation, db) }
                return doomed.count
            }
        }
    }

    /// The conversation's messages as a tree.
    static func tree(_ conversation: String, _ db: SQLiteConnection) throws -> MessageTree {
        let rows = try db.query("SELECT id, parent FROM messages WHERE conversation = ? ORDER BY id", [.text(conversation)])
        return MessageTree(rows.map { (id: $0["id"].text ?? "", parent: $0["parent"].text) })
    }

    /// Makes `path` the conversation's path: every other message leaves it.
    static func setPath(_ path: [String], of conversation: String, _ db: SQLiteConnection) throws {
        try db.query("UPDATE messages SET off_path = 1 WHERE conversation = ? AND off_path = 0", [.text(conversation)])
        for chunk in chunks(path) {
            try db.query(
                "UPDATE messages SET off_path = 0 WHERE conversation = ? AND id IN (\(marks(chunk.count)))",
                [.text(conversation)] + chunk.map(SQLValue.text))
        }
    }

    /// Ids in runs short enough for one statement's parameters.
    static func chunks(_ ids: [String]) -> [ArraySlice<String>] {
        stride(from: 0, to: ids.count, by: 500).map { ids[$0..<min($0 + 500, ids.count)] }
    }

    static func marks(_ count: Int) -> String { Array(repeating: "?", count: count).joined(separator: ", ") }

    public func alternatives(of messages: [String], conversation: String) async throws -> [String: Alternatives] {
        guard !messages.isEmpty else { return [:] }
        return try await read { db in
            let rows = try db.query(
                "SELECT id, parent FROM messages WHERE conversation = ? AND id IN (\(Self.marks(messages.count)))",
                [.text(conversation)] + messages.map(SQLValue.text))
            let parents = Set(rows.compactMap { $0["parent"].text })
            var siblings: [String: [String]] = [:]
            if !parents.isEmpty {
                let found = try db.query(
                    "SELECT id, parent FROM messages WHERE conversation = ? AND parent IN (\(Self.marks(parents.count))) ORDER BY id",
                    [.text(conversation)] + parents.map(SQLValue.text))
                for row in found { siblings[row["parent"].text ?? "", default: []].append(row["id"].text ?? "") }
            }
            return MessageTree.alternatives(rows.map { (id: $0["id"].text ?? "", parent: $0["parent"].text) }, siblings: siblings)
        }
    }

    static func message(from row: SQLRow) -> Message {
        var usage: Usage?
        if let input = row["input_tokens"].int, let output = row["output_tokens"].int {
            usage = Usage(inputTokens: Int(input), outputTokens: Int(output))
        }
        return Message(
            id: row["id"].text ?? "", conversation: row["conversation"].text ?? "", role: Role(rawValue: row["role"].text ?? "") ?? .user,
            text: row["text"].text ?? "", createdAt: row["created_at"].int ?? 0,
            reason: row["reason"].text.flatMap(StreamEndReason.init(rawValue:)), usage: usage, stream: row["stream"].text,
            saved: row["saved"].int == 1, parent: row["parent"].text.flatMap { $0.isEmpty ? nil : $0 }, onPath: row["off_path"].int != 1
        )
    }
}
