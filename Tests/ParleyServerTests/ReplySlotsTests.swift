import Foundation
import Logging
import ParleyCore
@testable import ParleyMongoStore
@testable import ParleyServer
import ParleyTestSupport
import Testing

/// A reply's hold on its conversation across a cluster (#22) whose release the store refused
/// (the database out of reach as the reply ended) is given back once the store takes writes
/// again: left held, it refused the conversation's next message on every node, and counted
/// against the user's replies, until the node restarted.
@Suite(.serialized) struct ReplySlotsTests {
    /// Fails the next `times` `command`s of the clients of `app` with `errorCode` (8: not
    /// transient, so the store does not retry it; 91: transient, the database out of reach).
    /// Only inside `MongoFixture.failPointLock`.
    func failNext(_ times: Int, _ command: String, app: String, errorCode: Int) throws {
        let data: JSONValue = .object([
            ("failCommands", .array([.string(command)])), ("appName", .string(app)), ("errorCode", .int(Int64(errorCode))),
        ])
        try configureFailPoint(.object([("times", .int(Int64(times)))]), data: data)
    }

    func configureFailPoint(_ mode: JSONValue, data: JSONValue = .object([])) throws {
        _ = try MongoClientPool(uri: MongoFixture.uri()).command(
            .object([("configureFailPoint", .string("failCommand")), ("mode", mode), ("data", data)]), database: "admin")
    }

    static func app() -> String { "parley-test-" + String(UInt64.random(in: 0...UInt64.max), radix: 36) }

    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aReleaseTheStoreRefusedIsTriedAgainOnceItTakesAWrite() async throws {
        try await MongoFixture.failPointLock.withLock { try await releaseTriedAgain() }
    }

    private func releaseTriedAgain() async throws {
        let app = Self.app()
        let uri = MongoFixture.uri(options: ["appname=" + app])
        let (store, other) = (try await MongoStore.open(uri: uri), try await MongoStore.open(uri: uri.replacingOccurrences(of: app, with: "other")))
        let writes = StoreWrites()
        let logger = Logger(label: "test")
        let a = ReplySlots(store: store, node: "node-a", limit: 4, logger: logger, retryAfter: .seconds(3600), writes: writes)
        let b = ReplySlots(store: other, node: "node-b", limit: 4, logger: logger, retryAfter: .seconds(3600))
        let conversation = "cv_" + app

        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        try failNext(1, "delete", app: app, errorCode: 8)
        await a.release(conversation: conversation)
        #expect(a.releasesWaiting == 1)
        #expect(try await b.claim(user: "alice", conversation: conversation) == .conversationBusy, "still held")
        writes.took()
        #expect(await holds(within: .seconds(30)) { a.releasesWaiting == 0 }, "given back once the store took a write, not an hour later")
        #expect(try await b.claim(user: "alice", conversation: conversation) == .reserved)
        await b.release(conversation: conversation)

        // The node that holds it gives it back first when it claims it again (its own
        // reservation says no reply of it runs there).
        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        try failNext(1, "delete", app: app, errorCode: 8)
        await a.release(conversation: conversation)
        #expect(a.releasesWaiting == 1)
        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        #expect(a.releasesWaiting == 0)
        await a.release(conversation: conversation)
        #expect(try await b.claim(user: "alice", conversation: conversation) == .reserved)
        await b.release(conversation: conversation)
        await a.stopRetries()
        try await store.close()
        try await other.close()
    }
}
