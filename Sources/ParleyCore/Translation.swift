/// The validated body of `POST /v1/rooms` for a translation chat.
public struct TranslationRequest: Sendable, Equatable {
    public struct CloneMember: Sendable, Equatable {
        public var clone: String
        public var language: LanguageTag
    }

    /// Users besides the creator who may join.
    public var members: [String]
    /// Languages set at creation, by user id (members and the creator).
    public var languages: [String: LanguageTag]
    public var clones: [CloneMember]
    /// The clones' replies and their translations are spoken too, where the speech service has
    /// the language (#29).
    public var voice = false

    public static func parse(_ value: JSONValue, limits: RoomLimits) throws(ValidationError) -> TranslationRequest {
        var reader = try JSONObjectReader(value)
        guard try reader.requiredString("kind") == "translation" else { throw ValidationError("'kind' must be 'translation'") }
        let members = try reader.stringArray("members") ?? []
        guard members.count <= limits.maxMembers else { throw ValidationError("at most \(limits.maxMembers) members") }
        guard !members.contains(where: \.isEmpty) else { throw ValidationError("'members' must be user ids") }
        guard Set(members).count == members.count else { throw ValidationError("a member is listed twice") }
        var languages: [String: LanguageTag] = [:]
        if let given = try reader.value("languages") {
            guard case .object(let pairs) = given else { throw ValidationError("'languages' must map user ids to language tags") }
            for (user, tag) in pairs {
                guard let text = tag.stringValue, let language = LanguageTag(text) else {
                    throw ValidationError("'languages.\(user)' must be a BCP 47 language tag such as en, pt-BR or zh-Hant")
                }
                languages[user] = language
            }
        }
        var clones: [CloneMember] = []
        if let given = try reader.value("clones") {
            guard case .array(let items) = given else { throw ValidationError("'clones' must be an array of {clone, language}") }
            guard items.count <= limits.maxDebaters else { throw ValidationError("at most \(limits.maxDebaters) clones") }
            for (index, item) in items.enumerated() {
                var entry = try JSONObjectReader(item, what: "'clones[\(index)]'", prefix: "clones[\(index)].")
                let clone = try entry.requiredString("clone")
                let text = try entry.requiredString("language")
                try entry.rejectUnknown()
                guard let language = LanguageTag(text) else {
                    throw ValidationError("'clones[\(index)].language' must be a BCP 47 language tag")
                }
                guard !clones.contains(where: { $0.clone == clone }) else { throw ValidationError("clone \(clone) is listed twice") }
                clones.append(CloneMember(clone: clone, language: language))
            }
        }
        guard !members.isEmpty || !clones.isEmpty else { throw ValidationError("a translation chat needs 'members' or 'clones'") }
        let voice = try reader.bool("voice") ?? false
        try reader.rejectUnknown()
        return TranslationRequest(members: members, languages: languages, clones: clones, voice: voice)
    }
}

/// The body of `POST /v1/rooms`, by its `kind`.
public enum RoomRequest: Sendable, Equatable {
    case debate(DebateRequest)
    case translation(TranslationRequest)

    public static func parse(_ value: JSONValue, limits: RoomLimits) throws(ValidationError) -> RoomRequest {
        switch value["kind"]?.stringValue {
        case "debate": return .debate(try DebateRequest.parse(value, limits: limits))
        case "translation": return .translation(try TranslationRequest.parse(value, limits: limits))
        default:
            _ = try JSONObjectReader(value)
            throw ValidationError("'kind' must be 'debate' or 'translation'")
        }
    }
}

/// Translation chats, pure: who needs which translation, what the translator is asked, and the
/// transcript as a reader of one language sees it.
public enum TranslationChat {
    /// Originals before the one translated that the translator sees, for ambiguity.
    public static let contextMessages = 6
    public static let contextCharactersEach = 300

    /// The tags `speaker`'s message is translated into: every distinct language of the room's
    /// other members (users who set one, and clones not muted) that `lang` does not share.
    public static func targets(room: Room, speaker: String, lang: LanguageTag) -> [LanguageTag] {
        var out = Set<LanguageTag>()
        for (member, tag) in room.languages where member != speaker && !tag.sharesLanguage(with: lang) {
            let isClone = room.debater(member) != nil
            if isClone ? !room.muted.contains(member) : (member == room.owner || room.members.contains(member)) {
                out.insert(tag)
            }
        }
        return out.sorted { $0.value < $1.value }
    }

