import Foundation
import Logging
import MetricsTestKit
import ParleyCore
@testable import ParleyServer
@testable import ParleyStore
import ParleyTestSupport
import Synchronization
import Testing

/// A reply whose message and settlement the store refused is tried again while the node runs,
/// so a store that comes back does not leave it waiting for a restart; the user's next message
/// stores it first, a conversation's deletion pauses its retry, an account's drops it.
@Suite struct KeptRepliesTests {
    /// An SQLite trigger that refuses a reply's message, as a full disk would.
    static let refusingReplies =
        "CREATE TRIGGER refuse_replies BEFORE INSERT ON messages WHEN NEW.role = 'assistant' BEGIN SELECT RAISE(ABORT, 'refused'); END;"
    /// That, and one that refuses every settlement.
    static let refusing =
        refusingReplies + """
            CREATE TRIGGER refuse_settlements BEFORE INSERT ON ledger WHEN NEW.id LIKE '%:settle' BEGIN SELECT RAISE(ABORT, 'refused'); END;
            """

    /// A server whose SQLite store refuses what `sql`'s triggers say, trying kept replies again
    /// after `retry`.
    private func refusingServer(
        retry: Duration, metrics: TestMetrics? = nil, refusing sql: String = Self.refusing
    ) async throws -> (TestServer, SQLiteStore) {
        let server = try await TestServer.start {
            if let metrics { $0.metrics = metrics }
            $0.keptReplyRetry = retry
        }
        let store = try #require(server.server.store as? SQLiteStore)
        try await store.run { db in try db.exec(sql) }
        return (server, store)
    }

    /// Alice's "hello", whose reply the store refused (`refusingReplies`; tried again after an
    /// hour, or once the store takes another write on the node).
    private func aliceRefusedReply() async throws -> (
        server: TestServer, store: SQLiteStore, token: String, clone: String, socket: TestWebSocket, reply: StreamedReply
    ) {
        let (server, store) = try await refusingServer(retry: .seconds(3600), refusing: Self.refusingReplies)
        let (token, clone, socket) = try await aliceSends("hello", on: server)
        let reply = try await socket.readReply()
        #expect(reply.end["message"] == nil, "not stored")
        return (server, store, token, clone, socket, reply)
    }

    /// Bob's message and its reply: a write the store takes on the node.
    private func bobChats(on server: TestServer) async throws {
        let bob = try await server.token("bob")
        let bobs = try await server.connect(token: bob)
        try await bobs.chatSend(id: "b1", clone: try await server.createClone(token: bob)["id"]!.stringValue!, text: "hi")
        _ = try await bobs.readReply()
    }

    @Test func aReplyTheStoreRefusedIsStoredAndSettledOnceTheStoreTakesWritesAgain() async throws {
        let metrics = TestMetrics()
        let (server, store) = try await refusingServer(retry: .milliseconds(20), metrics: metrics)
        let (token, _, socket) = try await aliceSends("hello", on: server)
        let (end, before) = try await socket.next(type: "stream.end")
        #expect(end["reason"] == .string("complete"))
        #expect(end["message"] == nil, "not stored, so not named")
        let stream = try #require(end["stream"]?.stringValue)
        let conversation = try #require(before.first { $0["type"] == .string("stream.start") }?["conversation"]?.stringValue)
        let waiting = try metrics.expectMeter("parley_streams_awaiting_recovery")
        #expect(waiting.lastValue == 1)

        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies; DROP TRIGGER refuse_settlements") }
        let finished = await holds(within: .seconds(30)) {
            (try? await store.streamJournals(limit: 10, node: nil).isEmpty) == true
        }
        #expect(finished, "the retry stored and settled the reply, then deleted its journal")
        #expect(try await store.ledgerEntry(id: "\(stream):settle") != nil)
        let messages = try await server.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.count == 2)
        #expect(messages.last?["reason"] == .string("complete"), "stored as it ended, not as a crash's reply")
        #expect(waiting.lastValue == 0)
        #expect(server.server.chat.streams.kept.waiting() == 0)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    /// A scheduled message the store refused is stored by the retry once the store takes writes
    /// again, which completes its schedule and delivers it (it stayed `firing` until a restart).
    @Test func aScheduledMessageTheStoreRefusedIsDeliveredOnceStored() async throws {
        let (server, store, token, _, socket, id, reply) = try await refusedScheduledMessage()
        #expect(reply.reason == "complete")
        #expect(try await server.schedule(id, token: token)["status"] == .string("firing"))

        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies; DROP TRIGGER refuse_settlements") }
        let delivery = try await socket.next(type: "delivery").frame
        #expect(delivery["schedule"] == .string(id))
        #expect(delivery["message"]?["text"] == .string(reply.text))
        _ = try await server.awaitSchedule(id, token: token, status: "delivered")
        await server.stop()
    }

