import MetricsTestKit
import ParleyCore
@testable import ParleyMongoStore
import ParleyStore
import ParleyTestSupport
import Testing

/// What only the MongoDB backend promises: retries of transient failures, schema versioning,
/// and a clear failure when the server cannot be reached. Runs against the wire test server or,
/// with PARLEY_TEST_MONGODB_URI, a real mongod started with enableTestCommands.
@Suite(.serialized, .armsFailPoint) struct MongoStoreTests {
    /// A store for tests that lose replies: its retries wait a millisecond.
    func losingReplies(_ uri: String, node: String? = nil) async throws -> MongoStore {
        var options = MongoStore.Options()
        options.backoff = .milliseconds(1)
        options.node = node
        return try await MongoStore.open(uri: uri, options: options)
    }

    @Test func aTestDatabaseURIKeepsTheBasesOptionsAndReplacesItsPath() {
        #expect(MongoFixture.uri(base: "mongodb://h:1", database: "d") == "mongodb://h:1/d")
        #expect(MongoFixture.uri(base: "mongodb://h:1/", database: "d", options: ["appname=x"]) == "mongodb://h:1/d?appname=x")
        let withOptions = MongoFixture.uri(base: "mongodb://h:1/?replicaSet=rs", database: "d", options: ["appname=x"])
        #expect(withOptions == "mongodb://h:1/d?replicaSet=rs&appname=x")
        let withAuthDatabase = MongoFixture.uri(base: "mongodb://u:p@h:1,h:2/admin?tls=true", database: "d")
        #expect(withAuthDatabase == "mongodb://u:p@h:1,h:2/d?tls=true&authSource=admin")
    }

    @Test func transientFailuresAreRetried() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await MongoStore.open(uri: uri)
        let clone = makeClone(owner: "alice")
        // NetworkTimeout: retried here. Not NotWritablePrimary: a real server's "not primary" makes
        // the driver mark it unknown until its monitor checks again (SDAM), which these
        // milliseconds of backoff do not outlast; the wire test server did not model that.
        try MongoFixture.failNext(2, ["insert"], app: app, errorCode: 89)
        try await store.createClone(clone)
        #expect(try await store.clone(id: clone.id, owner: "alice") == clone)

