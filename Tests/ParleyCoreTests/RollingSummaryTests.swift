import ParleyCore
import Testing

@Suite struct RollingSummaryTests {
    func turns(_ count: Int, words: Int = 10) -> [Message] {
        let text = Array(repeating: "word", count: words).joined(separator: " ")
        return (0..<count).map { (i: Int) -> Message in
            let role: Role = i % 2 == 0 ? .user : .assistant
            return Message(id: "msg_\(1_000 + i)", conversation: "cv", role: role, text: text, createdAt: Int64(i))
        }
    }

    @Test func nothingFoldsWhileTheTurnsFitTheirShare() {
        let rolling = RollingSummary(contextBudget: 1_000)
        #expect(rolling.toFold(turns: turns(10), systemText: "You are Ada.").isEmpty)
        #expect(rolling.toFold(turns: turns(2, words: 2_000), systemText: "You are Ada.").isEmpty, "the newest two stay whole")
    }

    @Test func theOldestFoldUntilTheRestFillsHalfTheirShare() {
        let rolling = RollingSummary(contextBudget: 1_000)
        let all = turns(60)
        let folded = rolling.toFold(turns: all, systemText: "You are Ada.")
        #expect(!folded.isEmpty && folded == Array(all.prefix(folded.count)))
        let fixed = Tokenizer.count("You are Ada.") + PromptAssembler.perMessageOverhead * 2 + rolling.summaryTokens
        let allowance = (1_000 - fixed) * RollingSummary.historyShare / 100
        let rest = all.dropFirst(folded.count).reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
        #expect(rest <= allowance / 2)
        #expect(rest + Tokenizer.count(all[folded.count - 1].text) + PromptAssembler.perMessageOverhead > allowance / 2, "no more than needed")
        // A long run folds a part at a time: what fits the summarizing prompt.
        let long = turns(400, words: 60)
        let part = rolling.toFold(turns: long, systemText: "You are Ada.")
        let cost = part.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
        #expect(!part.isEmpty && part.count < 398 && cost <= 1_000 - rolling.summaryTokens * 2 - 128)
    }

    @Test func theSummaryAppliesOnlyBelowTheMessageAnswered() {
        let history = turns(6)
        let summary = ConversationSummary(text: "s", through: "msg_0999")
        let applied = RollingSummary.turns(after: summary, throughIsOnPath: true, history: history)
        #expect(applied.summary == summary && applied.turns == history)
        let mid = ConversationSummary(text: "s", through: history[2].id)
        #expect(RollingSummary.turns(after: mid, throughIsOnPath: true, history: history).turns == Array(history.dropFirst(3)))
        #expect(RollingSummary.turns(after: mid, throughIsOnPath: false, history: history).summary == nil, "another branch's")
        // An edit of the message it runs through, or of one before it: the prompt's history ends there.
        #expect(RollingSummary.turns(after: mid, throughIsOnPath: true, history: Array(history.prefix(2)) + [history[5]]).summary == nil)
        #expect(RollingSummary.turns(after: mid, throughIsOnPath: true, history: [history[5]]).summary == nil)
    }

    @Test func theSummaryIsInThePromptAndPaidForInItsBudget() {
        let clone = Clone(id: "cl", owner: "a", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
        let summary = Array(repeating: "fact", count: 50).joined(separator: " ")
        let without = PromptAssembler(contextBudget: 200).assemble(clone: clone, history: turns(30))
        let with = PromptAssembler(contextBudget: 200).assemble(clone: clone, history: turns(30), summary: summary)
        #expect(with.messages[0].text.hasSuffix("What was said earlier in this conversation, in short:\n" + summary))
        #expect(with.estimatedTokens <= 200 && without.estimatedTokens <= 200)
        #expect(with.messages.count < without.messages.count, "the summary takes the place of turns")
        let prompt = RollingSummary(contextBudget: 200).prompt(summary: "Old.", folding: Array(turns(2)), user: "The user", clone: "Ada")
        #expect(prompt[1].text.hasPrefix("Summary so far:\nOld.\n\nNew messages:\nThe user: word"))
        #expect(prompt[1].text.contains("\nAda: word"))
    }

    @Test func learnedFactsAreTheNewBulletsWithinTheLimit() {
        let answer = "Here you go:\n- The user has a sister, Wilhelmina.\n* the user lives in Porto\n- The user lives in Porto\nnone\n-\n- none"
        #expect(LearnedFacts.parse(answer, known: [], limit: 10) == ["The user has a sister, Wilhelmina.", "the user lives in Porto"])
        #expect(LearnedFacts.parse(answer, known: ["THE USER LIVES IN PORTO"], limit: 10) == ["The user has a sister, Wilhelmina."])
        #expect(LearnedFacts.parse(answer, known: ["a", "b"], limit: 3) == ["The user has a sister, Wilhelmina."])
        #expect(LearnedFacts.parse(answer, known: ["a", "b", "c"], limit: 3).isEmpty)
        let long = "- " + Array(repeating: "word", count: 100).joined(separator: " ")
        let cut = LearnedFacts.parse(long, known: [], limit: 1)
        #expect(cut.count == 1 && cut[0].count <= LearnedFacts.maxLength && cut[0].hasSuffix("word"))
        let prompt = LearnedFacts.prompt(known: ["likes tea"], from: turns(3), user: "The user")
        #expect(prompt[1].text.hasPrefix("Already known:\n- likes tea\n\nMessages from The user:\n- word"))
        #expect(prompt[1].text.components(separatedBy: "\n- word").count == 3, "the user's two messages, not the reply")
    }
}
