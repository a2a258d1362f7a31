import Logging
import ParleyCore
import ParleyStore
import Synchronization

/// The replies whose message or settlement the store refused (and the refunds of streams
/// abandoned before they ran), tried again while the node runs: their journals would otherwise
/// wait for the next start-up's recovery, so a store that comes back (a full disk freed, a
/// MongoDB election over) would leave the transcript without the reply, or the refund pending,
/// until someone restarts the node. Each is tried after a growing delay, or as soon as the store
/// takes another write on the node, until both are done (its journal is then deleted) or
/// `attempts` have failed (then it stays for the start-up). Deleting
/// a clone or a conversation pauses its owner's meanwhile, deleting the account drops them (its
/// journals go with it), and a shutdown stops all: the journals keep what they had not done.
final class KeptReplies: Sendable {
    /// What is still to be done for one reply; each step is idempotent (a message stored twice is
    /// a duplicate key, a settlement's ledger id is its stream's), so a retry after an answer that
    /// was lost does no harm.
    struct Work: Sendable {
        var stream: String
        var owner: String
        /// The conversation (or room) its message goes to.
        var place: String? = nil
        /// Stores the message; nil when there is none to store.
        var store: (@Sendable () async throws -> Void)? = nil
        /// Settles the stream, true once the store took it; nil once settled.
        var settle: (@Sendable () async -> Bool)? = nil
        /// In a cluster, the reply's hold on its conversation across the nodes (`ReplySlots`),
        /// kept while its message waits so that no node stores the conversation's next message
        /// before it; given back once it is stored, or once it cannot keep its place (refused
        /// for its own sake, given up, its account deleted). Nil once given back.
        var releaseHold: (@Sendable () async -> Void)? = nil
    }

    /// A reply's message, stored once: by its retry, or earlier by its owner's next request.
    private final class KeptMessage: Sendable {
        private let save: (@Sendable () async throws -> Void)?
        private let stored = Atomic<Bool>(false)
        private let hold: (@Sendable () async -> Void)?
        private let held: Atomic<Bool>

        init(_ save: (@Sendable () async throws -> Void)?, hold: (@Sendable () async -> Void)?) {
            self.save = save
            self.hold = hold
            held = Atomic(hold != nil)
        }

        var isStored: Bool { save == nil || stored.load(ordering: .acquiring) }
        var isHeld: Bool { held.load(ordering: .acquiring) }

        /// Returns once stored (or when there was nothing to store); throws what the store
        /// refused it with. Lets the conversation go once stored, or when the store refused it
        /// alone (its place would otherwise block the conversation for every attempt's delay).
        func store() async throws {
            guard let save, !stored.load(ordering: .acquiring) else { return await letGo() }
            do {
                try await save()
            } catch StoreError.duplicateKey {
                // Stored by an attempt whose answer was lost.
            } catch {
                if FrameError.storeUnavailable(error) == nil { await letGo() }
                throw error
            }
            stored.store(true, ordering: .releasing)
            await letGo()
        }

        /// Gives the conversation's hold back, once.
        func letGo() async {
            guard let hold, held.exchange(false, ordering: .acquiringAndReleasing) else { return }
            await hold()
        }
    }

    private struct Entry {
        var owner: String
        var place: String?
        var message: KeptMessage
        /// What is left to do when it was stopped before it finished.
        var task: Task<Work?, Never>
    }

    /// More than this many waiting replies are left to the start-up (bounded memory).
    static let limit = 1_000

    private let entries = Mutex<[String: Entry]>([:])
    /// How many replies `forget` dropped for an account deletion still under way, by owner: their
    /// journals wait (and `parley_streams_awaiting_recovery` counts them) until it takes them.
    private let droppedForDeletion = Mutex<[String: Int]>([:])
    private let store: any Store
    private let metrics: StreamMetrics
    private let logger: Logger
    private let firstDelay: Duration
    private let attempts: Int
    /// Cuts a retry's delay short once the store takes a write.
    private let writes: StoreWrites

    init(store: any Store, metrics: StreamMetrics, logger: Logger, firstDelay: Duration, attempts: Int = 16, writes: StoreWrites = StoreWrites()) {
        self.writes = writes
        self.store = store
        self.metrics = metrics
        self.logger = logger
        self.firstDelay = firstDelay
        self.attempts = attempts
    }

    /// Replies being tried again now, for tests.
    func waiting(owner: String? = nil) -> Int {
        entries.withLock { e in owner.map { o in e.values.filter { $0.owner == o }.count } ?? e.count }
    }

    /// Whether a message of the owner's waits to be stored in `place`: a deletion or a branch
    /// chosen there waits for it (`ChatService.whileNoReplyStreams`).
    func holdsMessage(owner: String, in place: String) -> Bool {
        entries.withLock { e in e.values.contains { $0.owner == owner && $0.place == place && !$0.message.isStored } }
    }