        try MongoFixture.failNext(1, ["find"], app: app, closeConnection: true)  // the network drops once
        #expect(try await store.clones(owner: "alice", limit: 100, after: nil) == [clone])
        try await store.close()
    }

    /// A server out of disk space is reported as a full store (clients are told
    /// `unavailable`), not retried as if the network had failed.
    @Test func aServerOutOfDiskSpaceIsAFullStore() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await MongoStore.open(uri: uri)
        try MongoFixture.failNext(1, ["insert"], app: app, errorCode: 14031)
        await #expect {
            try await store.createClone(makeClone(owner: "alice"))
        } throws: { error in
            guard case StoreError.full = error else { return false }
            return true
        }
        try await store.createClone(makeClone(owner: "alice"))
        try await store.close()
    }

    /// `ping` (and so `/healthz`) says `full` for a while after a write found the database out
    /// of disk space (it never did: a balancer kept sending requests that failed).
    @Test func pingSaysFullForAWhileAfterTheServerRanOutOfSpace() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let clock = ManualClock()
        var options = MongoStore.Options()
        options.fullFor = .seconds(30)
        options.spaceClock = clock.now
        let store = try await MongoStore.open(uri: uri, options: options)
        try await store.ping()
        try MongoFixture.failNext(1, ["insert"], app: app, errorCode: 14031)
        _ = try? await store.createClone(makeClone(owner: "alice"))
        await #expect {
            try await store.ping()
        } throws: { error in
            guard case StoreError.full = error else { return false }
            return true
        }
        clock.advance(by: .seconds(29))
        await #expect(throws: StoreError.self, "still within the window") { try await store.ping() }
        clock.advance(by: .seconds(1))
        try await store.ping()
        try await store.close()
    }

    /// A write stored after one that found no space: `ping` is fine at once.
    @Test func pingIsFineOnceAWriteIsStoredAgain() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await MongoStore.open(uri: uri)
        try MongoFixture.failNext(1, ["insert"], app: app, errorCode: 14031)
        _ = try? await store.createClone(makeClone(owner: "alice"))
        await #expect(throws: StoreError.self) { try await store.ping() }
        try await store.createClone(makeClone(owner: "alice"))
        try await store.ping()
        try await store.close()
    }

    /// A deletion whose last step loses its reply after deleting: the retry deletes nothing,
    /// yet the clone (or the voice clip) was there and is gone, so the call says so (it said
    /// "no such clone", a 404 to the user who just deleted it).
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aDeletionWhoseReplyIsLostStillReportsTheDeletion() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await losingReplies(uri)
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        // Its conversations go first (it has none, so no messages or clips to delete): the
        // clone's own deletion is the second.
        try MongoFixture.failNext(1, ["delete"], app: app, skip: 1, dropReply: true)
        #expect(try await store.deleteClone(id: clone.id, owner: "alice"))
        #expect(try await store.clone(id: clone.id, owner: "alice") == nil)
        #expect(try await !store.deleteClone(id: clone.id, owner: "alice"))
        let clip = VoiceClip(
            id: "vc_lost_" + app, owner: "alice", stream: "st_1", conversation: nil, room: nil, message: nil, audio: [1, 2, 3], createdAt: 1)
        try await store.saveClip(clip)
        try MongoFixture.failNext(1, ["delete"], app: app, dropReply: true)
        #expect(try await store.deleteClip(id: clip.id, owner: "alice"))
        #expect(try await store.clip(id: clip.id, owner: "alice", withAudio: false) == nil)
        #expect(try await !store.deleteClip(id: clip.id, owner: "alice"))
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    @Test func retriesAreBoundedAndPermanentErrorsAreNotRetried() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let metrics = TestMetrics()
        var options = MongoStore.Options()
        options.attempts = 3
        options.backoff = .milliseconds(1)
        options.metrics = metrics
        let store = try await MongoStore.open(uri: uri, options: options)
        try MongoFixture.failNext(3, ["find"], app: app, errorCode: 89)  // NetworkTimeout
        await #expect {
            _ = try await store.clones(owner: "alice", limit: 100, after: nil)
        } throws: { error in
            // Told apart from a fault: the server answers `unavailable`, not `internal`.
            guard case StoreError.unreachable = error else { return false }
            return "\(error)".contains("after 3 attempts")
        }
        // The fail point is used up: the store works again.
        #expect(try await store.clones(owner: "alice", limit: 100, after: nil).isEmpty)

        try MongoFixture.failNext(1, ["find"], app: app, errorCode: 2)  // BadValue: permanent
        await #expect {
            _ = try await store.clones(owner: "alice", limit: 100, after: nil)
        } throws: { error in
            guard case StoreError.backend = error else { return false }
            return true
        }
        #expect(try await store.clones(owner: "alice", limit: 100, after: nil).isEmpty)
        // Each failed call counted once, by kind, for an operator's alert.
        #expect(try metrics.expectCounter("parley_store_errors_total", [("store", "mongodb"), ("kind", "unreachable")]).totalValue == 1)
        #expect(try metrics.expectCounter("parley_store_errors_total", [("store", "mongodb"), ("kind", "failed")]).totalValue == 1)
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// A command the server stops answering gives its thread back after the URI's
    /// `socketTimeoutMS` (libmongoc's own default is 300 s), as a network failure (which the store
    /// retries): here it would have succeeded after the 3 s block, so its failure is the
    /// timeout's doing. A bare pool, not a store: opening one runs commands (its indexes) that a
    /// loaded machine may not answer within the short timeout. On the wire test server only: in
    /// the first of five full store runs on SecantusDB the blocked command was answered after the
    /// block instead (not understood yet; the other four, and two runs of this suite alone, timed out).
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func theURIsSocketTimeoutBoundsACommandTheServerDoesNotAnswer() throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let pool = try MongoClientPool(uri: uri + "&socketTimeoutMS=500")
        try MongoFixture.failNext(1, ["find"], app: app, blockTimeMS: 3_000)
        #expect {
            _ = try pool.command(.object([("find", .string("clones")), ("filter", .object([]))]))
        } throws: { error in
            (error as? MongoCommandError)?.isTransient == true
        }
        try MongoFixture.turnOffFailPoint()
    }

    /// A spending window's take and give are retried when their reply is lost after they were
    /// applied (a network failure): the retry finds its own first attempt, so the window counts
    /// each once. (Counted twice, a lost give would let a user spend past their own limit.)
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aSpendingWindowCountsATakeAndAGiveOnceWhenTheirRepliesAreLost() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await losingReplies(uri)
        let user = "spender"
        func entry(_ id: String, _ credits: Int64) -> LedgerEntry {
            LedgerEntry(id: id, user: user, kind: credits > 0 ? .grant : .debit, credits: credits, createdAt: 1)
        }
        #expect(try await store.apply(entry("g", 1_000), allowOverdraft: false).isApplied)
        let caps = [SpendCap(window: "day:2026-12-06", max: 500), SpendCap(window: "month:2026-12", max: 100)]
        // The debit's first findAndModify is the day window's take.
        try MongoFixture.failNext(1, ["findAndModify"], app: app, dropReply: true)
        #expect(try await store.apply(entry("d1", -40), allowOverdraft: false, caps: caps).isApplied)
        #expect(try await store.spent(user: user, windows: caps.map(\.window)) == ["day:2026-12-06": 40, "month:2026-12": 40])
        // The month refuses this one, and the day gets its take back: the third update, after
        // the two windows' makes.
        try MongoFixture.failNext(1, ["update"], app: app, skip: 2, dropReply: true)
        let refused = try await store.apply(entry("d2", -80), allowOverdraft: false, caps: caps)
        guard case .overLimit(balance: 960, available: 60) = refused else {
            Issue.record("expected overLimit, got \(refused)")
            return
        }
        #expect(try await store.spent(user: user, windows: caps.map(\.window)) == ["day:2026-12-06": 40, "month:2026-12": 40])
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// A ledger entry whose row insert, then whose balance change, loses its reply after it was
    /// applied: applied once, and reported as this call's (`applied`, which meters and audits
    /// it), not as an earlier call's (`alreadyApplied`, which a later call with its id gets).
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aLedgerEntryWhoseRepliesAreLostIsAppliedOnceAndReportedAsApplied() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await losingReplies(uri)
        let user = "lost-" + app
        func entry(_ id: String, _ credits: Int64) -> LedgerEntry {
            LedgerEntry(id: id + app, user: user, kind: credits > 0 ? .grant : .debit, credits: credits, createdAt: 1)
        }
        try MongoFixture.failNext(1, ["insert"], app: app, dropReply: true)
        #expect(try await store.apply(entry("g", 1_000), allowOverdraft: false) == .applied(balance: 1_000))
        try MongoFixture.failNext(1, ["findAndModify"], app: app, dropReply: true)
        #expect(try await store.apply(entry("d", -100), allowOverdraft: false) == .applied(balance: 900))
        #expect(try await store.apply(entry("d", -100), allowOverdraft: false) == .alreadyApplied(balance: 900))
        #expect(try await store.ledger(user: user, limit: 10, before: nil).map(\.credits).sorted() == [-100, 1_000])
        #expect(try await store.balance(user: user) == 900)
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// A payment order's change whose write loses its reply: recorded once, and reported as
    /// this call's (the webhook's delivery was logged a duplicate of itself).
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func anOrderChangeWhoseReplyIsLostIsReportedApplied() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await losingReplies(uri)
        let order = "ord_lost_" + app
        func change(_ status: PaymentOrder.Status, _ event: String) -> PaymentOrder.Change {
            PaymentOrder.Change(status: status, at: 1_000, event: event)
        }
        #expect(try await store.recordOrderChange(order: order, user: "alice", key: "k", credits: 500, change: change(.created, "e1")).applied)
        try MongoFixture.failNext(1, ["update"], app: app, dropReply: true)
        let paid = try await store.recordOrderChange(order: order, user: "alice", key: "k", credits: 500, change: change(.paid, "e2"))
        #expect(paid.applied && paid.order.status == .paid && paid.order.history.count == 2)
        #expect(try await !store.recordOrderChange(order: order, user: "alice", key: "k", credits: 500, change: change(.paid, "e2")).applied)
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// A schedule's move, its withdrawal and a lease's handover whose reply is lost after they
    /// were applied: the retry finds the document moved on (or gone), yet the call reports its
    /// own change, not another writer's (it said "someone else moved it", and the schedule
    /// stayed firing with no one firing it; the room's lease stayed with a node that did not
    /// run the room).
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aMoveWhoseReplyIsLostIsReportedAsTheCallsOwn() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await losingReplies(uri, node: "node-a")
        func pending(_ id: String) -> Schedule {
            Schedule(
                id: id, owner: "alice", clone: "cl_1", conversation: nil, at: 5_000, content: .text("hi"), status: .pending, createdAt: 1,
                updatedAt: 1)
        }
        let id = "sc_lost_" + app
        try await store.createSchedule(pending(id))
        try MongoFixture.failNext(1, ["findAndModify"], app: app, dropReply: true)
        let moved = try await store.transitionSchedule(id: id, from: .pending, to: ScheduleChange(status: .firing, updatedAt: 2))
        #expect(moved?.status == .firing)
        #expect(try await store.firingSchedules(node: "node-a").map(\.id) == [id])
        // A move that did not happen still reports nil, retried or not.
        try MongoFixture.failNext(1, ["findAndModify"], app: app, closeConnection: true)
        #expect(try await store.transitionSchedule(id: id, from: .pending, to: ScheduleChange(status: .cancelled, updatedAt: 3)) == nil)

        // A withdrawal whose reply is lost: withdrawn, not taken for a schedule that started
        // firing.
        let over = "sc_over_" + app
        try await store.createSchedule(pending(over))
        try MongoFixture.failNext(1, ["delete"], app: app, dropReply: true)
        #expect(try await store.withdrawSchedule(id: over))
        #expect(try await !store.withdrawSchedule(id: id), "firing: not withdrawn")

        let key = "rm_lost_" + app
        let collection = "room_leases"
        func lease(_ node: String, until: Int64 = 2_000_000) -> NodeLease { NodeLease(node: node, host: "h", pid: 1, expires: until) }
        #expect(try await store.claimNodeLease(lease("node-b"), now: 1_000_000, key: key, in: collection) == nil)
        try MongoFixture.failNext(1, ["findAndModify"], app: app, dropReply: true)
        #expect(try await store.transferLease(key, from: "node-b", to: lease("node-c"), in: collection))
        #expect(try await store.lease(key, in: collection)?.node == "node-c")
        #expect(try await store.lease(key, in: collection)?.epoch == 1_000_001)
        #expect(try await !store.transferLease(key, from: "node-b", to: lease("node-d"), in: collection))
        // An expired lease taken over (the claim's second findAndModify, after "is it mine?").
        try MongoFixture.failNext(1, ["findAndModify"], app: app, skip: 1, dropReply: true)
        #expect(try await store.claimNodeLease(lease("node-e", until: 3_015_000), now: 3_000_000, key: key, in: collection) == nil)
        #expect(try await store.lease(key, in: collection)?.node == "node-e")
        #expect(try await store.lease(key, in: collection)?.epoch == 1_000_002)
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// A conversation's summary whose write's reply is lost after it was applied: the retry
    /// finds the summary it wrote over gone, yet reports it stored (it said "a newer summary was
    /// stored meanwhile"), while a summary written over the same one by someone else still is not.
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aSummaryWhoseReplyIsLostIsReportedAsStored() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await losingReplies(uri)
        let conversation = makeConversation(owner: "alice", clone: "cl_1")
        try await store.createConversation(conversation)
        let first = ConversationSummary(text: "They said hello.", through: "msg_1")
        try MongoFixture.failNext(1, ["update", "findAndModify"], app: app, dropReply: true)
        #expect(try await store.setSummary(first, conversation: conversation.id, owner: "alice", replacing: nil))
        #expect(try await store.conversation(id: conversation.id, owner: "alice")?.summary == first)
        let other = ConversationSummary(text: "Someone else's.", through: "msg_2")
        #expect(try await !store.setSummary(other, conversation: conversation.id, owner: "alice", replacing: nil))
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// Options that bound a command's wait and let no retry hide its failure.
    static func oneAttempt(socketTimeoutMS: Int32) -> MongoStore.Options {
        var options = MongoStore.Options()
        options.socketTimeoutMS = socketTimeoutMS
        options.attempts = 1
        return options
    }

    /// The store's own bound, for a URI that sets none: a command the server stops answering
    /// while the store serves fails after `socketTimeoutMS` (with one attempt, so no retry hides
    /// it) where libmongoc would have waited out the 3 s block and succeeded.
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aServingStoreBoundsACommandTheServerDoesNotAnswer() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let store = try await MongoStore.open(uri: uri, options: Self.oneAttempt(socketTimeoutMS: 500))
        try MongoFixture.failNext(1, ["find"], app: app, blockTimeMS: 3_000)
        await #expect(throws: StoreError.self) {
            _ = try await store.clones(owner: "alice", limit: 100, after: nil)
        }
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    /// Opening the store is not held to that bound: an index build slower than it (a large
    /// collection's) still completes.
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func openingTheStoreWaitsForIndexBuildsLongerThanACommandMay() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        try MongoFixture.failNext(1, ["createIndexes"], app: app, blockTimeMS: 1_500)
        let store = try await MongoStore.open(uri: uri, options: Self.oneAttempt(socketTimeoutMS: 300))
        try MongoFixture.turnOffFailPoint()
        try await store.close()
    }

    @Test func aNewerSchemaIsRefusedAndIndexesAreIdempotent() async throws {
        let uri = MongoFixture.uri()
        try await MongoStore.open(uri: uri).close()
        try await MongoStore.open(uri: uri).close()  // indexes and version again: no error
        _ = try MongoClientPool(uri: uri).command(
            .object([
                ("update", .string("meta")),
                (
                    "updates",
                    .array([.object([("q", .object([("_id", .string("schema"))])), ("u", .object([("$set", .object([("version", .int(99))]))]))])])
                ),
            ]))
        await #expect(throws: StoreError.schemaTooNew(found: 99, supported: MongoStore.schemaVersion)) {
            _ = try await MongoStore.open(uri: uri)
        }
    }

    @Test func anUnreachableServerIsAClearErrorNotAHang() async throws {
        var options = MongoStore.Options()
        options.serverSelectionTimeoutMS = 300
        await #expect {
            _ = try await MongoStore.open(uri: "mongodb://127.0.0.1:1/parley", options: options)
        } throws: { error in
            "\(error)".hasPrefix("cannot reach MongoDB at mongodb://127.0.0.1:1/parley")
        }
    }

    @Test func passwordsStayOutOfMessages() {
        #expect(MongoStore.redacted("mongodb://parley:s3cret@db.internal:27017/parley") == "mongodb://…@db.internal:27017/parley")
        #expect(MongoStore.redacted("mongodb://127.0.0.1/parley") == "mongodb://127.0.0.1/parley")
    }
}

