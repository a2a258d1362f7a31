/// Limits on what a clone may hold; they bound memory, prompt size and storage per clone.
public struct CloneLimits: Sendable, Equatable {
    public var maxNameLength = 80
    public var maxTraits = 32
    public var maxTraitLength = 80
    public var maxSystemPromptLength = 16_000
    public var maxSliders = 32
    public var maxMemoryEntries = 256
    public var maxMemoryEntryLength = 2_000

    public init() {}
}

/// The editable fields of a clone, as a client sends them to `POST` (all required but `traits`,
/// `sliders`, `memory`, `system_prompt`) or `PATCH` (any subset).
public struct CloneFields: Sendable, Equatable {
    public var name: String?
    public var traits: [String]?
    public var systemPrompt: String?
    public var sliders: [String: Int]?
    public var memory: [String]?
    /// `model`: a model name, or null for the server's default (nil here: not given).
    public var model: ModelChoice?
    /// `profile`: the card fields to replace (the lorebook and unknown card fields change only
    /// by importing a card).
    public var profile: ProfileFields?
    /// `voice`: how the clone sounds (#29), or null for the server's default (nil: not given).
    public var voice: VoiceChoice?

    public enum VoiceChoice: Sendable, Equatable {
        case serverDefault
        case voice(CloneVoice)
    }

    /// The editable card fields of a clone's profile; nil fields keep their value.
    public struct ProfileFields: Sendable, Equatable {
        public var description: String?
        public var personality: String?
        public var scenario: String?
        public var firstMessage: String?
        public var alternateGreetings: [String]?
        public var exampleMessages: String?
        public var postHistoryInstructions: String?

        public init() {}

        static var textKeys: [(String, WritableKeyPath<ProfileFields, String?>)] {
            [
                ("description", \.description), ("personality", \.personality), ("scenario", \.scenario), ("first_mes", \.firstMessage),
                ("mes_example", \.exampleMessages), ("post_history_instructions", \.postHistoryInstructions),
            ]
        }

        static func parse(_ value: JSONValue, limits: CharacterCard.Limits) throws(ValidationError) -> ProfileFields {
            var reader = try JSONObjectReader(value, what: "'profile'", prefix: "profile.")
            var fields = ProfileFields()
            for (key, path) in textKeys {
                guard let text = try reader.string(key) else { continue }
                guard text.fits(characters: limits.maxTextLength) else {
                    throw ValidationError("'\(reader.prefix)\(key)' is longer than \(limits.maxTextLength) characters")
                }
                fields[keyPath: path] = text
            }
            if let greetings = try reader.stringArray("alternate_greetings") {
                fields.alternateGreetings = try CloneFields.entries(
                    greetings, field: "profile.alternate_greetings", maxCount: limits.maxGreetings,
                    maxLength: limits.maxTextLength)
            }
            if reader.has("lorebook") {
                throw ValidationError("'profile.lorebook' changes only by importing a card (POST /v1/clones/import)")
            }
            if let unknown = reader.unread.first {
                let editable = (textKeys.map(\.0) + ["alternate_greetings"]).joined(separator: ", ")
                throw ValidationError("unknown field '\(reader.prefix)\(unknown.0)'; editable: \(editable)")
            }
            return fields
        }

        func applied(to profile: CloneProfile) -> CloneProfile {
            var p = profile
            if let description { p.description = description }
            if let personality { p.personality = personality }
            if let scenario { p.scenario = scenario }
            if let firstMessage { p.firstMessage = firstMessage }
            if let alternateGreetings { p.alternateGreetings = alternateGreetings }
            if let exampleMessages { p.exampleMessages = exampleMessages }
            if let postHistoryInstructions { p.postHistoryInstructions = postHistoryInstructions }
            return p
        }
    }

    public enum ModelChoice: Sendable, Equatable {
        case serverDefault
        case named(String)
    }

    public init(
        name: String? = nil, traits: [String]? = nil, systemPrompt: String? = nil,
        sliders: [String: Int]? = nil, memory: [String]? = nil, model: ModelChoice? = nil
    ) {
        self.model = model
        self.name = name
        self.traits = traits
        self.systemPrompt = systemPrompt
        self.sliders = sliders
        self.memory = memory
    }

