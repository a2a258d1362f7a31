import ParleyCore
import Testing

@Suite struct TurnTakingTests {
    func room(_ policy: Room.TurnPolicy, muted: [String] = []) -> Room {
        Room(
            id: "rm_1", owner: "mod", topic: "Is cheese a dessert?",
            debaters: [
                Room.Debater(clone: "a", stance: "cheese is dessert", name: "Ada"),
                Room.Debater(clone: "b", stance: "savory always", name: "Bob"),
                Room.Debater(clone: "c", stance: "depends on wine", name: "Cy"),
            ],
            rounds: 2, policy: policy, maxTokensPerTurn: 50, visibility: .link, muted: muted, createdAt: 0, updatedAt: 0)
    }

    func turn(_ clone: String, _ text: String = "I think so.", reason: StreamEndReason = .complete) -> RoomEntry {
        RoomEntry(id: "re_\(clone)\(text.count)", room: "rm_1", kind: .turn, speaker: clone, text: text, createdAt: 0, reason: reason)
    }

    func said(_ text: String) -> RoomEntry {
        RoomEntry(id: "re_s\(text.count)", room: "rm_1", kind: .said, speaker: "viewer", text: text, createdAt: 0)
    }

    @Test func roundRobinGoesInListedOrderSkippingMutedAndRetriesACutShortTurn() {
        let r = room(.roundRobin)
        #expect(TurnTaking.next(room: r, transcript: [], requested: nil) == "a")
        #expect(TurnTaking.next(room: r, transcript: [turn("a")], requested: nil) == "b")
        #expect(TurnTaking.next(room: r, transcript: [turn("a"), turn("b"), turn("c")], requested: nil) == "a")
        #expect(TurnTaking.next(room: r, transcript: [turn("a"), said("hello")], requested: nil) == "b")
        #expect(TurnTaking.next(room: room(.roundRobin, muted: ["b"]), transcript: [turn("a")], requested: nil) == "c")
        #expect(TurnTaking.next(room: r, transcript: [turn("a"), turn("b", reason: .cancelled)], requested: nil) == "b")
        #expect(TurnTaking.next(room: r, transcript: [turn("a")], requested: "c") == "c")
        #expect(TurnTaking.next(room: room(.roundRobin, muted: ["a", "b", "c"]), transcript: [], requested: nil) == nil)
        #expect(TurnTaking.after("c", in: r) == "a")
        #expect(TurnTaking.after("a", in: room(.roundRobin, muted: ["b"])) == "c")
    }

    @Test func theModeratorPicksEverySpeaker() {
        let r = room(.moderator)
        #expect(TurnTaking.next(room: r, transcript: [], requested: nil) == nil)
        #expect(TurnTaking.next(room: r, transcript: [turn("a")], requested: nil) == nil)
        #expect(TurnTaking.next(room: r, transcript: [turn("a")], requested: "a") == "a")
        #expect(TurnTaking.next(room: r, transcript: [], requested: "nobody") == nil)
        #expect(TurnTaking.next(room: room(.moderator, muted: ["b"]), transcript: [], requested: "b") == nil)
    }

    @Test func naturalGivesTheFloorToWhoeverIsAddressedElseTheMostRelevant() {
        let r = room(.natural)
        // Addressed by name, in a turn or an interjection.
        #expect(TurnTaking.next(room: r, transcript: [turn("a", "Cy, what do you say?")], requested: nil) == "c")
        #expect(TurnTaking.next(room: r, transcript: [turn("a"), said("bob: answer that")], requested: nil) == "b")
        // Whoever just spoke does not answer themselves, even when they name themselves.
        #expect(TurnTaking.next(room: r, transcript: [turn("a", "As Ada I insist")], requested: nil) == "b")
        // No name: the stance sharing most words with the newest entry.
        #expect(TurnTaking.next(room: r, transcript: [turn("a", "Surely the wine decides everything")], requested: nil) == "c")
        #expect(TurnTaking.next(room: r, transcript: [turn("c", "Savory dishes always win")], requested: nil) == "b")
        // Nothing to go on: round robin.
        #expect(TurnTaking.next(room: r, transcript: [], requested: nil) == "a")
        #expect(TurnTaking.next(room: r, transcript: [turn("a", "Hmm.")], requested: nil) == "b")
    }