/// What a crash leaves behind at each step of MongoDB's two-phase apply, written behind the
/// store's back.
private struct CrashStaging {
    let pool: MongoClientPool

    /// Step 1 only: the row is pending, the balance untouched.
    func stoppedAfterStep1(_ entry: LedgerEntry) throws {
        _ = try pool.command(
            .object([("insert", .string("ledger")), ("documents", .array([MongoStore.document(entry, state: "pending")]))]))
    }

    /// Steps 1 and 2: the balance moved and the account counts the entry; the row still says pending.
    func stoppedAfterStep2(_ entry: LedgerEntry) throws {
        try stoppedAfterStep1(entry)
        let update: JSONValue = .object([
            ("$inc", .object([("balance", .long(entry.credits)), ("applies", .long(1))])),
            ("$push", .object([("recent", .string(entry.id))])),
        ])
        _ = try pool.command(
            .object([
                ("update", .string("accounts")),
                ("updates", .array([.object([("q", .object([("_id", .string(entry.user))])), ("u", update)])])),
            ]))
    }

    /// The `seq` of each ledger row `filter` matches, by id.
    func seqs(_ filter: JSONValue) throws -> [String: Int64?] {
        let rows = try pool.command(.object([("find", .string("ledger")), ("filter", filter)]))
        return Dictionary(
            uniqueKeysWithValues: (rows["cursor"]?["firstBatch"]?.arrayValue ?? []).map { ($0["_id"]?.stringValue ?? "", $0["seq"]?.int64) })
    }
}

