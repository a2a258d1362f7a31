import Foundation
import MetricsTestKit
import ParleyCore
import ParleyServer
@testable import ParleyStore
import ParleyTestSupport
import Testing

/// What start-up does with the journals a crash left: the real kill -9 of a chat reply is in
/// Tests/interop/test_credits_crash.py; these cover the other targets on both stores.
@Suite("Stream recovery") struct StreamRecoveryTests {
    /// A stream as a crash leaves it: its prompt and one 16-token batch debited (linked to `room`
    /// when given), its journal saved.
    private func leaveOpen(
        _ store: any Store, stream: String, user: String, target: StreamJournal.Target, text: String, tokens: Int,
        feature: Feature, room: String? = nil
    ) async throws -> StreamJournal {
        for (suffix, credits, count) in [("in", Int64(-10), 10), ("1", Int64(-32), 16)] {
            _ = try await store.apply(
                LedgerEntry(
                    id: "\(stream):\(suffix)", user: user, kind: .debit, credits: credits, tokens: count, stream: stream,
                    room: room, model: "simulated", feature: feature.rawValue, createdAt: 1_000), allowOverdraft: false)
        }
        // Recent: the retention purge at start-up must not take what recovery stores.
        let now = Int64(Timestamp.nowMillis())
        let journal = StreamJournal(
            stream: stream, user: user, model: "simulated", feature: feature.rawValue, inputTokens: 10, target: target,
            messageID: IDGenerator().make(target.columns.kind == "room_turn" ? .roomEntry : .message), text: text, outputTokens: tokens,
            createdAt: now - 1_000, updatedAt: now)
        try await store.saveStreamJournal(journal)
        return journal
    }

    private func paid(_ store: any Store, _ user: String, stream: String) async throws -> Int64 {
        -(try await store.ledger(user: user, limit: 500, before: nil).filter { $0.stream == stream }.reduce(0) { $0 + $1.credits })
    }

    /// A reply whose settlement the store refused (here a trigger; in life a full disk or a
    /// database out of reach) keeps its journal, and the next start-up settles it: the refund
    /// of its unused prepaid tokens was lost (its journal was deleted once the reply was stored).
    @Test func aReplyWhoseSettlementFailedIsSettledAtTheNextStartUp() async throws {
        let metrics = TestMetrics()
        let server = try await TestServer.start {
            $0.credits.batchTokens = 16
            $0.metrics = metrics
            $0.keptReplyRetry = .seconds(3600)  // the start-up's recovery, not a retry meanwhile
        }
        let store = try #require(server.server.store as? SQLiteStore)
        try await store.run { db in
            try db.exec(
                "CREATE TRIGGER refuse_settlements BEFORE INSERT ON ledger WHEN NEW.id LIKE '%:settle' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        }
        let (token, _, socket) = try await aliceSends("hello", on: server)
        let (end, before) = try await socket.next(type: "stream.end")
        #expect(end["reason"] == .string("complete"))
        let stream = try #require(end["stream"]?.stringValue)
        let conversation = try #require(before.first { $0["type"] == .string("stream.start") }?["conversation"]?.stringValue)
        #expect(try await store.ledgerEntry(id: "\(stream):settle") == nil)
        #expect(try await store.streamJournals(limit: 10, node: nil).map(\.stream) == [stream])
        #expect(try metrics.expectMeter("parley_streams_awaiting_recovery").lastValue == 1, "an operator sees it waits for a restart")

        try await store.run { db in try db.exec("DROP TRIGGER refuse_settlements") }
        let restarted = try await server.restarted()
        let settlement = try #require(try await restarted.server.store.ledgerEntry(id: "\(stream):settle"))
        #expect(settlement.credits > 0, "24 tokens used of 32 prepaid: a refund")
        #expect(try await restarted.server.store.streamJournals(limit: 10, node: nil).isEmpty)
        try await expectInvariant(restarted, token: token)
        // Stored once, by the stream: the recovery's own store of it found it there.
        let messages = try await restarted.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["id"] } == [messages.first?["id"], end["message"]])
        await restarted.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func journalsLeftByACrashAreStoredAndSettledAtStartUp(_ kind: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: kind)
        let token = try await server.token("moe")
        let first = try await server.createClone(token: token, name: "Pro")["id"]!.stringValue!
        let second = try await server.createClone(token: token, name: "Con")["id"]!.stringValue!
        let created = try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/rooms", token: token,
            json: .object([
                ("kind", .string("debate")), ("topic", .string("tea or coffee")),
                (
                    "clones",
                    .array([
                        .object([("clone", .string(first)), ("stance", .string("tea"))]),
                        .object([("clone", .string(second)), ("stance", .string("coffee"))]),
                    ])
                ),
            ]))
        let room = try created.json()["id"]!.stringValue!
        // Credits first, as a user's first request would grant them.
        _ = try await server.get("/v1/credits", token: token)
        let store = server.server.store
        let before = try await store.balance(user: "moe")
        let turn = try await leaveOpen(
            store, stream: "st_turn", user: "moe", target: .roomTurn(room: room, speaker: first), text: "Tea, for a start,",
            tokens: 5, feature: .debate, room: room)
        // A stream whose text is not kept (a translation's), its entries linked to the room.
        _ = try await leaveOpen(
            store, stream: "st_trans", user: "moe", target: .settleOnly(room: room), text: "Chá, para", tokens: 4, feature: .debate,
            room: room)
        _ = try await leaveOpen(store, stream: "st_sched", user: "moe", target: .settleOnly(), text: "Good morn", tokens: 3, feature: .scheduled)
        _ = try await leaveOpen(
            store, stream: "st_gone", user: "moe", target: .conversation("cv_01M8ZZZZZZ0000000000000000"), text: "Hel",
            tokens: 1, feature: .chat)

