/// A person, identified by the `sub` claim of their token.
public struct User: Sendable, Equatable {
    public var id: String
    public var createdAt: Int64

    public init(id: String, createdAt: Int64) {
        self.id = id
        self.createdAt = createdAt
    }
}

/// An AI persona a user created.
public struct Clone: Sendable, Equatable {
    public var id: String
    public var owner: String
    public var name: String
    public var traits: [String]
    public var systemPrompt: String
    /// Personality sliders, each 0...100.
    public var sliders: [String: Int]
    public var memory: [String]
    public var createdAt: Int64
    public var updatedAt: Int64
    /// The model this clone's replies come from; nil means the server's default model.
    public var model: String?
    /// What a Character Card brought beyond the fields above (empty for a clone made here).
    public var profile: CloneProfile

    public init(
        id: String, owner: String, name: String, traits: [String], systemPrompt: String,
        sliders: [String: Int], memory: [String], createdAt: Int64, updatedAt: Int64, model: String? = nil,
        profile: CloneProfile = CloneProfile()
    ) {
        self.model = model
        self.profile = profile
        self.id = id
        self.owner = owner
        self.name = name
        self.traits = traits
        self.systemPrompt = systemPrompt
        self.sliders = sliders
        self.memory = memory
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// A one-to-one chat between a user and one of their clones.
public struct Conversation: Sendable, Equatable {
    public var id: String
    public var owner: String
    public var clone: String
    public var title: String
    public var createdAt: Int64
    public var updatedAt: Int64
    /// The rolling summary of its oldest turns, once they no longer fit a prompt (#24).
    public var summary: ConversationSummary?

    public init(
        id: String, owner: String, clone: String, title: String, createdAt: Int64, updatedAt: Int64, summary: ConversationSummary? = nil
    ) {
        self.summary = summary
        self.id = id
        self.owner = owner
        self.clone = clone
        self.title = title
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// Where a message stands among the messages that share its parent (regenerated replies, edited
/// messages), oldest first.
public struct Alternatives: Sendable, Equatable {
    /// The messages that share its parent, itself included, oldest first.
    public var siblings: [String]
    /// Its index among them, from 0.
    public var index: Int
    public var count: Int { siblings.count }

    public init(siblings: [String], index: Int) {
        self.siblings = siblings
        self.index = index
    }

    /// A message that is the only child of its parent.
    public static func only(_ id: String) -> Alternatives { Alternatives(siblings: [id], index: 0) }
}

public enum Role: String, Sendable, Codable, Equatable {
    case system, user, assistant
}

public struct Usage: Sendable, Equatable, Codable {
    public var inputTokens: Int
    public var outputTokens: Int

    public init(inputTokens: Int, outputTokens: Int) {
        self.inputTokens = inputTokens
        self.outputTokens = outputTokens
    }

    enum CodingKeys: String, CodingKey {
        case inputTokens = "input_tokens"
        case outputTokens = "output_tokens"
    }
}

/// Why a stream ended; stored with the assistant message and sent in `stream.end`.
public enum StreamEndReason: String, Sendable, Codable, Equatable, CaseIterable {
    case complete, cancelled, insufficientCredits = "insufficient_credits", error, shutdown
    /// A limit the user set on their own spending (`PUT /v1/me/limits`) was reached (#27).
    case spendLimit = "spend_limit"
    /// The server stopped without ending the stream (a crash, kill -9): stored at the next
    /// start-up as far as its journal got. Never in a live `stream.end`.
    case interrupted
}

/// One turn of a transcript.
public struct Message: Sendable, Equatable {
    public var id: String
    public var conversation: String
    public var role: Role
    public var text: String
    public var createdAt: Int64
    /// Assistant messages only: how the stream that produced it ended.
    public var reason: StreamEndReason?
    public var usage: Usage?
    public var stream: String?
    /// Marked by its owner to be kept: the retention purge leaves saved messages alone.
    public var saved: Bool
    /// The message it follows in its conversation's tree (a reply's user message; a regenerated
    /// reply shares its parent with the reply it is an alternative to). Nil when appended: the
    /// store makes it the end of the conversation's path then (none for the first message).
    public var parent: String?
    /// On its conversation's path (the messages shown); false for an alternative not chosen.
    public var onPath: Bool

    public init(
        id: String, conversation: String, role: Role, text: String, createdAt: Int64,
        reason: StreamEndReason? = nil, usage: Usage? = nil, stream: String? = nil, saved: Bool = false, parent: String? = nil,
        onPath: Bool = true
    ) {
        self.saved = saved
        self.parent = parent
        self.onPath = onPath
        self.id = id
        self.conversation = conversation
        self.role = role
        self.text = text
        self.createdAt = createdAt
        self.reason = reason
        self.usage = usage
        self.stream = stream
    }
}
