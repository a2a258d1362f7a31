import ParleyCore
import ParleyStore

/// A cluster's replies in flight (#22): one document per conversation a reply streams in, so
/// that two nodes never stream two replies into one conversation at once and a user's
/// concurrent replies are counted across the nodes. A node's slots go when its replies end, at
/// its restart, or when another node takes a dead one over.
extension MongoStore {
    public enum ReplySlotClaim: Sendable, Equatable {
        case claimed
        /// A reply streams in that conversation already (on any node).
        case conversationBusy
        /// The user has `limit` replies streaming already (across the nodes).
        case tooManyStreams
    }

    /// Takes `conversation` for one reply of `user` on `node`: refused while another reply
    /// streams in it, or when it is not among the user's first `limit` slots (by time, then
    /// id; so of two claims racing for the last slot one wins, and never both).
    public func claimReplySlot(conversation: String, user: String, node: String, limit: Int, now: Int64) async throws -> ReplySlotClaim {
        try await run { db in
            do {
                try db.insert(
                    "reply_slots",
                    .object([("_id", .string(conversation)), ("user", .string(user)), ("node", .string(node)), ("created_at", .long(now))]))
            } catch StoreError.duplicateKey {
                return .conversationBusy
            }
            let first = try db.find(
                "reply_slots", filter: .object([("user", .string(user))]), sort: .object([("created_at", .int(1)), ("_id", .int(1))]),
                projection: .object([("_id", .int(1))]), limit: limit)
            guard first.contains(where: { $0["_id"]?.stringValue == conversation }) else {
                _ = try db.delete("reply_slots", query: .object([("_id", .string(conversation)), ("node", .string(node))]))
                return .tooManyStreams
            }
            return .claimed
        }
    }

    /// Gives `conversation` back once its reply ended (if `node` holds it).
    public func releaseReplySlot(conversation: String, node: String) async throws {
        try await run { db in _ = try db.delete("reply_slots", query: .object([("_id", .string(conversation)), ("node", .string(node))])) }
    }

    /// Gives back every slot `node` holds (its restart, or a takeover); returns how many.
    @discardableResult
    public func releaseReplySlots(node: String) async throws -> Int {
        try await run { db in Int(try db.delete("reply_slots", query: .object([("node", .string(node))]))) }
    }
}
