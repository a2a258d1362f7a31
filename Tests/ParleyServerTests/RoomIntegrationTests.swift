import Foundation
import NIOHTTP1
import ParleyCore
import ParleyLLM
import ParleyStore
import ParleyTestSupport
import Testing

@testable import ParleyServer

extension TestWebSocket {
    func room(_ type: String, id: String, room: String, _ fields: [(String, JSONValue)] = []) async throws {
        try await send(.object([("type", .string(type)), ("id", .string(id)), ("room", .string(room))] + fields))
    }

    func control(_ room: String, _ action: String, target: String? = nil, id: String = "ctl") async throws {
        var fields: [(String, JSONValue)] = [("action", .string(action))]
        if let target { fields.append(("target", .string(target))) }
        try await self.room("room.control", id: id, room: room, fields)
    }

    /// Joins and returns the `room.state` answer.
    func join(_ room: String) async throws -> JSONValue {
        try await self.room("room.join", id: "j-\(room)", room: room)
        let state = try await nextJSON()
        guard state["type"] == .string("room.state") else { throw TestTimeout(description: "expected room.state, got \(state)") }
        return state
    }

    /// The next `room.event` of kind `event`, skipping any other frame.
    func roomEvent(_ event: String) async throws -> JSONValue {
        while true {
            let frame = try await nextJSON()
            if frame["type"] == .string("room.event"), frame["event"] == .string(event) { return frame }
        }
    }

    /// One debate turn as a member sees it: the `turn` event, then its stream.
    func readTurn() async throws -> (event: JSONValue, reply: StreamedReply) {
        let event = try await roomEvent("turn")
        return (event, try await readReply())
    }
}

/// A frame (or array of frames) without `cost` and `balance`: what members who do not pay see.
func withoutPayment(_ frame: JSONValue) -> JSONValue {
    switch frame {
    case .array(let frames): .array(frames.map(withoutPayment))
    case .object(let pairs): .object(pairs.filter { $0.0 != "cost" && $0.0 != "balance" })
    default: frame
    }
}

/// A server with two (or more) clones and a debate room made by `mod`.
struct DebateFixture {
    var server: TestServer
    var modToken: String
    var clones: [String]
    var room: String

    static func make(
        names: [String] = ["Ada", "Bob"], policy: String = "round_robin", rounds: Int = 2, maxTokens: Int = 300,
        visibility: String = "link", store: TestServer.StoreKind = .sqlite, provider: (any LLMProvider)? = nil,
        _ configure: (inout ServerConfiguration) -> Void = { _ in }
    ) async throws -> DebateFixture {
        let server = try await TestServer.start(store: store, provider: provider) {
            $0.simulated.replyTokens = 6
            configure(&$0)
        }
        let mod = try await server.token("mod")
        var clones: [String] = []
        for name in names { clones.append(try await server.createClone(token: mod, name: name)["id"]!.stringValue!) }
        let body = JSONValue.object([
            ("kind", .string("debate")), ("topic", .string("Is cheese a dessert?")),
            ("clones", .array(clones.enumerated().map { .object([("clone", .string($1)), ("stance", .string("stance \($0)"))]) })),
            ("rounds", .int(Int64(rounds))), ("turn_policy", .string(policy)), ("max_tokens_per_turn", .int(Int64(maxTokens))),
            ("visibility", .string(visibility)),
        ])
        let created = try await TestHTTPClient.json(port: server.port, .POST, "/v1/rooms", token: mod, json: body)
        guard created.status == .created else { throw TestTimeout(description: "room creation answered \(created.status): \(created.text)") }
        return DebateFixture(server: server, modToken: mod, clones: clones, room: try created.json()["id"]!.stringValue!)
    }

    /// The moderator's socket, joined, the debate started and its first turn `tokens` tokens in.
    func moderatorInFirstTurn(tokens: Int = 1) async throws -> TestWebSocket {
        let mod = try await server.connect(token: modToken)
        _ = try await mod.join(room)
        try await mod.control(room, "start")
        _ = try await mod.roomEvent("started")
        _ = try await mod.roomEvent("turn")
        _ = try await mod.nextJSON()  // stream.start
        for _ in 0..<tokens { _ = try await mod.readUntilToken() }
        return mod
    }

