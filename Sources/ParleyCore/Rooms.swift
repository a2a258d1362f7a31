/// A room. A debate: several clones argue a topic in turns while people watch, interject and
/// moderate; the creator is the moderator and pays for every turn. A translation chat: people
/// (and clones) each write in their own language and read everyone in theirs.
public struct Room: Sendable, Equatable {
    public enum Kind: String, Sendable, Equatable, CaseIterable {
        case debate, translation
    }

    public enum Status: String, Sendable, Equatable, CaseIterable {
        /// Created, not started yet.
        case open
        case running
        case paused
        case ended
    }

    public enum TurnPolicy: String, Sendable, Equatable, CaseIterable {
        /// Clones speak in the order they were listed.
        case roundRobin = "round_robin"
        /// The moderator picks each speaker with `room.control next`.
        case moderator
        /// The clone addressed by name speaks next, else the most relevant one (see `TurnTaking`).
        case natural
    }

    public enum Visibility: String, Sendable, Equatable, CaseIterable {
        /// Only the moderator may join.
        case `private`
        /// Anyone with a token and the room id may join and watch.
        case link
    }

    public struct Debater: Sendable, Equatable {
        public var clone: String
        public var stance: String
        /// The clone's name when the room was created (for prompts and transcripts).
        public var name: String
        /// A voiced debate (#29): the voice the clone's turns are spoken in, chosen at creation.
        public var voice: CloneVoice?

        public init(clone: String, stance: String, name: String, voice: CloneVoice? = nil) {
            self.clone = clone
            self.stance = stance
            self.name = name
            self.voice = voice
        }

        /// As the stores keep it and the API shows it.
        public var json: JSONValue {
            .object(
                [("clone", .string(clone)), ("name", .string(name)), ("stance", .string(stance))] + (voice.map { [("voice", $0.json)] } ?? []))
        }

        public init(json: JSONValue) {
            self.init(
                clone: json["clone"]?.stringValue ?? "", stance: json["stance"]?.stringValue ?? "", name: json["name"]?.stringValue ?? "",
                voice: json["voice"].flatMap { try? CloneVoice.parse($0) })
        }
    }

    public var id: String
    public var kind: Kind
    public var owner: String
    public var topic: String
    public var debaters: [Debater]
    public var rounds: Int
    public var policy: TurnPolicy
    public var maxTokensPerTurn: Int
    public var visibility: Visibility
    public var status: Status
    /// Completed turns so far; the debate ends after `rounds × debaters.count`.
    public var turnsTaken: Int
    /// Muted clones are skipped; muted users cannot `room.say`.
    public var muted: [String]
    /// Users removed by the moderator; they cannot join again.
    public var kicked: [String]
    /// Translation chats: the users besides the owner who may join.
    public var members: [String]
    /// Translation chats: the language each user or clone (by id) writes and reads in.
    public var languages: [String: LanguageTag]
    public var createdAt: Int64
    public var updatedAt: Int64

    public init(
        id: String, kind: Kind = .debate, owner: String, topic: String, debaters: [Debater], rounds: Int, policy: TurnPolicy,
        maxTokensPerTurn: Int, visibility: Visibility, status: Status = .open, turnsTaken: Int = 0, muted: [String] = [],
        kicked: [String] = [], members: [String] = [], languages: [String: LanguageTag] = [:], createdAt: Int64, updatedAt: Int64
    ) {
        self.id = id
        self.kind = kind
        self.members = members
        self.languages = languages
        self.owner = owner
        self.topic = topic
        self.debaters = debaters
        self.rounds = rounds
        self.policy = policy
        self.maxTokensPerTurn = maxTokensPerTurn
        self.visibility = visibility
        self.status = status
        self.turnsTaken = turnsTaken
        self.muted = muted
        self.kicked = kicked
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }

    public var totalTurns: Int { rounds * debaters.count }

    public func debater(_ clone: String) -> Debater? { debaters.first { $0.clone == clone } }

    /// Who may join: a debate's moderator (anyone for `link` visibility), a translation chat's
    /// owner and members; never someone the moderator kicked.
    public func admits(_ user: String) -> Bool {
        guard !kicked.contains(user) else { return false }
        return user == owner || visibility == .link || (kind == .translation && members.contains(user))
    }

