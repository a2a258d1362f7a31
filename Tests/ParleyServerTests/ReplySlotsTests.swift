import Foundation
import Logging
import ParleyCore
import ParleyMongoStore
@testable import ParleyServer
import ParleyTestSupport
import Testing

/// A reply's hold on its conversation across a cluster (#22) whose release the store refused
/// (the database out of reach as the reply ended) is given back once the store takes writes
/// again: left held, it refused the conversation's next message on every node, and counted
/// against the user's replies, until the node restarted.
@Suite(.serialized) struct ReplySlotsTests {
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aReleaseTheStoreRefusedIsTriedAgainOnceItTakesAWrite() async throws {
        try await MongoFixture.failPointLock.run { try await releaseTriedAgain() }
    }

    private func releaseTriedAgain() async throws {
        let (uri, app) = MongoFixture.isolatedURI()
        let (store, other) = (try await MongoStore.open(uri: uri), try await MongoStore.open(uri: uri.replacingOccurrences(of: app, with: "other")))
        let writes = StoreWrites()
        let logger = Logger(label: "test")
        let a = ReplySlots(store: store, node: "node-a", limit: 4, logger: logger, retryAfter: .seconds(3600), writes: writes)
        let b = ReplySlots(store: other, node: "node-b", limit: 4, logger: logger, retryAfter: .seconds(3600))
        let conversation = "cv_" + app

        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        try MongoFixture.failNext(1, ["delete"], app: app, errorCode: 8)  // not transient: not retried
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
        try MongoFixture.failNext(1, ["delete"], app: app, errorCode: 8)  // not transient: not retried
        await a.release(conversation: conversation)
        #expect(a.releasesWaiting == 1)
        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        #expect(a.releasesWaiting == 0)
        await a.release(conversation: conversation)
        #expect(try await b.claim(user: "alice", conversation: conversation) == .reserved)
        await b.release(conversation: conversation)

        // Given back from a cancelled task (a stopped stream's, which gives its hold back as it
        // ends): the store's thread pool refuses that task's calls, so it runs outside it.
        #expect(try await a.claim(user: "alice", conversation: conversation) == .reserved)
        let stopped = Task {
            while !Task.isCancelled { await Task.yield() }
            await a.release(conversation: conversation)
        }
        stopped.cancel()
        await stopped.value
        #expect(a.releasesWaiting == 0, "given back at once, not left to its retry")
        #expect(try await b.claim(user: "alice", conversation: conversation) == .reserved)
        await b.release(conversation: conversation)
        await a.stopRetries()
        try await store.close()
        try await other.close()
    }

    /// A reply whose message the store refused on its node (the database out of reach there)
    /// keeps its conversation held across the nodes until it is stored: the user's next message,
    /// sent on another node once the database is back, is refused meanwhile and then comes after
    /// it. (Given back as the stream ended, the other node stored the next message first, and
    /// the reply followed it a second later.)
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aKeptReplyHoldsItsConversationOnEveryNodeUntilItIsStored() async throws {
        try await MongoFixture.failPointLock.run { try await keptReplyHoldsItsConversation() }
    }

