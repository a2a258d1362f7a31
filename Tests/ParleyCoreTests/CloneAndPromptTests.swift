import ParleyCore
import Testing

@Suite struct CloneFieldsTests {
    func parse(_ text: String, requireName: Bool = true) throws(ValidationError) -> CloneFields {
        try CloneFields.parse(try! JSONValue.parse(Array(text.utf8)), requireName: requireName)
    }

    func message(_ text: String, requireName: Bool = true) -> String? {
        do {
            _ = try parse(text, requireName: requireName)
            return nil
        } catch { return error.message }
    }

    @Test func acceptsAFullClone() throws {
        let fields = try parse(
            #"{"name":" Ada ","traits":["curious"],"system_prompt":"Be kind.","sliders":{"warmth":80,"humor":0},"memory":["likes tea"]}"#)
        #expect(
            fields
                == CloneFields(
                    name: "Ada", traits: ["curious"], systemPrompt: "Be kind.", sliders: ["warmth": 80, "humor": 0], memory: ["likes tea"]))
    }

    @Test func rejectsWhatIsWrongWithAClearMessage() {
        #expect(message(#"{}"#) == "missing field 'name'")
        #expect(message(#"{"name":"   "}"#) == "'name' must not be empty")
        #expect(message(#"{"name":"A","sliders":{"warmth":101}}"#) == "slider 'warmth' must be between 0 and 100")
        #expect(message(#"{"name":"A","sliders":{"warmth":50.5}}"#) == "'sliders.warmth' must be an integer, not number")
        #expect(message(#"{"name":"A","sliders":{"Warmth!":5}}"#)?.hasPrefix("slider name 'Warmth!'") == true)
        #expect(message(#"{"name":"A","traits":"curious"}"#) == "'traits' must be an array of strings")
        #expect(message(#"{"name":"A","memory":[""]}"#) == "'memory[0]' must not be empty")
        #expect(message(#"{"name":"A","id":"cl_x"}"#) == "unknown field 'id'")
        #expect(message(#"{"name":"\#(String(repeating: "x", count: 81))"}"#) == "'name' is longer than 80 characters")
        #expect(message("[]") == "body must be a JSON object, not array")
        #expect(message(#"{"name":"A","traits":[\#((0..<33).map { "\"t\($0)\"" }.joined(separator: ","))]}"#) == "'traits' has more than 32 entries")
    }

