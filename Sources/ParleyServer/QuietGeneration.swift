import ParleyCore
import ParleyLLM

extension StreamRunner {
    /// A generation no socket watches (a conversation's title, its rolling summary), metered
    /// like any: its prompt charged first, its output settled with what the provider reported.
    /// Nil when the payer cannot afford the prompt or the provider failed; nothing is sent.
    func generateQuietly(
        _ request: CompletionRequest, payer: String, conversation: String, feature: Feature, stream: String
    ) async -> String? {
        let estimated = Tokenizer.count(request.messages.map(\.text).joined(separator: "\n")) + 4 * request.messages.count
        let meter = credits.meter(user: payer, stream: stream, conversation: conversation, model: provider.modelName(for: request), feature: feature)
        do {
            try await meter.begin(inputTokens: estimated)
        } catch {
            return nil
        }
        var text = ""
        var usage: Usage?
        var failed = false
        do {
            for try await event in provider.stream(request) {
                switch event {
                case .token(let token): text += token
                case .usage(let reported): usage = reported
                }
            }
        } catch {
            failed = true
        }
        _ = await meter.settle(
            usage: Usage(inputTokens: usage?.inputTokens ?? estimated, outputTokens: usage?.outputTokens ?? Tokenizer.count(text)))
        return failed ? nil : text
    }
}
