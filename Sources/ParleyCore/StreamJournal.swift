/// A reply being generated, as far as it got: kept in the store while it streams (rewritten with
/// each prepaid credit batch and a few times a second), so that after a crash, even `kill -9`, the
/// next start-up can store what the user saw, marked `interrupted`, and settle its credits for
/// exactly that text. Removed once the reply is stored the ordinary way; kept whole, with how it
/// ended, when the store refused that.
public struct StreamJournal: Sendable, Equatable {
    /// Where the finished text goes.
    public enum Target: Sendable, Equatable {
        /// An assistant message in this conversation, answering `parent` (nil: after the path's
        /// last message), so that one stored late still follows the message it answers.
        case conversation(String, parent: String? = nil)
        /// An assistant message in this conversation, in place of the reply `replacing` on its
        /// path (a regenerated reply, #24).
        case alternative(conversation: String, replacing: String)
        /// A debate turn in this room, said by this clone.
        case roomTurn(room: String, speaker: String)
        /// Nowhere: the credits are settled and the text is produced again (a scheduled message
        /// is fired anew) or dropped (a translation). The settlement is linked to the
        /// conversation or room the stream's prompt was charged to, when either is named, so what
        /// it refunds counts against what was spent there.
        case settleOnly(conversation: String? = nil, room: String? = nil)
    }

    public var stream: String
    /// Who pays (the ledger entries `<stream>:…` are theirs).
    public var user: String
    public var model: String
    public var feature: String
    /// The prompt's estimated tokens, charged up front.
    public var inputTokens: Int
    public var target: Target
    /// The id the stored message or room entry takes.
    public var messageID: String
    public var text: String
    public var outputTokens: Int
    public var createdAt: Int64
    public var updatedAt: Int64
    /// How the reply ended, for one that ended but whose message or settlement the store refused
    /// (it is stored with this reason); nil while it streams (a crash's is `interrupted`).
    public var ended: StreamEndReason?

    public init(
        stream: String, user: String, model: String, feature: String, inputTokens: Int, target: Target, messageID: String,
        text: String = "", outputTokens: Int = 0, createdAt: Int64, updatedAt: Int64? = nil, ended: StreamEndReason? = nil
    ) {
        self.stream = stream
        self.user = user
        self.model = model
        self.feature = feature
        self.inputTokens = inputTokens
        self.target = target
        self.messageID = messageID
        self.text = text
        self.outputTokens = outputTokens
        self.createdAt = createdAt
        self.updatedAt = updatedAt ?? createdAt
        self.ended = ended
    }
}

extension StreamJournal.Target {
    /// How every backend stores a target: a kind, an id and (for room turns) a speaker; for a
    /// conversation's reply its parent takes the speaker's place, for an alternative the reply it
    /// replaces, for a settle-only stream the kind of what it is linked to (the id).
    public var columns: (kind: String, id: String?, speaker: String?) {
        switch self {
        case .conversation(let id, let parent): ("conversation", id, parent)
        case .alternative(let id, let replacing): ("alternative", id, replacing)
        case .roomTurn(let room, let speaker): ("room_turn", room, speaker)
        case .settleOnly(_, let room?): ("settle_only", room, "room")
        case .settleOnly(let conversation?, nil): ("settle_only", conversation, "conversation")
        case .settleOnly(nil, nil): ("settle_only", nil, nil)
        }
    }

    public init(kind: String, id: String?, speaker: String?) {
        switch (kind, id, speaker) {
        case ("conversation", let id?, let parent): self = .conversation(id, parent: parent)
        case ("alternative", let id?, let replacing?): self = .alternative(conversation: id, replacing: replacing)
        case ("room_turn", let room?, let speaker?): self = .roomTurn(room: room, speaker: speaker)
        case ("settle_only", let room?, "room"): self = .settleOnly(room: room)
        case ("settle_only", let conversation?, "conversation"): self = .settleOnly(conversation: conversation)
        default: self = .settleOnly()
        }
    }
}