    @Test func patchNeedsNoNameAndChangesOnlyWhatItNames() throws {
        let fields = try parse(#"{"traits":["bold"]}"#, requireName: false)
        let clone = Clone(
            id: "cl", owner: "u", name: "Ada", traits: ["shy"], systemPrompt: "p", sliders: ["a": 1], memory: ["m"], createdAt: 1, updatedAt: 1)
        let patched = fields.applied(to: clone, at: 5)
        #expect(patched.traits == ["bold"])
        #expect(patched.name == "Ada" && patched.systemPrompt == "p" && patched.sliders == ["a": 1] && patched.memory == ["m"])
        #expect(patched.updatedAt == 5 && patched.createdAt == 1)
        #expect(patched.model == nil)
    }

    @Test func aModelIsNamedKeptOrResetToTheDefault() throws {
        let clone = Clone(id: "cl", owner: "u", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 1, updatedAt: 1)
        let named = try parse(#"{"model":"big-model"}"#, requireName: false)
        #expect(named.model == .named("big-model"))
        let withModel = named.applied(to: clone, at: 2)
        #expect(withModel.model == "big-model")
        #expect(try parse(#"{"name":"Ada"}"#, requireName: false).applied(to: withModel, at: 3).model == "big-model")
        let reset = try parse(#"{"model":null}"#, requireName: false)
        #expect(reset.model == .serverDefault)
        #expect(reset.applied(to: withModel, at: 4).model == nil)
        #expect(message(#"{"name":"A","model":""}"#) == "'model' must be 1-200 bytes, or null for the default")
        #expect(message(#"{"name":"A","model":5}"#) == "'model' must be a string, not number")
    }

    @Test func profileFieldsChangeOneByOneAndTheRestOfTheCardStays() throws {
        var clone = Clone(id: "cl", owner: "u", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 1, updatedAt: 1)
        clone.profile.description = "a lighthouse keeper"
        clone.profile.firstMessage = "Ahoy."
        clone.profile.lorebook = [LoreEntry(keys: ["lamp"], content: "The lamp is old.")]
        clone.profile.rest = [("creator_notes", .string("kept"))]
        let fields = try parse(#"{"profile":{"first_mes":"Welcome, {{user}}.","alternate_greetings":[" Hi! "],"scenario":""}}"#, requireName: false)
        let patched = fields.applied(to: clone, at: 2)
        #expect(patched.profile.firstMessage == "Welcome, {{user}}." && patched.profile.alternateGreetings == ["Hi!"])
        #expect(patched.profile.scenario == "" && patched.profile.description == "a lighthouse keeper")
        #expect(patched.profile.lorebook == clone.profile.lorebook)
        #expect(JSONValue.object(patched.profile.rest) == .object([("creator_notes", .string("kept"))]))
        #expect(message(#"{"profile":{"first_mes":1}}"#, requireName: false) == "'profile.first_mes' must be a string, not number")
        #expect(
            message(#"{"profile":{"alternate_greetings":[2]}}"#, requireName: false)
                == "'profile.alternate_greetings[0]' must be a string, not number")
        #expect(
            message(#"{"profile":{"lorebook":[]}}"#, requireName: false)
                == "'profile.lorebook' changes only by importing a card (POST /v1/clones/import)")
        #expect(message(#"{"profile":{"tags":[]}}"#, requireName: false)?.hasPrefix("unknown field 'profile.tags'; editable: description") == true)
        #expect(message(#"{"profile":"x"}"#, requireName: false) == "'profile' must be a JSON object, not string")
        #expect(
            message(#"{"profile":{"scenario":"\#(String(repeating: "x", count: 32_001))"}}"#, requireName: false)
                == "'profile.scenario' is longer than 32000 characters")
    }
}

@Suite struct PromptAssemblerTests {
    let clone = Clone(
        id: "cl", owner: "u", name: "Ada", traits: ["curious", "warm"], systemPrompt: "Speak plainly.",
        sliders: ["warmth": 80, "humor": 20], memory: ["Her cat is Tom."], createdAt: 0, updatedAt: 0
    )

    func history(_ count: Int, wordsEach: Int = 10) -> [Message] {
        (0..<count).map { i in
            Message(
                id: "m\(i)", conversation: "c", role: i % 2 == 0 ? .user : .assistant,
                text: (0..<wordsEach).map { _ in "word" }.joined(separator: " ") + " #\(i)", createdAt: Int64(i))
        }
    }

    @Test func systemTextCarriesTheWholePersona() {
        let text = PromptAssembler.systemText(for: clone)
        #expect(
            text
                == "Speak plainly.\nYou are Ada.\nTraits: curious, warm.\nPersonality (0-100): humor 20, warmth 80.\nThings you remember:\n- Her cat is Tom."
        )
    }

    @Test func everythingFitsInALargeBudget() {
        let prompt = PromptAssembler(contextBudget: 100_000).assemble(clone: clone, history: history(10))
        #expect(prompt.messages.count == 11)
        #expect(prompt.messages.first?.role == .system)
        #expect(prompt.droppedMessages == 0)
        #expect(prompt.messages.last?.text.hasSuffix("#9") == true)
    }

    @Test func theNewestMessagesAreKeptWithinBudget() {
        let system = Tokenizer.count(PromptAssembler.systemText(for: clone)) + PromptAssembler.perMessageOverhead
        let perMessage = Tokenizer.count(history(1)[0].text) + PromptAssembler.perMessageOverhead
        let budget = system + perMessage * 3 + perMessage / 2
        let prompt = PromptAssembler(contextBudget: budget).assemble(clone: clone, history: history(10))
        #expect(prompt.messages.dropFirst().map { $0.text.split(separator: "#").last! } == ["7", "8", "9"])
        #expect(prompt.droppedMessages == 7)
        #expect(prompt.estimatedTokens <= budget)
    }

    @Test func theLastMessageIsKeptEvenOverBudget() {
        let prompt = PromptAssembler(contextBudget: 1).assemble(clone: clone, history: history(3, wordsEach: 50))
        #expect(prompt.messages.count == 2)
        #expect(prompt.messages.last?.text.hasSuffix("#2") == true)
        #expect(prompt.droppedMessages == 2)
    }
}

@Suite struct TrimmedWhitespaceTests {
    /// What trimming means, character by character (the fast path for strings that begin and end
    /// with printable ASCII must agree with it).
    static func characterwise(_ s: String) -> String {
        guard let first = s.firstIndex(where: { !$0.isWhitespace }) else { return "" }
        return String(s[first...s.lastIndex(where: { !$0.isWhitespace })!])
    }

    @Test func agreesWithTrimmingCharacterByCharacter() {
        let ends = ["", " ", "\t", "\n", "\r\n", "\u{00A0}", "\u{3000}", "\u{2028}", "\u{0085}", "a", "~", "!", "é", "e\u{0301}", "\u{0600}", "🌊"]
        let middles = ["", "x", " x ", "a b", "\u{0301}", "\u{200D}", "ab\u{00A0}cd"]
        for head in ends {
            for middle in middles {
                for tail in ends {
                    let s = head + middle + tail
                    #expect(s.trimmedWhitespace == Self.characterwise(s), "\(Array(s.unicodeScalars))")
                }
            }
        }
        #expect("  Fact one \n".trimmedWhitespace == "Fact one" && "\u{0600}a ".trimmedWhitespace == "\u{0600}a")
    }
}

@Suite struct FitsCharactersTests {
    /// `fits(characters:)` says what counting every character says, for any limit, however many
    /// bytes each character takes (ASCII, two-byte letters, combining marks, CRLF, joined emoji).
    @Test func agreesWithCountingEveryCharacter() {
        let pieces = ["a", "é", "e\u{0301}", "\r\n", "🌊", "👩‍👩‍👧", "\u{3000}", " "]
        var strings = [""]
        for piece in pieces {
            for length in 1...5 { strings.append(String(repeating: piece, count: length)) }
        }
        strings += ["héllo🌊\r\nworld", pieces.joined(), pieces.joined(separator: "x")]
        for string in strings {
            for limit in 0...(string.utf8.count + 1) {
                #expect(string.fits(characters: limit) == (string.count <= limit), "\(Array(string.unicodeScalars)) within \(limit)")
            }
        }
    }
}