    /// Two nodes on one database whose kept replies are tried again after a second; node A's
    /// connections carry `app` as their name (a fail point's filter), node B's too when `bothNamed`.
    private func twoNodes(bothNamed: Bool = false) async throws -> (nats: NATSServer, a: TestServer, b: TestServer, app: String) {
        let nats = try NATSServer()
        let (database, app) = ("parley_test_" + MongoFixture.appName().suffix(12), MongoFixture.appName())
        let secret = "cluster-test-secret-" + UUID().uuidString
        let pace: @Sendable (inout ServerConfiguration) -> Void = {
            $0.nodeLeasePeriod = .seconds(60)
            $0.keptReplyRetry = .seconds(1)
            $0.simulated.tokensPerSecond = 50
            $0.simulated.replyTokens = 20
        }
        let named = MongoFixture.uri(base: MongoFixture.baseURI, database: database, options: ["appname=" + app])
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: named, secret: secret, pace)
        let b = try await TestServer.clusterNode(
            "node-b", nats: nats, uri: bothNamed ? named : MongoFixture.uri(base: MongoFixture.baseURI, database: database), secret: secret, pace)
        return (nats, a, b, app)
    }

    /// Sends "and then?" into `conversation` on `socket` until it is not refused as busy (each
    /// refusal waits for `node`'s kept replies to be stored), and reads its reply.
    private func sendOnceFree(_ socket: TestWebSocket, clone: String, conversation: String, keptOn node: TestServer) async throws {
        var refusals = 0
        var answer: JSONValue = .null
        while true {
            try await socket.chatSend(id: "n\(refusals)", clone: clone, conversation: conversation, text: "and then?")
            answer = try await socket.nextJSON()
            while answer["type"] != .string("error") && answer["type"] != .string("stream.start") { answer = try await socket.nextJSON() }
            guard answer["type"] == .string("error"), refusals < 5 else { break }
            #expect(answer["code"] == .string("rate_limited"))
            #expect(answer["message"]?.stringValue?.hasSuffix("is still streaming or waiting to be stored; try again shortly") == true)
            refusals += 1
            #expect(await holds(within: .seconds(30)) { node.server.chat.streams.kept.waiting() == 0 })
        }
        #expect(answer["type"] == .string("stream.start"))
        _ = try await socket.next(type: "stream.end")
    }

    private func keptReplyHoldsItsConversation() async throws {
        let (nats, a, b, app) = try await twoNodes()
        let token = try await a.token("alice")
        let clone = try await a.createClone(token: token)["id"]!.stringValue!
        let onA = try await a.connect(token: token)
        try await onA.chatSend(id: "c1", clone: clone, text: "hello")
        let conversation = try #require(try await onA.next(type: "stream.start").frame["conversation"]?.stringValue)
        _ = try await onA.readUntilToken()
        try MongoFixture.failNext(100_000, ["insert"], app: app, errorCode: 91)  // transient: the database out of reach
        let end = try await onA.next(type: "stream.end").frame
        try MongoFixture.turnOffFailPoint()
        #expect(end["message"] == nil, "refused on node A, kept")
        #expect(a.server.chat.streams.kept.waiting() == 1)

        let onB = try await b.connect(token: token)
        try await sendOnceFree(onB, clone: clone, conversation: conversation, keptOn: a)
        let messages = try await b.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["role"]?.stringValue } == ["user", "assistant", "user", "assistant"])
        #expect(messages.count == 4 && messages[2]["text"] == .string("and then?"))
        await a.stop()
        await b.stop()
        await nats.stop()
    }

    /// A scheduled message the store refused holds its conversation across the nodes the same
    /// way: given back as its firing ended, the user's next message, sent on the other node,
    /// was stored before it (user, assistant, user, scheduled, assistant).
    @Test(.enabled(if: !MongoFixture.isRealServer))
    func aKeptScheduledMessageHoldsItsConversationOnEveryNodeUntilItIsStored() async throws {
        try await MongoFixture.failPointLock.run { try await keptScheduledMessageHoldsItsConversation() }
    }

    private func keptScheduledMessageHoldsItsConversation() async throws {
        let (nats, a, b, app) = try await twoNodes(bothNamed: true)
        let token = try await a.token("alice")
        let clone = try await a.createClone(token: token)["id"]!.stringValue!
        let onA = try await a.connect(token: token)
        try await onA.chatSend(id: "c1", clone: clone, text: "hello")
        let conversation = try await onA.readReply().conversation
        let onB = try await b.connect(token: token)

        try await onA.scheduleCreate(id: "s1", clone: clone, conversation: conversation, delayMS: 10, prompt: "the weather")
        _ = try await onA.next(type: "stream.start")
        _ = try await onA.readUntilToken()
        try MongoFixture.failNext(100_000, ["insert"], app: app, errorCode: 91)  // transient: the database out of reach
        let end = try await onA.next(type: "stream.end").frame
        try MongoFixture.turnOffFailPoint()
        #expect(end["message"] == nil, "refused, kept")
        _ = try await onB.next(type: "stream.end")  // the owner's every socket reads it
        // The message is sent on the node that did not fire the schedule (its shard's node).
        let (firing, other) = a.server.chat.streams.kept.waiting() == 1 ? (a, onB) : (b, onA)
        #expect(firing.server.chat.streams.kept.waiting() == 1)

        try await sendOnceFree(other, clone: clone, conversation: conversation, keptOn: firing)
        let messages = try await b.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["role"]?.stringValue } == ["user", "assistant", "assistant", "user", "assistant"])
        #expect(messages.count == 5 && messages[3]["text"] == .string("and then?"))
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}