/// A crash in the middle of MongoDB's two-phase apply, staged by writing what each crash point
/// leaves behind, then recovered.
@Suite struct MongoLedgerRecoveryTests {
    /// A retry that finds its entry applied (the first attempt stopped after step 2) marks the row
    /// with the number of that apply, as the first attempt would have.
    @Test func aRetryThatFindsItsEntryAppliedMarksItWithItsNumber() async throws {
        let uri = MongoFixture.uri()
        let store = try await MongoStore.open(uri: uri)
        _ = try await store.apply(grant("carol", 100, id: "carol:welcome"), allowOverdraft: false)
        let staging = CrashStaging(pool: try MongoClientPool(uri: uri))
        try staging.stoppedAfterStep2(debit("carol", 4, id: "carol:1"))
        _ = try await store.apply(debit("carol", 1, id: "carol:2"), allowOverdraft: false)
        #expect(try await store.apply(debit("carol", 4, id: "carol:1"), allowOverdraft: false) == .alreadyApplied(balance: 95))
        #expect(try staging.seqs(.object([("user", .string("carol"))])) == ["carol:welcome": 1, "carol:1": 2, "carol:2": 3])
        try await store.close()
    }

    @Test func recoveryFinishesOrVoidsWhatACrashLeftPending() async throws {
        let uri = MongoFixture.uri()
        let store = try await MongoStore.open(uri: uri)
        _ = try await store.apply(grant("alice", 100, id: "welcome"), allowOverdraft: false)
        let staging = CrashStaging(pool: try MongoClientPool(uri: uri))
        // A debit's crash after step 1 (voided by recovery), a payment's (it must still be
        // credited), and a debit's after step 2 (finished by recovery).
        try staging.stoppedAfterStep1(debit("alice", 7, id: "st_a:1", at: 3_000))
        try staging.stoppedAfterStep1(grant("alice", 50, id: "order:9", at: 3_001))
        try staging.stoppedAfterStep2(debit("alice", 4, id: "st_b:1", at: 3_002))

        // A page beside the balance counts the debit its account counts, though still pending.
        let page = try await store.ledgerPage(user: "alice", limit: 10, before: nil)
        #expect(page.entries.map(\.id) == ["st_b:1", "welcome"] && page.balance == 96)

        #expect(try await store.recoverLedger() == 3)
        // Every applied row carries the number of its apply, however it was marked: pages leave
        // out rows numbered past the account they read.
        #expect(try staging.seqs(.object([("state", .string("applied"))])) == ["welcome": 1, "st_b:1": 2, "order:9": 3])
        #expect(try await store.balance(user: "alice") == 100 - 4 + 50)
        let entries = try await allEntries(store, "alice").map(\.id)
        #expect(Set(entries) == ["welcome", "order:9", "st_b:1"])
        try await expectLedgerInvariant(store, "alice")
        #expect(try await store.recoverLedger() == 0)
        // The voided debit can be retried under its id and then applies once.
        #expect(try await store.apply(debit("alice", 7, id: "st_a:1"), allowOverdraft: false) == .applied(balance: 139))
        try await store.close()
    }
}