    public var json: JSONValue {
        guard kind == .debate else {
            return .object([
                ("id", .string(id)),
                ("kind", .string(kind.rawValue)),
                ("owner", .string(owner)),
                ("members", .array(([owner] + members).map(JSONValue.string))),
                ("languages", .object(languages.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value.value)) })),
                (
                    "clones",
                    .array(
                        debaters.map {
                            .object([
                                ("clone", .string($0.clone)), ("name", .string($0.name)),
                                ("language", languages[$0.clone].map { .string($0.value) } ?? .null),
                            ])
                        })
                ),
                ("status", .string(status.rawValue)),
                ("muted", .array(muted.map(JSONValue.string))),
                ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
                ("updated_at", .string(Timestamp.rfc3339(millis: updatedAt))),
            ])
        }
        return .object([
            ("id", .string(id)),
            ("kind", .string("debate")),
            ("moderator", .string(owner)),
            ("topic", .string(topic)),
            ("clones", .array(debaters.map(\.json))),
            ("rounds", .int(Int64(rounds))),
            ("turn_policy", .string(policy.rawValue)),
            ("max_tokens_per_turn", .int(Int64(maxTokensPerTurn))),
            ("visibility", .string(visibility.rawValue)),
            ("status", .string(status.rawValue)),
            ("turns_taken", .int(Int64(turnsTaken))),
            ("muted", .array(muted.map(JSONValue.string))),
            ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
            ("updated_at", .string(Timestamp.rfc3339(millis: updatedAt))),
        ])
    }
}

/// One line of a room's transcript: a clone's turn or a person's interjection, or (translation
/// chats) the translation of one of those into one language.
extension RoomEntry {
    /// The transcript as it stands: without the turns a moderator had regenerated (a turn whose
    /// `source` names an earlier turn takes its place).
    public static func current(_ transcript: [RoomEntry]) -> [RoomEntry] {
        let replaced = Set(transcript.lazy.filter { $0.kind == .turn }.compactMap(\.source))
        guard !replaced.isEmpty else { return transcript }
        return transcript.filter { !($0.kind == .turn && replaced.contains($0.id)) }
    }
}

public struct RoomEntry: Sendable, Equatable {
    public enum Kind: String, Sendable, Equatable {
        case turn, said, translation
    }

    public var id: String
    public var room: String
    public var kind: Kind
    /// The clone (turns) or user (interjections) who spoke.
    public var speaker: String
    public var text: String
    public var createdAt: Int64
    /// Turns: how the stream ended (`complete`, `cancelled`, `insufficient_credits`, `shutdown`,
    /// `error`); a turn cut short is `interrupted` in the transcript.
    public var reason: StreamEndReason?
    public var stream: String?
    /// Translation chats: the language of `text`.
    public var lang: LanguageTag?
    /// Translations: the entry translated. A regenerated turn: the turn it replaces.
    public var source: String?
    /// Translations: whether `speaker` is a clone (else a user).
    public var speakerIsClone: Bool

    public init(
        id: String, room: String, kind: Kind, speaker: String, text: String, createdAt: Int64,
        reason: StreamEndReason? = nil, stream: String? = nil, lang: LanguageTag? = nil, source: String? = nil,
        speakerIsClone: Bool? = nil
    ) {
        self.id = id
        self.lang = lang
        self.source = source
        self.speakerIsClone = speakerIsClone ?? (kind == .turn)
        self.room = room
        self.kind = kind
        self.speaker = speaker
        self.text = text
        self.createdAt = createdAt
        self.reason = reason
        self.stream = stream
    }

    /// A turn or translation that ended before it was complete.
    public var interrupted: Bool { kind != .said && reason != .complete }

    public var json: JSONValue { json(untranslated: false) }

    /// `untranslated`: shown to a reader of another language because no translation exists (the
    /// sender lacked credits, or the translation failed or is still missing).
    public func json(untranslated: Bool) -> JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("id", .string(id)), ("kind", .string(kind.rawValue)),
            (speakerIsClone ? "clone" : "user", .string(speaker)),
            ("text", .string(text)), ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
        ]
        if let lang { pairs.append(("lang", .string(lang.value))) }
        if let source { pairs.append(("source", .string(source))) }
        if kind != .said {
            pairs.append(("interrupted", .bool(interrupted)))
            if let reason { pairs.append(("reason", .string(reason.rawValue))) }
            if let stream { pairs.append(("stream", .string(stream))) }
        }
        if untranslated { pairs.append(("untranslated", .bool(true))) }
        return .object(pairs)
    }
}

/// Room creation limits.
public struct RoomLimits: Sendable, Equatable {
    public var maxDebaters = 8
    public var maxRounds = 50
    public var maxTokensPerTurn = 2_000
    public var maxTopicLength = 500
    public var maxStanceLength = 500
    public var maxSayLength = 2_000
    /// Users in a translation chat besides its owner.
    public var maxMembers = 50
    /// Past this many sockets in a room, joins and leaves are announced to its moderator only
    /// (a room with thousands of viewers would otherwise send each of them everyone's arrival).
    public var presenceBroadcastMembers = 100