        let again = try await server.restarted()
        let after = again.server.store
        #expect(try await after.streamJournals(limit: 10).isEmpty, "every journal finished")
        let entries = try await after.roomEntries(room: room, limit: 500, before: nil)
        let stored = try #require(entries.first { $0.id == turn.messageID })
        #expect(
            stored.text == "Tea, for a start," && stored.speaker == first && stored.kind == .turn && stored.reason == .interrupted
                && stored.interrupted)
        // Each is charged its prompt (10 tokens: 10 credits) and the tokens its journal holds (2
        // credits each); the rest of the prepaid batch comes back.
        #expect(try await paid(after, "moe", stream: "st_turn") == 10 + 10)
        #expect(try await paid(after, "moe", stream: "st_sched") == 10 + 6)
        #expect(try await paid(after, "moe", stream: "st_gone") == 10 + 2, "settled even though its conversation is gone")
        #expect(try await paid(after, "moe", stream: "st_trans") == 10 + 8)
        #expect(try await after.balance(user: "moe") == before - 20 - 16 - 12 - 18)
        // The room's cost counts the refunds its streams' settlements gave back.
        #expect(try await after.costs(user: "moe", link: .room, ids: [room]) == [room: 20 + 18])
        // A second start-up finds nothing left to do: no entry or credit twice.
        let third = try await again.restarted()
        #expect(try await third.server.store.roomEntries(room: room, limit: 500, before: nil).filter { $0.stream == "st_turn" } == [stored])
        #expect(try await third.server.store.balance(user: "moe") == before - 20 - 16 - 12 - 18)
        await third.stop()
    }

    /// Ivy's "Hello" and "And then?", each answered: a conversation of four messages.
    private func ivyChats(
        _ kind: TestServer.StoreKind
    ) async throws -> (server: TestServer, token: String, first: StreamedReply, second: StreamedReply) {
        let server = try await TestServer.start(store: kind)
        let token = try await server.token("ivy")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        let first = try await socket.readReply()
        try await socket.chatSend(id: "c2", clone: clone, conversation: first.conversation, text: "And then?")
        return (server, token, first, try await socket.readReply())
    }

    /// A reply cut by a crash is stored after the message it answers (its journal names it),
    /// whatever the path did before the start-up stored it (the user wrote on through another
    /// node, or while its retries failed): off the path, as an alternative, once the path went on
    /// past that message; not at all once that message was deleted (it is still settled).
    @Test(arguments: TestServer.StoreKind.allCases)
    func aReplyCutByACrashIsStoredAfterTheMessageItAnswers(_ kind: TestServer.StoreKind) async throws {
        let (server, token, reply, second) = try await ivyChats(kind)
        let before = try await server.path(reply.conversation, token: token)
        let question = try #require(before[2]["id"]?.stringValue)

        let cut = try await leaveOpen(
            server.server.store, stream: "st_cut", user: "ivy", target: .conversation(reply.conversation, parent: question),
            text: "Then th", tokens: 2, feature: .chat)
        _ = try await leaveOpen(
            server.server.store, stream: "st_orphan", user: "ivy",
            target: .conversation(reply.conversation, parent: "msg_01M8ZZZZZZ0000000000000000"),
            text: "Nothing", tokens: 2, feature: .chat)
        let again = try await server.restarted()
        #expect(try await again.path(reply.conversation, token: token).map { $0["id"] } == before.map { $0["id"] }, "as the user left it")
        let stored = try #require(try await again.server.store.message(id: cut.messageID, conversation: reply.conversation))
        #expect(stored.parent == question && !stored.onPath && stored.text == "Then th" && stored.reason == .interrupted)
        let alternatives = try await again.server.store.alternatives(of: [second.end["message"]!.stringValue!], conversation: reply.conversation)
        #expect(alternatives.values.first?.count == 2)
        #expect(try await again.server.store.everyMessage(conversation: reply.conversation, limit: 10, before: nil).count == 5, "not the orphan")
        #expect(try await again.server.store.streamJournals(limit: 10).isEmpty)
        #expect(try await paid(again.server.store, "ivy", stream: "st_orphan") == 10 + 4, "settled for what it streamed")
        await again.stop()
    }

    /// A regenerated reply cut by a crash takes its original's place on the path, as it would
    /// have had it ended; the original stays as an alternative.
    @Test(arguments: TestServer.StoreKind.allCases)
    func aRegeneratedReplyCutByACrashTakesItsOriginalsPlace(_ kind: TestServer.StoreKind) async throws {
        let (server, token, reply, _) = try await ivyChats(kind)
        let original = reply.end["message"]!.stringValue!
        let question = try await server.path(reply.conversation, token: token)[0]["id"]!

        let cut = try await leaveOpen(
            server.server.store, stream: "st_regen", user: "ivy", target: .alternative(conversation: reply.conversation, replacing: original),
            text: "Hi ag", tokens: 2, feature: .chat)
        let again = try await server.restarted()
        let path = try await again.path(reply.conversation, token: token)
        #expect(path.map { $0["id"]! } == [question, .string(cut.messageID)])
        #expect(path[1]["text"] == .string("Hi ag") && path[1]["reason"] == .string("interrupted"))
        #expect(path[1]["alternatives"] == .int(2) && path[1]["alternative"] == .int(1))
        await again.stop()
    }
}
