#if canImport(Glibc)
import Glibc
#endif
import CoreMetrics
import NIOCore
import NIOPosix
import ParleyCore
import Synchronization

/// The embedded, zero-setup store: one SQLite file in WAL mode with `synchronous=FULL`, so a
/// commit that returned survives a crash of the process or the machine. Calls run on a private
/// NIOThreadPool; the single connection is serialised by a mutex (SQLite writes are serial anyway).
public final class SQLiteStore: Store {
    /// Schema migrations; entry N brings the schema from version N to N+1.
    static let migrations: [String] = [
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            created_at INTEGER NOT NULL
        );
        CREATE TABLE clones (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            traits TEXT NOT NULL,
            system_prompt TEXT NOT NULL,
            sliders TEXT NOT NULL,
            memory TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX clones_by_owner ON clones(owner, id);
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            clone TEXT NOT NULL REFERENCES clones(id) ON DELETE CASCADE,
            title TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX conversations_by_owner ON conversations(owner, id);
        CREATE INDEX conversations_by_clone ON conversations(clone);
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            text TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            reason TEXT,
            input_tokens INTEGER,
            output_tokens INTEGER,
            stream TEXT
        );
        CREATE INDEX messages_by_conversation ON messages(conversation, id);
        """,
        // v2: credits. A ledger row and its balance change commit in one transaction.
        """
        CREATE TABLE accounts (
            user TEXT PRIMARY KEY,
            balance INTEGER NOT NULL
        );
        CREATE TABLE ledger (
            id TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            kind TEXT NOT NULL,
            credits INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            stream TEXT,
            conversation TEXT,
            room TEXT,
            model TEXT,
            feature TEXT,
            note TEXT,
            created_at INTEGER NOT NULL
        );
        CREATE INDEX ledger_by_user ON ledger(user, created_at, id);
        """,
        // v3: scheduled messages. No foreign key to clones: a schedule outlives its clone as history.
        """
        CREATE TABLE schedules (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            clone TEXT NOT NULL,
            conversation TEXT,
            at INTEGER NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            message TEXT,
            failure TEXT
        );
        CREATE INDEX schedules_by_owner ON schedules(owner, id);
        CREATE INDEX schedules_by_status ON schedules(status, id);
        """,
        // v4: debate rooms and their transcripts.
        """
        CREATE TABLE rooms (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            topic TEXT NOT NULL,
            debaters TEXT NOT NULL,
            rounds INTEGER NOT NULL,
            policy TEXT NOT NULL,
            max_tokens INTEGER NOT NULL,
            visibility TEXT NOT NULL,
            status TEXT NOT NULL,
            turns_taken INTEGER NOT NULL,
            muted TEXT NOT NULL,
            kicked TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX rooms_by_status ON rooms(status, id);
        CREATE TABLE room_entries (
            id TEXT PRIMARY KEY,
            room TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            speaker TEXT NOT NULL,
            text TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            reason TEXT,
            stream TEXT
        );
        CREATE INDEX room_entries_by_room ON room_entries(room, id);
        """,
        // v5: translation chats (members and languages; translations linked to their original).
        """
        ALTER TABLE rooms ADD COLUMN kind TEXT NOT NULL DEFAULT 'debate';
        ALTER TABLE rooms ADD COLUMN members TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE rooms ADD COLUMN languages TEXT NOT NULL DEFAULT '{}';
        ALTER TABLE room_entries ADD COLUMN lang TEXT;
        ALTER TABLE room_entries ADD COLUMN source TEXT;
        ALTER TABLE room_entries ADD COLUMN speaker_is_clone INTEGER NOT NULL DEFAULT 0;
        UPDATE room_entries SET speaker_is_clone = 1 WHERE kind = 'turn';
        """,
        // v6: a clone may name its model (NULL: the server's default).
        "ALTER TABLE clones ADD COLUMN model TEXT;",
        // v7: what a Character Card brought (CharacterCard.storageJSON; NULL for a clone made here).
        "ALTER TABLE clones ADD COLUMN profile TEXT;",
        // v8: the privacy promises: saved messages, retention by age, export by owner, the audit log.
        """
        ALTER TABLE messages ADD COLUMN saved INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX messages_unsaved_by_age ON messages(created_at) WHERE saved = 0;
        CREATE INDEX room_entries_by_age ON room_entries(created_at);
        CREATE INDEX room_entries_by_speaker ON room_entries(speaker) WHERE speaker_is_clone = 0;
        CREATE INDEX rooms_by_owner ON rooms(owner, id);
        CREATE TABLE audit (
            id TEXT PRIMARY KEY,
            at INTEGER NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            ip_hash TEXT,
            detail TEXT NOT NULL
        );
        CREATE INDEX audit_by_actor ON audit(actor);
        CREATE INDEX audit_by_target ON audit(target);
        """,
        // v9: the journals of replies in flight, so a crash cannot lose what a user saw.
        """
        CREATE TABLE stream_journals (
            stream TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            model TEXT NOT NULL,
            feature TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            target_kind TEXT NOT NULL,
            target_id TEXT,
            speaker TEXT,
            message_id TEXT NOT NULL,
            text TEXT NOT NULL,
            output_tokens INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX stream_journals_by_user ON stream_journals(user);
        """,
    ]

    public static var schemaVersion: Int { migrations.count }

    private let db: Mutex<SQLiteConnection>
    private let pool: NIOThreadPool
    private let closed = Atomic(false)
    /// `parley_store_seconds{store="sqlite"}`: each call from asking to its commit.
    private let latency: CoreMetrics.Timer

    private init(connection: SQLiteConnection, pool: NIOThreadPool, metrics: any MetricsFactory) {
        self.db = Mutex(connection)
        self.pool = pool
        latency = CoreMetrics.Timer(label: "parley_store_seconds", dimensions: [("store", "sqlite")], preferredDisplayUnit: .seconds, factory: metrics)
    }

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    public static func open(path: String, metrics: any MetricsFactory = MetricsSystem.factory) async throws -> SQLiteStore {
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        do {
            let connection = try await pool.runIfActive { () throws -> SQLiteConnection in
                try restrictToOwner(path)
                let connection = try SQLiteConnection(path: path)
                do {
                    try connection.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")
                    try migrate(connection)
                } catch {
                    connection.close()
                    throw error
                }
                return connection
            }
            return SQLiteStore(connection: connection, pool: pool, metrics: metrics)
        } catch {
            try? await pool.shutdownGracefully()
            throw error
        }
    }

    /// The database holds every user's words: readable by the server's user only (0600). SQLite
    /// gives its -wal and -shm files the database file's mode. An existing file is tightened too.
    static func restrictToOwner(_ path: String) throws {
        guard path != ":memory:", !path.isEmpty else { return }
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StoreError.backend("cannot open SQLite database at \(path): \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        guard fchmod(fd, 0o600) == 0 else { throw StoreError.backend("cannot make \(path) private: \(String(cString: strerror(errno)))") }
        for suffix in ["-wal", "-shm"] { _ = chmod(path + suffix, 0o600) }
    }

    static func migrate(_ connection: SQLiteConnection) throws {
        let version = Int(try connection.query("PRAGMA user_version").first?.first?.int ?? 0)
        guard version <= migrations.count else {
            throw StoreError.schemaTooNew(found: version, supported: migrations.count)
        }
        for step in version..<migrations.count {
            try connection.transaction {
                try connection.exec(migrations[step])
                try connection.exec("PRAGMA user_version = \(step + 1)")
            }
        }
    }

    /// One call waiting for the next group commit.
    private struct Job: Sendable {
        /// Runs the call in its own savepoint; returns what to do once the batch is committed.
        let execute: @Sendable (SQLiteConnection) -> @Sendable ((any Error)?) -> Void
        let fail: @Sendable (any Error) -> Void
    }

    private struct Queue {
        var jobs: [Job] = []
        var draining = false
    }

    private let queue = Mutex(Queue())
    /// Calls committed together at most (a bound on how long one batch holds the others).
    static let maxBatch = 256

    /// Runs `body` with the connection on the store's thread: every call waiting at that moment
    /// runs in one transaction, each in its own savepoint (a failing call rolls back only
    /// itself), and one commit (one fsync) makes them all durable. A caller hears back only after
    /// that commit, so group commit trades nothing away: `synchronous=FULL` still holds for each.
    @discardableResult
    private func run<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        guard !closed.load(ordering: .acquiring) else { throw StoreError.closed }
        let started = NIODeadline.now()
        defer { latency.recordNanoseconds((NIODeadline.now() - started).nanoseconds) }
        return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let job = Job(
                execute: { db in
                    let result: Result<T, any Error>
                    do {
                        result = .success(try db.transaction { try body(db) })
                    } catch {
                        result = .failure(error)
                    }
                    return { commitFailure in
                        if let commitFailure, case .success = result {
                            continuation.resume(throwing: commitFailure)
                        } else {
                            continuation.resume(with: result)
                        }
                    }
                },
                fail: { continuation.resume(throwing: $0) }
            )
            enqueue(job)
        }
    }

    private func enqueue(_ job: Job) {
        let startDrain = queue.withLock { q -> Bool in
            q.jobs.append(job)
            guard !q.draining else { return false }
            q.draining = true
            return true
        }
        guard startDrain else { return }
        pool.submit { state in
            guard case .active = state else {
                let orphans = self.queue.withLock { q -> [Job] in
                    q.draining = false
                    defer { q.jobs.removeAll() }
                    return q.jobs
                }
                for orphan in orphans { orphan.fail(StoreError.closed) }
                return
            }
            self.drain()
        }
    }

    /// Commits batches until no call is waiting (on the store's single thread).
    private func drain() {
        while true {
            let batch = queue.withLock { q -> [Job] in
                guard !q.jobs.isEmpty else {
                    q.draining = false
                    return []
                }
                let batch = Array(q.jobs.prefix(Self.maxBatch))
                q.jobs.removeFirst(batch.count)
                return batch
            }
            guard !batch.isEmpty else { return }
            db.withLock { connection in
                do {
                    try connection.exec("BEGIN IMMEDIATE")
                } catch {
                    for job in batch { job.fail(error) }
                    return
                }
                let finishers = batch.map { $0.execute(connection) }
                var commitFailure: (any Error)?
                do {
                    try connection.exec("COMMIT")
                } catch {
                    commitFailure = error
                    try? connection.exec("ROLLBACK")
                }
                for finish in finishers { finish(commitFailure) }
            }
        }
    }

    public func close() async throws {
        guard !closed.load(ordering: .acquiring) else { return }
        try await run { _ in }  // every call queued before this one is committed
        closed.store(true, ordering: .releasing)
        try await pool.runIfActive {
            self.db.withLock { connection in
                // Fold the WAL back into the main file so the data dir is one self-contained file.
                try? connection.exec("PRAGMA wal_checkpoint(TRUNCATE)")
                connection.close()
            }
        }
        try await pool.shutdownGracefully()
    }

    // MARK: Users

    public func ensureUser(_ id: String, now: Int64) async throws -> User {
        try await run { db in
            try db.query("INSERT INTO users(id, created_at) VALUES(?, ?) ON CONFLICT(id) DO NOTHING", [.text(id), .int(now)])
            let row = try db.query("SELECT created_at FROM users WHERE id = ?", [.text(id)]).first
            return User(id: id, createdAt: row?.first?.int ?? now)
        }
    }

    // MARK: Clones

    /// A JSON array of strings stored in a text column.
    private static func strings(_ value: SQLValue) throws -> [String] {
        (try JSONValue.parse(Array((value.text ?? "[]").utf8))).arrayValue?.compactMap(\.stringValue) ?? []
    }

    private static let cloneColumns = "id, owner, name, traits, system_prompt, sliders, memory, model, profile, created_at, updated_at"

    public func createClone(_ clone: Clone) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO clones(\(Self.cloneColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [.text(clone.id), .text(clone.owner)] + Self.cloneValues(clone) + [.int(clone.createdAt), .int(clone.updatedAt)]
            )
        }
    }

    public func clone(id: String, owner: String) async throws -> Clone? {
        try await run { db in
            try db.query("SELECT \(Self.cloneColumns) FROM clones WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
                .first.map(Self.clone(from:))
        }
    }

    public func clones(owner: String) async throws -> [Clone] {
        try await run { db in
            try db.query("SELECT \(Self.cloneColumns) FROM clones WHERE owner = ? ORDER BY id", [.text(owner)])
                .map(Self.clone(from:))
        }
    }

    public func updateClone(_ clone: Clone) async throws -> Bool {
        try await run { db in
            try db.query(
                "UPDATE clones SET name = ?, traits = ?, system_prompt = ?, sliders = ?, memory = ?, model = ?, profile = ?, updated_at = ? WHERE id = ? AND owner = ?",
                Self.cloneValues(clone) + [.int(clone.updatedAt), .text(clone.id), .text(clone.owner)]
            )
            return db.changes > 0
        }
    }

    public func deleteClone(id: String, owner: String) async throws -> Bool {
        try await run { db in
            // Conversations and messages go with it through ON DELETE CASCADE.
            try db.query("DELETE FROM clones WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
            return db.changes > 0
        }
    }

    private static func cloneValues(_ clone: Clone) -> [SQLValue] {
        [
            .text(clone.name),
            .text(JSONValue.array(clone.traits.map(JSONValue.string)).serializedString()),
            .text(clone.systemPrompt),
            .text(clone.slidersJSON.serializedString()),
            .text(JSONValue.array(clone.memory.map(JSONValue.string)).serializedString()),
            clone.model.map(SQLValue.text) ?? .null,
            clone.profile.isEmpty ? .null : .text(CharacterCard.storageJSON(clone.profile).serializedString()),
        ]
    }

    private static func clone(from row: [SQLValue]) throws -> Clone {
        var sliders: [String: Int] = [:]
        if case .object(let pairs) = try JSONValue.parse(Array((row[5].text ?? "{}").utf8)) {
            for (key, value) in pairs { if case .int(let v) = value { sliders[key] = Int(v) } }
        }
        return Clone(
            id: row[0].text ?? "", owner: row[1].text ?? "", name: row[2].text ?? "",
            traits: try Self.strings(row[3]), systemPrompt: row[4].text ?? "", sliders: sliders,
            memory: try Self.strings(row[6]), createdAt: row[9].int ?? 0, updatedAt: row[10].int ?? 0, model: row[7].text,
            profile: CharacterCard.profile(fromStorage: row[8].text)
        )
    }

    // MARK: Conversations

    private static let conversationColumns = "id, owner, clone, title, created_at, updated_at"

    public func createConversation(_ c: Conversation) async throws {
        try await run { db in try Self.insert(c, into: db, orIgnore: false) }
    }

    private static func insert(_ c: Conversation, into db: SQLiteConnection, orIgnore: Bool) throws {
        try db.query(
            "INSERT INTO conversations(\(Self.conversationColumns)) VALUES(?, ?, ?, ?, ?, ?)" + (orIgnore ? " ON CONFLICT(id) DO NOTHING" : ""),
            [.text(c.id), .text(c.owner), .text(c.clone), .text(c.title), .int(c.createdAt), .int(c.updatedAt)]
        )
    }

    public func conversation(id: String, owner: String) async throws -> Conversation? {
        try await run { db in
            try db.query("SELECT \(Self.conversationColumns) FROM conversations WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
                .first.map(Self.conversation(from:))
        }
    }

    public func conversations(owner: String, limit: Int, before: String?) async throws -> [Conversation] {
        let page = Self.cursor("id", "<", before)
        return try await run { db in
            try db.query(
                "SELECT \(Self.conversationColumns) FROM conversations WHERE owner = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map(Self.conversation(from:))
        }
    }

    private static func conversation(from row: [SQLValue]) -> Conversation {
        Conversation(
            id: row[0].text ?? "", owner: row[1].text ?? "", clone: row[2].text ?? "", title: row[3].text ?? "",
            createdAt: row[4].int ?? 0, updatedAt: row[5].int ?? 0
        )
    }

    // MARK: Messages

    private static let messageColumns = "id, conversation, role, text, created_at, reason, input_tokens, output_tokens, stream, saved"

    public func appendMessage(_ m: Message) async throws {
        try await run { db in
            try db.transaction { try Self.insert(m, into: db, orIgnore: false) }
        }
    }

    /// Inserts a message and moves its conversation's `updated_at`; `orIgnore` keeps an existing
    /// message with the same id instead of failing.
    private static func insert(_ m: Message, into db: SQLiteConnection, orIgnore: Bool) throws {
                try db.query(
                    "INSERT INTO messages(\(Self.messageColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" + (orIgnore ? " ON CONFLICT(id) DO NOTHING" : ""),
                    [
                        .text(m.id), .text(m.conversation), .text(m.role.rawValue), .text(m.text), .int(m.createdAt),
                        m.reason.map { .text($0.rawValue) } ?? .null,
                        m.usage.map { .int(Int64($0.inputTokens)) } ?? .null,
                        m.usage.map { .int(Int64($0.outputTokens)) } ?? .null,
                        m.stream.map(SQLValue.text) ?? .null,
                        .int(m.saved ? 1 : 0),
                    ]
                )
                try db.query(
                    "UPDATE conversations SET updated_at = max(updated_at, ?) WHERE id = ?",
                    [.int(m.createdAt), .text(m.conversation)]
                )
    }

    public func message(id: String, conversation: String) async throws -> Message? {
        try await run { db in
            try db.query("SELECT \(Self.messageColumns) FROM messages WHERE id = ? AND conversation = ?", [.text(id), .text(conversation)])
                .first.map(Self.message(from:))
        }
    }

    public func messages(conversation: String, limit: Int, before: String?) async throws -> [Message] {
        let page = Self.cursor("id", "<", before)
        return try await run { db in
            try db.query(
                "SELECT \(Self.messageColumns) FROM messages WHERE conversation = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(conversation)] + page.params + [.int(Int64(limit))]
            ).reversed().map(Self.message(from:))
        }
    }

    private static func message(from row: [SQLValue]) -> Message {
        var usage: Usage?
        if let input = row[6].int, let output = row[7].int { usage = Usage(inputTokens: Int(input), outputTokens: Int(output)) }
        return Message(
            id: row[0].text ?? "", conversation: row[1].text ?? "", role: Role(rawValue: row[2].text ?? "") ?? .user,
            text: row[3].text ?? "", createdAt: row[4].int ?? 0,
            reason: row[5].text.flatMap(StreamEndReason.init(rawValue:)), usage: usage, stream: row[8].text, saved: row[9].int == 1
        )
    }

    // MARK: Credits

    private static let ledgerColumns = "id, user, kind, credits, tokens, stream, conversation, room, model, feature, note, created_at"

    public func balance(user: String) async throws -> Int64 {
        try await run { db in try Self.balance(db, user) }
    }

    private static func balance(_ db: SQLiteConnection, _ user: String) throws -> Int64 {
        try db.query("SELECT balance FROM accounts WHERE user = ?", [.text(user)]).first?.first?.int ?? 0
    }

    public func apply(_ entry: LedgerEntry, allowOverdraft: Bool) async throws -> LedgerOutcome {
        try await run { db in
            try db.transaction {
                let current = try Self.balance(db, entry.user)
                if try !db.query("SELECT 1 FROM ledger WHERE id = ?", [.text(entry.id)]).isEmpty {
                    return .alreadyApplied(balance: current)
                }
                if entry.credits < 0, !allowOverdraft, current + entry.credits < 0 {
                    return .insufficient(balance: current)
                }
                let optional: (String?) -> SQLValue = { $0.map(SQLValue.text) ?? .null }
                try db.query(
                    "INSERT INTO ledger(\(Self.ledgerColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        .text(entry.id), .text(entry.user), .text(entry.kind.rawValue), .int(entry.credits), .int(Int64(entry.tokens)),
                        optional(entry.stream), optional(entry.conversation), optional(entry.room), optional(entry.model),
                        optional(entry.feature), optional(entry.note), .int(entry.createdAt),
                    ]
                )
                let updated = current + entry.credits
                try db.query(
                    "INSERT INTO accounts(user, balance) VALUES(?, ?) ON CONFLICT(user) DO UPDATE SET balance = excluded.balance",
                    [.text(entry.user), .int(updated)]
                )
                return .applied(balance: updated)
            }
        }
    }

    public func ledgerEntry(id: String) async throws -> LedgerEntry? {
        try await run { db in
            try db.query("SELECT \(Self.ledgerColumns) FROM ledger WHERE id = ?", [.text(id)]).first.map(Self.ledgerEntry(from:))
        }
    }

    private static func ledgerEntry(from r: [SQLValue]) -> LedgerEntry {
        LedgerEntry(
            id: r[0].text ?? "", user: r[1].text ?? "", kind: LedgerEntry.Kind(rawValue: r[2].text ?? "") ?? .debit,
            credits: r[3].int ?? 0, tokens: Int(r[4].int ?? 0), stream: r[5].text, conversation: r[6].text, room: r[7].text,
            model: r[8].text, feature: r[9].text, note: r[10].text, createdAt: r[11].int ?? 0
        )
    }

    public func ledger(user: String, limit: Int, before: String?) async throws -> [LedgerEntry] {
        try await run { db in
            var cursor: (Int64, String)?
            if let before {
                guard let row = try db.query("SELECT created_at, id FROM ledger WHERE id = ? AND user = ?", [.text(before), .text(user)]).first else {
                    return []
                }
                cursor = (row[0].int ?? 0, row[1].text ?? "")
            }
            // A row-value comparison, so the (user, created_at, id) index serves the range; the
            // first page has no condition at all (see `cursor`).
            let page: (sql: String, params: [SQLValue]) = cursor.map { (" AND (created_at, id) < (?, ?)", [.int($0.0), .text($0.1)]) } ?? ("", [])
            let rows = try db.query(
                "SELECT \(Self.ledgerColumns) FROM ledger WHERE user = ?\(page.sql) ORDER BY created_at DESC, id DESC LIMIT ?",
                [.text(user)] + page.params + [.int(Int64(limit))]
            )
            return rows.map(Self.ledgerEntry(from:))
        }
    }

    /// Applying is one transaction here: nothing is ever left half-applied.
    public func recoverLedger() async throws -> Int { 0 }

    // MARK: Schedules

    private static func optional(_ text: String?) -> SQLValue { text.map(SQLValue.text) ?? .null }

    /// A keyset-pagination condition, `AND <column> <op> ?` with its value, or nothing without a
    /// cursor. Not `(? IS NULL OR id < ?)`: SQLite cannot use the index range through the OR, so
    /// every page would scan from the newest row down to the cursor (an export of a long
    /// conversation went quadratic).
    private static func cursor(_ column: String, _ op: String, _ value: String?) -> (sql: String, params: [SQLValue]) {
        guard let value else { return ("", []) }
        return (" AND \(column) \(op) ?", [.text(value)])
    }

    private static let scheduleColumns = "id, owner, clone, conversation, at, kind, body, status, created_at, updated_at, message, failure"

    public func createSchedule(_ s: Schedule) async throws {
        let (kind, body): (String, String) = switch s.content {
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
        try await run { db in
            try db.query("SELECT \(Self.scheduleColumns) FROM schedules WHERE id = ? AND owner = ?", [.text(id), .text(owner)])
                .first.map(Self.schedule(from:))
        }
    }

    public func schedules(owner: String, limit: Int, before: String?) async throws -> [Schedule] {
        let page = Self.cursor("id", "<", before)
        return try await run { db in
            try db.query(
                "SELECT \(Self.scheduleColumns) FROM schedules WHERE owner = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map(Self.schedule(from:))
        }
    }

    public func schedules(statuses: [Schedule.Status], owner: String?, limit: Int, after: String?) async throws -> [Schedule] {
        guard !statuses.isEmpty else { return [] }
        return try await run { db in
            let marks = Array(repeating: "?", count: statuses.count).joined(separator: ", ")
            let (mine, page) = (Self.cursor("owner", "=", owner), Self.cursor("id", ">", after))
            return try db.query(
                "SELECT \(Self.scheduleColumns) FROM schedules WHERE status IN (\(marks))\(mine.sql)\(page.sql) ORDER BY id LIMIT ?",
                statuses.map { .text($0.rawValue) } + mine.params + page.params + [
                    .int(Int64(limit)),
                ]
            ).map(Self.schedule(from:))
        }
    }

    public func transitionSchedule(id: String, from: Schedule.Status, to change: ScheduleChange) async throws -> Schedule? {
        try await run { db in try db.transaction { try Self.transition(db, id: id, from: from, change) } }
    }

    private static func transition(_ db: SQLiteConnection, id: String, from: Schedule.Status, _ change: ScheduleChange) throws -> Schedule? {
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
                guard try db.query("SELECT status FROM schedules WHERE id = ?", [.text(id)]).first?.first?.text == Schedule.Status.firing.rawValue else {
                    return nil
                }
                if let newConversation { try Self.insert(newConversation, into: db, orIgnore: true) }
                try Self.insert(message, into: db, orIgnore: true)
                return try Self.transition(db, id: id, from: .firing,
                                           ScheduleChange(status: .fired, updatedAt: now, conversation: message.conversation, message: message.id))
            }
        }
    }

    private static func schedule(from r: [SQLValue]) -> Schedule {
        let body = r[6].text ?? ""
        return Schedule(
            id: r[0].text ?? "", owner: r[1].text ?? "", clone: r[2].text ?? "", conversation: r[3].text, at: r[4].int ?? 0,
            content: r[5].text == "prompt" ? .prompt(body) : .text(body), status: Schedule.Status(rawValue: r[7].text ?? "") ?? .failed,
            createdAt: r[8].int ?? 0, updatedAt: r[9].int ?? 0, message: r[10].text, failure: r[11].text
        )
    }

    // MARK: Rooms

    private static let roomColumns =
        "id, owner, topic, debaters, rounds, policy, max_tokens, visibility, status, turns_taken, muted, kicked, created_at, updated_at, kind, members, languages"

    private static func roomValues(_ r: Room) -> [SQLValue] {
        let debaters = JSONValue.array(r.debaters.map {
            .object([("clone", .string($0.clone)), ("stance", .string($0.stance)), ("name", .string($0.name))])
        })
        return [
            .text(r.id), .text(r.owner), .text(r.topic), .text(debaters.serializedString()), .int(Int64(r.rounds)),
            .text(r.policy.rawValue), .int(Int64(r.maxTokensPerTurn)), .text(r.visibility.rawValue), .text(r.status.rawValue),
            .int(Int64(r.turnsTaken)), .text(JSONValue.array(r.muted.map(JSONValue.string)).serializedString()),
            .text(JSONValue.array(r.kicked.map(JSONValue.string)).serializedString()), .int(r.createdAt), .int(r.updatedAt),
            .text(r.kind.rawValue), .text(JSONValue.array(r.members.map(JSONValue.string)).serializedString()),
            .text(RoomCoding.languages(r.languages).serializedString()),
        ]
    }

    private static func room(from r: [SQLValue]) throws -> Room {
        let debaters = (try JSONValue.parse(Array((r[3].text ?? "[]").utf8))).arrayValue ?? []
        return Room(
            id: r[0].text ?? "", kind: Room.Kind(rawValue: r[14].text ?? "") ?? .debate, owner: r[1].text ?? "", topic: r[2].text ?? "",
            debaters: debaters.map { Room.Debater(clone: $0["clone"]?.stringValue ?? "", stance: $0["stance"]?.stringValue ?? "",
                                                  name: $0["name"]?.stringValue ?? "") },
            rounds: Int(r[4].int ?? 0), policy: Room.TurnPolicy(rawValue: r[5].text ?? "") ?? .roundRobin,
            maxTokensPerTurn: Int(r[6].int ?? 0), visibility: Room.Visibility(rawValue: r[7].text ?? "") ?? .private,
            status: Room.Status(rawValue: r[8].text ?? "") ?? .ended, turnsTaken: Int(r[9].int ?? 0),
            muted: try Self.strings(r[10]), kicked: try Self.strings(r[11]), members: try Self.strings(r[15]),
            languages: RoomCoding.languages(try JSONValue.parse(Array((r[16].text ?? "{}").utf8))),
            createdAt: r[12].int ?? 0, updatedAt: r[13].int ?? 0
        )
    }

    public func createRoom(_ room: Room) async throws {
        try await run { db in
            try db.query("INSERT INTO rooms(\(Self.roomColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", Self.roomValues(room))
        }
    }

    public func room(id: String) async throws -> Room? {
        try await run { db in
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
        return try await run { db in
            let marks = Array(repeating: "?", count: statuses.count).joined(separator: ", ")
            let page = Self.cursor("id", ">", after)
            return try db.query(
                "SELECT \(Self.roomColumns) FROM rooms WHERE status IN (\(marks))\(page.sql) ORDER BY id LIMIT ?",
                statuses.map { .text($0.rawValue) } + page.params + [.int(Int64(limit))]
            ).map(Self.room(from:))
        }
    }

    private static let entryColumns = "id, room, kind, speaker, text, created_at, reason, stream, lang, source, speaker_is_clone"

    public func appendRoomEntry(_ e: RoomEntry) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO room_entries(\(Self.entryColumns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [.text(e.id), .text(e.room), .text(e.kind.rawValue), .text(e.speaker), .text(e.text), .int(e.createdAt),
                 Self.optional(e.reason?.rawValue), Self.optional(e.stream), Self.optional(e.lang?.value), Self.optional(e.source),
                 .int(e.speakerIsClone ? 1 : 0)]
            )
        }
    }

    public func roomEntries(room: String, limit: Int, before: String?) async throws -> [RoomEntry] {
        let page = Self.cursor("id", "<", before)
        return try await run { db in
            try db.query(
                "SELECT \(Self.entryColumns) FROM room_entries WHERE room = ?\(page.sql) ORDER BY id DESC LIMIT ?",
                [.text(room)] + page.params + [.int(Int64(limit))]
            ).reversed().map { r in
                RoomEntry(id: r[0].text ?? "", room: r[1].text ?? "", kind: RoomEntry.Kind(rawValue: r[2].text ?? "") ?? .said,
                          speaker: r[3].text ?? "", text: r[4].text ?? "", createdAt: r[5].int ?? 0,
                          reason: r[6].text.flatMap(StreamEndReason.init(rawValue:)), stream: r[7].text,
                          lang: r[8].text.flatMap(LanguageTag.init), source: r[9].text, speakerIsClone: r[10].int == 1)
            }
        }
    }

    // MARK: Privacy

    public func rooms(owner: String, limit: Int, after: String?) async throws -> [Room] {
        let page = Self.cursor("id", ">", after)
        return try await run { db in
            try db.query(
                "SELECT \(Self.roomColumns) FROM rooms WHERE owner = ?\(page.sql) ORDER BY id LIMIT ?",
                [.text(owner)] + page.params + [.int(Int64(limit))]
            ).map(Self.room(from:))
        }
    }

    public func setMessageSaved(id: String, conversation: String, saved: Bool) async throws -> Bool {
        try await run { db in
            try db.query("UPDATE messages SET saved = ? WHERE id = ? AND conversation = ?", [.int(saved ? 1 : 0), .text(id), .text(conversation)])
            return db.changes > 0
        }
    }

    public func deleteUser(_ id: String, pseudonym: String) async throws -> UserDeletion {
        try await run { db in
            try db.transaction {
                var report = UserDeletion()
                let user: [SQLValue] = [.text(id)]
                let count: (String) throws -> Int = { Int(try db.query($0, user).first?.first?.int ?? 0) }
                let mine = "SELECT id FROM conversations WHERE owner = ?"
                report.messages = try count("SELECT count(*) FROM messages WHERE conversation IN (\(mine))")
                try db.query("DELETE FROM messages WHERE conversation IN (\(mine))", user)
                try db.query("DELETE FROM conversations WHERE owner = ?", user)
                report.conversations = db.changes
                try db.query("DELETE FROM clones WHERE owner = ?", user)
                report.clones = db.changes
                try db.query("DELETE FROM schedules WHERE owner = ?", user)
                report.schedules = db.changes
                // Their rooms with every entry (ON DELETE CASCADE), then what they said elsewhere
                // with its translations.
                report.roomEntries = try count("SELECT count(*) FROM room_entries WHERE room IN (SELECT id FROM rooms WHERE owner = ?)")
                try db.query("DELETE FROM rooms WHERE owner = ?", user)
                report.rooms = db.changes
                try db.query("DELETE FROM room_entries WHERE source IN (SELECT id FROM room_entries WHERE speaker = ? AND speaker_is_clone = 0)", user)
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
                    try db.query("UPDATE rooms SET muted = ?, kicked = ?, members = ?, languages = ? WHERE id = ?",
                                 [values[10], values[11], values[15], values[16], values[0]])
                }
                // The books: rows and balance move to the pseudonym, detached from content.
                let alias: SQLValue = .text(pseudonym)
                if let welcome = try db.query("SELECT \(Self.ledgerColumns) FROM ledger WHERE id = ?", [.text(LedgerEntry.welcomeID(for: id))]).first {
                    let earlier = try db.query("SELECT 1 FROM ledger WHERE id = ?", [.text(LedgerEntry.welcomeID(for: pseudonym))]).first != nil
                    let entry = Self.ledgerEntry(from: welcome)
                    let moved = earlier ? entry.laterWelcomeID(of: pseudonym) : LedgerEntry.welcomeID(for: pseudonym)
                    try db.query("UPDATE ledger SET id = ? WHERE id = ?", [.text(moved), .text(entry.id)])
                }
                try db.query("UPDATE ledger SET user = ?, stream = NULL, conversation = NULL, room = NULL, note = NULL WHERE user = ?", [alias, .text(id)])
                report.ledgerRowsKept = Int(try db.query("SELECT count(*) FROM ledger WHERE user = ?", [alias]).first?.first?.int ?? 0)
                if let balance = try db.query("SELECT balance FROM accounts WHERE user = ?", user).first?.first?.int {
                    try db.query(
                        "INSERT INTO accounts(user, balance) VALUES(?, ?) ON CONFLICT(user) DO UPDATE SET balance = accounts.balance + excluded.balance",
                        [alias, .int(balance)]
                    )
                    try db.query("DELETE FROM accounts WHERE user = ?", user)
                }
                try db.query("UPDATE audit SET actor = ? WHERE actor = ?", [alias, .text(id)])
                try db.query("UPDATE audit SET target = ? WHERE target = ?", [alias, .text(id)])
                try db.query("DELETE FROM stream_journals WHERE user = ?", user)
                try db.query("DELETE FROM users WHERE id = ?", user)
                return report
            }
        }
    }

    public func purge(createdBefore cutoff: Int64, limit: Int) async throws -> PurgeResult {
        try await run { db in
            let bounds: [SQLValue] = [.int(cutoff), .int(Int64(limit))]
            try db.query("DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE saved = 0 AND created_at < ? ORDER BY created_at LIMIT ?)", bounds)
            let messages = db.changes
            try db.query("DELETE FROM room_entries WHERE id IN (SELECT id FROM room_entries WHERE created_at < ? ORDER BY created_at LIMIT ?)", bounds)
            return PurgeResult(messages: messages, roomEntries: db.changes)
        }
    }

    private static let journalColumns =
        "stream, user, model, feature, input_tokens, target_kind, target_id, speaker, message_id, text, output_tokens, created_at, updated_at"

    public func ping() async throws {
        try await run { db in _ = try db.query("SELECT 1") }
    }

    public func saveStreamJournal(_ j: StreamJournal) async throws {
        let target = j.target.columns
        try await run { db in
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

    public func deleteStreamJournal(stream: String) async throws {
        try await run { db in try db.query("DELETE FROM stream_journals WHERE stream = ?", [.text(stream)]) }
    }

    public func streamJournals(limit: Int) async throws -> [StreamJournal] {
        try await run { db in
            try db.query("SELECT \(Self.journalColumns) FROM stream_journals ORDER BY created_at, stream LIMIT ?", [.int(Int64(limit))]).map { r in
                StreamJournal(
                    stream: r[0].text ?? "", user: r[1].text ?? "", model: r[2].text ?? "", feature: r[3].text ?? "", inputTokens: Int(r[4].int ?? 0),
                    target: .init(kind: r[5].text ?? "", id: r[6].text, speaker: r[7].text), messageID: r[8].text ?? "", text: r[9].text ?? "",
                    outputTokens: Int(r[10].int ?? 0), createdAt: r[11].int ?? 0, updatedAt: r[12].int ?? 0
                )
            }
        }
    }

    public func appendAudit(_ e: AuditEvent) async throws {
        try await run { db in
            try db.query(
                "INSERT INTO audit(id, at, actor, action, target, ip_hash, detail) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [.text(e.id), .int(e.at), .text(e.actor), .text(e.action), Self.optional(e.target), Self.optional(e.ipHash),
                 .text(AuditEvent.json(e.detail).serializedString())]
            )
        }
    }

    public func auditEvents(limit: Int, before: String?) async throws -> [AuditEvent] {
        let page = Self.cursor("id", "<", before)
        return try await run { db in
            try db.query(
                "SELECT id, at, actor, action, target, ip_hash, detail FROM audit WHERE 1 = 1\(page.sql) ORDER BY id DESC LIMIT ?",
                page.params + [.int(Int64(limit))]
            ).map { r in
                AuditEvent(id: r[0].text ?? "", at: r[1].int ?? 0, actor: r[2].text ?? "", action: r[3].text ?? "", target: r[4].text,
                           ipHash: r[5].text, detail: AuditEvent.detail(try? JSONValue.parse(Array((r[6].text ?? "{}").utf8))))
            }
        }
    }
}