    public init() {}
}

/// The validated body of `POST /v1/rooms` for a debate.
public struct DebateRequest: Sendable, Equatable {
    public var topic: String
    public var clones: [(clone: String, stance: String)]
    public var rounds: Int
    public var policy: Room.TurnPolicy
    public var maxTokensPerTurn: Int
    public var visibility: Room.Visibility
    /// Each turn is spoken too, in its clone's voice (#29).
    public var voice = false

    public static func == (a: DebateRequest, b: DebateRequest) -> Bool {
        a.topic == b.topic && a.clones.map(\.clone) == b.clones.map(\.clone) && a.clones.map(\.stance) == b.clones.map(\.stance)
            && a.rounds == b.rounds && a.policy == b.policy && a.maxTokensPerTurn == b.maxTokensPerTurn && a.visibility == b.visibility
            && a.voice == b.voice
    }

    public static func parse(_ value: JSONValue, limits: RoomLimits) throws(ValidationError) -> DebateRequest {
        var reader = try JSONObjectReader(value)
        let kind = try reader.requiredString("kind")
        guard kind == "debate" else { throw ValidationError("'kind' must be 'debate'") }
        let topic = try reader.requiredString("topic").trimmedWhitespace
        guard (1...limits.maxTopicLength).contains(topic.count) else {
            throw ValidationError("'topic' must be 1-\(limits.maxTopicLength) characters")
        }
        guard case .array(let items)? = try reader.value("clones") else { throw ValidationError("'clones' must be an array of {clone, stance}") }
        guard (2...limits.maxDebaters).contains(items.count) else {
            throw ValidationError("a debate needs 2-\(limits.maxDebaters) clones")
        }
        var clones: [(String, String)] = []
        for (index, item) in items.enumerated() {
            var entry = try JSONObjectReader(item, what: "'clones[\(index)]'", prefix: "clones[\(index)].")
            let clone = try entry.requiredString("clone")
            let stance = try entry.string("stance") ?? ""
            try entry.rejectUnknown()
            guard stance.fits(characters: limits.maxStanceLength) else {
                throw ValidationError("'clones[\(index)].stance' is longer than \(limits.maxStanceLength) characters")
            }
            guard !clones.contains(where: { $0.0 == clone }) else { throw ValidationError("clone \(clone) is listed twice") }
            clones.append((clone, stance))
        }
        let rounds = Int(try reader.int("rounds") ?? 3)
        guard (1...limits.maxRounds).contains(rounds) else { throw ValidationError("'rounds' must be 1-\(limits.maxRounds)") }
        let policyText = try reader.string("turn_policy") ?? "round_robin"
        guard let policy = Room.TurnPolicy(rawValue: policyText) else {
            throw ValidationError("'turn_policy' must be one of round_robin, moderator, natural")
        }
        let maxTokens = Int(try reader.int("max_tokens_per_turn") ?? 300)
        guard (1...limits.maxTokensPerTurn).contains(maxTokens) else {
            throw ValidationError("'max_tokens_per_turn' must be 1-\(limits.maxTokensPerTurn)")
        }
        let visibilityText = try reader.string("visibility") ?? "private"
        guard let visibility = Room.Visibility(rawValue: visibilityText) else { throw ValidationError("'visibility' must be private or link") }
        let voice = try reader.bool("voice") ?? false
        try reader.rejectUnknown()
        return DebateRequest(
            topic: topic, clones: clones, rounds: rounds, policy: policy, maxTokensPerTurn: maxTokens, visibility: visibility, voice: voice)
    }
}

