import Foundation
import MetricsTestKit
import NIOHTTP1
import ParleyCore
import ParleyLLM
@testable import ParleyStore
import ParleyTestSupport
import Testing

@testable import ParleyServer

/// A translation chat as one member saw it.
struct TranslatedChat {
    /// Message ids (originals) in the order their first frame arrived.
    var order: [String] = []
    /// What the member read for each message.
    var texts: [String: String] = [:]
    /// `stream.start` frames, in arrival order.
    var starts: [JSONValue] = []
    /// Message ids in the order their stream ended (or their `said` arrived).
    var finished: [String] = []
    var ends: [String: JSONValue] = [:]
    var untranslated: Set<String> = []
    var errors: [JSONValue] = []
    var messageOf: [String: String] = [:]
    var open: Set<String> = []
    var streamed: Set<String> { Set(starts.map { $0["source"]!.stringValue! }) }
}

extension TestWebSocket {
    /// Joins a translation chat, giving `language` when set.
    func joinChat(_ room: String, language: String? = nil) async throws -> JSONValue {
        try await self.room("room.join", id: "j-\(room)", room: room, language.map { [("language", .string($0))] } ?? [])
        return try await next(type: "room.state").frame
    }

    func say(_ room: String, _ text: String, id: String = "say") async throws {
        try await self.room("room.say", id: id, room: room, [("text", .string(text))])
    }

    /// Reads frames until `messages` messages have arrived whole: each as a `said` event or as a
    /// stream from `stream.start` to `stream.end` (tokens of several streams may interleave).
    func readChat(messages: Int, errors allowed: Int = 0) async throws -> TranslatedChat {
        var chat = TranslatedChat()
        try await readChat(into: &chat, errors: allowed) { $0.order.count >= messages && $0.open.isEmpty }
        return chat
    }

    /// Reads frames into `chat` until `done` holds.
    func readChat(into chat: inout TranslatedChat, errors allowed: Int = 0, until done: (TranslatedChat) -> Bool) async throws {
        func arrived(_ id: String) { if !chat.order.contains(id) { chat.order.append(id) } }
        while !done(chat) {
            let frame = try await nextJSON()
            switch frame["type"]?.stringValue {
            case "room.event" where frame["event"] == .string("said"):
                let entry = frame["entry"]!
                let id = entry["source"]?.stringValue ?? entry["id"]!.stringValue!
                arrived(id)
                chat.texts[id] = entry["text"]!.stringValue!
                chat.finished.append(id)
                if entry["untranslated"] == .bool(true) { chat.untranslated.insert(id) }
            case "stream.start":
                let id = frame["source"]!.stringValue!
                arrived(id)
                chat.messageOf[frame["stream"]!.stringValue!] = id
                chat.open.insert(frame["stream"]!.stringValue!)
                chat.texts[id] = ""
                chat.starts.append(frame)
            case "token":
                chat.texts[chat.messageOf[frame["stream"]!.stringValue!]!]! += frame["text"]!.stringValue!
            case "stream.end":
                let stream = frame["stream"]!.stringValue!
                chat.open.remove(stream)
                chat.finished.append(chat.messageOf[stream]!)
                chat.ends[chat.messageOf[stream]!] = frame
            case "error":
                chat.errors.append(frame)
                if chat.errors.count > allowed { throw TestTimeout(description: "unexpected error frame \(frame)") }
            default:
                break
            }
        }
    }
}

/// A translation chat made by `alice` with the given members and languages.
struct TranslationFixture {
    var server: TestServer
    var tokens: [String: String]
    var room: String
    var clones: [String]