/// Several nodes on one database (#22): what a crash leaves behind is stamped with its node, so
/// a node finishes its own leftovers (or a dead node's it took over) and never what a live
/// node is in the middle of; each node holds a lease of its own, which another takes over once
/// it expired.
@Suite struct MongoNodeLeftoversTests {
    private func store(_ uri: String, node: String?) async throws -> MongoStore {
        var options = MongoStore.Options()
        options.node = node
        return try await MongoStore.open(uri: uri, options: options)
    }

    private func journal(_ stream: String, at time: Int64) -> StreamJournal {
        StreamJournal(
            stream: stream, user: "alice", model: "m", feature: "chat", inputTokens: 3, target: .conversation("cv_1"), messageID: "msg_" + stream,
            text: "so far", outputTokens: 2, createdAt: time)
    }

    @Test func eachNodeFindsTheJournalsItWroteAndThoseNoNodeStamped() async throws {
        let uri = MongoFixture.uri()
        let a = try await store(uri, node: "node-a")
        let b = try await store(uri, node: "node-b")
        let unstamped = try await store(uri, node: nil)
        try await a.saveStreamJournal(journal("st_a", at: 1))
        try await b.saveStreamJournal(journal("st_b", at: 2))
        try await unstamped.saveStreamJournal(journal("st_old", at: 3))
        #expect(try await a.streamJournals(limit: 10, node: "node-a").map(\.stream) == ["st_a", "st_old"])
        #expect(try await a.streamJournals(limit: 10, node: "node-b").map(\.stream) == ["st_b", "st_old"])
        #expect(try await b.streamJournals(limit: 10).map(\.stream) == ["st_a", "st_b", "st_old"])
        // Saving again (a later token) keeps the journal its node's.
        try await a.saveStreamJournal(journal("st_a", at: 1))
        #expect(try await b.streamJournals(limit: 10, node: "node-b").map(\.stream) == ["st_b", "st_old"])
        for s in [a, b, unstamped] { try await s.close() }
    }

    @Test func aNodeRecoversOnlyTheLedgerEntriesItLeftPending() async throws {
        let uri = MongoFixture.uri()
        let a = try await store(uri, node: "node-a")
        let b = try await store(uri, node: "node-b")
        _ = try await a.apply(grant("alice", 100, id: "welcome"), allowOverdraft: false)
        let pool = try MongoClientPool(uri: uri)
        // An entry applied through a node carries its node.
        let applied = try pool.command(.object([("find", .string("ledger")), ("filter", .object([("_id", .string("welcome"))]))]))
        #expect(applied["cursor"]?["firstBatch"]?.arrayValue?.first?["node"] == .string("node-a"))
        // Debits each node is in the middle of (step 1 done), and one from before nodes were stamped.
        for (id, node) in [("st_a:1", "node-a"), ("st_b:1", "node-b"), ("st_old:1", nil)] {
            guard case .object(var fields) = MongoStore.document(debit("alice", 5, id: id, at: 3_000), state: "pending") else { return }
            if let node { fields.append(("node", .string(node))) }
            _ = try pool.command(.object([("insert", .string("ledger")), ("documents", .array([.object(fields)]))]))
        }
        #expect(try await b.recoverLedger(node: "node-b") == 2)
        // Node A's debit is still pending: A finishes it (here: it applies, as A would once its
        // balance change returned), and the recovery B ran did not void it.
        #expect(try await a.apply(debit("alice", 5, id: "st_a:1"), allowOverdraft: false) == .applied(balance: 95))
        #expect(try await a.recoverLedger(node: "node-a") == 0)
        #expect(try await a.balance(user: "alice") == 95)
        for s in [a, b] { try await s.close() }
    }

