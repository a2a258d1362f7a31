/// One message of a prompt as a provider sees it.
public struct PromptMessage: Sendable, Equatable {
    public var role: Role
    public var text: String

    public init(role: Role, text: String) {
        self.role = role
        self.text = text
    }
}

public struct AssembledPrompt: Sendable, Equatable {
    /// The system message first, then the kept history in chronological order.
    public var messages: [PromptMessage]
    /// Tokens of the whole prompt as counted by `Tokenizer` plus per-message overhead.
    public var estimatedTokens: Int
    /// History messages left out to fit the budget (the oldest ones).
    public var droppedMessages: Int
}

/// Builds the prompt for a clone's reply: persona first, then as much recent history as fits.
public struct PromptAssembler: Sendable {
    /// Framing tokens a chat format spends on each message (role markers and separators).
    public static let perMessageOverhead = 4

    /// Upper bound for the whole prompt, in tokens.
    public var contextBudget: Int

    public init(contextBudget: Int) {
        self.contextBudget = contextBudget
    }

    /// Messages scanned for lorebook keys, and the lore's token budget, when the card's book sets none.
    public static let defaultLoreScanDepth = 4
    public static let defaultLoreBudget = 512

    /// The persona as one system text: the clone's own prompt, then name, the card's description,
    /// personality and scenario, who it talks with (the user's persona, when they set one),
    /// traits, sliders, memory and example dialogue.
    /// `loreFirst`: lore the card places before the character's definitions (`before_char`).
    public static func systemText(for clone: Clone, loreFirst: String? = nil, user: Persona? = nil) -> String {
        var parts: [String] = []
        let own = Self.expand(clone.systemPrompt, clone, user).trimmedWhitespace
        if !own.isEmpty { parts.append(own) }
        parts.append("You are \(clone.name).")
        if let loreFirst { parts.append(loreFirst) }
        let profile = clone.profile
        for (label, text) in [("Description", profile.description), ("Personality", profile.personality), ("Scenario", profile.scenario)] {
            // Trimmed once expanded: a macro for nothing (`{{persona}}` without one) leaves no space.
            let text = Self.expand(text, clone, user).trimmedWhitespace
            if !text.isEmpty { parts.append("\(label): \(text)") }
        }
        if let user {
            parts.append("You are talking with \(user.name).")
            if !user.description.isEmpty { parts.append("About \(user.name): \(Self.expand(user.description, clone, user))") }
        }
        if !clone.traits.isEmpty {
            parts.append("Traits: \(clone.traits.joined(separator: ", ")).")
        }
        if !clone.sliders.isEmpty {
            let sliders = clone.sliders.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
            parts.append("Personality (0-100): \(sliders.joined(separator: ", ")).")
        }
        if !clone.memory.isEmpty {
            parts.append("Things you remember:\n" + clone.memory.map { "- \($0)" }.joined(separator: "\n"))
        }
        let examples = Self.exampleDialogues(profile.exampleMessages)
        if !examples.isEmpty { parts.append("Examples of how you speak:\n" + Self.expand(examples, clone, user)) }
        return parts.joined(separator: "\n")
    }

    /// A card's `mes_example` as the persona shows it: the dialogues its `<START>` lines (any
    /// case) begin, each trimmed, a blank line between them (the marker is for card tools, not
    /// the model).
    static func exampleDialogues(_ text: String) -> String {
        guard text.contains("<") else { return text.trimmedWhitespace }
        return text.split(separator: Regex<Substring>(verbatim: "<START>").ignoresCase())
            .map { String($0).trimmedWhitespace }.filter { !$0.isEmpty }.joined(separator: "\n\n")
    }

    /// The card's greeting (`first_mes`, or with `choice` k the k-th of `alternate_greetings`;
    /// macros expanded for `user`) that opens a new conversation; nil for none.
    public static func greeting(of clone: Clone, choice: Int = 0, user: Persona? = nil) -> String? {
        let greetings = clone.profile.alternateGreetings
        guard choice == 0 || greetings.indices.contains(choice - 1) else { return nil }
        let text = (choice == 0 ? clone.profile.firstMessage : greetings[choice - 1]).trimmedWhitespace
        return text.isEmpty ? nil : expand(text, clone, user)
    }

    /// Every greeting a new conversation may open with, by `choice` (nil: that one is blank).
    public static func greetings(of clone: Clone, user: Persona? = nil) -> [String?] {
        (0...clone.profile.alternateGreetings.count).map { greeting(of: clone, choice: $0, user: user) }
    }