    /// Parses and validates a request body. `requireName` is true for creation.
    public static func parse(_ body: JSONValue, requireName: Bool, limits: CloneLimits = CloneLimits()) throws(ValidationError) -> CloneFields {
        var reader = try JSONObjectReader(body)
        var fields = CloneFields()
        if let name = try reader.string("name") {
            let trimmed = name.trimmedWhitespace
            guard !trimmed.isEmpty else { throw ValidationError("'name' must not be empty") }
            guard trimmed.fits(characters: limits.maxNameLength) else {
                throw ValidationError("'name' is longer than \(limits.maxNameLength) characters")
            }
            fields.name = trimmed
        } else if requireName {
            throw ValidationError("missing field 'name'")
        }
        if let traits = try reader.stringArray("traits") {
            fields.traits = try entries(traits, field: "traits", maxCount: limits.maxTraits, maxLength: limits.maxTraitLength)
        }
        if let prompt = try reader.string("system_prompt") {
            guard prompt.fits(characters: limits.maxSystemPromptLength) else {
                throw ValidationError("'system_prompt' is longer than \(limits.maxSystemPromptLength) characters")
            }
            fields.systemPrompt = prompt
        }
        if let sliders = try reader.intMap("sliders") {
            guard sliders.count <= limits.maxSliders else { throw ValidationError("at most \(limits.maxSliders) sliders") }
            var out: [String: Int] = [:]
            for (name, value) in sliders {
                guard Self.isValidSliderName(name) else {
                    throw ValidationError("slider name '\(name)' must be 1-32 characters of a-z, 0-9 and _, starting with a letter")
                }
                guard (0...100).contains(value) else { throw ValidationError("slider '\(name)' must be between 0 and 100") }
                out[name] = Int(value)
            }
            fields.sliders = out
        }
        if let memory = try reader.stringArray("memory") {
            fields.memory = try entries(memory, field: "memory", maxCount: limits.maxMemoryEntries, maxLength: limits.maxMemoryEntryLength)
        }
        if reader.has("model") {
            if let model = try reader.string("model") {
                guard (1...200).contains(model.utf8.count) else { throw ValidationError("'model' must be 1-200 bytes, or null for the default") }
                fields.model = .named(model)
            } else {
                fields.model = .serverDefault
            }
        }
        if let profile = try reader.value("profile") {
            fields.profile = try ProfileFields.parse(profile, limits: CharacterCard.Limits())
        }
        if reader.has("voice") {
            switch try reader.value("voice") {
            case nil, .null?: fields.voice = .serverDefault
            case let value?: fields.voice = .voice(try CloneVoice.parse(value))
            }
        }
        // id, timestamps and owner are the server's; naming them is a client bug worth reporting.
        try reader.rejectUnknown()
        return fields
    }

    /// A list of short texts (traits, memory entries): trimmed, none empty, bounded in count and length.
    static func entries(_ list: [String], field: String, maxCount: Int, maxLength: Int) throws(ValidationError) -> [String] {
        guard list.count <= maxCount else { throw ValidationError("'\(field)' has more than \(maxCount) entries") }
        return try list.enumerated().map { (i, entry) throws(ValidationError) in
            let trimmed = entry.trimmedWhitespace
            guard !trimmed.isEmpty else { throw ValidationError("'\(field)[\(i)]' must not be empty") }
            guard trimmed.fits(characters: maxLength) else {
                throw ValidationError("'\(field)[\(i)]' is longer than \(maxLength) characters")
            }
            return trimmed
        }
    }

    static func isValidSliderName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...32).contains(bytes.count), let first = bytes.first, (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first) else {
            return false
        }
        return bytes.allSatisfy {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "_")
        }
    }

    /// Applies these fields over an existing clone.
    public func applied(to clone: Clone, at now: Int64) -> Clone {
        var c = clone
        if let name { c.name = name }
        if let traits { c.traits = traits }
        if let systemPrompt { c.systemPrompt = systemPrompt }
        if let sliders { c.sliders = sliders }
        if let memory { c.memory = memory }
        switch model {
        case .serverDefault?: c.model = nil
        case .named(let name)?: c.model = name
        case nil: break
        }
        if let profile { c.profile = profile.applied(to: c.profile) }
        switch voice {
        case .serverDefault?: c.profile.voice = nil
        case .voice(let chosen)?: c.profile.voice = chosen
        case nil: break
        }
        c.updatedAt = now
        return c
    }
}

extension String {
    /// Whether the string has at most `limit` characters, counting no further than it needs: a
    /// string of at most `limit` UTF-8 bytes does, and past that at most `limit + 1` characters
    /// are walked (each lorebook entry's content was counted whole on every read of its clone).
    public func fits(characters limit: Int) -> Bool {
        if utf8.count <= limit { return true }
        guard let end = index(startIndex, offsetBy: limit, limitedBy: endIndex) else { return true }
        return end == endIndex
    }

    /// The string without leading and trailing whitespace and newlines.
    public var trimmedWhitespace: String {
        // Most strings start and end with a printable ASCII byte: nothing to trim, and no
        // Unicode property lookups (a reply trims each of a big lorebook's keys, 65,536 of them).
        // Such a byte begins its character or ends one begun by a non-whitespace scalar.
        if let head = utf8.first, let tail = utf8.last, (0x21...0x7E).contains(head), (0x21...0x7E).contains(tail) { return self }
        guard let first = firstIndex(where: { !$0.isWhitespace }) else { return "" }
        let last = lastIndex(where: { !$0.isWhitespace })!
        return String(self[first...last])
    }
}
