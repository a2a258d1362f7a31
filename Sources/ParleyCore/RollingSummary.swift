/// What a conversation's rolling summary holds: the oldest turns of its path folded into a few
/// sentences by the clone's model, through the message `through` (the last one folded).
public struct ConversationSummary: Sendable, Equatable {
    public var text: String
    /// The last message it covers. A message's ancestors never change, so the summary is right
    /// for any path on which this message lies before the message being answered.
    public var through: String

    public init(text: String, through: String) {
        self.text = text
        self.through = through
    }
}

/// When and what to fold into a conversation's rolling summary (#24), so that a long
/// conversation's prompt keeps what was said early while its recent turns stay whole. Pure: the
/// chat service asks it after each reply and runs the model it asks for.
///
/// The turns after the summary may fill `historyShare` of the budget left once the persona and
/// the summary are paid for; past that, the oldest of them are folded until they fill half of it
/// (so folding happens every few turns, not every turn), the newest two always left whole.
public struct RollingSummary: Sendable {
    public var contextBudget: Int

    public init(contextBudget: Int) { self.contextBudget = contextBudget }

    /// The share (percent) of the budget the turns after the summary may use before they fold:
    /// the rest is the next message's and the lore's.
    public static let historyShare = 75
    /// The summary's own size: at most this many tokens (and an eighth of the budget).
    public static let maxSummaryTokens = 256

    public var summaryTokens: Int { min(Self.maxSummaryTokens, max(32, contextBudget / 8)) }

    /// The oldest messages of `turns` (the path after the summary, chronological) to fold now,
    /// given the persona's system text; empty while everything fits. The folded run also fits
    /// the summarizing prompt: what does not is left for the next fold.
    public func toFold(turns: [Message], systemText: String) -> [Message] {
        let usable = turns.filter { !$0.text.isEmpty && $0.role != .system }
        guard usable.count > 2 else { return [] }
        let fixed = Tokenizer.count(systemText) + PromptAssembler.perMessageOverhead * 2 + summaryTokens
        let allowance = max(0, contextBudget - fixed) * Self.historyShare / 100
        let costs = usable.map { Tokenizer.count($0.text) + PromptAssembler.perMessageOverhead }
        var total = costs.reduce(0, +)
        guard total > allowance else { return [] }
        // The summarizing prompt holds the summary so far, the run and its instructions.
        let foldable = max(0, contextBudget - summaryTokens * 2 - 128)
        var folded = 0
        var foldedCost = 0
        while folded < usable.count - 2, total > allowance / 2, foldedCost + costs[folded] <= foldable || folded == 0 {
            total -= costs[folded]
            foldedCost += costs[folded]
            folded += 1
        }
        return Array(usable.prefix(folded))
    }

    /// The summarizing request: the summary so far and the turns to fold, as one user message
    /// under instructions that keep every fact the user gave.
    public func prompt(summary: String?, folding turns: [Message], user: String, clone: String) -> [PromptMessage] {
        let words = summaryTokens * 3 / 4
        let system = """
            You keep the running summary of a long conversation between \(user) (the user) and \(clone). \
            Rewrite the summary so that it also covers the new messages. Keep every fact the user told about themselves \
            (names, places, dates, preferences, plans) and what was agreed, in the user's words where they matter. \
            Write at most \(words) words of plain prose and nothing else.
            """
        var text = "Summary so far:\n" + ((summary?.isEmpty ?? true) ? "(none yet)" : summary!) + "\n\nNew messages:\n"
        for turn in turns {
            text += (turn.role == .user ? user : clone) + ": " + turn.text + "\n"
        }
        return [PromptMessage(role: .system, text: system), PromptMessage(role: .user, text: text)]
    }

    /// The turns of `history` (a path's newest messages, chronological, ending with the message
    /// answered, which may be an edit not stored yet) after `summary`, and whether the summary
    /// applies: it does when the message it runs through is on the path (`onPath`) at or before
    /// the message the answered one follows, so it is among that message's ancestors. Otherwise (an
    /// edit or a regenerate at or above it, a deleted message) it describes another branch and is
    /// left out.
    public static func turns(
        after summary: ConversationSummary?, throughIsOnPath onPath: Bool, history: [Message]
    ) -> (
        summary: ConversationSummary?, turns: [Message]
    ) {
        guard let summary, onPath, history.count >= 2, summary.through <= history[history.count - 2].id else { return (nil, history) }
        return (summary, history.filter { $0.id > summary.through })
    }
}

/// Facts a clone keeps about its user (#24): drawn by the clone's model from the turns a fold
/// takes out of the prompt, added to the clone's memory (which every prompt of the clone holds,
/// and which the user reads, edits and deletes as the clone's `memory`).
public enum LearnedFacts {
    /// Tokens the model may spend listing them.
    public static let maxTokens = 96
    /// A fact longer than this is cut (at a word).
    public static let maxLength = 200

    /// The request: what the clone already remembers, and the user's words to draw from.
    public static func prompt(known: [String], from turns: [Message], user: String) -> [PromptMessage] {
        let system = """
            You note what a user says about themselves. From the user's messages below, list each fact the user \
            stated about themselves or their life (names, places, dates, preferences, plans) that is not already known, \
            one per line starting with "- ", in a short sentence about "the user". If there is none, answer "none".
            """
        var text = "Already known:\n" + (known.isEmpty ? "(nothing)" : known.map { "- " + $0 }.joined(separator: "\n"))
        text += "\n\nMessages from \(user):\n" + turns.filter { $0.role == .user }.map { "- " + $0.text }.joined(separator: "\n")
        return [PromptMessage(role: .system, text: system), PromptMessage(role: .user, text: text)]
    }

    /// The new facts of the model's `answer` (its lines starting with "- " or "* "), without
    /// those `known` holds (case-insensitively) or repeats, each at most `maxLength` characters,
    /// so that `known` plus them stays within `limit` entries.
    public static func parse(_ answer: String, known: [String], limit: Int) -> [String] {
        var seen = Set(known.map { $0.lowercased() })
        var facts: [String] = []
        for line in answer.split(whereSeparator: \.isNewline) {
            let trimmed = String(line).trimmedWhitespace
            guard trimmed.hasPrefix("- ") || trimmed.hasPrefix("* ") else { continue }
            var fact = String(trimmed.dropFirst(2)).trimmedWhitespace
            if fact.count > maxLength {
                fact = String(fact.prefix(maxLength))
                if let space = fact.lastIndex(of: " ") { fact = String(fact[..<space]) }
            }
            guard !fact.isEmpty, fact.lowercased() != "none", seen.insert(fact.lowercased()).inserted else { continue }
            facts.append(fact)
        }
        return Array(facts.prefix(max(0, limit - known.count)))
    }
}
