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
    /// Fails the next `delete` of the clients of `app` with a non-transient error, so the store
    /// does not retry it.
    func failNextDelete(app: String) throws {
        let data: JSONValue = .object([("failCommands", .array([.string("delete")])), ("appName", .string(app)), ("errorCode", .int(8))])
        _ = try MongoClientPool(uri: MongoFixture.uri()).command(
            .object([("configureFailPoint", .string("failCommand")), ("mode", .object([("times", .int(1))])), ("data", data)]),
            database: "admin")
    }

    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aReleaseTheStoreRefusedIsTriedAgainOnceItTakesAWrite() async throws {
        let app = "parley-test-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let uri = MongoFixture.uri(options: ["appname=" + app])
        let (store, other) = (try await MongoStore.open(uri: uri), try await MongoStore.open(uri: uri.replacingOccurrences(of: app, with: "other")))
        let writes = StoreWrites()
        let logger = Logger(label: "test")
        let a = ReplySlots(store: store, node: "node-a", limit: 4, logger: logger, retryAfter: .seconds(3600), writes: writes)
        let b = ReplySlots(store: other, node: "node-b", limit: 4, logger: logger, retryAfter: .seconds(3600))
        let conversation = "cv_" + app

        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        try failNextDelete(app: app)
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
        try failNextDelete(app: app)
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
