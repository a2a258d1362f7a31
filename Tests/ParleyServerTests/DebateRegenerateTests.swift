import ParleyCore
import ParleyLLM
import ParleyTestSupport
import Synchronization
import Testing

/// A model whose every reply is numbered ("Take 1.", "Take 2."…) and which records each prompt.
final class NumberingModel: LLMProvider {
    let prompts = Mutex<[CompletionRequest]>([])

    func modelName(for request: CompletionRequest) -> String { "simulated" }

    func stream(_ request: CompletionRequest) -> LLMEventStream {
        let number = prompts.withLock {
            $0.append(request)
            return $0.count
        }
        return LLMEventStream { continuation in
            for token in ["Take", " \(number)", "."] { continuation.yield(.token(token)) }
            continuation.yield(.usage(Usage(inputTokens: 10, outputTokens: 3)))
            continuation.finish()
        }
    }

    var last: CompletionRequest? { prompts.withLock { $0.last } }
}

/// The moderator regenerates a debate's last turn (#24): the same clone speaks again in its place,
/// paid by the moderator; the turn it replaces leaves every later prompt.
@Suite struct DebateRegenerateTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func theLastTurnIsTakenAgainInItsPlaceRunningOrPaused(_ store: TestServer.StoreKind) async throws {
        let model = NumberingModel()
        let f = try await DebateFixture.make(policy: "moderator", rounds: 2, store: store, provider: model)
        let (ada, bob) = (f.clones[0], f.clones[1])
        let mod = try await f.server.connect(token: f.modToken)
        _ = try await mod.join(f.room)
        try await mod.control(f.room, "regenerate")
        #expect(try await mod.next(type: "error").frame["code"] == .string("conflict"), "an open room has no turn")
        try await mod.control(f.room, "start")
        _ = try await mod.roomEvent("started")
        try await mod.control(f.room, "regenerate")
        #expect(try await mod.next(type: "error").frame["code"] == .string("bad_request"), "no turn yet")
        try await mod.control(f.room, "next", target: ada)
        let (_, first) = try await mod.readTurn()
        #expect(first.text == "Take 1.")
        let firstEntry = try #require(try await f.transcript().last?["id"]?.stringValue)
        let viewer = try await f.server.connect(token: try await f.server.token("vic"))
        _ = try await viewer.join(f.room)
        try await viewer.control(f.room, "regenerate")
        #expect(try await viewer.next(type: "error").frame["code"] == .string("forbidden"))
        let balance = try await f.server.get("/v1/credits", token: f.modToken).json()["balance"]?.intValue

        // Running, between turns: Ada speaks again, in place of her turn, which still counts once.
        try await mod.control(f.room, "regenerate")
        let announced = try await mod.roomEvent("regenerating")
        #expect(announced["clone"] == .string(ada) && announced["replaces"] == .string(firstEntry) && announced["by"] == .string("mod"))
        let (turn, second) = try await mod.readTurn()
        #expect(turn["clone"] == .string(ada) && turn["replaces"] == .string(firstEntry) && turn["turn"] == .int(1))
        #expect(second.text == "Take 2.")
        #expect(model.last?.messages.contains { $0.text.contains("Take 1.") } == false, "the take it replaces is not its prompt")
        let transcript = try await f.transcript()
        #expect(transcript.count == 2 && transcript[1]["source"] == .string(firstEntry))
        let room = try await f.server.get("/v1/rooms/\(f.room)", token: f.modToken).json()
        #expect(room["room"]?["turns_taken"] == .int(1))
        let paid = try await f.server.get("/v1/credits", token: f.modToken).json()["balance"]?.intValue
        #expect(paid! < balance!, "the moderator paid for it")

        // Bob answers Ada's second take, not her first.
        try await mod.control(f.room, "next", target: bob)
        let (_, third) = try await mod.readTurn()
        #expect(third.text == "Take 3.")
        let bobsPrompt = try #require(model.last).messages.map(\.text).joined(separator: "\n")
        #expect(bobsPrompt.contains("Take 2.") && !bobsPrompt.contains("Take 1."))

        // Paused: that one turn runs, and the room stays paused.
        try await mod.control(f.room, "pause")
        _ = try await mod.roomEvent("paused")
        try await mod.control(f.room, "regenerate")
        _ = try await mod.roomEvent("regenerating")
        let (again, fourth) = try await mod.readTurn()
        #expect(again["clone"] == .string(bob) && fourth.text == "Take 4.")
        let paused = try await f.server.get("/v1/rooms/\(f.room)", token: f.modToken).json()
        #expect(paused["room"]?["status"] == .string("paused"))
        try await mod.control(f.room, "end")
        _ = try await mod.roomEvent("ended")
        try await mod.control(f.room, "regenerate")
        #expect(try await mod.next(type: "error").frame["code"] == .string("conflict"), "an ended room")
        await f.server.stop()
    }
}