/// Who speaks next. Pure: the same room and transcript always give the same answer.
public enum TurnTaking {
    /// The next speaker, nil when no clone may speak (all muted) or the moderator must choose.
    ///
    /// - round robin: the clone after the last one who completed a turn, in listed order,
    ///   skipping muted ones; a turn cut short is given again to the same clone.
    /// - moderator: `requested` (from `room.control next`), nil until one is given.
    /// - natural: the clone the newest entry addresses by name (case-insensitive, as a whole
    ///   word), unless that is who just spoke; otherwise the clone whose name, stance and last
    ///   turn share the most words with the newest entry; ties and an empty transcript fall back
    ///   to round robin. The clone who spoke last never speaks twice in a row unless alone.
    public static func next(room: Room, transcript all: [RoomEntry], requested: String?) -> String? {
        let transcript = RoomEntry.current(all)
        let speakers = room.debaters.filter { !room.muted.contains($0.clone) }
        guard !speakers.isEmpty else { return nil }
        let lastTurn = transcript.last { $0.kind == .turn }
        if let requested, speakers.contains(where: { $0.clone == requested }) { return requested }
        switch room.policy {
        case .moderator:
            return nil
        case .roundRobin:
            return roundRobin(room: room, speakers: speakers, lastTurn: lastTurn)
        case .natural:
            let fallback = roundRobin(room: room, speakers: speakers, lastTurn: lastTurn)
            guard let newest = transcript.last else { return fallback }
            let candidates = speakers.filter { $0.clone != lastTurn?.speaker || speakers.count == 1 }
            let said = Self.words(newest.text, minimumLength: 1)
            if let addressed = candidates.first(where: { debater in
                let name = Self.words(debater.name, minimumLength: 1)
                return !name.isEmpty && name.isSubset(of: said)
            }) {
                return addressed.clone
            }
            let words = Self.words(newest.text)
            var best: (clone: String, score: Int)?
            for candidate in candidates {
                let ownLast = transcript.last { $0.kind == .turn && $0.speaker == candidate.clone }?.text ?? ""
                let score = words.intersection(Self.words(candidate.stance + " " + ownLast)).count
                if score > (best?.score ?? 0) { best = (candidate.clone, score) }
            }
            return best?.clone ?? fallback
        }
    }

    /// The clone after `clone` in listed order, skipping muted ones (nil when none may speak).
    public static func after(_ clone: String, in room: Room) -> String? {
        let order = room.debaters.map(\.clone)
        guard let index = order.firstIndex(of: clone) else { return nil }
        for step in 1...order.count {
            let candidate = order[(index + step) % order.count]
            if !room.muted.contains(candidate) { return candidate }
        }
        return nil
    }

    private static func roundRobin(room: Room, speakers: [Room.Debater], lastTurn: RoomEntry?) -> String {
        guard let lastTurn else { return speakers[0].clone }
        if lastTurn.interrupted, speakers.contains(where: { $0.clone == lastTurn.speaker }) { return lastTurn.speaker }
        let order = room.debaters.map(\.clone)
        guard let index = order.firstIndex(of: lastTurn.speaker) else { return speakers[0].clone }
        for step in 1...order.count {
            let candidate = order[(index + step) % order.count]
            if speakers.contains(where: { $0.clone == candidate }) { return candidate }
        }
        return speakers[0].clone
    }

    /// Lower-cased words of `minimumLength` letters or more (for relevance, short words say little).
    static func words(_ text: String, minimumLength: Int = 4) -> Set<String> {
        var out = Set<String>()
        var current = ""
        for ch in text.lowercased() {
            if ch.isLetter || ch.isNumber {
                current.append(ch)
            } else {
                if current.count >= minimumLength { out.insert(current) }
                current = ""
            }
        }
        if current.count >= minimumLength { out.insert(current) }
        return out
    }

    /// The prompt for `speaker`'s turn: its persona, its stance, the topic and the debate so far
    /// (its own turns as assistant messages, everyone else's as named user messages), trimmed to
    /// `budget` tokens from the oldest end.
    public static func prompt(room: Room, speaker: Clone, transcript all: [RoomEntry], names: [String: String], budget: Int) -> AssembledPrompt {
        let transcript = RoomEntry.current(all)
        let stance = room.debater(speaker.id)?.stance ?? ""
        let others = room.debaters.filter { $0.clone != speaker.id }.map(\.name).joined(separator: ", ")
        var debate = "You are in a debate on: \(room.topic)"
        if !stance.isEmpty { debate += "\nYour stance: \(stance)" }
        debate += "\nThe other debaters: \(others). Give your next turn only, in your own voice and in a few sentences; answer points made by others."
        var history: [Message] = transcript.map { entry in
            let own = entry.kind == .turn && entry.speaker == speaker.id
            let name = names[entry.speaker] ?? entry.speaker
            let prefix = entry.kind == .said ? "\(name) (audience)" : name
            return Message(
                id: entry.id, conversation: room.id, role: own ? .assistant : .user,
                text: own ? entry.text : "\(prefix): \(entry.text)", createdAt: entry.createdAt)
        }
        if history.last?.role != .user {
            history.append(Message(id: "cue", conversation: room.id, role: .user, text: "(Moderator: \(speaker.name), your turn.)", createdAt: 0))
        }
        var persona = speaker
        persona.systemPrompt = [speaker.systemPrompt.trimmedWhitespace, debate].filter { !$0.isEmpty }.joined(separator: "\n")
        return PromptAssembler(contextBudget: budget).assemble(clone: persona, history: history)
    }
}