    /// A scheduled message the store refused whose clone is deleted meanwhile: its retry
    /// settles it and stores nothing (no conversation for a clone that is gone).
    @Test func aRefusedScheduledMessageOfADeletedCloneIsSettledAndNotStored() async throws {
        let (server, store, token, clone, _, _, reply) = try await refusedScheduledMessage()
        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/clones/\(clone)", token: token)
        #expect(deleted.status == .noContent)

        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies; DROP TRIGGER refuse_settlements") }
        let finished = await holds(within: .seconds(30)) {
            (try? await store.streamJournals(limit: 10, node: nil).isEmpty) == true
        }
        #expect(finished, "settled, and nothing left to store")
        #expect(try await store.ledgerEntry(id: "\(reply.stream):settle") != nil)
        let conversations = try await server.get("/v1/conversations", token: token).json()["conversations"]?.arrayValue
        #expect(conversations == [], "no conversation made for the deleted clone")
        await server.stop()
    }

    /// Alice schedules a message from her clone through a store that refuses it and its
    /// settlement (`refusing`, retried after 20 ms); returns once its stream has ended, unstored.
    private func refusedScheduledMessage() async throws -> (
        server: TestServer, store: SQLiteStore, token: String, clone: String, socket: TestWebSocket, schedule: String, reply: StreamedReply
    ) {
        let (server, store) = try await refusingServer(retry: .milliseconds(20))
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.scheduleCreate(id: "s1", clone: clone, delayMS: 10, prompt: "the weather")
        let id = try await socket.next(type: "schedule.ok").frame["schedule"]!["id"]!.stringValue!
        let reply = try await socket.readReply()
        #expect(reply.end["message"] == nil, "not stored")
        return (server, store, token, clone, socket, id, reply)
    }

    /// A reply the store refused, and a restart before any retry stored it: the start-up's
    /// recovery stores it as it ended, not as a crash's reply.
    @Test func aRefusedReplyLeftToTheStartUpIsStoredAsItEnded() async throws {
        let (server, store) = try await refusingServer(retry: .seconds(3600))
        let (token, _, socket) = try await aliceSends("hello", on: server)
        let reply = try await socket.readReply()
        #expect(reply.reason == "complete" && reply.end["message"] == nil)
        // Its journal names the message it answers, for the start-up to store it after.
        let hello = try #require(try await server.path(reply.conversation, token: token).first?["id"]?.stringValue)
        let journal = try await store.streamJournals(limit: 10, node: nil).first { $0.stream == reply.stream }
        #expect(journal?.target == .conversation(reply.conversation, parent: hello))
        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies; DROP TRIGGER refuse_settlements") }

        let restarted = try await server.restarted()
        let messages = try await restarted.get("/v1/conversations/\(reply.conversation)/messages", token: token).json()["messages"]!
            .arrayValue!
        #expect(messages.map { $0["text"]?.stringValue } == ["hello", reply.text])
        #expect(messages.last?["reason"] == .string("complete"))
        #expect(try await restarted.server.store.streamJournals(limit: 10, node: nil).isEmpty)
        try await expectInvariant(restarted, token: token)
        await restarted.stop()
    }