    @Test func eachNodeHoldsItsOwnLeaseAndAnExpiredOneIsTakenOverByOneNode() async throws {
        let uri = MongoFixture.uri()
        let store = try await store(uri, node: nil)
        let now: Int64 = 1_000_000
        func lease(_ node: String, until: Int64) -> NodeLease { NodeLease(node: node, host: "h", pid: 1, expires: until) }
        #expect(try await store.claimNodeLease(lease("node-a", until: now + 15_000), now: now, key: "node-a") == nil)
        #expect(try await store.claimNodeLease(lease("node-b", until: now + 15_000), now: now, key: "node-b") == nil)
        #expect(Set(try await store.nodeLeases().keys) == ["node-a", "node-b"])
        // Alive, A's lease is not B's to take.
        #expect(try await store.claimNodeLease(lease("node-b", until: now + 20_000), now: now + 5_000, key: "node-a")?.node == "node-a")
        // A stopped renewing: past its expiry B takes it over, and C, a moment later, cannot.
        let later = now + 16_000
        #expect(try await store.claimNodeLease(lease("node-b", until: later + 15_000), now: later, key: "node-a") == nil)
        #expect(try await store.claimNodeLease(lease("node-c", until: later + 15_000), now: later + 1, key: "node-a")?.node == "node-b")
        // A, back from a stall, finds its lease taken: it must stop.
        #expect(try await store.claimNodeLease(lease("node-a", until: later + 15_000), now: later + 2, key: "node-a")?.node == "node-b")
        // B finished A's leftovers and lets the lease go; only B's own is left.
        try await store.releaseNodeLease(node: "node-b", key: "node-a")
        #expect(Set(try await store.nodeLeases().keys) == ["node-b"])
        try await store.close()
    }

    @Test func aLeaseEpochGrowsOnlyWhenTheLeaseChangesHandsAndFencesTheRoomsWrites() async throws {
        let store = try await store(MongoFixture.uri(), node: nil)
        let now: Int64 = 1_000_000
        let collection = "room_leases"
        func lease(_ node: String, until: Int64) -> NodeLease { NodeLease(node: node, host: "h", pid: 1, expires: until) }
        func epoch() async throws -> Int64? { try await store.lease("rm_1", in: collection)?.epoch }
        #expect(try await store.claimNodeLease(lease("node-a", until: now + 15_000), now: now, key: "rm_1", in: collection) == nil)
        #expect(try await epoch() == now, "a new lease starts at its claim's time")
        // Renewed (a claim, or all of a node's leases at once): the same holder, the same epoch.
        #expect(try await store.claimNodeLease(lease("node-a", until: now + 20_000), now: now + 5_000, key: "rm_1", in: collection) == nil)
        try await store.renewLeases(node: "node-a", expires: now + 25_000, in: collection)
        #expect(try await epoch() == now)
        // Taken after it expired, then handed over from a stopped node: a new epoch each time.
        #expect(try await store.claimNodeLease(lease("node-b", until: now + 60_000), now: now + 30_000, key: "rm_1", in: collection) == nil)
        #expect(try await epoch() == now + 1)
        #expect(try await store.transferLease("rm_1", from: "node-b", to: lease("node-c", until: now + 90_000), in: collection))
        #expect(try await epoch() == now + 2)

        // The room's writes: A's land until C fences the room with its epoch; then they are
        // refused, and C's land.
        let room = Room(
            id: "rm_1", owner: "mod", topic: "t", debaters: [], rounds: 1, policy: .roundRobin, maxTokensPerTurn: 10, visibility: .link,
            createdAt: now, updatedAt: now)
        try await store.createRoom(room)
        var update = room
        update.topic = "by A"
        #expect(try await store.updateRoom(update, fence: now))
        #expect(try await store.fenceRoom("rm_1", epoch: now + 2))
        #expect(try await !store.fenceRoom("rm_1", epoch: now + 1), "an older epoch cannot fence it back")
        update.topic = "by A again"
        await #expect(throws: MongoStore.Superseded.self) { try await store.updateRoom(update, fence: now) }
        let entry = RoomEntry(id: "re_1", room: "rm_1", kind: .said, speaker: "mod", text: "hi", createdAt: now)
        await #expect(throws: MongoStore.Superseded.self) { try await store.appendRoomEntry(entry, fence: now + 1) }
        #expect(try await store.roomEntries(room: "rm_1", limit: 10, before: nil).isEmpty)
        update.topic = "by C"
        #expect(try await store.updateRoom(update, fence: now + 2))
        try await store.appendRoomEntry(entry, fence: now + 2)
        #expect(try await store.room(id: "rm_1")?.topic == "by C")
        #expect(try await store.roomEntries(room: "rm_1", limit: 10, before: nil).map(\.id) == ["re_1"])
        // Given up (the room went idle) and claimed anew later: the epoch still grows.
        try await store.releaseNodeLease(node: "node-c", key: "rm_1", in: collection)
        #expect(try await store.claimNodeLease(lease("node-a", until: now + 200_000), now: now + 100_000, key: "rm_1", in: collection) == nil)
        #expect(try await epoch() == now + 100_000)
        #expect(try await store.fenceRoom("rm_1", epoch: now + 100_000))
        try await store.close()
    }
}

/// A cluster's schedules (#22): each schedule has a shard, a node loads the pending schedules
/// of the shards it holds, a firing is stamped with its node, and a user's pending schedules
/// are counted in the store.
@Suite struct MongoScheduleShardTests {
    private func store(_ uri: String, node: String?) async throws -> MongoStore {
        var options = MongoStore.Options()
        options.node = node
        return try await MongoStore.open(uri: uri, options: options)
    }

    private func schedule(_ id: String, owner: String = "alice", at: Int64 = 5_000) -> Schedule {
        Schedule(id: id, owner: owner, clone: "cl_1", conversation: nil, at: at, content: .text("hi"), status: .pending, createdAt: 1, updatedAt: 1)
    }

