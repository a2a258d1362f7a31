import Logging
import ParleyCore
import ParleyMongoStore
import Synchronization

/// In a cluster (#22), a reply's hold on its conversation across the nodes, after the node's
/// own (`StreamHub.reserve`): no two nodes stream into one conversation at once, and a user's
/// concurrent replies are counted across the nodes (`MongoStore.claimReplySlot`).
struct ReplySlots: Sendable {
    let store: MongoStore
    let node: String
    let limit: Int
    let logger: Logger
    /// Releases the store refused, tried again while the node runs.
    private let retries: SlotReleases

    init(
        store: MongoStore, node: String, limit: Int, logger: Logger, retryAfter firstDelay: Duration = .seconds(1),
        writes: StoreWrites = StoreWrites()
    ) {
        self.store = store
        self.node = node
        self.limit = limit
        self.logger = logger
        retries = SlotReleases(firstDelay: firstDelay, writes: writes, logger: logger)
    }

    /// Takes `conversation` for one reply of `user`.
    func claim(user: String, conversation: String) async throws -> StreamHub.Reservation {
        // This node's own hold, whose release the store refused and which waits for its retry:
        // the node's reservation (taken before this) says no reply of it runs there any more.
        await retries.releaseNow(conversation)
        switch try await store.claimReplySlot(
            conversation: conversation, user: user, node: node, limit: limit, now: Int64(Timestamp.nowMillis()))
        {
        case .claimed: return .reserved
        case .conversationBusy: return .conversationBusy
        case .tooManyStreams: return .tooManyStreams
        }
    }

    /// Gives it back once the reply ended. One the store refuses is tried again while the node
    /// runs (a slot left held refuses the conversation's next message on every node, and
    /// counts against the user's replies at once, until this node restarts); a shutdown leaves
    /// what is still held to this node's next start, or to the node that takes this one over.
    /// Runs outside the caller's task: a stopped stream's is cancelled, and the store's thread
    /// pool refuses a call from a cancelled task (the release would wait for its retry).
    func release(conversation: String) async {
        await Task { await releaseOrRetry(conversation) }.value
    }

    private func releaseOrRetry(_ conversation: String) async {
        let (store, node) = (self.store, self.node)
        let release: @Sendable () async throws -> Void = { try await store.releaseReplySlot(conversation: conversation, node: node) }
        let backoff = retries.backoff()  // a write the store takes from here on ends its first pause
        do {
            try await release()
        } catch {
            logger.error(
                "giving a reply's conversation back failed; it is tried again", metadata: ["conversation": "\(conversation)", "error": "\(error)"])
            retries.retry(conversation, release, backoff)
        }
    }

    /// Stops the retries (a shutdown).
    func stopRetries() async {
        await retries.cancelAll()
    }

    /// Releases waiting for their retry, for tests.
    var releasesWaiting: Int { retries.count }
}

/// The releases of conversations the store refused, each tried after a growing delay (or once
/// the store takes a write) until it is stored or the node stops; at most `limit` wait.
final class SlotReleases: Sendable {
    static let limit = 10_000

    private struct Pending {
        var release: @Sendable () async throws -> Void
        var task: Task<Void, Never>
    }

    private let pending = Mutex<[String: Pending]>([:])
    private let firstDelay: Duration
    private let writes: StoreWrites
    private let logger: Logger

    init(firstDelay: Duration, writes: StoreWrites, logger: Logger) {
        self.firstDelay = firstDelay
        self.writes = writes
        self.logger = logger
    }

    var count: Int { pending.withLock { $0.count } }

    /// The pauses of a retry whose first attempt is about to be made.
    func backoff() -> StoreWrites.Backoff { writes.backoff(from: firstDelay) }

    func retry(_ conversation: String, _ release: @escaping @Sendable () async throws -> Void, _ backoff: StoreWrites.Backoff) {
        let taken = pending.withLock { p -> Bool in
            guard p[conversation] == nil else { return true }  // one release does for both
            guard p.count < Self.limit else { return false }
            p[conversation] = Pending(release: release, task: Task { await self.run(conversation, release, backoff) })
            return true
        }
        if !taken {
            logger.error(
                "too many releases wait for the store: this conversation waits for the node's restart", metadata: ["conversation": "\(conversation)"])
        }
    }

    /// Releases `conversation` now if its release waits for a retry (where the store takes it).
    func releaseNow(_ conversation: String) async {
        guard let waiting = pending.withLock({ $0.isEmpty ? nil : $0[conversation] }) else { return }
        guard (try? await waiting.release()) != nil else { return }
        waiting.task.cancel()
        await waiting.task.value
    }

    func cancelAll() async {
        let tasks = pending.withLock { p in p.values.map(\.task) }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
    }

    private func run(_ conversation: String, _ release: @Sendable () async throws -> Void, _ start: StoreWrites.Backoff) async {
        defer { _ = pending.withLock { $0.removeValue(forKey: conversation) } }
        var backoff = start
        while true {
            do {
                try await backoff.pause()
            } catch {
                return  // cancelled: released meanwhile, or a shutdown
            }
            if (try? await release()) != nil {
                logger.notice("a reply's conversation the store had kept held is given back", metadata: ["conversation": "\(conversation)"])
                return
            }
        }
    }
}