    static func make(
        languages: [String: String], members: [String], clones: [(name: String, language: String)] = [], store: TestServer.StoreKind = .sqlite,
        _ configure: (inout ServerConfiguration) -> Void = { _ in }
    ) async throws -> TranslationFixture {
        let server = try await TestServer.start(store: store, configure)
        var tokens: [String: String] = [:]
        for user in ["alice"] + members { tokens[user] = try await server.token(user) }
        var cloneIDs: [String] = []
        for clone in clones { cloneIDs.append(try await server.createClone(token: tokens["alice"]!, name: clone.name)["id"]!.stringValue!) }
        let body = JSONValue.object([
            ("kind", .string("translation")), ("members", .array(members.map(JSONValue.string))),
            ("languages", .object(languages.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) })),
            ("clones", .array(zip(cloneIDs, clones).map { .object([("clone", .string($0)), ("language", .string($1.language))]) })),
        ])
        let created = try await TestHTTPClient.json(port: server.port, .POST, "/v1/rooms", token: tokens["alice"]!, json: body)
        guard created.status == .created else { throw TestTimeout(description: "room creation answered \(created.status): \(created.text)") }
        return TranslationFixture(server: server, tokens: tokens, room: try created.json()["id"]!.stringValue!, clones: cloneIDs)
    }

    func connect(_ user: String, language: String? = nil) async throws -> TestWebSocket {
        let socket = try await server.connect(token: tokens[user]!)
        _ = try await socket.joinChat(room, language: language)
        return socket
    }

    /// The user's balance, their entries that paid for streams, and the sum of all their entries.
    func ledger(_ user: String) async throws -> (balance: Int64, debits: [JSONValue], sum: Int64) {
        let json = try await server.get("/v1/credits?limit=100", token: tokens[user]!).json()
        let entries = json["entries"]!.arrayValue!
        return (json["balance"]!.intValue!, entries.filter { $0["stream"] != nil }, entries.reduce(0) { $0 + $1["credits"]!.intValue! })
    }
}

func standIn(_ text: String, _ tag: String) -> String { SimulatedProvider.translationStandIn(text, to: LanguageTag(tag)!) }

@Suite struct TranslationIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func everyMemberSeesEveryMessageOnceInTheirLanguageInTheOrderSaid(_ store: TestServer.StoreKind) async throws {
        // Paced, so the first message's long translation (about 170 tokens: 11 s) is still
        // streaming when the second's ends, also on a loaded machine with the serial Mongo
        // fixture (at 6 s it once was not).
        let f = try await TranslationFixture.make(
            languages: ["alice": "en", "bruno": "pt", "chen": "zh"], members: ["bruno", "chen", "dave", "erin", "frank"], store: store
        ) { $0.simulated.tokensPerSecond = 15 }
        let alice = try await f.connect("alice")
        let bruno = try await f.connect("bruno")
        let chen = try await f.connect("chen")
        let dave = try await f.connect("dave", language: "en-US")  // a language set on joining
        let long = Array(repeating: "the harbour lights were late tonight", count: 20).joined(separator: ", ")
        var seen: [String: TranslatedChat] = [
            "alice": TranslatedChat(), "bruno": TranslatedChat(), "chen": TranslatedChat(), "dave": TranslatedChat(),
        ]
        try await alice.say(f.room, long)
        try await alice.readChat(into: &seen["alice"]!) { $0.order.count == 1 }  // placed first
        try await bruno.say(f.room, "Bom dia!")
        try await bruno.readChat(into: &seen["bruno"]!) { $0.order.count == 2 }
        try await chen.say(f.room, "你好，大家")
        for (user, socket) in [("alice", alice), ("bruno", bruno), ("chen", chen), ("dave", dave)] {
            try await socket.readChat(into: &seen[user]!) { $0.order.count >= 3 && $0.open.isEmpty }
        }
        let originals = try await f.server.server.store.roomEntries(room: f.room, limit: 100, before: nil).filter { $0.kind != .translation }
        #expect(originals.map(\.text) == [long, "Bom dia!", "你好，大家"])
        let ids = originals.map(\.id)
        let said = Dictionary(uniqueKeysWithValues: originals.map { ($0.id, $0.text) })
        for (user, chat) in seen {
            #expect(chat.order == ids, "\(user) sees the messages in the order they were said")
        }
        // Each reads originals in their own language and the simulated translation of the rest.
        let expected: [String: [String]] = [
            "alice": [long, standIn("Bom dia!", "en"), standIn("你好，大家", "en")],
            "bruno": [standIn(long, "pt"), "Bom dia!", standIn("你好，大家", "pt")],
            "chen": [standIn(long, "zh"), standIn("Bom dia!", "zh"), "你好，大家"],
            "dave": [long, standIn("Bom dia!", "en-US"), standIn("你好，大家", "en-US")],
        ]
        for (user, texts) in expected {
            #expect(ids.map { seen[user]!.texts[$0] } == texts, "\(user)'s chat")
            // Same language (en and en-US too): the original as a `said` event, never a stream.
            let own = Set(ids.indices.filter { !texts[$0].hasPrefix("[simulated") }.map { ids[$0] })
            #expect(seen[user]!.streamed.isDisjoint(with: own))
            #expect(seen[user]!.streamed.count == 3 - own.count)
            #expect(seen[user]!.untranslated.isEmpty)
        }
        let start = seen["chen"]!.starts[0]
        #expect(start["room"] == .string(f.room) && start["user"] == .string("alice") && start["lang"] == .string("zh"))
        #expect(start["clone"] == nil && start["conversation"] == nil)
        // The later, shorter translation ended first: streams interleave, yet starts kept order.
        #expect(seen["chen"]!.finished.firstIndex(of: ids[1])! < seen["chen"]!.finished.firstIndex(of: ids[0])!)
        // Members who did not pay see no cost or balance.
        #expect(seen["chen"]!.ends[ids[0]]!["balance"] == nil)

