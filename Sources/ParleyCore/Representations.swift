/// JSON shapes of domain objects as the REST API and the protocol show them.
extension Clone {
    public var json: JSONValue { json(user: nil) }

    /// As `user` sees it: its greetings' `{{user}}` is their persona's name.
    public func json(user: Persona?) -> JSONValue {
        let greetings = PromptAssembler.greetings(of: self, user: user).map { $0.map(JSONValue.string) ?? .null }
        return .object([
            ("id", .string(id)),
            ("name", .string(name)),
            ("traits", .array(traits.map(JSONValue.string))),
            ("system_prompt", .string(systemPrompt)),
            ("sliders", slidersJSON),
            ("memory", .array(memory.map(JSONValue.string))),
            ("model", model.map(JSONValue.string) ?? .null),
            ("profile", CharacterCard.profileJSON(profile)),
            ("voice", profile.voice?.json ?? .null),
            ("greeting", greetings[0]),  // first_mes's
            ("greetings", .array(greetings)),
            ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
            ("updated_at", .string(Timestamp.rfc3339(millis: updatedAt))),
        ])
    }
}

extension Clone {
    /// The sliders as a JSON object in name order (the API, the stores and card exports agree).
    public var slidersJSON: JSONValue {
        .object(sliders.sorted { $0.key < $1.key }.map { ($0.key, .int(Int64($0.value))) })
    }
}

extension Conversation {
    public var json: JSONValue {
        .object(
            [
                ("id", .string(id)),
                ("clone", .string(clone)),
                ("title", .string(title)),
                ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
                ("updated_at", .string(Timestamp.rfc3339(millis: updatedAt))),
            ] + (summary.map { [("summary", .object([("text", .string($0.text)), ("through", .string($0.through))]))] } ?? []))
    }
}

extension Usage {
    public var json: JSONValue {
        .object([("input_tokens", .int(Int64(inputTokens))), ("output_tokens", .int(Int64(outputTokens)))])
    }
}

extension Message {
    /// What the privacy export holds of it: also its parent and, for an alternative not chosen,
    /// `on_path: false` (the export has every message of a conversation, not only its path).
    public var exportJSON: JSONValue {
        guard case .object(var pairs) = json else { return json }
        pairs.append(("parent", parent.map(JSONValue.string) ?? .null))
        if !onPath { pairs.append(("on_path", .bool(false))) }
        return .object(pairs)
    }

    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("id", .string(id)),
            ("conversation", .string(conversation)),
            ("role", .string(role.rawValue)),
            ("text", .string(text)),
            ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
        ]
        if let reason { pairs.append(("reason", .string(reason.rawValue))) }
        if let usage { pairs.append(("usage", usage.json)) }
        if let stream { pairs.append(("stream", .string(stream))) }
        pairs.append(("saved", .bool(saved)))
        return .object(pairs)
    }
}
