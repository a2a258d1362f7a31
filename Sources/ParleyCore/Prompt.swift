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

    /// The persona as one system text: the clone's own prompt, then name, traits, sliders and memory.
    public static func systemText(for clone: Clone) -> String {
        var parts: [String] = []
        let own = clone.systemPrompt.trimmedWhitespace
        if !own.isEmpty { parts.append(own) }
        parts.append("You are \(clone.name).")
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
        return parts.joined(separator: "\n")
    }

    /// `history` is chronological and ends with the user message being answered. The newest
    /// messages are kept; the last one is always kept, even alone over budget, because a reply
    /// to nothing is worse than a slightly long prompt (its length is capped at the edge).
    public func assemble(clone: Clone, history: [Message]) -> AssembledPrompt {
        let system = PromptMessage(role: .system, text: Self.systemText(for: clone))
        var total = Tokenizer.count(system.text) + Self.perMessageOverhead
        var kept: [PromptMessage] = []
        var dropped = 0
        let usable = history.filter { !$0.text.isEmpty && $0.role != .system }
        for (offset, message) in usable.reversed().enumerated() {
            let cost = Tokenizer.count(message.text) + Self.perMessageOverhead
            if offset > 0, total + cost > contextBudget {
                dropped = usable.count - offset
                break
            }
            total += cost
            kept.append(PromptMessage(role: message.role, text: message.text))
        }
        return AssembledPrompt(messages: [system] + kept.reversed(), estimatedTokens: total, droppedMessages: dropped)
    }
}