    func transcript(token: String? = nil) async throws -> [JSONValue] {
        try await server.get("/v1/rooms/\(room)", token: token ?? modToken).json()["transcript"]!.arrayValue!
    }
}

@Suite struct RoomIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func aRoundRobinDebateRunsItsRoundsAndEveryMemberSeesTheSameFrames(_ store: TestServer.StoreKind) async throws {
        let f = try await DebateFixture.make(store: store)
        let mod = try await f.server.connect(token: f.modToken)
        let viewer = try await f.server.connect(token: try await f.server.token("vic"))
        let state = try await mod.join(f.room)
        #expect(state["room"]?["status"] == .string("open"))
        #expect(state["members"] == .array([.string("mod")]))
        _ = try await viewer.join(f.room)
        #expect(try await mod.roomEvent("joined")["user"] == .string("vic"))

        try await mod.control(f.room, "start")
        var seen: [[JSONValue]] = [[], []]
        for (index, socket) in [mod, viewer].enumerated() {
            _ = try await socket.roomEvent("started")
            for _ in 0..<4 {
                let (event, reply) = try await socket.readTurn()
                #expect(reply.start["room"] == .string(f.room))
                #expect(reply.start["conversation"] == nil)
                #expect(reply.start["clone"] == event["clone"])
                #expect(reply.reason == "complete")
                #expect(reply.seqs == Array(1...6))
                seen[index].append(.array([reply.start] + reply.tokens + [reply.end]))
            }
            #expect(try await socket.roomEvent("ended")["reason"] == .string("rounds_done"))
        }
        // Identical frames, except that only the moderator (who pays) sees cost and balance.
        #expect(seen[0].map(withoutPayment) == seen[1])
        #expect(seen[0].allSatisfy { $0.arrayValue!.last!["balance"] != nil } && seen[1].allSatisfy { $0.arrayValue!.last!["cost"] == nil })
        let speakers = seen[0].map { $0.arrayValue![0]["clone"]!.stringValue! }
        #expect(speakers == [f.clones[0], f.clones[1], f.clones[0], f.clones[1]])

