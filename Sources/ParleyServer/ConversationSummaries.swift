import ParleyCore
import ParleyLLM
import ParleyStore

/// A conversation's rolling summary (#24): after a reply, when the turns since the summary no
/// longer fit their share of a prompt (`RollingSummary`), the clone's model folds the oldest of
/// them into it, metered as feature `summary` and paid by the conversation's owner (skipped when
/// they cannot pay: the prompt then leaves those turns out, as before). Every prompt of the
/// conversation then holds the summary after the persona, and the turns after it.
struct ConversationSummaries: Sendable {
    let streams: StreamRunner
    let store: any Store
    let ids: IDGenerator
    let configuration: ServerConfiguration

    var rolling: RollingSummary { RollingSummary(contextBudget: configuration.contextBudgetTokens) }

    /// Folds what no longer fits, if anything; called once a reply in `conversation` is stored,
    /// with the summary its prompt held and the turns after it, the reply included (what the
    /// prompt was made of: nothing is read again, and a reply that folds nothing costs no I/O).
    func fold(_ conversation: Conversation, clone: Clone, summary: ConversationSummary?, turns: [Message]) async {
        let (id, owner) = (conversation.id, conversation.owner)
        do {
            let folding = rolling.toFold(turns: turns, systemText: PromptAssembler.systemText(for: clone))
            guard let through = folding.last else { return }
            let request = CompletionRequest(
                model: configuration.model(for: clone),
                messages: rolling.prompt(summary: summary?.text, folding: folding, user: "The user", clone: clone.name),
                maxOutputTokens: rolling.summaryTokens)
            guard
                let text = await streams.generateQuietly(request, payer: owner, conversation: id, feature: .summary, stream: ids.make(.stream))?
                    .trimmedWhitespace, !text.isEmpty
            else { return }
            // Over what the prompt was made with: a summary written meanwhile stays.
            let stored = try await store.setSummary(
                ConversationSummary(text: text, through: through.id), conversation: id, owner: owner, replacing: conversation.summary?.through)
            if !stored { streams.logger.debug("a newer summary was stored meanwhile", metadata: ["conversation": "\(id)"]) }
            try await learn(from: folding, clone: clone, owner: owner, conversation: id)
        } catch {
            streams.logger.warning("could not fold the conversation's summary", metadata: ["conversation": "\(id)", "error": "\(error)"])
        }
    }
}

extension ConversationSummaries {
    /// What the folded turns told of the user joins the clone's memory (metered as `summary`).
    /// Read again just before it is written, so that only an edit made during that one write is
    /// lost; a memory at its limit learns nothing more.
    func learn(from folded: [Message], clone: Clone, owner: String, conversation: String) async throws {
        guard folded.contains(where: { $0.role == .user }), clone.memory.count < configuration.cloneLimits.maxMemoryEntries else { return }
        let request = CompletionRequest(
            model: configuration.model(for: clone), messages: LearnedFacts.prompt(known: clone.memory, from: folded, user: "The user"),
            maxOutputTokens: LearnedFacts.maxTokens)
        guard
            let answer = await streams.generateQuietly(
                request, payer: owner, conversation: conversation, feature: .summary, stream: ids.make(.stream)),
            var current = try await store.clone(id: clone.id, owner: owner)
        else { return }
        let facts = LearnedFacts.parse(answer, known: current.memory, limit: configuration.cloneLimits.maxMemoryEntries)
        guard !facts.isEmpty else { return }
        current.memory += facts
        current.updatedAt = Int64(Timestamp.nowMillis())
        _ = try await store.updateClone(current)
    }
}

extension ChatStore {
    /// What a prompt of `conversation` holds of its past: its summary when that applies to
    /// `history` (the path's newest messages, chronological, ending with the one answered) and
    /// the messages of `history` after it; without one, all of `history`.
    func promptHistory(of conversation: Conversation, _ history: [Message]) async throws -> (ConversationSummary?, [Message]) {
        guard let summary = conversation.summary else { return (nil, history) }
        let onPath = try await message(id: summary.through, conversation: conversation.id)?.onPath == true
        return RollingSummary.turns(after: summary, throughIsOnPath: onPath, history: history)
    }
}