    /// Card macros (`Macros`): `{{char}}` (and the older `<BOT>`, `<CHAR>`) is the clone, by the
    /// card's nickname when it has one (V3), `{{user}}` (`<USER>`) the person talking to it (their
    /// persona's name, else "User"), `{{persona}}` what their persona says of them.
    static func expand(_ text: String, _ clone: Clone, _ persona: Persona? = nil) -> String {
        guard text.contains("{{") || text.contains("<") else { return text }
        let nickname = clone.profile.nickname
        let char = nickname.isEmpty ? clone.name : nickname
        let user = persona?.name ?? Persona.defaultName
        var macros = Macros(char: char, user: user, persona: persona?.description ?? "", seed: clone.id)
        var out = text.contains("{{") ? macros.expand(text) : text
        guard out.contains("<") else { return out }
        let lowered = out.lowercased()
        for (macro, value) in [("<bot>", char), ("<char>", char), ("<user>", user)] where lowered.contains(macro) {
            out = out.replacing(Regex<Substring>(verbatim: macro).ignoresCase(), with: value)
        }
        return out
    }

    /// The lorebook entries that enter the prompt: enabled ones that are constant or whose key
    /// appears in `recent` (or in the last messages of `history` an entry's `@@scan_depth` says),
    /// as their decorators allow, within `budget` tokens (the lowest priority dropped first), in
    /// insertion order.
    public static func lore(for clone: Clone, recent: [String], budget: Int, history: [String]? = nil) -> [LoreEntry] {
        // Keys are matched as `LoreKeyMatcher` says (bytes, in the newest 64 KiB), in the text as
        // written for a case-sensitive entry, else both lowercased; each index is built once for
        // the book's scan depth and each other one an entry asks.
        let keys = clone.profile.lorebook.reduce(0) { $0 + $1.keys.count }
        // A class, so that a search mutates its matcher in place (through a dictionary's value,
        // each search copied it: a reply of a big book took 2.5 times as long).
        final class Matchers {
            private let messages: [String]
            private let keys: Int
            private var exact: LoreKeyMatcher?
            private var folded: LoreKeyMatcher?
            init(_ messages: [String], keys: Int) {
                self.messages = messages
                self.keys = keys
            }
            func occurs(_ key: String, caseSensitive: Bool) -> Bool {
                if caseSensitive {
                    if exact == nil { exact = LoreKeyMatcher(messages, keys: keys) }
                    return exact!.occurs(key)
                }
                if folded == nil { folded = LoreKeyMatcher(messages.map { $0.lowercased() }, keys: keys) }
                return folded!.occurs(key)
            }
        }
        let book = Matchers(recent, keys: keys)
        var byDepth: [Int: Matchers] = [:]
        // `key` trimmed and not blank, and lowercased unless `caseSensitive`, in the last `depth`
        // messages (nil: `recent`).
        func occursAsSearched(_ key: String, caseSensitive: Bool, depth: Int?) -> Bool {
            var matchers = book
            if let depth {
                if let made = byDepth[depth] {
                    matchers = made
                } else {
                    matchers = Matchers(Array((history ?? recent).suffix(depth)), keys: keys)
                    byDepth[depth] = matchers
                }
            }
            return matchers.occurs(key, caseSensitive: caseSensitive)
        }
        func occurs(_ key: String, caseSensitive: Bool, depth: Int?) -> Bool {
            let key = key.trimmedWhitespace
            return !key.isEmpty && occursAsSearched(caseSensitive ? key : key.lowercased(), caseSensitive: caseSensitive, depth: depth)
        }
        let triggered = clone.profile.lorebook.enumerated().filter { _, entry in
            guard entry.enabled, !entry.promptContent.trimmedWhitespace.isEmpty else { return false }
            let decorators = entry.decorators
            if decorators.contains(.activate) { return true }
            if decorators.contains(.dontActivate) { return false }
            // SillyTavern's chance, drawn once the entry is found, or constant (`@@activate` is in
            // whatever it says).
            func drawn() -> Bool {
                let chance = entry.probability
                return chance >= 100 || (chance > 0 && Int.random(in: 0..<100) < chance)
            }
            if entry.constant == true { return drawn() }
            let caseSensitive = entry.isCaseSensitive
            let depth = entry.scanDepth
            let searched = caseSensitive ? entry.searchKeys.exact : entry.searchKeys.folded
            guard searched.contains(where: { occursAsSearched($0, caseSensitive: caseSensitive, depth: depth) }) else { return false }
            let found = { (key: String) in occurs(key, caseSensitive: caseSensitive, depth: depth) }
            for decorator in decorators {
                switch decorator {
                case .additionalKeys(let keys): guard keys.contains(where: found) else { return false }
                case .excludeKeys(let keys) where !entry.usesRegex: guard !keys.contains(where: found) else { return false }
                default: break
                }
            }
            return entry.secondaryKeysAllow(found) && drawn()
        }
        // Highest priority first (earlier entries first among equals), kept while they fit.
        var kept: [(Int, LoreEntry)] = []
        var used = 0
        for (index, entry) in triggered.sorted(by: { ($0.1.priority ?? 0, -$0.0) > ($1.1.priority ?? 0, -$1.0) }) {
            let cost = Tokenizer.count(entry.promptContent)
            if used + cost > budget { continue }
            used += cost
            kept.append((index, entry))
        }
        return kept.sorted { ($0.1.insertionOrder, $0.0) < ($1.1.insertionOrder, $1.0) }.map(\.1)
    }