    /// A reply the store refused, then the user's next message once the store takes writes
    /// again, before any retry: the reply is stored first, so the transcript keeps its order.
    @Test func aRefusedReplyIsStoredBeforeTheUsersNextMessage() async throws {
        let (server, store, token, clone, socket, first) = try await aliceRefusedReply()
        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies") }

        try await socket.chatSend(id: "c2", clone: clone, conversation: first.conversation, text: "and then?")
        let second = try await socket.readReply()
        let messages = try await server.get("/v1/conversations/\(first.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["role"]?.stringValue } == ["user", "assistant", "user", "assistant"])
        #expect(messages.map { $0["text"]?.stringValue } == ["hello", first.text, "and then?", second.text])
        #expect(messages[1]["reason"] == .string("complete"))
        await server.stop()
    }

    /// A reply the store refused is tried again as soon as the store takes another write on the
    /// node (here another user's message), not at the end of its delay (up to a minute once
    /// grown; an hour here): a store that came back gets it at once.
    @Test func aRefusedReplyIsStoredOnceTheStoreTakesAnotherWrite() async throws {
        let (server, store, token, _, _, first) = try await aliceRefusedReply()
        #expect(server.server.chat.streams.kept.waiting(owner: "alice") == 1)
        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies") }

        try await bobChats(on: server)
        let stored = await holds(within: .seconds(30)) { server.server.chat.streams.kept.waiting() == 0 }
        #expect(stored, "tried again after bob's message was stored, not an hour later")
        let messages = try await server.get("/v1/conversations/\(first.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["text"]?.stringValue } == ["hello", first.text])
        // Alice's journal only: bob's reply's goes with the node's next journal write.
        #expect(try await !store.streamJournals(limit: 10, node: nil).contains { $0.stream == first.stream })
        await server.stop()
    }

    /// Deleting the message a reply waiting to be stored answers: the deletion stores it first,
    /// and takes it with the message; while the store still refuses it, the deletion is 409.
    /// (Before `c595748`, deleted first, the retry stored it in the emptied conversation as its
    /// only message; since `87740b6` the store would not store it at all.)
    @Test func deletingTheMessageAReplyWaitingToBeStoredAnswersTakesTheReplyToo() async throws {
        let (server, store, token, _, _, first) = try await aliceRefusedReply()
        let base = "/v1/conversations/\(first.conversation)"
        let hello = try #require(try await server.get(base + "/messages", token: token).json()["messages"]?.arrayValue?.first?["id"]?.stringValue)

        let refused = try await TestHTTPClient.request(port: server.port, .DELETE, base + "/messages/\(hello)", token: token)
        #expect(refused.status == .conflict, "the store still refuses the reply: its place must not change")
        #expect(try refused.json()["error"]?["message"]?.stringValue?.contains("waiting to be stored") == true)
        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies") }

        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, base + "/messages/\(hello)", token: token)
        #expect(deleted.status == .ok)
        #expect(try deleted.json()["deleted"] == .int(2), "the question and its reply")
        // Another user's write wakes the retry, which finds the reply stored (and deleted since).
        try await bobChats(on: server)
        #expect(await holds(within: .seconds(30)) { server.server.chat.streams.kept.waiting() == 0 })
        let messages = try await server.get(base + "/messages", token: token).json()["messages"]?.arrayValue
        #expect(messages == [], "no reply to a deleted question")
        await server.stop()
    }

    /// Choosing another branch while a reply waits to be stored: it is stored first, on its own
    /// branch, or the choice is 409 while the store still refuses it. (Before `c595748`, chosen
    /// first, the retry stored it on the chosen path: after the other reply to "hello",
    /// answering an "and then?" that is off that path; since `87740b6` the store keeps it off.)
    @Test func choosingABranchWhileAReplyWaitsToBeStoredLeavesTheReplyOnItsOwnBranch() async throws {
        let server = try await TestServer.start { $0.keptReplyRetry = .seconds(3600) }
        let store = try #require(server.server.store as? SQLiteStore)
        let (token, clone, socket) = try await aliceSends("hello", on: server)
        let first = try await socket.readReply()
        try await socket.chatRegenerate(id: "r1", message: first.end["message"]!.stringValue!)
        let regenerated = try await socket.readReply()
        try await store.run { db in try db.exec(Self.refusingReplies) }
        try await socket.chatSend(id: "c2", clone: clone, conversation: first.conversation, text: "and then?")
        let kept = try await socket.readReply()
        #expect(kept.end["message"] == nil, "not stored")

        let firstID = first.end["message"]!.stringValue!
        #expect(try await server.choose(firstID, in: first.conversation, token: token).status == .conflict, "its place must not change")
        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies") }
        #expect(try await server.choose(firstID, in: first.conversation, token: token).status == .ok)
        try await bobChats(on: server)  // wakes the retry, which finds the reply stored
        #expect(await holds(within: .seconds(30)) { server.server.chat.streams.kept.waiting() == 0 })
        #expect(try await server.path(first.conversation, token: token).map { $0["text"]?.stringValue } == ["hello", first.text])
        let back = try await server.choose(regenerated.end["message"]!.stringValue!, in: first.conversation, token: token)
        #expect(back.status == .ok)
        #expect(
            try await server.path(first.conversation, token: token).map { $0["text"]?.stringValue } == [
                "hello", regenerated.text, "and then?", kept.text,
            ])
        await server.stop()
    }

