import CSQLite
import Dispatch
import Foundation
import MetricsTestKit
import ParleyCore
@testable import ParleyStore
import ParleyTestSupport
import Testing

/// What only the SQLite backend promises: durability across reopen and schema versioning.
@Suite struct SQLiteStoreTests {
    @Test func dataSurvivesCloseAndReopen() async throws {
        let path = temporaryPath("reopen") + "/parley.sqlite"
        let store = try await SQLiteStore.open(path: path)
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        try await store.close()

        let reopened = try await SQLiteStore.open(path: path)
        #expect(try await reopened.clone(id: clone.id, owner: "alice") == clone)
        try await reopened.close()
    }

    @Test func aReadIsAnsweredWhileAWriteBatchHoldsTheWriter() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("reader") + "/parley.sqlite")
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        // A write that cannot finish until told to: the group commit's thread is taken.
        let (entered, release) = (DispatchSemaphore(value: 0), DispatchSemaphore(value: 0))
        let write = Task {
            try await store.run { _ in
                entered.signal()
                release.wait()
            }
        }
        await Task.detached { entered.wait() }.value
        let read = try await withThrowingTaskGroup(of: Clone?.self) { group in
            group.addTask { try await store.clone(id: clone.id, owner: "alice") }
            group.addTask {
                try await Task.sleep(for: .seconds(30))
                release.signal()  // the read waited for the write: let both finish, and fail
                throw CancellationError()
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
        #expect(read == clone, "the read connection answers from the last commit")
        release.signal()
        try await write.value
        try await store.close()
        await #expect(throws: StoreError.closed) { _ = try await store.clones(owner: "alice", limit: 100, after: nil) }
    }

    /// Messages stored before v10 have no parent recorded: each follows the one before it, and
    /// one replaced by an alternative gets its parent written then.
    @Test func messagesStoredBeforeTheyHadParentsFollowTheOneBeforeThem() async throws {
        let path = temporaryPath("legacy") + "/parley.sqlite"
        let store = try await SQLiteStore.open(path: path)
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        let conversation = makeConversation(owner: "alice", clone: clone.id)
        try await store.createConversation(conversation)
        let messages = ["hi", "hello", "joke?", "no"].enumerated().map { i, text in
            makeMessage(conversation.id, text, role: i % 2 == 0 ? .user : .assistant, at: 2_000 + Int64(i))
        }
        for message in messages { try await store.appendMessage(message) }
        try await store.run { db in try db.query("UPDATE messages SET parent = NULL") }

        #expect(
            try await store.alternatives(of: messages.map(\.id), conversation: conversation.id).values.allSatisfy { $0.count == 1 && $0.index == 0 })
        let regenerated = try #require(
            try await store.appendAlternative(makeMessage(conversation.id, "why not", role: .assistant), replacing: messages[3].id))
        #expect(regenerated.parent == messages[2].id)
        let alternatives = try await store.alternatives(of: [messages[3].id, regenerated.id], conversation: conversation.id)
        #expect(alternatives[messages[3].id] == Alternatives(siblings: [messages[3].id, regenerated.id], index: 0))
        #expect(alternatives[regenerated.id] == Alternatives(siblings: [messages[3].id, regenerated.id], index: 1))
        #expect(try await store.activate(message: messages[3].id, conversation: conversation.id))
        #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil).map(\.text) == ["hi", "hello", "joke?", "no"])
        try await store.close()
    }

    /// A database from before search (schema v10) indexes what it holds when it opens.
    @Test func messagesStoredBeforeSearchAreFoundAfterTheUpgrade() async throws {
        let path = temporaryPath("presearch") + "/parley.sqlite"
        var store = try await SQLiteStore.open(path: path)
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        var conversation = makeConversation(owner: "alice", clone: clone.id)
        conversation.title = "Old heron"
        try await store.createConversation(conversation)
        let message = makeMessage(conversation.id, "a heron stood still")
        try await store.appendMessage(message)
        try await store.run { db in
            try db.exec(
                """
                DROP TABLE messages_fts; DROP TABLE titles_fts;
                DROP TRIGGER IF EXISTS messages_fts_insert; DROP TRIGGER IF EXISTS messages_fts_delete;
                DROP TRIGGER IF EXISTS messages_fts_update; DROP TRIGGER IF EXISTS titles_fts_insert;
                DROP TRIGGER IF EXISTS titles_fts_delete; DROP TRIGGER IF EXISTS titles_fts_update;
                ALTER TABLE conversations DROP COLUMN summary; ALTER TABLE conversations DROP COLUMN summary_through;
                DROP TABLE session_revocations; DROP INDEX audit_by_age; DROP TABLE subscriptions;
                DROP TABLE payment_orders; DROP TABLE webhook_deliveries; DROP INDEX ledger_by_conversation; DROP INDEX ledger_by_room;
                DROP TABLE spend_limits; DROP TABLE spend_windows; DROP INDEX ledger_by_age; DROP TABLE voice_clips;
                DROP TABLE search_progress; DROP TABLE stream_journal_tails; DROP INDEX stream_journals_by_tail; DROP TABLE personas;
                ALTER TABLE stream_journals DROP COLUMN tail_from; ALTER TABLE stream_journals DROP COLUMN ended;
                CREATE INDEX messages_on_path ON messages(conversation, id) WHERE off_path = 0;
                PRAGMA user_version = 10;
                """)
        }
        try await store.close()
        store = try await SQLiteStore.open(path: path)
        let query = try #require(try SearchQuery.parse("heron"))
        #expect(try await store.search(owner: "alice", query: query, limit: 5, before: nil).map(\.id) == [message.id, conversation.id])
        try await store.close()
    }

    /// Rows the search index holds (its own table, not the messages it points at).
    private func indexed(_ store: SQLiteStore) async throws -> Int64 {
        try await store.read { db in try db.query("SELECT count(*) AS n FROM messages_fts_docsize").first?["n"].int ?? -1 }
    }

    private func search(_ store: SQLiteStore, _ words: String) async throws -> [String] {
        try await store.search(owner: "alice", query: try #require(try SearchQuery.parse(words)), limit: 10, before: nil).map(\.id)
    }

    /// v22: a message is not indexed on its own commit; a search indexes what is behind first, and
    /// deleting a row never indexed, or reusing the rowid of one deleted, keeps the index exact.
    @Test func messagesAreIndexedForSearchLaterYetFoundAtOnce() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("deferred") + "/parley.sqlite", indexingInterval: .hours(1))
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        let kept = makeConversation(owner: "alice", clone: clone.id)
        let heron = makeMessage(kept.id, "a heron stood still")
        try await store.createConversation(kept, messages: [heron, makeMessage(kept.id, "then it flew")])
        #expect(try await indexed(store) == 0, "not indexed on its own commit")
        #expect(try await search(store, "heron") == [heron.id])
        #expect(try await indexed(store) == 2)

        // Deleted before it was ever indexed: nothing to take out of the index.
        let gone = makeConversation(owner: "alice", clone: clone.id)
        try await store.createConversation(gone, messages: [makeMessage(gone.id, "an egret waded")])
        #expect(try await store.deleteConversation(id: gone.id, owner: "alice"))
        #expect(try await search(store, "egret").isEmpty)

        // The newest row deleted once indexed: the next message takes its rowid and is indexed at once.
        let brief = makeConversation(owner: "alice", clone: clone.id)
        try await store.createConversation(brief, messages: [makeMessage(brief.id, "a kingfisher dove")])
        #expect(try await search(store, "kingfisher").count == 1)
        let rowid = try await store.read { db in try db.query("SELECT max(rowid) AS r FROM messages").first?["r"].int }
        #expect(try await store.deleteConversation(id: brief.id, owner: "alice"))
        let stork = makeMessage(kept.id, "a stork arrived")
        try await store.appendMessage(stork)
        #expect(
            try await store.read { db in try db.query("SELECT rowid AS r FROM messages WHERE id = ?", [.text(stork.id)]).first?["r"].int } == rowid)
        #expect(try await indexed(store) == 3, "indexed on its commit: its rowid was indexed before")
        #expect(try await search(store, "stork") == [stork.id])
        #expect(try await search(store, "kingfisher").isEmpty)
        try await store.run { db in try db.exec("INSERT INTO messages_fts(messages_fts) VALUES('integrity-check')") }
        try await store.close()
    }

    /// Waits (polling: no event says a call has queued) until `condition` holds.
    private func until(_ condition: () -> Bool) async throws {
        while !condition() { try await Task.sleep(for: .milliseconds(1)) }
    }

    /// A writer whose last commit held several calls waits up to `commitWindow` for more before
    /// the next (one fsync for all of them); a caller writing alone is never held back.
    @Test func aBusyWriterGathersCallsForItsNextCommitButALoneOneCommitsAtOnce() async throws {
        // A window far longer than a busy machine takes to start a task: the later caller must
        // reach the queue inside it (with one second, a CI run beside SecantusDB missed it).
        let store = try await SQLiteStore.open(path: temporaryPath("window") + "/parley.sqlite", commitWindow: .seconds(5))
        try await store.run { db in try db.exec("CREATE TABLE t (v INTEGER)") }
        @Sendable func write(_ v: Int) -> Task<Void, any Error> { Task { try await store.run { db in try db.exec("INSERT INTO t VALUES (\(v))") } } }

        // Alone: every batch holds one call, so none waits for the window.
        for v in 0..<20 { try await write(v).value }
        #expect(store.windowWaits.load(ordering: .relaxed) == 0, "a caller writing alone is never held back")

        // Busy: a batch of two calls (the writer held by the first batch while both queue), then
        // one call waiting at its commit and another coming 100 ms later: one commit for both.
        let (entered, enter) = AsyncStream<Int>.makeStream()
        var signals = entered.makeAsyncIterator()
        let gates = [DispatchSemaphore(value: 0), DispatchSemaphore(value: 0)]
        @Sendable func hold(_ n: Int) -> Task<Void, any Error> {
            Task {
                try await store.run { _ in
                    enter.yield(n)
                    gates[n].wait()
                }
            }
        }
        let first = hold(0)
        #expect(await signals.next() == 0)
        let pair = [write(100), hold(1)]
        try await until { store.waitingCalls == 2 }
        gates[0].signal()
        #expect(await signals.next() == 1)  // the pair's batch is running
        let waiting = write(101)
        try await until { store.waitingCalls == 1 }
        let before = store.commits.load(ordering: .relaxed)
        gates[1].signal()
        try await until { store.windowWaits.load(ordering: .relaxed) == 1 }  // the writer is waiting
        let later = write(102)  // and the second caller comes after it began to wait
        try await first.value
        for task in pair { try await task.value }
        try await waiting.value
        try await later.value
        #expect(store.commits.load(ordering: .relaxed) - before == 2, "the pair's commit, then one for the two that came after it")
        #expect(store.windowWaits.load(ordering: .relaxed) == 1, "after the pair's commit, and only then")
        let rows = try await store.read { db in try db.query("SELECT count(*) AS n FROM t").first?["n"].int }
        #expect(rows == 23)
        try await store.close()
    }

    /// A call that fills the disk makes SQLite roll back the whole transaction of its batch, not
    /// only its savepoint: the call before it is undone and told so, the call after it runs in a
    /// new transaction, and every call that returned is stored, every one that threw is not.
    /// (The call after it ran outside any transaction, committed alone, then heard the batch's
    /// failed commit: stored, yet told it failed.)
    @Test func aCallThatFillsTheDiskFailsWithItsBatchAndTheCallsAfterItStillCommit() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("disk-full") + "/parley.sqlite")
        try await store.run { db in
            try db.exec("CREATE TABLE t (v INTEGER, pad BLOB)")
            // The database may grow by a few pages only: to SQLite, as full as a full disk.
            let pages = try db.query("PRAGMA page_count").first?["page_count"].int ?? 0
            try db.exec("PRAGMA max_page_count = \(pages + 4)")
        }
        let (entered, enter) = AsyncStream<Void>.makeStream()
        var signals = entered.makeAsyncIterator()
        let gate = DispatchSemaphore(value: 0)
        let held = Task {
            try await store.run { _ in
                enter.yield()
                gate.wait()
            }
        }
        _ = await signals.next()
        @Sendable func write(_ v: Int, bytes: Int) -> Task<Void, any Error> {
            Task { try await store.run { db in try db.exec("INSERT INTO t VALUES (\(v), zeroblob(\(bytes)))") } }
        }
        // One batch, in this order.
        let before = write(1, bytes: 10)
        try await until { store.waitingCalls == 1 }
        let filling = write(2, bytes: 1_000_000)
        try await until { store.waitingCalls == 2 }
        let after = write(3, bytes: 10)
        try await until { store.waitingCalls == 3 }
        gate.signal()
        try await held.value
        var returned: [Int] = []
        for (v, task) in [(1, before), (2, filling), (3, after)] where (try? await task.value) != nil { returned.append(v) }
        let stored = try await store.read { db in try db.query("SELECT v FROM t ORDER BY v").compactMap { $0["v"].int } }
        #expect(returned == [3])
        #expect(stored == [3])
        // Both failed for lack of space, the one undone with the other too.
        for task in [before, filling] {
            await #expect {
                try await task.value
            } throws: { error in
                guard case StoreError.full = error else { return false }
                return true
            }
        }
        try await store.close()
    }

    /// A write that finds no space throws `full` (a code the server can tell clients), and `ping`
    /// says so until a write is stored again: a read alone does not clear it.
    @Test func aWriteWithoutSpaceThrowsFullAndPingSaysSoUntilAWriteIsStored() async throws {
        let metrics = TestMetrics()
        let store = try await SQLiteStore.open(path: temporaryPath("no-space") + "/parley.sqlite", metrics: metrics)
        let pages = try await store.run { db in
            try db.exec("CREATE TABLE t (v INTEGER, pad BLOB)")
            return try db.query("PRAGMA page_count").first?["page_count"].int ?? 0
        }
        try await store.run { db in try db.exec("PRAGMA max_page_count = \(pages + 2)") }
        @Sendable func isFull(_ error: any Error) -> Bool {
            guard case StoreError.full = error else { return false }
            return true
        }
        try await store.ping()
        await #expect(performing: { try await store.run { db in try db.exec("INSERT INTO t VALUES (1, zeroblob(100000))") } }, throws: isFull)
        // Counted for an operator's alert, once: the ping's own call read fine.
        let full = try metrics.expectCounter("parley_store_errors_total", [("store", "sqlite"), ("kind", "full")])
        #expect(full.totalValue == 1)
        await #expect(performing: { try await store.ping() }, throws: isFull)
        _ = try await store.read { db in try db.query("SELECT count(*) FROM t") }
        _ = try await store.run { db in try db.query("SELECT count(*) FROM t") }
        await #expect(performing: { try await store.ping() }, throws: isFull)
        try await store.run { db in try db.exec("PRAGMA max_page_count = 1000000") }
        try await store.run { db in try db.exec("INSERT INTO t VALUES (2, zeroblob(100000))") }
        try await store.ping()
        #expect(full.totalValue == 1)
        try await store.close()
    }

    /// A node whose store said `full` may get no more requests (a balancer's health check) and so
    /// store nothing more: its `ping` says `full` only for a while after the last write that
    /// found no space, then tells again what the next write finds (it stayed `full` for good).
    /// The window is a test clock's, moved by the test: two real seconds once passed between the
    /// failed write and the first ping on a loaded CI machine, and the test saw no `full` at all.
    @Test func pingSaysFullForAWhileOnlyWithoutAWrite() async throws {
        let clock = ManualClock()
        let store = try await SQLiteStore.open(
            path: temporaryPath("no-space-window") + "/parley.sqlite", space: SpaceWatch(window: .seconds(30), clock: clock.now))
        let pages = try await store.run { db in
            try db.exec("CREATE TABLE t (v INTEGER, pad BLOB)")
            return try db.query("PRAGMA page_count").first?["page_count"].int ?? 0
        }
        try await store.run { db in try db.exec("PRAGMA max_page_count = \(pages + 2)") }
        _ = try? await store.run { db in try db.exec("INSERT INTO t VALUES (1, zeroblob(100000))") }
        await #expect(throws: StoreError.self) { try await store.ping() }
        clock.advance(by: .seconds(29))
        await #expect(throws: StoreError.self, "still within the window") { try await store.ping() }
        clock.advance(by: .seconds(1))
        try await store.ping()
        // The next write that finds no space says so again.
        _ = try? await store.run { db in try db.exec("INSERT INTO t VALUES (2, zeroblob(100000))") }
        await #expect(throws: StoreError.self) { try await store.ping() }
        try await store.close()
    }

    /// Each call of a batch runs in a savepoint, whose journal of the pages it changes outgrew
    /// SQLite's default 64 KiB in memory under load: every batch then made, wrote and deleted a
    /// file in /var/tmp (#26).
    @Test func aBatchJournalsItsSavepointsInMemoryNotInATemporaryFile() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("subjournal") + "/parley.sqlite")
        try await store.run { db in
            try db.exec("CREATE TABLE t (v BLOB)")
            for _ in 0..<200 { try db.exec("INSERT INTO t VALUES (zeroblob(2000))") }
        }
        let temporaryFiles = try await store.run { db in
            // Rewrites every page (≈400 KiB, journaled by the call's savepoint), then looks for
            // SQLite's temporary files among this process's open files.
            try db.exec("UPDATE t SET v = zeroblob(2001)")
            return Self.openFiles().filter { $0.contains("etilqs_") }
        }
        #expect(temporaryFiles == [])
        try await store.close()
    }

    /// Since v24 dropped `messages_on_path`, the path's queries (as the store words them: its
    /// newest message, a page of it) find their rows through `messages_by_conversation`, in its
    /// order, with no scan and no sort (#26).
    @Test func thePathIsReadThroughTheConversationsIndex() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("path-plan") + "/parley.sqlite")
        let (plans, dropped) = try await store.read { db in
            let queries: [(String, [SQLValue])] = [
                ("SELECT id FROM messages WHERE conversation = ? AND off_path = 0 ORDER BY id DESC LIMIT 1", [.text("cv")]),
                (
                    "SELECT * FROM messages WHERE conversation = ? AND off_path = 0 AND id < ? ORDER BY id DESC LIMIT ?",
                    [.text("cv"), .text("ms"), .int(50)]
                ),
            ]
            let plans = try queries.map { sql, params in
                try db.query("EXPLAIN QUERY PLAN " + sql, params).compactMap { $0["detail"].text }.joined(separator: "; ")
            }
            let dropped = try db.query("SELECT 1 FROM sqlite_schema WHERE name = 'messages_on_path'").isEmpty
            return (plans, dropped)
        }
        #expect(dropped)
        for plan in plans {
            #expect(plan.hasPrefix("SEARCH messages USING INDEX messages_by_conversation"), "\(plan)")
            #expect(!plan.contains("SCAN") && !plan.contains("TEMP B-TREE"), "\(plan)")
        }
        try await store.close()
    }

    private static func openFiles() -> [String] {
        let descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return descriptors.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0) }
    }

    private func journal(_ stream: String, user: String = "alice", text: String = "", at time: Int64) -> StreamJournal {
        StreamJournal(
            stream: stream, user: user, model: "simulated", feature: "chat", inputTokens: 42, target: .conversation("cv_" + stream),
            messageID: "msg_" + stream, text: text, createdAt: time)
    }

    private func journalRow(_ store: SQLiteStore, _ stream: String) async throws -> (text: String?, tails: Int64?) {
        try await store.read { db in
            (
                try db.query("SELECT text FROM stream_journals WHERE stream = ?", [.text(stream)]).first?["text"].text,
                try db.query("SELECT count(*) AS n FROM stream_journal_tails WHERE stream = ?", [.text(stream)]).first?["n"].int
            )
        }
    }

    /// A reply's journal snapshot that only adds to its text is written as a tail (schema v23,
    /// #26): its row's text is written whole once per `maxTails` snapshots, and whatever was
    /// written reads back as the whole journal, in this process and after a reopen.
    @Test func aGrowingJournalIsWrittenAsTailsAndItsRowWholeOnlyNowAndThen() async throws {
        let path = temporaryPath("journal-tails") + "/parley.sqlite"
        var store = try await SQLiteStore.open(path: path)
        var j = journal("st_a", at: 1_000)
        try await store.saveStreamJournal(j)
        var wholeAt = ""
        for n in 1...(SQLiteStore.maxTails + 1) {
            j.text += n % 7 == 0 ? " ünï🙂\(n)" : " tok\(n)"
            j.outputTokens = n
            j.updatedAt = 1_000 + Int64(n)
            try await store.saveStreamJournal(j)
            if n == SQLiteStore.maxTails + 1 { wholeAt = j.text }
            #expect(try await store.streamJournals(limit: 10) == [j])
            let row = try await journalRow(store, "st_a")
            // Tails 1…maxTails; the next snapshot writes the row whole.
            #expect(row.text == (n <= SQLiteStore.maxTails ? "" : wholeAt))
            #expect(row.tails == Int64(min(n, SQLiteStore.maxTails)))
        }
        j.text += " more"
        try await store.saveStreamJournal(j)
        #expect(try await journalRow(store, "st_a").text == wholeAt)

        // A text that does not begin with the one written is written whole.
        j.text = "replaced"
        try await store.saveStreamJournal(j)
        #expect(try await journalRow(store, "st_a").text == "replaced")
        j.text += ", then grown"
        try await store.saveStreamJournal(j)
        #expect(try await journalRow(store, "st_a").text == "replaced")
        #expect(try await store.streamJournals(limit: 10) == [j])

        // Another process (after a crash: the store is not closed) finds the tails taken into
        // the row, and writes its first snapshot whole.
        let crashed = store
        store = try await SQLiteStore.open(path: path)
        #expect(try await journalRow(store, "st_a") == (j.text, 0))
        #expect(try await store.streamJournals(limit: 10) == [j])
        j.text += "!"
        try await store.saveStreamJournal(j)
        #expect(try await journalRow(store, "st_a").text == j.text)
        #expect(try await store.streamJournals(limit: 10) == [j])

        // An account's deletion takes its tails, a finished reply's too.
        var done = journal("st_done", at: 2_000)
        try await store.saveStreamJournal(done)
        done.text = "said"
        try await store.saveStreamJournals([done], deleting: [])
        try await store.saveStreamJournals([], deleting: ["st_done"])
        #expect(try await journalRow(store, "st_done").tails == 1)
        _ = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
        #expect(try await store.read { db in try db.query("SELECT count(*) AS n FROM stream_journal_tails").first?["n"].int } == 0)
        #expect(try await store.streamJournals(limit: 10).isEmpty)
        try await store.close()
        try await crashed.close()
    }

    /// Compaction deletes the tails no journal reads; journals that hold it back (a reply that
    /// waits, one whose tails are old) take their tails into their row first.
    @Test func compactionDeletesTheTailsNoJournalReads() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("journal-compaction") + "/parley.sqlite")
        var waiting = journal("st_wait", text: "waiting", at: 1)
        var slow = journal("st_slow", at: 2)
        var busy = journal("st_busy", at: 3)
        var done = journal("st_done", at: 4)
        try await store.saveStreamJournals([waiting, slow, busy, done])
        for n in 1...3 {
            slow.text += " s\(n)"
            done.text += " d\(n)"
            try await store.saveStreamJournals([slow, done])
        }
        try await store.saveStreamJournals([], deleting: ["st_done"])
        for n in 1...40 {
            busy.text += " b\(n)"
            busy.outputTokens = n
            try await store.saveStreamJournal(busy)
        }
        let compact = { (backlog: Int64) in
            try await store.run { db in try store.journaled.withLock { try SQLiteStore.compactTails(db, &$0, backlog: backlog) } }
        }
        // The oldest journals' tails are within the backlog: only what is below them all goes.
        try await compact(1_000)
        #expect(try await journalRow(store, "st_slow").tails == 3)
        #expect(try await journalRow(store, "st_done").tails == 3)
        // Past it, the journals behind take their tails in; then the tails no journal reads go.
        try await compact(10)
        #expect(try await journalRow(store, "st_slow") == (slow.text, 0))
        #expect(try await journalRow(store, "st_wait") == ("waiting", 0))
        #expect(try await journalRow(store, "st_done").tails == 0)
        #expect(try await store.streamJournals(limit: 10) == [waiting, slow, busy])
        // And they grow by tails again.
        waiting.text += ", still"
        slow.text += " s4"
        try await store.saveStreamJournals([waiting, slow])
        #expect(try await journalRow(store, "st_slow") == (slow.text.replacingOccurrences(of: " s4", with: ""), 1))
        #expect(try await store.streamJournals(limit: 10) == [waiting, slow, busy])
        try await store.close()
    }

    /// The group commit brings the index up to date on its own every `indexingInterval`.
    @Test func theGroupCommitIndexesForSearchOnItsOwn() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("indexing") + "/parley.sqlite", indexingInterval: .zero)
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        let conversation = makeConversation(owner: "alice", clone: clone.id)
        try await store.createConversation(conversation, messages: [makeMessage(conversation.id, "one")])
        try await store.appendMessage(makeMessage(conversation.id, "two"))
        // Each batch, before its commit, indexed what it had stored.
        #expect(try await indexed(store) == 2)
        #expect(try await store.read { db in try SQLiteStore.searchIsBehind(db) } == false)
        try await store.close()
    }

    @Test func aNewerSchemaIsRefused() async throws {
        let path = temporaryPath("schema") + "/parley.sqlite"
        try await SQLiteStore.open(path: path).close()
        let connection = try SQLiteConnection(path: path)
        try connection.exec("PRAGMA user_version = \(SQLiteStore.schemaVersion + 1)")
        connection.close()

        await #expect(throws: StoreError.schemaTooNew(found: SQLiteStore.schemaVersion + 1, supported: SQLiteStore.schemaVersion)) {
            _ = try await SQLiteStore.open(path: path)
        }
    }

    @Test func theSchemaVersionIsRecorded() async throws {
        let path = temporaryPath("version") + "/parley.sqlite"
        try await SQLiteStore.open(path: path).close()
        let connection = try SQLiteConnection(path: path)
        defer { connection.close() }
        #expect(try connection.query("PRAGMA user_version").first?["user_version"] == .int(Int64(SQLiteStore.schemaVersion)))
        #expect(try connection.query("PRAGMA journal_mode").first?["journal_mode"] == .text("wal"))
    }

    /// A transaction's `BEGIN`, `COMMIT`, savepoint and rollback are statements prepared once and
    /// kept: each must work again after one of them failed or rolled back.
    @Test func transactionsAndSavepointsRollBackAndCommitAgainAndAgain() throws {
        let connection = try SQLiteConnection(path: temporaryPath("transactions") + "/t.sqlite")
        defer { connection.close() }
        try connection.exec("CREATE TABLE t (v INTEGER PRIMARY KEY)")
        struct Refused: Error {}
        func values() throws -> [SQLValue] { try connection.query("SELECT v FROM t ORDER BY v").map { $0["v"] } }
        for round in 0..<3 {
            let base = Int64(round * 10)
            #expect(throws: Refused.self) {
                try connection.transaction {
                    try connection.query("INSERT INTO t (v) VALUES (?)", [.int(base + 1)])
                    throw Refused()
                }
            }
            #expect(!connection.inTransaction)
            try connection.transaction {
                try connection.query("INSERT INTO t (v) VALUES (?)", [.int(base + 2)])
                // A savepoint inside: its rollback keeps what the transaction wrote before it.
                #expect(throws: Refused.self) {
                    try connection.transaction {
                        try connection.query("INSERT INTO t (v) VALUES (?)", [.int(base + 3)])
                        throw Refused()
                    }
                }
                try connection.transaction { _ = try connection.query("INSERT INTO t (v) VALUES (?)", [.int(base + 4)]) }
            }
            #expect(!connection.inTransaction)
            // A statement that fails inside the transaction (a duplicate key) rolls it all back.
            #expect(throws: StoreError.self) {
                try connection.transaction {
                    try connection.query("INSERT INTO t (v) VALUES (?)", [.int(base + 5)])
                    try connection.query("INSERT INTO t (v) VALUES (?)", [.int(base + 2)])
                }
            }
            #expect(!connection.inTransaction)
        }
        #expect(try values() == [2, 4, 12, 14, 22, 24].map { SQLValue.int($0) })
        // A COMMIT that fails (no transaction is open) is an error, and the next one works.
        #expect(throws: StoreError.self) { try connection.command("COMMIT") }
        try connection.command("BEGIN")
        try connection.query("INSERT INTO t (v) VALUES (30)")
        try connection.command("COMMIT")
        #expect(try values().last == .int(30))
    }

    @Test func anUnopenablePathIsAClearError() async throws {
        await #expect {
            _ = try await SQLiteStore.open(path: "/proc/definitely/not/here.sqlite")
        } throws: { error in
            "\(error)".contains("cannot open SQLite database")
        }
    }
}