    @Test func shardsAreStableAndSpreadTheIds() {
        let ids = (0..<6_400).map { "sc_\($0)" }
        let counts = Dictionary(grouping: ids, by: ScheduleShards.shard(of:)).mapValues(\.count)
        #expect(counts.count == ScheduleShards.count)
        #expect(counts.values.allSatisfy { (50...150).contains($0) }, "\(counts.values.sorted())")
        // Fixed by definition: every node (and every version) must agree.
        #expect(ScheduleShards.shard(of: "") == 2_166_136_261 % 64)
        #expect(ScheduleShards.shard(of: "sc_01J") == ScheduleShards.shard(of: "sc_01J"))
    }

    @Test func aNodeLoadsThePendingSchedulesOfItsShardsOnly() async throws {
        let uri = MongoFixture.uri()
        let store = try await store(uri, node: "node-a")
        let ids = (0..<40).map { "sc_\($0)" }
        for (n, id) in ids.enumerated() { try await store.createSchedule(schedule(id, at: Int64(1_000 + n))) }
        let shards = Set(ids.prefix(3).map(ScheduleShards.shard(of:)))
        let expected = ids.filter { shards.contains(ScheduleShards.shard(of: $0)) }.sorted()
        #expect(try await store.pendingSchedules(shards: shards, limit: 100, after: nil).map(\.id) == expected)
        // Paged, and only those due before a time.
        let first = try await store.pendingSchedules(shards: shards, limit: 1, after: nil)
        #expect(try await store.pendingSchedules(shards: shards, limit: 100, after: first.last?.id).map(\.id) == Array(expected.dropFirst()))
        #expect(
            try await store.pendingSchedules(shards: shards, dueBefore: 1_010, limit: 100, after: nil).map(\.id)
                == expected.filter { id in
                    Int(id.dropFirst(3))! < 10
                })
        // Not pending any more: not loaded.
        _ = try await store.transitionSchedule(id: expected[0], from: .pending, to: ScheduleChange(status: .cancelled, updatedAt: 2))
        #expect(try await store.pendingSchedules(shards: shards, limit: 100, after: nil).map(\.id) == Array(expected.dropFirst()))
        #expect(try await store.pendingSchedules(shards: [], limit: 100, after: nil).isEmpty)
        try await store.close()
    }

    @Test func aFiringIsItsNodesAndATakeoverMakesItTheTakersOwn() async throws {
        let uri = MongoFixture.uri()
        let a = try await store(uri, node: "node-a")
        let b = try await store(uri, node: "node-b")
        for id in ["sc_1", "sc_2", "sc_3"] { try await a.createSchedule(schedule(id)) }
        let firing = ScheduleChange(status: .firing, updatedAt: 2, conversation: "cv_1", message: "msg_1")
        _ = try await a.transitionSchedule(id: "sc_1", from: .pending, to: firing)
        _ = try await b.transitionSchedule(id: "sc_2", from: .pending, to: firing)
        #expect(try await a.firingSchedules(node: "node-a").map(\.id) == ["sc_1"])
        #expect(try await a.firingSchedules(node: "node-b").map(\.id) == ["sc_2"])
        // B takes A's over: they are B's now, and nothing is left under A's name.
        #expect(try await b.adoptFiringSchedules(from: "node-a", to: "node-b").map(\.id) == ["sc_1"])
        #expect(try await b.firingSchedules(node: "node-b").map(\.id) == ["sc_1", "sc_2"])
        #expect(try await b.firingSchedules(node: "node-a").isEmpty)
        for s in [a, b] { try await s.close() }
    }

    @Test func aUsersPendingSchedulesAreCountedInTheStoreInCreationOrder() async throws {
        let uri = MongoFixture.uri()
        let store = try await store(uri, node: "node-a")
        for id in ["sc_1", "sc_2", "sc_3"] { try await store.createSchedule(schedule(id)) }
        try await store.createSchedule(schedule("sc_0", owner: "bob"))
        #expect(try await store.isWithinPendingLimit(id: "sc_2", owner: "alice", limit: 2))
        #expect(try await !store.isWithinPendingLimit(id: "sc_3", owner: "alice", limit: 2))
        #expect(try await store.withdrawSchedule(id: "sc_3"))
        #expect(try await store.schedule(id: "sc_3", owner: "alice") == nil)
        // One that started firing is not withdrawn, and no longer counts as pending.
        _ = try await store.transitionSchedule(id: "sc_1", from: .pending, to: ScheduleChange(status: .firing, updatedAt: 2))
        #expect(try await !store.withdrawSchedule(id: "sc_1"))
        try await store.createSchedule(schedule("sc_4"))
        #expect(try await store.isWithinPendingLimit(id: "sc_4", owner: "alice", limit: 2))
        try await store.close()
    }

    @Test func shardLeasesAreKeptApartFromNodeLeasesAndRenewedTogether() async throws {
        let uri = MongoFixture.uri()
        let store = try await store(uri, node: nil)
        let now: Int64 = 1_000_000
        let collection = "schedule_shards"
        func lease(_ node: String) -> NodeLease { NodeLease(node: node, host: "h", pid: 1, expires: now + 1_000) }
        #expect(try await store.claimNodeLease(lease("node-a"), now: now, key: "node-a") == nil)
        for shard in ["0", "1", "2"] { #expect(try await store.claimNodeLease(lease("node-a"), now: now, key: shard, in: collection) == nil) }
        #expect(try await store.claimNodeLease(lease("node-b"), now: now, key: "3", in: collection) == nil)
        #expect(try await store.claimNodeLease(lease("node-b"), now: now, key: "0", in: collection)?.node == "node-a")
        #expect(Set(try await store.nodeLeases().keys) == ["node-a"])
        #expect(try await store.otherLiveNodes(than: "node-b", now: now) == ["node-a"])
        #expect(try await store.renewLeases(node: "node-a", expires: now + 9_000, in: collection) == 3)
        let shards = try await store.nodeLeases(in: collection)
        #expect(shards.filter { $0.value.expires == now + 9_000 }.keys.sorted() == ["0", "1", "2"])
        #expect(shards["3"]?.expires == now + 1_000)
        try await store.close()
    }

    @Test func schedulesStoredBeforeShardsGetTheirsWhenTheStoreOpens() async throws {
        let uri = MongoFixture.uri()
        try await MongoStore.open(uri: uri).close()
        let pool = try MongoClientPool(uri: uri)
        guard case .object(let fields) = MongoStore.document(schedule("sc_old")) else { return }
        _ = try pool.command(
            .object([("insert", .string("schedules")), ("documents", .array([.object(fields.filter { $0.0 != "shard" })]))]))
        _ = try pool.command(
            .object([
                ("update", .string("meta")),
                (
                    "updates",
                    .array([.object([("q", .object([("_id", .string("schema"))])), ("u", .object([("$set", .object([("version", .int(1))]))]))])])
                ),
            ]))
        let store = try await store(uri, node: nil)
        #expect(try await store.pendingSchedules(shards: [ScheduleShards.shard(of: "sc_old")], limit: 10, after: nil).map(\.id) == ["sc_old"])
        try await store.close()
    }

    /// Messages and conversations stored before search (schema 2) get their owner and terms
    /// when the store opens.
    @Test func messagesStoredBeforeSearchAreFoundAfterTheUpgrade() async throws {
        let uri = MongoFixture.uri()
        try await MongoStore.open(uri: uri).close()
        let pool = try MongoClientPool(uri: uri)
        func insert(_ collection: String, _ document: JSONValue) throws {
            guard case .object(let fields) = document else { return }
            _ = try pool.command(.object([("insert", .string(collection)), ("documents", .array([.object(fields.filter { $0.0 != "terms" })]))]))
        }
        var conversation = makeConversation(owner: "alice", clone: "cl_x")
        conversation.title = "Old heron"
        try insert("conversations", MongoStore.document(conversation))
        let message = makeMessage(conversation.id, "a heron stood still")
        try insert(
            "messages",
            .object([
                ("_id", .string(message.id)), ("conversation", .string(conversation.id)), ("role", .string("user")),
                ("text", .string(message.text)), ("created_at", .long(message.createdAt)), ("saved", .bool(false)), ("parent", .string("")),
            ]))
        _ = try pool.command(
            .object([
                ("update", .string("meta")),
                (
                    "updates",
                    .array([.object([("q", .object([("_id", .string("schema"))])), ("u", .object([("$set", .object([("version", .int(2))]))]))])])
                ),
            ]))
        let store = try await MongoStore.open(uri: uri)
        let query = try #require(try SearchQuery.parse("heron"))
        #expect(try await store.search(owner: "alice", query: query, limit: 5, before: nil).map(\.id) == [message.id, conversation.id])
        #expect(try await store.search(owner: "bob", query: query, limit: 5, before: nil).isEmpty)
        try await store.close()
    }
}

