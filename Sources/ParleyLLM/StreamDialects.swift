import ParleyCore

/// What one event of a provider's stream says, in Parley's terms.
public enum StreamPart: Sendable, Equatable {
    case text(String)
    /// Tokens the provider counted; either side may be missing until the end of the stream.
    case usage(input: Int?, output: Int?)
    /// Why generation stopped, as the provider said it (`stop`, `length`, `end_turn`…).
    case finish(String)
    /// The stream is over (`[DONE]`, `message_stop`).
    case done
}

/// The events of OpenAI's Chat Completions stream (and every server that speaks its dialect:
/// vLLM, llama.cpp, Ollama, LM Studio, OpenRouter): `data:` lines of JSON chunks with
/// `choices[0].delta.content` and `finish_reason`, a last chunk with `usage` when
/// `stream_options.include_usage` was asked for, then `data: [DONE]`.
public enum OpenAIChatDialect {
    /// What `parts` reads of a chunk; its id, model, timestamps and the rest are checked, not built.
    static let chunkShape = JSONShape.members([
        ("error", .everything),
        ("choices", .members([("delta", .members([("content", .everything)])), ("finish_reason", .everything)])),
        ("usage", .everything),
    ])

    public static func parts(of event: SSEEvent) throws(ProviderError) -> [StreamPart] {
        guard event.data != "[DONE]" else { return [.done] }
        let chunk: JSONValue
        do {
            chunk = try JSONValue.parse(event.data.utf8, keeping: chunkShape)
        } catch {
            throw ProviderError("the model provider sent a malformed stream event")
        }
        if let error = chunk["error"] {
            throw ProviderError("the model provider failed: \(Self.message(error))")
        }
        var parts: [StreamPart] = []
        if let choice = chunk["choices"]?.arrayValue?.first {
            if let content = choice["delta"]?["content"]?.stringValue, !content.isEmpty { parts.append(.text(content)) }
            if let reason = choice["finish_reason"]?.stringValue { parts.append(.finish(reason)) }
        }
        if let usage = chunk["usage"], case .object = usage {
            parts.append(.usage(input: usage["prompt_tokens"]?.intValue.map(Int.init), output: usage["completion_tokens"]?.intValue.map(Int.init)))
        }
        return parts
    }

    /// The error object's message, cut short: it is shown to users, so no more than a line.
    public static func message(_ error: JSONValue) -> String {
        let text = error["message"]?.stringValue ?? error.stringValue ?? "unknown error"
        return text.count > 200 ? String(text.prefix(200)) + "…" : text
    }
}

/// The events of Anthropic's Messages stream: `message_start` (input usage), `content_block_delta`
/// with `text_delta`, `message_delta` (stop reason, output usage), `message_stop`, `ping`, `error`.
public enum AnthropicMessagesDialect {
    public static func parts(of event: SSEEvent) throws(ProviderError) -> [StreamPart] {
        let body: JSONValue
        do {
            body = try JSONValue.parse(event.data.utf8)
        } catch {
            throw ProviderError("the model provider sent a malformed stream event")
        }
        switch event.event ?? body["type"]?.stringValue {
        case "message_start":
            let usage = body["message"]?["usage"]
            return [.usage(input: usage?["input_tokens"]?.intValue.map(Int.init), output: nil)]
        case "content_block_delta":
            guard body["delta"]?["type"]?.stringValue == "text_delta", let text = body["delta"]?["text"]?.stringValue, !text.isEmpty else {
                return []
            }
            return [.text(text)]
        case "message_delta":
            var parts: [StreamPart] = []
            if let reason = body["delta"]?["stop_reason"]?.stringValue { parts.append(.finish(reason)) }
            if let output = body["usage"]?["output_tokens"]?.intValue { parts.append(.usage(input: nil, output: Int(output))) }
            return parts
        case "message_stop":
            return [.done]
        case "error":
            throw ProviderError("the model provider failed: \(OpenAIChatDialect.message(body["error"] ?? .null))")
        default:
            return []  // ping, content_block_start/stop and events added later
        }
    }
}