        let transcript = try await f.transcript()
        #expect(transcript.map { $0["clone"]!.stringValue! } == speakers)
        #expect(transcript.allSatisfy { $0["interrupted"] == .bool(false) })
        let room = try await f.server.get("/v1/rooms/\(f.room)", token: f.modToken).json()["room"]!
        #expect(room["status"] == .string("ended"))
        #expect(room["turns_taken"] == .int(4))
        // The moderator paid, under feature `debate`, with the room on every entry.
        let debits = try await creditsOf(f.server, token: f.modToken).entries.filter { $0["feature"] == .string("debate") }
        #expect(!debits.isEmpty && debits.allSatisfy { $0["room"] == .string(f.room) })
        #expect(try await creditsOf(f.server, token: try await f.server.token("vic")).entries.filter { $0["feature"] == .string("debate") }.isEmpty)
        await f.server.stop()
    }

    @Test func onlyTheModeratorModeratesAndPrivateRoomsArePrivate() async throws {
        let f = try await DebateFixture.make()
        let vicToken = try await f.server.token("vic")
        let viewer = try await f.server.connect(token: vicToken)
        _ = try await viewer.join(f.room)
        try await viewer.control(f.room, "start", id: "c1")
        let refused = try await viewer.nextJSON()
        #expect(refused["code"] == .string("forbidden"))
        #expect(refused["ref"] == .string("c1"))

        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.control(f.room, "mute", target: "vic")
        _ = try await mod.roomEvent("muted")
        try await viewer.room("room.say", id: "s1", room: f.room, [("text", .string("let me speak"))])
        #expect(try await viewer.next(type: "error").frame["code"] == .string("forbidden"))

        try await mod.control(f.room, "kick", target: "vic")
        #expect(try await viewer.roomEvent("kicked")["user"] == .string("vic"))
        try await viewer.room("room.join", id: "j2", room: f.room)
        #expect(try await viewer.nextJSON()["code"] == .string("forbidden"))
        #expect(try await f.server.get("/v1/rooms/\(f.room)", token: vicToken).status == .forbidden)

        // A private room is invisible to anyone but its moderator.
        let hidden = try await DebateFixture.make(visibility: "private")
        let stranger = try await hidden.server.connect(token: try await hidden.server.token("eve"))
        try await stranger.room("room.join", id: "j", room: hidden.room)
        #expect(try await stranger.nextJSON()["code"] == .string("not_found"))
        #expect(try await hidden.server.get("/v1/rooms/\(hidden.room)", token: try await hidden.server.token("eve")).status == .notFound)
        await hidden.server.stop()
        await f.server.stop()
    }

    @Test func aLateJoinerCatchesUpOnTheTurnBeingStreamedWithoutGapsOrRepeats() async throws {
        // 3 s per turn: the late joiner connects and joins while the first turn streams, also
        // on a loaded machine.
        let f = try await DebateFixture.make(rounds: 1) {
            $0.simulated.replyTokens = 60
            $0.simulated.tokensPerSecond = 20
        }
        _ = try await f.moderatorInFirstTurn(tokens: 5)

        let late = try await f.server.connect(token: try await f.server.token("vic"))
        let state = try await late.join(f.room)
        #expect(state["speaker"] == .string(f.clones[0]))
        let stream = state["stream"]!
        let reply = try await late.readReply()
        #expect(reply.start["stream"] == stream)
        #expect(reply.seqs == Array(1...60), "replayed and live tokens join without a gap or a repeat")
        #expect(reply.reason == "complete")
        await f.server.stop()
    }

    @Test func anInterjectionReachesTheNextPromptAndNaturalTurnsFollowNames() async throws {
        let f = try await DebateFixture.make(names: ["Ada", "Bob", "Cy"], policy: "natural", rounds: 1)
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.room("room.say", id: "s1", room: f.room, [("text", .string("Cy, is cheesecake a dessert?"))])
        let said = try await mod.roomEvent("said")["entry"]!
        #expect(said["user"] == .string("mod"))

        try await mod.control(f.room, "start")
        _ = try await mod.roomEvent("started")
        let (event, reply) = try await mod.readTurn()
        #expect(event["clone"] == .string(f.clones[2]), "the clone addressed by name speaks first")

        // The reply is what the model gives for a prompt that holds the interjection.
        let room = try #require(try await f.server.server.store.room(id: f.room))
        let cy = try #require(try await f.server.server.store.clone(id: f.clones[2], owner: "mod"))
        let entry = RoomEntry(
            id: said["id"]!.stringValue!, room: f.room, kind: .said, speaker: "mod", text: "Cy, is cheesecake a dessert?", createdAt: 0)
        let prompt = TurnTaking.prompt(
            room: room, speaker: cy, transcript: [entry],
            names: Dictionary(uniqueKeysWithValues: room.debaters.map { ($0.clone, $0.name) }),
            budget: f.server.configuration.contextBudgetTokens)
        #expect(prompt.messages.contains { $0.text == "mod (audience): Cy, is cheesecake a dessert?" })
        let request = CompletionRequest(messages: prompt.messages, speaker: "Cy", maxOutputTokens: room.maxTokensPerTurn)
        #expect(reply.text == SimulatedProvider(configuration: f.server.configuration.simulated).replyTokens(for: request).joined())
        await f.server.stop()
    }

    @Test func underTheModeratorPolicyNobodySpeaksUntilChosen() async throws {
        let f = try await DebateFixture.make(policy: "moderator", rounds: 1)
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.control(f.room, "start")
        _ = try await mod.roomEvent("started")
        try await mod.control(f.room, "next", id: "n0")
        #expect(try await mod.nextJSON()["code"] == .string("bad_request"))
        try await mod.control(f.room, "next", target: f.clones[1])
        #expect(try await mod.roomEvent("next")["clone"] == .string(f.clones[1]))
        #expect(try await mod.readTurn().event["clone"] == .string(f.clones[1]))
        try await mod.control(f.room, "next", target: f.clones[0])
        #expect(try await mod.readTurn().event["clone"] == .string(f.clones[0]))
        _ = try await mod.roomEvent("ended")
        await f.server.stop()
    }

    @Test func aPauseSentOnSeeingStreamEndLeavesTheStoredRoomCountingEveryCompleteTurn() async throws {
        // The moderator's pause and the turn loop both store the room, from different tasks: an
        // older state must never land over a newer one (a turn counted in memory, not in the store).
        // Turns take about two seconds, so the turn after the one seen ending is still running when
        // the pause lands and is cut: a turn that completed in that moment would be stored (its
        // transcript entry, then its count) while the room is read (CI saw that under load).
        let f = try await DebateFixture.make(rounds: 10) {
            $0.simulated.timeToFirstToken = .seconds(1)
            $0.simulated.tokensPerSecond = 6
        }
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.control(f.room, "start")
        for round in 0..<3 {
            _ = try await mod.next(type: "stream.end")
            try await mod.control(f.room, "pause", id: "p\(round)")  // sent the moment stream.end arrived
            _ = try await mod.roomEvent("paused")
            let room = try await f.server.get("/v1/rooms/\(f.room)", token: f.modToken).json()["room"]!
            let complete = try await f.transcript().filter { $0["reason"] == .string("complete") }.count
            #expect(room["status"] == .string("paused") && room["turns_taken"] == .int(Int64(complete)), "\(room)")
            try await mod.control(f.room, "resume", id: "r\(round)")
            _ = try await mod.roomEvent("resumed")
        }
        await f.server.stop()
    }

    @Test func pauseCutsTheTurnShortAndResumeGivesItBack() async throws {
        let f = try await DebateFixture.make(rounds: 1) {
            $0.simulated.replyTokens = 400
            $0.simulated.tokensPerSecond = 100
        }
        let mod = try await f.moderatorInFirstTurn()
        try await mod.control(f.room, "pause")
        let (end, skipped) = try await mod.next(type: "stream.end")
        #expect(end["reason"] == .string("cancelled"))
        if !skipped.contains(where: { $0["event"] == .string("paused") }) { _ = try await mod.roomEvent("paused") }
        let transcript = try await f.transcript()
        #expect(transcript.count == 1 && transcript[0]["interrupted"] == .bool(true))

        try await mod.control(f.room, "resume")
        _ = try await mod.roomEvent("resumed")
        #expect(try await mod.roomEvent("turn")["clone"] == .string(f.clones[0]), "the cut-short turn is taken again")
        try await mod.control(f.room, "end")
        _ = try await mod.roomEvent("ended")
        let room = try await f.server.get("/v1/rooms/\(f.room)", token: f.modToken).json()["room"]!
        #expect(room["status"] == .string("ended"))
        await f.server.stop()
    }

    @Test func runningOutOfCreditsPausesTheRoomAndTellsTheModerator() async throws {
        let f = try await DebateFixture.make(rounds: 3) {
            $0.credits.pricing = PricingTable(models: ["simulated": ModelPrice(inputPer1K: 0, outputPer1K: 1_000)])
            $0.credits.startingGrant = 10
            $0.credits.batchTokens = 2
            $0.credits.outputReserveTokens = 2
        }
        let viewer = try await f.server.connect(token: try await f.server.token("vic"))
        _ = try await viewer.join(f.room)
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.control(f.room, "start")
        let (paywall, skipped) = try await mod.next(type: "paywall")
        #expect(paywall["room"] == .string(f.room))
        #expect(skipped.contains { $0["type"] == .string("token") })
        #expect(try await mod.next(type: "stream.end").frame["reason"] == .string("insufficient_credits"))
        _ = try await mod.roomEvent("paused")
        // The viewer sees the room pause but no paywall: the bill is the moderator's.
        var frames: [JSONValue] = []
        while frames.last?["event"] != .string("paused") { frames.append(try await viewer.nextJSON()) }
        #expect(frames.contains { $0["type"] == .string("stream.end") })
        #expect(!frames.contains { $0["type"] == .string("paywall") })
        #expect(try await creditsOf(f.server, token: f.modToken).balance == 0)
        await f.server.stop()
    }

    @Test func aSlowMemberIsCutOffWithoutSlowingTheOthers() async throws {
        // 2 turns × 1000 tokens of ~80 bytes at 200 tokens/s: a reader that stalls piles up
        // 160 KB, far past the 64 KB limit and the small kernel buffers; a reader that keeps up
        // would have to stall for seconds to be cut off.
        let f = try await DebateFixture.make(rounds: 1, maxTokens: 1_000) {
            $0.simulated.replyTokens = 1_000
            $0.simulated.tokensPerSecond = 200
            $0.maxQueuedBytesPerSocket = 64 * 1024
            $0.socketSendBufferBytes = 4 * 1024
        }
        let vic = try await f.server.token("vic")
        let slow = try await TestWebSocket.connect(port: f.server.port, token: vic, receiveBuffer: 4 * 1024)
        _ = try await slow.nextJSON()
        _ = try await slow.join(f.room)
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await slow.pauseReading()

        try await mod.control(f.room, "start")
        _ = try await mod.roomEvent("started")
        let frames = try await mod.texts(until: { $0.contains(#""event":"ended""#) }).map { try JSONValue.parse(Array($0.utf8)) }
        let seqs = frames.filter { $0["type"] == .string("token") }.map { $0["seq"]!.intValue! }
        #expect(seqs == Array(1...1_000) + Array(1...1_000), "the reader that kept up got every token of both turns")
        #expect(frames.contains { $0["event"] == .string("left") && $0["user"] == .string("vic") }, "the slow member was dropped from the room")

        // The slow reader was cut off: whatever it still gets ends in a 1008 close or EOF,
        // long before 4000 tokens.
        try await slow.resumeReading()
        var tokens = 0
        var closeCode: UInt16?
        loop: while true {
            switch try await slow.next() {
            case .text(let text) where text.contains(#""type":"token""#): tokens += 1
            case .close(let code, _): closeCode = code
            case .disconnected: break loop
            default: continue
            }
        }
        #expect(tokens < 2_000)
        #expect(closeCode == nil || closeCode == 1008)

        // It reconnects and catches up from the stored transcript.
        let again = try await f.server.connect(token: vic)
        let state = try await again.join(f.room)
        #expect(state["transcript"]?.arrayValue?.count == 2)
        #expect(state["room"]?["status"] == .string("ended"))
        await f.server.stop()
    }

    /// Past the presence limit only the moderator hears of joins and leaves, and only the
    /// moderator is told who is in the room on joining: the others get how many.
    @Test func pastThePresenceLimitOnlyTheModeratorHearsOfJoinsAndLeaves() async throws {
        let f = try await DebateFixture.make { $0.frameLimits.rooms.presenceBroadcastMembers = 2 }
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        let ann = try await f.server.connect(token: try await f.server.token("ann"))
        let annState = try await ann.join(f.room)
        #expect(annState["members"] == .array([.string("ann"), .string("mod")]) && annState["member_count"] == .int(2))
        #expect(try await mod.roomEvent("joined")["user"] == .string("ann"))
        let bob = try await f.server.connect(token: try await f.server.token("bob"))
        let bobState = try await bob.join(f.room)  // three sockets now: past the limit
        #expect(bobState["members"] == .array([]) && bobState["member_count"] == .int(3))
        #expect(try await mod.roomEvent("joined")["user"] == .string("bob"))
        let cy = try await f.server.connect(token: try await f.server.token("cy"))
        _ = try await cy.join(f.room)
        #expect(try await mod.roomEvent("joined")["user"] == .string("cy"))
        try await bob.room("room.leave", id: "l", room: f.room)  // three sockets stay
        #expect(try await mod.roomEvent("left")["user"] == .string("bob"))
        // The moderator, joining again from another socket, is told everyone.
        let modAgain = try await f.server.connect(token: f.modToken)
        let modState = try await modAgain.join(f.room)
        #expect(modState["members"] == .array([.string("ann"), .string("cy"), .string("mod")]) && modState["member_count"] == .int(3))
        // Ann heard of neither: the next thing she gets is the moderator's start.
        try await mod.control(f.room, "start")
        let next = try await ann.nextJSON()
        #expect(next["type"] == .string("room.event") && next["event"] == .string("started"))
        await f.server.stop()
    }

    /// A socket that closes leaves every room it was in (the rooms are found from the topics
    /// it followed, not by asking every room in memory), and its user with it when it was the
    /// user's last socket there.
    @Test func aClosedSocketLeavesEveryRoomItWasIn() async throws {
        let f = try await DebateFixture.make()
        let body = JSONValue.object([
            ("kind", .string("debate")), ("topic", .string("Is tea a soup?")),
            ("clones", .array(f.clones.map { .object([("clone", .string($0)), ("stance", .string("yes"))]) })),
            ("rounds", .int(1)), ("visibility", .string("link")),
        ])
        let second = try await TestHTTPClient.json(port: f.server.port, .POST, "/v1/rooms", token: f.modToken, json: body).json()["id"]!.stringValue!
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        _ = try await mod.join(second)
        let annToken = try await f.server.token("ann")
        let (ann, annAgain) = (try await f.server.connect(token: annToken), try await f.server.connect(token: annToken))
        _ = try await ann.join(f.room)
        _ = try await ann.join(second)
        _ = try await annAgain.join(second)
        for _ in 0..<2 { #expect(try await mod.roomEvent("joined")["user"] == .string("ann")) }
        await ann.drop()
        // Ann is out of the first room; her other socket keeps her in the second.
        let left = try await mod.roomEvent("left")
        #expect(left["user"] == .string("ann") && left["room"] == .string(f.room))
        await annAgain.drop()
        let leftAgain = try await mod.roomEvent("left")
        #expect(leftAgain["user"] == .string("ann") && leftAgain["room"] == .string(second))
        let cy = try await f.server.connect(token: try await f.server.token("cy"))
        #expect(try await cy.join(f.room)["members"] == .array([.string("cy"), .string("mod")]))
        #expect(try await cy.join(second)["members"] == .array([.string("cy"), .string("mod")]))
        await f.server.stop()
    }

    @Test func fiveHundredMembersAllReceiveEveryToken() async throws {
        let f = try await DebateFixture.make(rounds: 1) { $0.simulated.replyTokens = 10 }
        var members: [TestWebSocket] = []
        for i in 0..<500 {
            let socket = try await f.server.connect(token: try await f.server.token("u\(i)"))
            _ = try await socket.join(f.room)
            members.append(socket)
        }
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.control(f.room, "start")
        let turns = try await [mod.readTurn().reply, mod.readTurn().reply]
        _ = try await mod.roomEvent("ended")
        // Every member got both turns' frames, identical to the moderator's, in order (others'
        // `joined` events come first and are skipped).
        let expected = turns.flatMap { [$0.start] + $0.tokens + [withoutPayment($0.end)] }
        for socket in members {
            let texts = try await socket.texts(until: { $0.contains(#""event":"ended""#) })
            let frames = try texts.filter { !$0.hasPrefix(#"{"type":"room.event""#) }.map { try JSONValue.parse(Array($0.utf8)) }
            #expect(frames == expected)
        }
        for socket in members { await socket.drop() }
        await f.server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aRestartStoresTheRoomPausedWithTheTurnMarkedInterrupted(_ store: TestServer.StoreKind) async throws {
        var f = try await DebateFixture.make(rounds: 1, store: store) {
            $0.simulated.replyTokens = 400
            $0.simulated.tokensPerSecond = 100
        }
        _ = try await f.moderatorInFirstTurn()
        f.server = try await f.server.restarted()
        let after = try await f.server.get("/v1/rooms/\(f.room)", token: f.modToken).json()
        #expect(after["room"]?["status"] == .string("paused"))
        let turns = after["transcript"]!.arrayValue!
        #expect(turns.count == 1)
        #expect(turns.first?["interrupted"] == .bool(true))
        #expect(turns.first?["reason"] == .string("shutdown"))
        await f.server.stop()
    }
}