    /// `history` is chronological and ends with the user message being answered. The newest
    /// messages are kept; the last one is always kept, even alone over budget, because a reply
    /// to nothing is worse than a slightly long prompt (its length is capped at the edge).
    /// `summary`, when given, is the rolling summary of the turns before `history`: it follows
    /// the persona, as what was said before. `user`: the persona of the user it talks with, if
    /// they set one.
    public func assemble(clone: Clone, history: [Message], summary: String? = nil, user: Persona? = nil) -> AssembledPrompt {
        let usable = history.filter { !$0.text.isEmpty && $0.role != .system }
        var lore: [LoreEntry] = []
        if !clone.profile.lorebook.isEmpty {
            let book = clone.profile.bookSettings
            let depth = book["scan_depth"]?.intValue.map { Int(clamping: $0) } ?? Self.defaultLoreScanDepth
            let budget = book["token_budget"]?.intValue.map { Int(clamping: $0) } ?? Self.defaultLoreBudget
            lore = Self.lore(
                for: clone, recent: usable.suffix(max(0, depth)).map(\.text), budget: min(budget, contextBudget / 4), history: usable.map(\.text))
        }
        // An entry placed `before_char` goes before the character's definitions, one placed at a
        // depth (SillyTavern's) among the messages, the others after the persona.
        func block(_ entries: [LoreEntry]) -> String? {
            entries.isEmpty
                ? nil
                : "What you know that matters here:\n"
                    + entries.map { "- " + Self.expand($0.promptContent.trimmedWhitespace, clone, user) }.joined(separator: "\n")
        }
        let placed = lore.map { ($0, $0.placement) }
        var systemText = Self.systemText(for: clone, loreFirst: block(placed.filter { $0.1 == .beforeCharacter }.map(\.0)), user: user)
        if let after = block(placed.filter { $0.1 == .afterCharacter }.map(\.0)) { systemText += "\n" + after }
        if let summary = summary?.trimmedWhitespace, !summary.isEmpty {
            systemText += "\nWhat was said earlier in this conversation, in short:\n" + summary
        }
        let system = PromptMessage(role: .system, text: systemText)
        let instructions = Self.expand(clone.profile.postHistoryInstructions, clone, user).trimmedWhitespace
        let after = instructions.isEmpty ? nil : PromptMessage(role: .system, text: instructions)
        // What goes among the messages, by depth: the character's note, then the lore placed at
        // that depth, one message per role in the order its entries go in.
        var loreAtDepth: [(depth: Int, message: PromptMessage)] = []
        for (entry, place) in placed {
            guard case .atDepth(let depth, let role) = place else { continue }
            let text = Self.expand(entry.promptContent.trimmedWhitespace, clone, user)
            if let same = loreAtDepth.firstIndex(where: { $0.depth == depth && $0.message.role == role }) {
                loreAtDepth[same].message.text += "\n" + text
            } else {
                loreAtDepth.append((depth, PromptMessage(role: role, text: text)))
            }
        }
        let note = clone.profile.characterNote.map { ($0.depth, PromptMessage(role: $0.role, text: Self.expand($0.text, clone, user))) }
        let inserts = (note.map { [$0] } ?? []) + loreAtDepth
        var total = Tokenizer.count(system.text) + Self.perMessageOverhead
        for extra in [after].compactMap(\.self) + inserts.map(\.message) { total += Tokenizer.count(extra.text) + Self.perMessageOverhead }
        var kept: [PromptMessage] = []
        var dropped = 0
        for (offset, message) in usable.reversed().enumerated() {
            let cost = Tokenizer.count(message.text) + Self.perMessageOverhead
            if offset > 0, total + cost > contextBudget {
                dropped = usable.count - offset
                break
            }
            total += cost
            kept.append(PromptMessage(role: message.role, text: message.text))
        }
        // Each insert goes `depth` messages from the end of the history kept (past its start,
        // first), and post_history_instructions after them all, where the card wants them.
        let history = Array(kept.reversed())
        var body: [PromptMessage] = []
        for index in 0...history.count {
            body += inserts.filter { max(0, history.count - $0.depth) == index }.map(\.message)
            if index < history.count { body.append(history[index]) }
        }
        return AssembledPrompt(messages: [system] + body + (after.map { [$0] } ?? []), estimatedTokens: total, droppedMessages: dropped)
    }
}