        // Each sender paid for the translations of their own message, and nobody else did.
        let streamsBySender = Dictionary(grouping: seen.values.flatMap(\.starts), by: { $0["user"]!.stringValue! })
            .mapValues { Set($0.map { $0["stream"]!.stringValue! }) }
        for user in ["alice", "bruno", "chen", "dave"] {
            let (balance, debits, sum) = try await f.ledger(user)
            let paid = Set(debits.compactMap { $0["stream"]?.stringValue })
            #expect(paid == (streamsBySender[user] ?? []), "\(user) paid for exactly their own message's translations")
            #expect(debits.allSatisfy { $0["feature"] == .string("translation") && $0["room"] == .string(f.room) })
            #expect(balance == sum && (paid.isEmpty == (balance == 1_000_000)))
        }
        #expect(try await f.ledger("alice").debits.isEmpty == false)

        // Stored: each original once, plus one translation per other language, linked to it.
        let stored = try await f.server.server.store.roomEntries(room: f.room, limit: 100, before: nil)
        let translations = stored.filter { $0.kind == .translation }
        #expect(Set(translations.filter { $0.source == ids[0] }.compactMap { $0.lang?.value }) == ["pt", "zh"])
        #expect(Set(translations.filter { $0.source == ids[1] }.compactMap { $0.lang?.value }) == ["en", "en-US", "zh"])
        #expect(translations.allSatisfy { $0.text == standIn(said[$0.source!]!, $0.lang!.value) && $0.reason == .complete })

        // Said at once by three people on three sockets: every member still sees one order, the stored one.
        let sockets = [("alice", alice), ("bruno", bruno), ("chen", chen), ("dave", dave)]
        for n in 1...2 {
            for (user, socket) in sockets.prefix(3) { try await socket.say(f.room, "\(user) \(n)", id: "c\(n)") }  // no waiting between
        }
        var burst: [[String]] = []
        for (_, socket) in sockets { burst.append(try await socket.readChat(messages: 6).order) }
        let burstIDs = try await f.server.server.store.roomEntries(room: f.room, limit: 100, before: nil).filter { $0.kind != .translation }.map(\.id)
            .suffix(6)
        #expect(burst.allSatisfy { $0 == Array(burstIDs) })