    @Test func aTurnPromptHoldsPersonaStanceTopicAndTheDebateSoFar() {
        let r = room(.roundRobin)
        let ada = Clone(
            id: "a", owner: "mod", name: "Ada", traits: ["witty"], systemPrompt: "Be sharp.", sliders: [:], memory: [],
            createdAt: 0, updatedAt: 0)
        let transcript = [turn("b", "Cheese belongs before dessert."), said("What about cheesecake?"), turn("a", "Cheesecake proves me right.")]
        let prompt = TurnTaking.prompt(room: r, speaker: ada, transcript: transcript, names: ["a": "Ada", "b": "Bob", "viewer": "Vi"], budget: 4_096)
        let system = prompt.messages[0].text
        #expect(system.contains("Be sharp."))
        #expect(system.contains("Is cheese a dessert?"))
        #expect(system.contains("Your stance: cheese is dessert"))
        #expect(system.contains("Bob, Cy"))
        #expect(prompt.messages.dropFirst().map(\.role) == [.user, .user, .assistant, .user])
        #expect(prompt.messages[1].text == "Bob: Cheese belongs before dessert.")
        #expect(prompt.messages[2].text == "Vi (audience): What about cheesecake?")
        #expect(prompt.messages[3].text == "Cheesecake proves me right.")
        #expect(prompt.messages.last?.text == "(Moderator: Ada, your turn.)")
        // Trimmed to budget from the oldest end.
        let tight = TurnTaking.prompt(room: r, speaker: ada, transcript: transcript, names: [:], budget: Tokenizer.count(system) + 20)
        #expect(tight.droppedMessages > 0)
        #expect(tight.messages.last?.text == "(Moderator: Ada, your turn.)")
    }

    @Test func debateRequestsAreValidated() throws {
        func parse(_ text: String) throws -> DebateRequest { try DebateRequest.parse(try JSONValue.parse(Array(text.utf8)), limits: RoomLimits()) }
        func message(_ text: String) -> String? {
            do {
                _ = try parse(text)
                return nil
            } catch let error as ValidationError { return error.message } catch { return "\(error)" }
        }
        let ok = try parse(#"{"kind":"debate","topic":" Tea or coffee ","clones":[{"clone":"a","stance":"tea"},{"clone":"b"}]}"#)
        #expect(ok.topic == "Tea or coffee")
        #expect(ok.rounds == 3 && ok.policy == .roundRobin && ok.visibility == .private && ok.maxTokensPerTurn == 300)
        #expect(message(#"{"kind":"chat","topic":"x","clones":[]}"#) == "'kind' must be 'debate'")
        #expect(message(#"{"kind":"debate","topic":"x","clones":[{"clone":"a"}]}"#) == "a debate needs 2-8 clones")
        #expect(message(#"{"kind":"debate","topic":"x","clones":[{"clone":"a"},{"clone":"a"}]}"#) == "clone a is listed twice")
        #expect(
            message(#"{"kind":"debate","topic":"x","clones":[{"clone":"a"},{"clone":"b"}],"turn_policy":"chaos"}"#)
                == "'turn_policy' must be one of round_robin, moderator, natural")
        #expect(message(#"{"kind":"debate","topic":"x","clones":[{"clone":"a"},{"clone":"b"}],"rounds":0}"#) == "'rounds' must be 1-50")
        #expect(message(#"{"kind":"debate","topic":"x","clones":[{"clone":"a","mood":"x"},{"clone":"b"}]}"#) == "unknown field 'clones[0].mood'")
    }
}
