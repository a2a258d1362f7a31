import Logging
import ParleyCore
import ParleyMongoStore

/// In a cluster (#22), a reply's hold on its conversation across the nodes, after the node's
/// own (`StreamHub.reserve`): no two nodes stream into one conversation at once, and a user's
/// concurrent replies are counted across the nodes (`MongoStore.claimReplySlot`).
struct ReplySlots: Sendable {
    let store: MongoStore
    let node: String
    let limit: Int
    let logger: Logger

    /// Takes `conversation` for one reply of `user`.
    func claim(user: String, conversation: String) async throws -> StreamHub.Reservation {
        switch try await store.claimReplySlot(
            conversation: conversation, user: user, node: node, limit: limit, now: Int64(Timestamp.nowMillis()))
        {
        case .claimed: .reserved
        case .conversationBusy: .conversationBusy
        case .tooManyStreams: .tooManyStreams
        }
    }

    /// Gives it back once the reply ended. A failure leaves it to this node's next start, or to
    /// the node that takes this one over.
    func release(conversation: String) async {
        do {
            try await store.releaseReplySlot(conversation: conversation, node: node)
        } catch {
            logger.error("giving a reply's conversation back failed", metadata: ["conversation": "\(conversation)", "error": "\(error)"])
        }
    }
}