/// A cluster's replies in flight (#22): one per conversation across the nodes, and a user's
/// counted across them.
@Suite struct MongoReplySlotTests {
    @Test func aConversationHoldsOneReplyAndAUserAtMostTheLimitAcrossNodes() async throws {
        let store = try await MongoStore.open(uri: MongoFixture.uri())
        #expect(try await store.claimReplySlot(conversation: "cv_1", user: "alice", node: "node-a", limit: 2, now: 1) == .claimed)
        #expect(try await store.claimReplySlot(conversation: "cv_1", user: "alice", node: "node-b", limit: 2, now: 2) == .conversationBusy)
        #expect(try await store.claimReplySlot(conversation: "cv_2", user: "alice", node: "node-b", limit: 2, now: 3) == .claimed)
        #expect(try await store.claimReplySlot(conversation: "cv_3", user: "alice", node: "node-a", limit: 2, now: 4) == .tooManyStreams)
        // Bob's are his own.
        #expect(try await store.claimReplySlot(conversation: "cv_9", user: "bob", node: "node-a", limit: 2, now: 5) == .claimed)
        // Only its node gives a slot back.
        try await store.releaseReplySlot(conversation: "cv_1", node: "node-b")
        #expect(try await store.claimReplySlot(conversation: "cv_1", user: "alice", node: "node-b", limit: 2, now: 6) == .conversationBusy)
        try await store.releaseReplySlot(conversation: "cv_1", node: "node-a")
        #expect(try await store.claimReplySlot(conversation: "cv_3", user: "alice", node: "node-a", limit: 2, now: 7) == .claimed)
        // A refused claim left nothing behind; a stopped node's slots all go at once.
        #expect(try await store.releaseReplySlots(node: "node-a") == 2)
        #expect(try await store.claimReplySlot(conversation: "cv_3", user: "alice", node: "node-b", limit: 1, now: 8) == .tooManyStreams)
        #expect(try await store.claimReplySlot(conversation: "cv_1", user: "alice", node: "node-b", limit: 3, now: 9) == .claimed)
        try await store.close()
    }
}

/// Each test of the suite holds the fail point (`MongoFixture.failPointLock`) while it runs.
struct ArmsFailPoint: SuiteTrait, TestTrait, TestScoping {
    var isRecursive: Bool { true }

    func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        guard testCase != nil else { return try await function() }  // the suite's own scope
        try await MongoFixture.failPointLock.run { try await function() }
    }
}

extension Trait where Self == ArmsFailPoint {
    static var armsFailPoint: Self { ArmsFailPoint() }
}