/// `DecodedClones`: a clone read lately is not read again, and no write is missed.
@Suite struct DecodedClonesTests {
    /// Written behind the store's back (as no other process can), a clone read before stays as
    /// read: the second read did not reach the database. Every write through the store is seen.
    @Test func aCloneReadLatelyIsNotReadAgainButEveryWriteIsSeen() async throws {
        let store = try await SQLiteStore.open(path: temporaryPath("decoded") + "/parley.sqlite")
        var ada = makeClone(owner: "alice")
        try await store.createClone(ada)
        let bo = makeClone(owner: "alice", name: "Bo")
        try await store.createClone(bo)
        #expect(try await store.clone(id: ada.id, owner: "alice") == ada)
        #expect(try await store.clone(id: ada.id, owner: "bob") == nil, "another owner's read finds nothing, kept or not")
        let adaID = ada.id
        try await store.run { db in try db.query("UPDATE clones SET name = 'Behind' WHERE id = ?", [.text(adaID)]) }
        #expect(try await store.clone(id: ada.id, owner: "alice")?.name == "Ada", "kept, not read again")

        ada.name = "Ada II"
        ada.profile.description = "Renamed."
        #expect(try await store.updateClone(ada))
        #expect(try await store.clone(id: ada.id, owner: "alice") == ada)
        #expect(try await store.deleteClone(id: ada.id, owner: "alice"))
        #expect(try await store.clone(id: ada.id, owner: "alice") == nil)
        #expect(try await store.clone(id: bo.id, owner: "alice") == bo)
        _ = try await store.deleteUser("alice", pseudonym: "deleted:0b0b")
        #expect(try await store.clone(id: bo.id, owner: "alice") == nil)
        #expect(store.decodedClones.count == 0)
        try await store.close()

        // None kept with no room for them.
        let none = try await SQLiteStore.open(path: temporaryPath("undecoded") + "/parley.sqlite", decodedCloneBytes: 0)
        let cy = makeClone(owner: "carol", name: "Cy")
        try await none.createClone(cy)
        #expect(try await none.clone(id: cy.id, owner: "carol") == cy)
        try await none.run { db in try db.query("UPDATE clones SET name = 'Behind' WHERE id = ?", [.text(cy.id)]) }
        #expect(try await none.clone(id: cy.id, owner: "carol")?.name == "Behind")
        try await none.close()
    }