        // A late joiner reads the transcript in their language: pt-BR gets the pt translations,
        // a language nobody translated into gets the originals, flagged.
        let erin = try await f.server.connect(token: f.tokens["erin"]!)
        let erinState = try await erin.joinChat(f.room, language: "pt-BR")
        #expect(
            erinState["transcript"]!.arrayValue!.prefix(3).map { $0["text"]!.stringValue! } == [
                standIn(long, "pt"), "Bom dia!", standIn("你好，大家", "pt"),
            ])
        #expect(erinState["transcript"]!.arrayValue![0]["source"] == .string(ids[0]))
        let frank = try await f.server.connect(token: f.tokens["frank"]!)
        let frankState = try await frank.joinChat(f.room, language: "fr")
        #expect(frankState["transcript"]!.arrayValue!.map { $0["untranslated"] } == Array(repeating: .bool(true), count: 9))
        // REST: the transcript in the caller's language.
        let rest = try await f.server.get("/v1/rooms/\(f.room)", token: f.tokens["chen"]!).json()
        #expect(rest["transcript"]!.arrayValue!.prefix(3).map { $0["text"]!.stringValue! } == expected["chen"]!)
        #expect(rest["room"]!["languages"]!["dave"] == .string("en-US"), "the language given on joining is stored")
        await f.server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aSenderWithoutCreditsGetsInsufficientCreditsAndTheOthersTheOriginalFlagged(_ store: TestServer.StoreKind) async throws {
        let f = try await TranslationFixture.make(languages: ["alice": "en", "bruno": "pt"], members: ["bruno"], store: store) {
            $0.credits.startingGrant = 0
        }
        let alice = try await f.connect("alice")
        let bruno = try await f.connect("bruno")
        try await alice.say(f.room, "Hello there", id: "s1")
        let error = try await alice.next(type: "error").frame
        #expect(error["ref"] == .string("s1") && error["code"] == .string("insufficient_credits"))
        #expect(error["balance"] == .int(0) && (error["required"]?.intValue ?? 0) > 0)
        let chat = try await bruno.readChat(messages: 1)
        #expect(chat.starts.isEmpty)
        #expect(chat.texts.values.first == "Hello there" && chat.untranslated.count == 1)
        let transcript = try await f.server.get("/v1/rooms/\(f.room)", token: f.tokens["bruno"]!).json()["transcript"]!.arrayValue!
        #expect(transcript.count == 1 && transcript[0]["untranslated"] == .bool(true) && transcript[0]["text"] == .string("Hello there"))
        #expect(try await f.ledger("alice").debits.isEmpty)
        await f.server.stop()
    }

    @Test func aCloneMemberAnswersInItsLanguageAndItsReplyIsTranslatedForTheOthers() async throws {
        let f = try await TranslationFixture.make(languages: ["alice": "en"], members: [], clones: [("Zoé", "fr")]) {
            $0.simulated.replyTokens = 8
        }
        let alice = try await f.connect("alice")
        try await alice.say(f.room, "What do you think of the sea?")
        // Alice reads her own message, then the clone's reply translated into English.
        let chat = try await alice.readChat(messages: 2)
        let stored = try await f.server.server.store.roomEntries(room: f.room, limit: 100, before: nil)
        let reply = try #require(stored.first { $0.kind == .turn })
        #expect(reply.speaker == f.clones[0] && reply.lang?.value == "fr" && reply.reason == .complete)
        #expect(chat.order == [stored.first { $0.kind == .said }!.id, reply.id])
        #expect(chat.texts[reply.id] == standIn(reply.text, "en"))
        #expect(chat.starts.count == 1 && chat.starts[0]["clone"] == .string(f.clones[0]) && chat.starts[0]["lang"] == .string("en"))

        // The clone read the chat in French: its reply is the one the simulated provider gives
        // for a prompt holding the French translation of Alice's message.
        let room = try #require(try await f.server.server.store.room(id: f.room))
        let clone = try #require(try await f.server.server.store.clone(id: f.clones[0], owner: "alice"))
        let before = stored.filter { $0.id < reply.id }
        #expect(before.contains { $0.kind == .translation && $0.lang?.value == "fr" })
        let prompt = TranslationChat.replyPrompt(
            room: room, clone: clone, lang: LanguageTag("fr")!, view: TranslationChat.view(before, for: LanguageTag("fr")!).map(\.entry),
            names: [clone.id: clone.name], budget: f.server.configuration.contextBudgetTokens)
        #expect(prompt.messages.last?.text == "alice: " + standIn("What do you think of the sea?", "fr"))
        let request = CompletionRequest(messages: prompt.messages, speaker: clone.name, maxOutputTokens: f.server.configuration.maxOutputTokens)
        #expect(reply.text == SimulatedProvider(configuration: f.server.configuration.simulated).replyTokens(for: request).joined())

        // Alice owns the clone: she paid for its reply (chat) and its translation, and for hers.
        let features = try await f.ledger("alice").debits.compactMap { $0["feature"]?.stringValue }
        #expect(Set(features) == ["chat", "translation"])
        await f.server.stop()
    }

    @Test func aTranslationCutShortLeavesItsReadersTheOriginalFlagged() async throws {
        let f = try await TranslationFixture.make(languages: ["alice": "en", "bruno": "pt"], members: ["bruno"]) { $0.simulated.tokensPerSecond = 20 }
        let alice = try await f.connect("alice")
        let bruno = try await f.connect("bruno")
        let text = Array(repeating: "a long and winding sentence", count: 10).joined(separator: " ")
        try await alice.say(f.room, text)
        let start = try await bruno.next(type: "stream.start").frame
        _ = try await bruno.readUntilToken()
        try await alice.control(f.room, "end")
        let end = try await bruno.next(type: "stream.end").frame
        #expect(end["stream"] == start["stream"] && end["reason"] == .string("cancelled"))
        let said = try await bruno.roomEvent("said")
        #expect(said["entry"]!["text"] == .string(text) && said["entry"]!["untranslated"] == .bool(true))
        // Stored with its reason, and not offered as a translation.
        let stored = try await f.server.server.store.roomEntries(room: f.room, limit: 10, before: nil)
        #expect(stored.contains { $0.kind == .translation && $0.reason == .cancelled && $0.interrupted })
        let transcript = try await f.server.get("/v1/rooms/\(f.room)", token: f.tokens["bruno"]!).json()["transcript"]!.arrayValue!
        #expect(transcript.count == 1 && transcript[0]["untranslated"] == .bool(true))
        await f.server.stop()
    }

    /// A message whose storing fails after its translations were paid for gives their prompts
    /// back; when the store refuses the refunds too (the same failure, often), they wait in
    /// journals for the next start-up, which refunds them (they were lost).
    @Test func translationsPaidForAMessageThatCouldNotBeStoredAreRefundedOnceTheStoreAllows() async throws {
        // The start-up's recovery, not a retry meanwhile.
        let (f, store, metrics) = try await refusedTranslationRefunds(retry: .seconds(3600))
        try await store.run { db in try db.exec("DROP TRIGGER refuse_said; DROP TRIGGER refuse_settlements") }
        #expect(try metrics.expectMeter("parley_streams_awaiting_recovery").lastValue == 2)
        let restarted = try await f.server.restarted()
        let json = try await restarted.get("/v1/credits?limit=100", token: f.tokens["alice"]!).json()
        let streams = json["entries"]!.arrayValue!.filter { $0["stream"] != nil }
        #expect(streams.count == 4, "each prompt, then its refund")
        #expect(streams.reduce(0) { $0 + $1["credits"]!.intValue! } == 0)
        #expect(try await restarted.server.store.costs(user: "alice", link: .room, ids: [f.room]) == [f.room: 0], "refunded where charged")
        #expect(try await restarted.server.store.streamJournals(limit: 10, node: nil).isEmpty)
        await restarted.stop()
    }

    /// The same refunds are tried again while the node runs: once the store takes writes again
    /// they are there, without a restart (they waited for one).
    @Test func translationsPaidForAMessageThatCouldNotBeStoredAreRefundedWithoutARestart() async throws {
        let (f, store, metrics) = try await refusedTranslationRefunds(retry: .milliseconds(20))
        try await store.run { db in try db.exec("DROP TRIGGER refuse_said; DROP TRIGGER refuse_settlements") }
        let refunded = await holds(within: .seconds(30)) {
            (try? await store.streamJournals(limit: 10, node: nil).isEmpty) == true
        }
        #expect(refunded, "the retries refunded both prompts, then deleted their journals")
        let json = try await f.server.get("/v1/credits?limit=100", token: f.tokens["alice"]!).json()
        let streams = json["entries"]!.arrayValue!.filter { $0["stream"] != nil }
        #expect(streams.count == 4, "each prompt, then its refund")
        #expect(streams.reduce(0) { $0 + $1["credits"]!.intValue! } == 0)
        #expect(try metrics.expectMeter("parley_streams_awaiting_recovery").lastValue == 0)
        #expect(f.server.server.chat.streams.kept.waiting() == 0)
        await f.server.stop()
    }

    /// Alice says something in a three-language chat whose store refuses her message and every
    /// settlement: both translations' prompts are paid for, and their refunds are refused.
    private func refusedTranslationRefunds(retry: Duration) async throws -> (TranslationFixture, SQLiteStore, TestMetrics) {
        let metrics = TestMetrics()
        let f = try await TranslationFixture.make(languages: ["alice": "en", "bruno": "pt", "chen": "zh"], members: ["bruno", "chen"]) {
            $0.metrics = metrics
            $0.keptReplyRetry = retry
        }
        let alice = try await f.connect("alice")
        _ = try await f.ledger("alice")  // the starting grant, before anything is refused
        let store = try #require(f.server.server.store as? SQLiteStore)
        try await store.run { db in
            try db.exec(
                """
                CREATE TRIGGER refuse_said BEFORE INSERT ON room_entries WHEN NEW.kind = 'said' BEGIN SELECT RAISE(ABORT, 'refused'); END;
                CREATE TRIGGER refuse_settlements BEFORE INSERT ON ledger WHEN NEW.id LIKE '%:settle' BEGIN SELECT RAISE(ABORT, 'refused'); END;
                """)
        }
        try await alice.say(f.room, "Good morning, all")
        let refused = try await alice.next(type: "error").frame
        #expect(refused["code"] == .string("internal"))
        let paid = try await f.ledger("alice")
        #expect(paid.debits.count == 2, "a prompt paid for each of the two other languages")
        #expect(paid.debits.allSatisfy { $0["credits"]!.intValue! < 0 })
        #expect(try await store.streamJournals(limit: 10, node: nil).count == 2)
        #expect(try metrics.expectMeter("parley_streams_awaiting_recovery").lastValue == 2)
        return (f, store, metrics)
    }

    @Test func badInputGetsClearErrors() async throws {
        let f = try await TranslationFixture.make(languages: ["alice": "en"], members: ["bruno"])
        let alice = f.tokens["alice"]!
        for (body, message) in [
            (#"{"kind":"translation","members":["bruno"],"languages":{"bruno":"english!"}}"#, "BCP 47"),
            (#"{"kind":"translation","members":["bruno"],"languages":{"zed":"en"}}"#, "not in 'members'"),
            (#"{"kind":"translation","members":[]}"#, "needs 'members' or 'clones'"),
            (#"{"kind":"chat"}"#, "'kind' must be 'debate' or 'translation'"),
        ] {
            let response = try await TestHTTPClient.request(port: f.server.port, .POST, "/v1/rooms", token: alice, body: Array(body.utf8))
            #expect(response.status == .badRequest, "\(body)")
            #expect(response.text.contains(message), "\(response.text)")
        }
        // Bruno has no language yet: joining without one is refused, with one it works.
        let bruno = try await f.server.connect(token: f.tokens["bruno"]!)
        try await bruno.room("room.join", id: "j1", room: f.room)
        let refused = try await bruno.next(type: "error").frame
        #expect(refused["ref"] == .string("j1") && refused["code"] == .string("bad_request"))
        try await bruno.room("room.join", id: "j2", room: f.room, [("language", .string("pt_BR"))])
        #expect(try await bruno.next(type: "error").frame["code"] == .string("bad_request"))
        #expect(try await bruno.joinChat(f.room, language: "pt-br")["room"]!["languages"]!["bruno"] == .string("pt-BR"))
        // Strangers cannot join; translation chats have no turns.
        let zed = try await f.server.connect(token: try await f.server.token("zed"))
        try await zed.room("room.join", id: "j3", room: f.room, [("language", .string("en"))])
        #expect(try await zed.next(type: "error").frame["code"] == .string("not_found"))
        try await bruno.control(f.room, "start")
        #expect(try await bruno.next(type: "error").frame["code"] == .string("forbidden"))
        let owner = try await f.connect("alice")
        try await owner.control(f.room, "start")
        #expect(try await owner.next(type: "error").frame["code"] == .string("bad_request"))
        try await owner.control(f.room, "end")
        _ = try await owner.roomEvent("ended")
        try await bruno.say(f.room, "Olá", id: "late")
        let ended = try await bruno.next(type: "error").frame
        #expect(ended["ref"] == .string("late") && ended["code"] == .string("conflict"))
        await f.server.stop()
    }
}

@Suite struct TranslationChatDeletionTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func aDeletedMemberLeavesNoTraceInAChatSomeoneElseOwns(_ store: TestServer.StoreKind) async throws {
        let f = try await TranslationFixture.make(languages: ["alice": "en", "bruno": "pt"], members: ["bruno", "chen"], store: store)
        let alice = try await f.connect("alice")
        let bruno = try await f.connect("bruno")
        try await bruno.say(f.room, "bom dia a todos")
        _ = try await alice.readChat(messages: 1)
        try await alice.say(f.room, "good morning")
        _ = try await alice.readChat(messages: 1)

        let deleted = try await TestHTTPClient.request(port: f.server.port, .DELETE, "/v1/me", token: f.tokens["bruno"]!)
        #expect(deleted.status == .ok)
        // The chat is live (alice is in it): what it answers now comes from memory, and after a
        // restart from the store; neither may hold bruno.
        func expectNoTrace(_ server: TestServer) async throws {
            let detail = try await server.get("/v1/rooms/\(f.room)", token: f.tokens["alice"]!)
            #expect(detail.status == .ok)
            #expect(!detail.text.contains("bruno") && !detail.text.contains("bom dia"), "\(detail.text)")
            let transcript = try #require(try detail.json()["transcript"]?.arrayValue)
            #expect(transcript.map { $0["text"] } == [.string("good morning")])
        }
        try await expectNoTrace(f.server)
        let restarted = try await f.server.restarted()
        try await expectNoTrace(restarted)
        await restarted.stop()
    }
}