    /// The transcript as a reader of `lang` sees it: the originals in order (by id), each
    /// replaced by its complete translation into `lang` (or into another tag of the same
    /// language) when the reader does not share the original's language, and flagged
    /// untranslated when there is none. Originals in `pending`
    /// (their translation into `lang` is streaming) are left out: their streams follow.
    /// A nil `lang` sees every original as written.
    public static func view(_ transcript: [RoomEntry], for lang: LanguageTag?, pending: Set<String> = []) -> [(entry: RoomEntry, untranslated: Bool)]
    {
        // Complete translations by original: into `lang` itself, else into a tag of its language
        // (a `pt-BR` reader gets the `pt` translation when there is no `pt-BR` one).
        var translations: [String: RoomEntry] = [:]
        if let lang {
            for entry in transcript where entry.kind == .translation && entry.reason == .complete {
                guard let source = entry.source, let written = entry.lang, written.sharesLanguage(with: lang) else { continue }
                if written == lang || translations[source]?.lang != lang { translations[source] = entry }
            }
        }
        let originals = transcript.filter { $0.kind != .translation && !pending.contains($0.id) }.sorted { $0.id < $1.id }
        return originals.map { original in
            guard let lang, let written = original.lang, !written.sharesLanguage(with: lang) else { return (original, false) }
            if let translated = translations[original.id] { return (translated, false) }
            return (original, true)
        }
    }

    /// The translator's prompt: translate `text` from `from` into `to`, faithfully and with no
    /// commentary, with the chat's recent messages (originals) as context for ambiguity.
    public static func prompt(text: String, from: LanguageTag, to: LanguageTag, context: [RoomEntry], names: [String: String]) -> AssembledPrompt {
        var system = """
            Translate the user's message from \(from.promptName) into \(to.promptName). \
            Reply with the translation only: faithful to its meaning, tone and register, \
            with names, code and URLs left as they are. Add no notes, explanations, quotes or commentary, \
            and do not answer the message.
            """
        let recent = context.filter { $0.kind != .translation }.suffix(contextMessages)
        if !recent.isEmpty {
            system += "\n\nRecent messages in the chat, for context only (do not translate them):"
            for entry in recent {
                let name = names[entry.speaker] ?? entry.speaker
                let said = entry.text.count > contextCharactersEach ? String(entry.text.prefix(contextCharactersEach)) + "…" : entry.text
                system += "\n- \(name): \(said)"
            }
        }
        let messages = [PromptMessage(role: .system, text: system), PromptMessage(role: .user, text: text)]
        let tokens = messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
        return AssembledPrompt(messages: messages, estimatedTokens: tokens, droppedMessages: 0)
    }

    /// A clone member's reply: its persona, told to write in its own language, and the chat as
    /// it reads it (`view` for its language): its own messages as assistant turns, everyone
    /// else's as named user messages.
    public static func replyPrompt(
        room: Room, clone: Clone, lang: LanguageTag, view: [RoomEntry], names: [String: String], budget: Int
    ) -> AssembledPrompt {
        let history: [Message] = view.map { entry in
            let own = entry.speaker == clone.id
            return Message(
                id: entry.id, conversation: room.id, role: own ? .assistant : .user,
                text: own ? entry.text : "\(names[entry.speaker] ?? entry.speaker): \(entry.text)", createdAt: entry.createdAt)
        }
        var persona = clone
        let chat =
            "You are in a group chat where everyone writes in their own language and reads translations. "
            + "Write your replies in \(lang.promptName) only."
        persona.systemPrompt = [clone.systemPrompt.trimmedWhitespace, chat].filter { !$0.isEmpty }.joined(separator: "\n")
        return PromptAssembler(contextBudget: budget).assemble(clone: persona, history: history)
    }

    /// Room for a translation's output: the original's length and then some, since languages
    /// differ in length, within `cap`.
    public static func maxOutputTokens(for text: String, cap: Int) -> Int {
        min(cap, max(32, Tokenizer.count(text) * 3 + 16))
    }
}