    /// A reply the store refused for its own sake does not hold its conversation back (that would
    /// block it for every attempt's delay), so the user may edit the message it answers meanwhile.
    /// Stored later, it stays on the old branch, as an alternative, not on the new path below a
    /// question it does not answer.
    @Test func aRefusedReplyStoredAfterItsQuestionWasEditedStaysOnTheOldBranch() async throws {
        let (server, store, token, clone, socket, first) = try await aliceRefusedReply()
        let hello = try #require(try await server.path(first.conversation, token: token).first?["id"]?.stringValue)
        // Only this reply is refused from now on.
        try await store.run { db in
            try db.exec(
                "DROP TRIGGER refuse_replies; CREATE TRIGGER refuse_first BEFORE INSERT ON messages WHEN NEW.stream = '\(first.stream)' "
                    + "BEGIN SELECT RAISE(ABORT, 'refused'); END;")
        }
        try await socket.chatEdit(id: "e1", message: hello, text: "hi there")
        let edited = try await socket.readReply()
        #expect(edited.end["message"] != nil)
        try await store.run { db in try db.exec("DROP TRIGGER refuse_first") }

        // The next message stores it first (its retry, woken by the edit's writes and refused,
        // sleeps out its delay).
        try await socket.chatSend(id: "c2", clone: clone, conversation: first.conversation, text: "and?")
        let next = try await socket.readReply()
        #expect(!server.server.chat.streams.kept.holdsMessage(owner: "alice", in: first.conversation), "stored")
        #expect(
            try await server.path(first.conversation, token: token).map { $0["text"]?.stringValue } == [
                "hi there", edited.text, "and?", next.text,
            ])
        #expect(try await server.choose(hello, in: first.conversation, token: token).status == .ok)
        #expect(try await server.path(first.conversation, token: token).map { $0["text"]?.stringValue } == ["hello", first.text])
        await server.stop()
    }

    /// A regenerated reply the store refused for its own sake, while the user wrote on: stored
    /// later, it stays beside the reply it regenerated, and the user's newer messages stay on
    /// the path (it took their place before).
    @Test func aRefusedRegeneratedReplyStoredAfterTheUserWroteOnStaysBesideItsOriginal() async throws {
        let server = try await TestServer.start { $0.keptReplyRetry = .seconds(3600) }
        let store = try #require(server.server.store as? SQLiteStore)
        let (token, clone, socket) = try await aliceSends("hello", on: server)
        let first = try await socket.readReply()
        try await store.run { db in try db.exec(Self.refusingReplies) }
        try await socket.chatRegenerate(id: "r1", message: first.end["message"]!.stringValue!)
        let regenerated = try await socket.readReply()
        #expect(regenerated.end["message"] == nil, "not stored")
        // Only the regenerated reply is refused from now on.
        try await store.run { db in
            try db.exec(
                "DROP TRIGGER refuse_replies; CREATE TRIGGER refuse_regenerated BEFORE INSERT ON messages WHEN NEW.stream = "
                    + "'\(regenerated.stream)' BEGIN SELECT RAISE(ABORT, 'refused'); END;")
        }
        try await socket.chatSend(id: "c2", clone: clone, conversation: first.conversation, text: "and then?")
        let second = try await socket.readReply()
        try await store.run { db in try db.exec("DROP TRIGGER refuse_regenerated") }

        try await socket.chatSend(id: "c3", clone: clone, conversation: first.conversation, text: "more")
        let third = try await socket.readReply()  // stored after the regenerated reply, now stored
        #expect(!server.server.chat.streams.kept.holdsMessage(owner: "alice", in: first.conversation), "stored")
        let path = try await server.path(first.conversation, token: token)
        #expect(path.map { $0["text"]?.stringValue } == ["hello", first.text, "and then?", second.text, "more", third.text])
        #expect(path[1]["alternatives"] == .int(2), "the regenerated reply beside it")
        await server.stop()
    }

    /// The message a refused reply answers deleted meanwhile (as another node may delete it: a
    /// reply refused for its own sake does not hold its conversation across the nodes): its
    /// retry stores nothing and ends, where every attempt would fail until the start-up.
    @Test func aRefusedReplyWhoseQuestionWasDeletedIsNotStoredAndItsRetryEnds() async throws {
        let (server, store, token, _, _, first) = try await aliceRefusedReply()
        try await store.run { db in
            try db.exec("DROP TRIGGER refuse_replies; DELETE FROM messages WHERE conversation = '\(first.conversation)'")
        }
        try await bobChats(on: server)  // wakes the retry
        #expect(await holds(within: .seconds(30)) { server.server.chat.streams.kept.waiting() == 0 }, "done, not tried again")
        #expect(try await server.path(first.conversation, token: token).isEmpty)
        #expect(try await !store.streamJournals(limit: 10, node: nil).contains { $0.stream == first.stream })
        await server.stop()
    }

    /// The user's next request stores their waiting replies first, but a store that refuses as
    /// a whole is not asked again for each: the first refusal ends the request with it (on
    /// MongoDB each attempt can wait out the retries' server selection). A refusal of one reply's
    /// own does not hold the request up.
    @Test func aStoreThatRefusesEverythingIsAskedOnceBeforeTheNextMessage() async throws {
        let store = try await SQLiteStore.open(path: Scratch.path("kept", suffix: ".sqlite"))
        let kept = KeptReplies(
            store: store, metrics: StreamMetrics(factory: TestMetrics()), logger: Logger(label: "test"), firstDelay: .seconds(3600))
        let attempts = Mutex(0)
        let refusal = Mutex<StoreError?>(.unreachable("no primary"))
        for stream in ["st_1", "st_2", "st_3"] {
            kept.retry(
                .init(stream: stream, owner: "alice") {
                    attempts.withLock { $0 += 1 }
                    if let error = refusal.withLock({ $0 }) { throw error }
                })
        }
        await #expect(throws: StoreError.unreachable("no primary")) { try await kept.storeNow(owner: "alice") }
        #expect(attempts.withLock { $0 } == 1)
        refusal.withLock { $0 = .full("disk") }
        await #expect(throws: StoreError.full("disk")) { try await kept.storeNow(owner: "alice") }
        #expect(attempts.withLock { $0 } == 2)

        refusal.withLock { $0 = .backend("a constraint") }
        try await kept.storeNow(owner: "alice")
        #expect(attempts.withLock { $0 } == 5, "each tried, none throws")
        refusal.withLock { $0 = nil }
        try await kept.storeNow(owner: "alice")
        try await kept.storeNow(owner: "alice")
        #expect(attempts.withLock { $0 } == 8, "each stored once")
        await kept.cancelAll()
        try await store.close()
    }

    @Test func anAccountDeletionStopsItsRepliesRetriesBeforeDeleting() async throws {
        let metrics = TestMetrics()
        let (server, store) = try await refusingServer(retry: .seconds(3600), metrics: metrics)
        let (token, _, socket) = try await aliceSends("hello", on: server)
        _ = try await socket.next(type: "stream.end")
        let kept = server.server.chat.streams.kept
        #expect(kept.waiting(owner: "alice") == 1)
        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/me", token: token)
        #expect(deleted.status == .ok)
        #expect(kept.waiting() == 0, "a retry cannot store or charge for the deleted account")
        #expect(try await store.streamJournals(limit: 10, node: nil).isEmpty)
        #expect(try metrics.expectMeter("parley_streams_awaiting_recovery").lastValue == 0, "nothing of theirs waits any more")
        await server.stop()
    }

    /// An account deletion the store fails leaves the refused reply's journal for the next
    /// start-up (its retry stays dropped: the account was being deleted), and the gauge still
    /// counts it; the deletion asked again takes the journal, and the gauge its count.
    @Test func aFailedAccountDeletionLeavesItsKeptReplyCountedUntilADeletionTakesIt() async throws {
        let metrics = TestMetrics()
        let (server, store) = try await refusingServer(retry: .seconds(3600), metrics: metrics)
        let (token, _, socket) = try await aliceSends("hello", on: server)
        _ = try await socket.next(type: "stream.end")
        let waiting = try metrics.expectMeter("parley_streams_awaiting_recovery")
        #expect(waiting.lastValue == 1)
        try await store.run { db in try db.exec("CREATE TRIGGER refuse_deletion BEFORE DELETE ON clones BEGIN SELECT RAISE(ABORT, 'refused'); END;") }
        let failed = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/me", token: token)
        #expect(failed.status.code >= 500)
        #expect(try await store.streamJournals(limit: 10, node: nil).count == 1)
        #expect(waiting.lastValue == 1, "its journal still waits for a recovery")
        #expect(server.server.chat.streams.kept.waiting(owner: "alice") == 0, "no retry for an account being deleted")

        try await store.run { db in try db.exec("DROP TRIGGER refuse_deletion") }
        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/me", token: token)
        #expect(deleted.status == .ok)
        #expect(try await store.streamJournals(limit: 10, node: nil).isEmpty)
        #expect(waiting.lastValue == 0, "nothing of theirs waits any more")
        await server.stop()
    }

    /// Deleting the conversation of a reply the store refused pauses its retry while the
    /// conversation goes, then the retry settles it and stores nothing (there is nowhere to).
    @Test func aRefusedReplysConversationDeletedMeanwhileIsSettledAndNotStored() async throws {
        let metrics = TestMetrics()
        let (server, store) = try await refusingServer(retry: .milliseconds(20), metrics: metrics)
        let (token, _, socket) = try await aliceSends("hello", on: server)
        let reply = try await socket.readReply()
        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/conversations/\(reply.conversation)", token: token)
        #expect(deleted.status == .noContent)
        #expect(server.server.chat.streams.kept.waiting(owner: "alice") == 1, "tried again after the deletion")

        try await store.run { db in try db.exec("DROP TRIGGER refuse_replies; DROP TRIGGER refuse_settlements") }
        let finished = await holds(within: .seconds(30)) {
            (try? await store.streamJournals(limit: 10, node: nil).isEmpty) == true
        }
        #expect(finished)
        #expect(try await store.ledgerEntry(id: "\(reply.stream):settle") != nil)
        let stored = try await store.run { db in
            try db.query("SELECT COUNT(*) AS n FROM messages WHERE conversation = ?", [.text(reply.conversation)]).first?["n"].int
        }
        #expect(stored == 0, "nothing stored into the deleted conversation")
        #expect(try metrics.expectMeter("parley_streams_awaiting_recovery").lastValue == 0)
        try await expectInvariant(server, token: token)
        await server.stop()
    }
}