    /// Tries `work` again later. Its journal was written whole first (or that write failed too:
    /// the retry that finishes deletes whatever the store holds of it).
    func retry(_ work: Work) {
        let taken = entries.withLock { e -> Bool in
            guard e[work.stream] == nil, e.count < Self.limit else { return false }
            let message = KeptMessage(work.store, hold: work.releaseHold)
            let backoff = writes.backoff(from: firstDelay)  // made here: a write before its task runs ends its first pause
            e[work.stream] = Entry(owner: work.owner, place: work.place, message: message, task: Task { await self.run(work, message, backoff) })
            return true
        }
        if !taken {
            logger.warning("too many replies wait for the store: this one waits for the next start-up", metadata: ["stream": "\(work.stream)"])
            if let release = work.releaseHold { Task { await release() } }
        }
    }

    /// Stores the owner's waiting replies now, where the store takes them: their next message is
    /// about to be stored and a prompt read from their conversation, and the reply it follows
    /// belongs before it in both. One the store refused by itself waits for its retry; when the
    /// store refuses as a whole (full, out of reach, closed) this throws that at once: the next
    /// message would be refused too (after as long a wait again, on MongoDB the retries' server
    /// selection), and must not be stored before them if the store came back in between.
    func storeNow(owner: String) async throws {
        let messages = entries.withLock { e in e.isEmpty ? [] : e.values.filter { $0.owner == owner }.map(\.message) }
        for message in messages {
            do {
                try await message.store()
            } catch let refusal where FrameError.storeUnavailable(refusal) != nil {
                throw refusal
            } catch {
                // This reply's own fault: its retry goes on, the user's message need not wait.
            }
        }
    }

    /// Stops trying the owner's replies once no attempt of theirs is running, and returns what
    /// they had left to do, for `resume`: a clone or a conversation of theirs is being deleted,
    /// and no attempt may store into it meanwhile (after it, an attempt finds it gone and only
    /// settles, as the start-up's recovery does).
    func pause(owner: String) async -> [Work] {
        await stop { $0 == owner }
    }

    /// Tries again what `pause` stopped, from its first delay.
    func resume(_ paused: [Work]) {
        for work in paused { retry(work) }
    }

    /// Stops trying the owner's replies for good, once no attempt of theirs is running: their
    /// account is being deleted, and its journals with it. `untilDeleted`: this node deletes it,
    /// and their journals stay counted until `deleted(owner:)` (a deletion the store fails leaves
    /// them to the next start-up's recovery); otherwise another node does, and they are no longer
    /// counted here.
    func forget(owner: String, untilDeleted: Bool = false) async {
        let dropped = await stop { $0 == owner }
        if untilDeleted {
            droppedForDeletion.withLock { $0[owner, default: 0] += dropped.count }
        } else if !dropped.isEmpty {
            metrics.awaitingRecovery.decrement(by: Double(dropped.count))
        }
        for work in dropped { await work.releaseHold?() }
    }

    /// The owner's account is deleted, with the journals of the replies `forget` dropped for it.
    func deleted(owner: String) {
        guard let count = droppedForDeletion.withLock({ $0.removeValue(forKey: owner) }), count > 0 else { return }
        metrics.awaitingRecovery.decrement(by: Double(count))
    }

    /// Stops every retry (a shutdown): what they had not done waits in the journals.
    func cancelAll() async {
        _ = await stop { _ in true }
    }

    private func stop(where isOwner: (String) -> Bool) async -> [Work] {
        let tasks = entries.withLock { e in
            let picked = e.filter { isOwner($0.value.owner) }
            for stream in picked.keys { e.removeValue(forKey: stream) }
            return picked.values.map(\.task)
        }
        for task in tasks { task.cancel() }
        var left: [Work] = []
        for task in tasks { if let work = await task.value { left.append(work) } }
        return left
    }

    private func run(_ start: Work, _ message: KeptMessage, _ first: StoreWrites.Backoff) async -> Work? {
        var work = start
        var backoff = first
        defer { _ = entries.withLock { $0.removeValue(forKey: start.stream) } }
        for _ in 0..<attempts {
            do {
                try await backoff.pause()
            } catch {
                if message.isStored { work.store = nil }
                if !message.isHeld { work.releaseHold = nil }
                return work
            }
            if let settle = work.settle, await settle() { work.settle = nil }
            guard (try? await message.store()) != nil, work.settle == nil else { continue }
            do {
                try await store.deleteStreamJournal(stream: start.stream)
            } catch {
                continue
            }
            metrics.awaitingRecovery.decrement()
            logger.notice("a reply the store had refused is stored and settled", metadata: ["stream": "\(start.stream)"])
            return nil
        }
        logger.warning("a reply the store refused is left to the next start-up", metadata: ["stream": "\(start.stream)"])
        await message.letGo()
        return nil
    }
}
