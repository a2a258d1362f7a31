import ParleyCore
@testable import ParleyMongoStore
import ParleyStore
import ParleyTestSupport
import Testing

/// What only the MongoDB backend promises: retries of transient failures, schema versioning,
/// and a clear failure when the server cannot be reached. Runs against the wire test server or,
/// with PARLEY_TEST_MONGODB_URI, a real mongod started with enableTestCommands.
@Suite(.serialized) struct MongoStoreTests {
    /// Arms mongod's `failCommand` fail point (the wire test server implements the same subset).
    /// A database URI whose clients carry their own appName, so a fail point armed for it
    /// cannot hit the other tests running in parallel.
    func isolatedURI() -> (uri: String, app: String) {
        let app = "parley-test-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        return (MongoFixture.uri(options: ["appname=" + app]), app)
    }

    func failNext(_ times: Int, _ commands: [String], app: String, errorCode: Int? = nil, closeConnection: Bool = false) throws {
        let pool = try MongoClientPool(uri: MongoFixture.uri())
        var data: [(String, JSONValue)] = [("failCommands", .array(commands.map(JSONValue.string))), ("appName", .string(app))]
        if let errorCode { data.append(("errorCode", .int(Int64(errorCode)))) }
        if closeConnection { data.append(("closeConnection", .bool(true))) }
        _ = try pool.command(
            .object([
                ("configureFailPoint", .string("failCommand")),
                ("mode", .object([("times", .int(Int64(times)))])),
                ("data", .object(data)),
            ]), database: "admin")
    }

    func turnOffFailPoint() throws {
        _ = try MongoClientPool(uri: MongoFixture.uri()).command(
            .object([("configureFailPoint", .string("failCommand")), ("mode", .string("off"))]), database: "admin")
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
        let (uri, app) = isolatedURI()
        let store = try await MongoStore.open(uri: uri)
        let clone = makeClone(owner: "alice")
        // NetworkTimeout: retried here. Not NotWritablePrimary: a real server's "not primary" makes
        // the driver mark it unknown until its monitor checks again (SDAM), which these
        // milliseconds of backoff do not outlast; the wire test server did not model that.
        try failNext(2, ["insert"], app: app, errorCode: 89)
        try await store.createClone(clone)
        #expect(try await store.clone(id: clone.id, owner: "alice") == clone)

        try failNext(1, ["find"], app: app, closeConnection: true)  // the network drops once
        #expect(try await store.clones(owner: "alice") == [clone])
        try await store.close()
    }

    @Test func retriesAreBoundedAndPermanentErrorsAreNotRetried() async throws {
        let (uri, app) = isolatedURI()
        var options = MongoStore.Options()
        options.attempts = 3
        options.backoff = .milliseconds(1)
        let store = try await MongoStore.open(uri: uri, options: options)
        try failNext(3, ["find"], app: app, errorCode: 89)  // NetworkTimeout
        await #expect {
            _ = try await store.clones(owner: "alice")
        } throws: { error in
            "\(error)".contains("after 3 attempts")
        }
        // The fail point is used up: the store works again.
        #expect(try await store.clones(owner: "alice").isEmpty)

        try failNext(1, ["find"], app: app, errorCode: 2)  // BadValue: permanent
        await #expect(throws: StoreError.self) {
            _ = try await store.clones(owner: "alice")
        }
        #expect(try await store.clones(owner: "alice").isEmpty)
        try turnOffFailPoint()
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

/// A crash in the middle of MongoDB's two-phase apply, staged by writing what each crash point
/// leaves behind, then recovered.
@Suite struct MongoLedgerRecoveryTests {
    @Test func recoveryFinishesOrVoidsWhatACrashLeftPending() async throws {
        let uri = MongoFixture.uri()
        let store = try await MongoStore.open(uri: uri)
        _ = try await store.apply(grant("alice", 100, id: "welcome"), allowOverdraft: false)
        let pool = try MongoClientPool(uri: uri)
        func insert(_ collection: String, _ doc: JSONValue) throws {
            _ = try pool.command(.object([("insert", .string(collection)), ("documents", .array([doc]))]))
        }
        // Crash after step 1 of a debit: the row is pending, the balance untouched.
        try insert("ledger", MongoStore.document(debit("alice", 7, id: "st_a:1", at: 3_000), state: "pending"))
        // Crash after step 1 of a payment: it must still be credited.
        try insert("ledger", MongoStore.document(grant("alice", 50, id: "order:9", at: 3_001), state: "pending"))
        // Crash after step 2 of a debit: the balance moved, the row still says pending.
        try insert("ledger", MongoStore.document(debit("alice", 4, id: "st_b:1", at: 3_002), state: "pending"))
        _ = try pool.command(
            .object([
                ("update", .string("accounts")),
                (
                    "updates",
                    .array([
                        .object([
                            ("q", .object([("_id", .string("alice"))])),
                            ("u", .object([("$inc", .object([("balance", .long(-4))])), ("$push", .object([("recent", .string("st_b:1"))]))])),
                        ])
                    ])
                ),
            ]))

        #expect(try await store.recoverLedger() == 3)
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
