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
/// NIOThreadPool of two threads: writes (and reads inside them) on the writer connection, group
/// committed; plain reads on a read connection beside it, which WAL lets read the last commit
/// while a batch is being written, so a read never waits for another call's fsync.
///
/// This file holds the schema, the group commit and the shared helpers; each domain's calls are
/// in their own file (`SQLiteStore+Chat.swift`, `+Ledger`, `+Schedules`, `+Rooms`, `+Privacy`,
/// `+Journals`), and rows are read by column name (`SQLRow`).
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
        // v10: messages form a tree (#24). `parent` NULL: stored before (the message before
        // it); '': the first. `off_path` 1: not on the conversation's path (kept as an alternative).
        """
        ALTER TABLE messages ADD COLUMN parent TEXT;
        ALTER TABLE messages ADD COLUMN off_path INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX messages_on_path ON messages(conversation, id) WHERE off_path = 0;
        CREATE INDEX messages_by_parent ON messages(conversation, parent);
        """,
        // v11: search (#24). FTS5 tables over the messages' text and the conversations' titles,
        // external content (the text is stored once) kept in step by triggers, which also run for
        // the rows ON DELETE CASCADE removes. Their rowids are the tables' own: nothing here runs
        // VACUUM, which may renumber them (run `INSERT INTO messages_fts(messages_fts)
        // VALUES('rebuild')` after one). The tokenizer is SearchText's rule.
        searchIndex("messages_fts", over: "text", of: "messages") + searchIndex("titles_fts", over: "title", of: "conversations"),
        // v12: a conversation's rolling summary and the last message it covers (#24).
        """
        ALTER TABLE conversations ADD COLUMN summary TEXT;
        ALTER TABLE conversations ADD COLUMN summary_through TEXT;
        """,
        // v13: signed-out sessions (#28); session '' stands for every session issued before `at`.
        """
        CREATE TABLE session_revocations (
            user TEXT NOT NULL,
            session TEXT NOT NULL,
            at INTEGER NOT NULL,
            PRIMARY KEY (user, session)
        );
        """,
        // v14: the audit log is purged by age (24 months by default, #28).
        "CREATE INDEX audit_by_age ON audit(at);",
        // v15: subscriptions to plans (#27).
        """
        CREATE TABLE subscriptions (
            user TEXT PRIMARY KEY,
            plan TEXT NOT NULL,
            status TEXT NOT NULL,
            period_end INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        """,
        // v16: payment orders and the webhook's delivery log (#27).
        """
        CREATE TABLE payment_orders (
            id TEXT PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            user TEXT NOT NULL,
            credits INTEGER NOT NULL,
            status TEXT NOT NULL,
            history TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX payment_orders_by_user ON payment_orders(user, key);
        CREATE INDEX payment_orders_by_age ON payment_orders(updated_at);
        CREATE TABLE webhook_deliveries (
            id TEXT PRIMARY KEY,
            at INTEGER NOT NULL,
            event TEXT,
            event_id TEXT,
            user TEXT,
            outcome TEXT NOT NULL,
            reason TEXT
        );
        CREATE INDEX webhook_deliveries_by_age ON webhook_deliveries(at);
        CREATE INDEX webhook_deliveries_by_user ON webhook_deliveries(user);
        """,
        // v17: what a conversation or a room cost (#27).
        """
        CREATE INDEX ledger_by_conversation ON ledger(user, conversation) WHERE conversation IS NOT NULL;
        CREATE INDEX ledger_by_room ON ledger(user, room) WHERE room IS NOT NULL;
        """,
        // v18: the limits users set on their own spending, and what each window spent (#27).
        """
        CREATE TABLE spend_limits (
            user TEXT PRIMARY KEY,
            daily INTEGER,
            monthly INTEGER
        );
        CREATE INDEX ledger_by_age ON ledger(created_at, id);
        CREATE TABLE spend_windows (
            user TEXT NOT NULL,
            span TEXT NOT NULL,
            spent INTEGER NOT NULL,
            PRIMARY KEY (user, span)
        );
        """,
        // v19: the id of the event a subscription's state came from, to order events of the same time.
        "ALTER TABLE subscriptions ADD COLUMN event TEXT NOT NULL DEFAULT '';",
        // v20: spend windows by span, for the retention pass.
        "CREATE INDEX spend_windows_by_span ON spend_windows(span);",
        // v21: voiced replies' audio and voice messages' recordings (#29); a clip goes with its
        // conversation or room (ON DELETE CASCADE) and its owner's account.
        """
        CREATE TABLE voice_clips (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            content_type TEXT NOT NULL,
            owner TEXT NOT NULL,
            stream TEXT NOT NULL,
            conversation TEXT REFERENCES conversations(id) ON DELETE CASCADE,
            room TEXT REFERENCES rooms(id) ON DELETE CASCADE,
            message TEXT,
            sample_rate INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            truncated INTEGER NOT NULL,
            saved INTEGER NOT NULL,
            audio BLOB NOT NULL,
            created_at INTEGER NOT NULL
        );
        CREATE INDEX voice_clips_by_owner ON voice_clips(owner, id);
        CREATE INDEX voice_clips_by_age ON voice_clips(created_at) WHERE saved = 0;
        """,
        // v22: messages and titles are indexed for search in batches, not on each row's own
        // commit (#26: indexing was a quarter of a chat reply's writes); see `deferIndexing`.
        """
        CREATE TABLE search_progress (
            name TEXT PRIMARY KEY,
            through INTEGER NOT NULL
        );
        """ + deferIndexing("messages_fts", over: "text", of: "messages") + deferIndexing("titles_fts", over: "title", of: "conversations"),
        // v23: a streaming reply's journal grows by what it added since its last write, as a
        // tail row appended to one table (#26: each reply's whole text written again ten times a
        // second was a fifth of the server's CPU at 400-token replies); see `saveStreamJournals`.
        // A journal is its row's text followed by its stream's tails numbered above `tail_from`.
        """
        ALTER TABLE stream_journals ADD COLUMN tail_from INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX stream_journals_by_tail ON stream_journals(tail_from);
        CREATE TABLE stream_journal_tails (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            stream TEXT NOT NULL,
            user TEXT NOT NULL,
            text TEXT NOT NULL,
            output_tokens INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        """,
        // v24: `messages_on_path` (conversation, id) WHERE off_path = 0 repeated
        // `messages_by_conversation`'s key: the path's queries read that one and skip the few
        // alternatives, and every message stored wrote one index page fewer (#26: 7% of a chat
        // reply's WAL pages, `loadtest/wal-pages.py`).
        "DROP INDEX messages_on_path;",
        // v25: how a journaled reply ended, when it did but the store refused its message or
        // settlement (NULL: it was cut, by a crash or a lost node).
        "ALTER TABLE stream_journals ADD COLUMN ended TEXT;",
        // v26: a clone's stored profile keeps the card's fields last, under `card`, and a read
        // stops before them (`CharacterCard.storageJSON`). Nothing to change in the rows (text
        // stored before is still read), but a build before this one would read such a profile's
        // card fields as none and drop them on its next write of the clone: the version tells it
        // to refuse the database.
        "SELECT 1;",
        // v27: who each user is to their clones (`Persona`), deleted with the account.
        """
        CREATE TABLE personas (
            user TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            description TEXT NOT NULL
        );
        """,
    ]

    /// An FTS5 table `index` over `column` of `table` (v11's search): external content, so the
    /// text is stored once, kept in step by triggers. Part of a migration: its text never changes.
    static func searchIndex(_ index: String, over column: String, of table: String) -> String {
        """
        CREATE VIRTUAL TABLE \(index) USING fts5(
            \(column), content='\(table)', content_rowid='rowid', tokenize='unicode61 remove_diacritics 0');
        INSERT INTO \(index)(\(index)) VALUES('rebuild');
        CREATE TRIGGER \(index)_insert AFTER INSERT ON \(table) BEGIN
            INSERT INTO \(index)(rowid, \(column)) VALUES (new.rowid, new.\(column));
        END;
        CREATE TRIGGER \(index)_delete AFTER DELETE ON \(table) BEGIN
            INSERT INTO \(index)(\(index), rowid, \(column)) VALUES ('delete', old.rowid, old.\(column));
        END;
        CREATE TRIGGER \(index)_update AFTER UPDATE OF \(column) ON \(table) BEGIN
            INSERT INTO \(index)(\(index), rowid, \(column)) VALUES ('delete', old.rowid, old.\(column));
            INSERT INTO \(index)(rowid, \(column)) VALUES (new.rowid, new.\(column));
        END;

        """
    }

    /// Makes the search index `index` (see `searchIndex`) catch up in batches: its row in
    /// `search_progress` holds the last rowid of `table` indexed, the triggers touch the index
    /// only for rows at or below it (so a rowid reused after a deletion is indexed at once), and
    /// the rows above wait for `indexForSearch`, which a search runs first and the group commit
    /// runs every `indexingInterval`. Part of a migration: its text never changes.
    static func deferIndexing(_ index: String, over column: String, of table: String) -> String {
        let indexed = "(SELECT through FROM search_progress WHERE name = '\(index)')"
        return """
            INSERT INTO search_progress VALUES ('\(index)', (SELECT coalesce(max(rowid), 0) FROM \(table)));
            DROP TRIGGER \(index)_insert;
            DROP TRIGGER \(index)_delete;
            DROP TRIGGER \(index)_update;
            CREATE TRIGGER \(index)_insert AFTER INSERT ON \(table) WHEN new.rowid <= \(indexed) BEGIN
                INSERT INTO \(index)(rowid, \(column)) VALUES (new.rowid, new.\(column));
            END;
            CREATE TRIGGER \(index)_delete AFTER DELETE ON \(table) WHEN old.rowid <= \(indexed) BEGIN
                INSERT INTO \(index)(\(index), rowid, \(column)) VALUES ('delete', old.rowid, old.\(column));
            END;
            CREATE TRIGGER \(index)_update AFTER UPDATE OF \(column) ON \(table) WHEN old.rowid <= \(indexed) BEGIN
                INSERT INTO \(index)(\(index), rowid, \(column)) VALUES ('delete', old.rowid, old.\(column));
                INSERT INTO \(index)(rowid, \(column)) VALUES (new.rowid, new.\(column));
            END;

            """
    }

    public static var schemaVersion: Int { migrations.count }

    private let db: Mutex<SQLiteConnection>
    /// Reads only (`PRAGMA query_only`); nil for an in-memory database, which a second
    /// connection would not share.
    private let reader: Mutex<SQLiteConnection?>
    private let hasReader: Bool
    private let pool: NIOThreadPool
    private let closed = Atomic(false)
    /// When the group commit next brings the search indexes up to date (uptime nanoseconds).
    private let nextIndexing = Atomic<UInt64>(0)
    /// `parley_store_seconds{store="sqlite"}`: each call from asking to its commit.
    private let latency: CoreMetrics.Timer
    /// `parley_store_commits_total{store="sqlite"}`: group commits (each one `fdatasync`).
    private let commitCounter: CoreMetrics.Counter
    private let errors: StoreErrorCounter
    /// Group commits so far (what `commitCounter` counts), for tests.
    let commits = Atomic(0)
    /// A batch had a call fail for lack of space (a full disk) lately, and no batch has stored a
    /// row since: `ping` says so, for `/healthz`.
    private let space: SpaceWatch
    /// Times the writer waited for more calls before a commit (`commitWindow`), for tests.
    let windowWaits = Atomic(0)
    /// What the journals of the replies streaming now hold in the store (see `saveStreamJournals`).
    let journaled = Mutex(JournalTails())
    /// Clones read lately, decoded (see `DecodedClones`).
    let decodedClones: DecodedClones
    /// What `decodedClones` may hold by default.
    public static let defaultDecodedCloneBytes = 64 << 20

    private init(
        connection: SQLiteConnection, reader: SQLiteConnection?, pool: NIOThreadPool, metrics: any MetricsFactory, indexingInterval: TimeAmount,
        commitWindow: TimeAmount, space: SpaceWatch, decodedCloneBytes: Int
    ) {
        decodedClones = DecodedClones(capacity: decodedCloneBytes)
        self.space = space
        self.indexingInterval = indexingInterval
        self.commitWindow = commitWindow
        self.db = Mutex(connection)
        self.reader = Mutex(reader)
        hasReader = reader != nil
        self.pool = pool
        latency = CoreMetrics.Timer(
            label: "parley_store_seconds", dimensions: [("store", "sqlite")], preferredDisplayUnit: .seconds, factory: metrics)
        commitCounter = CoreMetrics.Counter(label: "parley_store_commits_total", dimensions: [("store", "sqlite")], factory: metrics)
        errors = StoreErrorCounter(store: "sqlite", factory: metrics)
    }

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    /// `indexingInterval`: how often the group commit brings search up to date (tests vary it);
    /// `commitWindow`: see `defaultCommitWindow`; `space`: how long `ping` says `full` after a
    /// write found no space (see `SpaceWatch`); `decodedCloneBytes`: what `DecodedClones` may hold
    /// (0: none).
    public static func open(
        path: String, metrics: any MetricsFactory = MetricsSystem.factory, indexingInterval: TimeAmount = SQLiteStore.defaultIndexingInterval,
        commitWindow: TimeAmount = SQLiteStore.defaultCommitWindow, space: SpaceWatch = SpaceWatch(),
        decodedCloneBytes: Int = SQLiteStore.defaultDecodedCloneBytes
    ) async throws -> SQLiteStore {
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        do {
            let (connection, reader) = try await pool.runIfActive { () throws -> (SQLiteConnection, SQLiteConnection?) in
                try restrictToOwner(path)
                let connection = try SQLiteConnection(path: path)
                var reader: SQLiteConnection?
                do {
                    // temp_store=MEMORY: each call of a batch runs in a savepoint, whose journal of
                    // the pages it changes SQLite otherwise spills past 64 KiB to a file in /var/tmp
                    // that the rest of the batch then writes too: under load nearly every batch
                    // made, wrote and deleted one (23,000 `pwrite`s in 3 s beside the WAL's 3,000,
                    // #26). In memory the journal is emptied as each savepoint is released, so it
                    // holds one call's changed pages at most. (A larger spill threshold is no way
                    // out: SQLite 3.40 fails to spill a chunk over 128 KiB, with SQLITE_FULL.)
                    try connection.exec(
                        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000; PRAGMA temp_store=MEMORY;"
                    )
                    try migrate(connection)
                    try foldAllTails(connection)
                    if path != ":memory:", !path.isEmpty {
                        reader = try SQLiteConnection(path: path)
                        try reader?.exec("PRAGMA query_only=ON; PRAGMA busy_timeout=5000;")
                    }
                } catch {
                    reader?.close()
                    connection.close()
                    throw error
                }
                return (connection, reader)
            }
            return SQLiteStore(
                connection: connection, reader: reader, pool: pool, metrics: metrics, indexingInterval: indexingInterval, commitWindow: commitWindow,
                space: space, decodedCloneBytes: decodedCloneBytes)
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
        let version = Int(try connection.query("PRAGMA user_version").first?["user_version"].int ?? 0)
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
        /// The last commit: how many calls it held and when it ended (uptime nanoseconds).
        var lastBatch = 0
        var lastCommit: UInt64 = 0
    }

    private let queue = Mutex(Queue())
    /// Calls waiting for the writer (tests watch it).
    var waitingCalls: Int { queue.withLock { $0.jobs.count } }
    /// Calls committed together at most (a bound on how long one batch holds the others).
    static let maxBatch = 256

    /// Runs `body` with the connection on the store's thread: every call waiting at that moment
    /// runs in one transaction, each in its own savepoint (a failing call rolls back only
    /// itself), and one commit (one fsync) makes them all durable. A caller hears back only after
    /// that commit, so group commit trades nothing away: `synchronous=FULL` still holds for each.
    @discardableResult
    func run<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        guard !closed.load(ordering: .acquiring) else { throw StoreError.closed }
        let started = NIODeadline.now()
        defer { latency.recordNanoseconds((NIODeadline.now() - started).nanoseconds) }
        let errors = self.errors
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
                            errors.count(commitFailure)
                            continuation.resume(throwing: commitFailure)
                        } else {
                            if case .failure(let error) = result { errors.count(error) }
                            continuation.resume(with: result)
                        }
                    }
                },
                fail: {
                    errors.count($0)
                    continuation.resume(throwing: $0)
                }
            )
            enqueue(job)
        }
    }

    /// Runs a read-only `body` on the read connection, in one read transaction (a consistent
    /// snapshot of the last commit), without waiting for the group commit. Every write a caller
    /// awaited before is visible: a commit is answered only once it is durable and visible.
    func read<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        guard hasReader else { return try await run(body) }
        guard !closed.load(ordering: .acquiring) else { throw StoreError.closed }
        let started = NIODeadline.now()
        defer { latency.recordNanoseconds((NIODeadline.now() - started).nanoseconds) }
        do {
            return try await pool.runIfActive {
                try self.reader.withLock { connection in
                    guard let connection else { throw StoreError.closed }
                    try connection.command("BEGIN")
                    defer { try? connection.command("COMMIT") }
                    return try body(connection)
                }
            }
        } catch {
            errors.count(error)
            throw error
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

    /// How long after a commit the next one waits for more calls while several callers write
    /// at once (the last batch held more than one call): one `fdatasync` then serves more of
    /// them. With 1,000 replies streaming, commits held one or two calls each and their
    /// `fdatasync`s and WAL writes were 12% of the server's CPU samples (#26). A caller writing
    /// alone is never held back: its batches hold one call. Zero turns the wait off.
    public static let defaultCommitWindow = TimeAmount.milliseconds(1)
    private let commitWindow: TimeAmount

    /// Whether the writer waits before its next commit, and until when (uptime nanoseconds):
    /// only while the last batch held more than one call, some but fewer than `maxBatch` calls
    /// wait, and the window after the last commit has not passed.
    static func gatherUntil(lastBatch: Int, lastCommit: UInt64, waiting: Int, window: TimeAmount, now: UInt64) -> UInt64? {
        guard lastBatch > 1, (1..<maxBatch).contains(waiting), window.nanoseconds > 0 else { return nil }
        let due = lastCommit + UInt64(window.nanoseconds)
        return now < due ? due : nil
    }

    /// Commits batches until no call is waiting (on the store's single thread).
    private func drain() {
        while true {
            let (waiting, lastBatch, lastCommit) = queue.withLock { ($0.jobs.count, $0.lastBatch, $0.lastCommit) }
            let now = NIODeadline.now().uptimeNanoseconds
            if let due = Self.gatherUntil(lastBatch: lastBatch, lastCommit: lastCommit, waiting: waiting, window: commitWindow, now: now) {
                // This thread only writes: the reads run on the pool's other one meanwhile.
                windowWaits.add(1, ordering: .relaxed)
                // usleep takes under a second and may end early: sleep until the window is over.
                var now = now
                while now < due {
                    usleep(UInt32(min((due - now) / 1_000, 999_999)))
                    now = NIODeadline.now().uptimeNanoseconds
                }
            }
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
                let spaceFailures = connection.spaceFailures
                var storedRows = false
                defer {
                    // Out of space until a batch stores something again (a read alone, as `ping`, does not tell).
                    if connection.spaceFailures != spaceFailures {
                        space.failed()
                    } else if storedRows {
                        space.stored()
                    }
                }
                var pending = batch[...]
                while !pending.isEmpty {
                    let (changesBefore, spaceFailuresBefore) = (connection.totalChanges, connection.spaceFailures)
                    do {
                        try connection.command("BEGIN IMMEDIATE")
                    } catch {
                        for job in pending { job.fail(error) }
                        return
                    }
                    var finishers: [@Sendable ((any Error)?) -> Void] = []
                    while let job = pending.popFirst() {
                        finishers.append(job.execute(connection))
                        // Some errors (a full disk, I/O) make SQLite roll the whole transaction
                        // back, not only the failing call's savepoint: the calls before it in the
                        // batch are undone too, and the ones after it must not run outside a
                        // transaction (each would commit alone, then hear the batch's failed
                        // commit: stored, yet told it failed). They go in a new transaction.
                        if !connection.inTransaction { break }
                    }
                    var commitFailure: (any Error)?
                    if connection.inTransaction {
                        indexForSearchWhenDue(connection)
                        do {
                            try connection.command("COMMIT")
                            if connection.totalChanges != changesBefore { storedRows = true }
                        } catch {
                            commitFailure = error
                            try? connection.command("ROLLBACK")
                        }
                        commits.add(1, ordering: .relaxed)
                        commitCounter.increment()
                    } else if connection.spaceFailures != spaceFailuresBefore {
                        commitFailure = StoreError.full("a call in the same transaction as this one found no space, and SQLite rolled back both")
                    } else {
                        commitFailure = StoreError.backend(
                            "a call in the same transaction as this one failed, and SQLite rolled back both (an I/O error)")
                    }
                    // Rolled back: what the journals hold is no longer known; each is written whole next.
                    if commitFailure != nil { journaled.withLock { $0.forgetAll() } }
                    for finish in finishers { finish(commitFailure) }
                }
            }
            let ended = NIODeadline.now().uptimeNanoseconds
            queue.withLock { q in
                q.lastBatch = batch.count
                q.lastCommit = ended
            }
        }
    }

    /// How often the group commit brings the search indexes up to date (v22), in the batch it
    /// commits anyway: a search between two catch-ups indexes the rest itself.
    public static let defaultIndexingInterval = TimeAmount.seconds(1)
    private let indexingInterval: TimeAmount
    /// Rows indexed per catch-up at most, so one batch never holds the writer for long.
    static let indexingBatch = 2_000

    private func indexForSearchWhenDue(_ connection: SQLiteConnection) {
        let now = NIODeadline.now().uptimeNanoseconds
        guard now >= nextIndexing.load(ordering: .relaxed) else { return }
        nextIndexing.store(now + UInt64(max(0, indexingInterval.nanoseconds)), ordering: .relaxed)
        // In its own savepoint: a failure here rolls back only the indexing, which the next
        // catch-up (or search) does again.
        _ = try? connection.transaction { try Self.indexForSearch(connection, limit: Self.indexingBatch) }
    }

    public func close() async throws {
        guard !closed.load(ordering: .acquiring) else { return }
        try await run { _ in }  // every call queued before this one is committed
        closed.store(true, ordering: .releasing)
        try await pool.runIfActive {
            self.reader.withLock { connection in
                connection?.close()
                connection = nil
            }
            self.db.withLock { connection in
                // Fold the WAL back into the main file so the data dir is one self-contained file.
                try? connection.exec("PRAGMA wal_checkpoint(TRUNCATE)")
                connection.close()
            }
        }
        try await pool.shutdownGracefully()
    }

    // MARK: Shared by the domains

    static func optional(_ text: String?) -> SQLValue { text.map(SQLValue.text) ?? .null }

    /// A keyset-pagination condition, `AND <column> <op> ?` with its value, or nothing without a
    /// cursor. Not `(? IS NULL OR id < ?)`: SQLite cannot use the index range through the OR, so
    /// every page would scan from the newest row down to the cursor (an export of a long
    /// conversation went quadratic).
    static func cursor(_ column: String, _ op: String, _ value: String?) -> (sql: String, params: [SQLValue]) {
        guard let value else { return ("", []) }
        return (" AND \(column) \(op) ?", [.text(value)])
    }

    /// A JSON array of strings stored in a text column.
    static func strings(_ value: SQLValue) throws -> [String] {
        (try JSONValue.parse(Array((value.text ?? "[]").utf8))).arrayValue?.compactMap(\.stringValue) ?? []
    }

    public func ping() async throws {
        try await run { db in _ = try db.query("SELECT 1") }
        try space.check()
    }
}