    /// A read that began before a write ended keeps nothing (what it read may be the old row),
    /// one that began after keeps its clone.
    @Test func aReadThatRacedAWriteKeepsNothing() {
        let decoded = DecodedClones(capacity: 1 << 20)
        let ada = makeClone(owner: "alice")
        let before = decoded.generation
        decoded.written(ids: [ada.id])
        decoded.keep(ada, bytes: 100, readAt: before)
        #expect(decoded.clone(id: ada.id, owner: "alice") == nil)
        // A write of another clone counts too: writes are not told apart.
        let after = decoded.generation
        decoded.written(ids: ["cl_other"])
        decoded.keep(ada, bytes: 100, readAt: after)
        #expect(decoded.count == 0)
        decoded.keep(ada, bytes: 100, readAt: decoded.generation)
        #expect(decoded.clone(id: ada.id, owner: "alice") == ada)
    }

    /// Over its capacity the least recently used go first, down to half; a clone over a quarter
    /// of the capacity is never kept.
    @Test func theLeastRecentlyUsedGoFirstAndAHugeCloneIsNotKept() {
        let decoded = DecodedClones(capacity: 10_000)
        let clones = (0..<6).map { makeClone(owner: "alice", name: "c\($0)") }
        // Each counts 2 × 744 + 256 = 1,744 bytes: five fit in 10,000, the sixth is over.
        for clone in clones.prefix(5) { decoded.keep(clone, bytes: 744, readAt: decoded.generation) }
        #expect(decoded.count == 5)
        #expect(decoded.clone(id: clones[0].id, owner: "alice") != nil)  // the oldest, used again
        decoded.keep(clones[5], bytes: 744, readAt: decoded.generation)
        // Half the capacity is 5,000: the two most recently used stay (clones[5], clones[0]).
        #expect(decoded.count == 2)
        #expect(decoded.clone(id: clones[5].id, owner: "alice") != nil && decoded.clone(id: clones[0].id, owner: "alice") != nil)
        let huge = makeClone(owner: "alice", name: "huge")
        decoded.keep(huge, bytes: 1_300, readAt: decoded.generation)
        #expect(decoded.clone(id: huge.id, owner: "alice") == nil, "2 × 1,300 + 256 is over a quarter of 10,000")
    }
}
