import CoreMetrics
import Foundation
import Logging
import NIOCore
import ParleyCore
import ParleyMongoStore

/// In a cluster (#22), finishes what a node that stopped renewing its lease left (a `kill -9`,
/// a machine gone): every period's third it looks for expired node leases, takes one over (a
/// conditional update: one node wins), and does for that node what its own restart would have
/// done: voids or completes its half-applied ledger entries, stores its cut replies as
/// `interrupted` and settles their credits exactly (every step idempotent), and ends those
/// streams for their readers on every node with a `stream.end` saying `interrupted`, and fires
/// again the scheduled messages it was firing. Then it lets the lease go. A node back from a stall finds its lease taken and stops.
final class NodeReaper: Sendable {
    private let store: MongoStore
    private let node: String
    private let period: Duration
    private let credits: Credits
    private let broker: NATSBroker?
    private let schedules: ScheduleService?
    private let rooms: RoomService?
    private let logger: Logger
    private let takeovers: Counter

    init(
        store: MongoStore, node: String, period: Duration, credits: Credits, broker: NATSBroker?, schedules: ScheduleService? = nil,
        rooms: RoomService? = nil, logger: Logger, metrics: any MetricsFactory
    ) {
        self.rooms = rooms
        self.schedules = schedules
        self.store = store
        self.node = node
        self.period = period
        self.credits = credits
        self.broker = broker
        self.logger = logger
        takeovers = Counter(label: "parley_node_takeovers_total", factory: metrics)
    }

    /// Sweeps until cancelled.
    func run() async {
        while true {
            do {
                try await Task.sleep(for: period / 3)
            } catch {
                return
            }
            await sweep()
        }
    }

    /// One look at the leases; returns the nodes whose leftovers this node finished.
    @discardableResult
    func sweep() async -> [String] {
        var taken: [String] = []
        do {
            let now = Int64(Timestamp.nowMillis())
            for (key, lease) in try await store.nodeLeases() where key != node && key != MongoStore.soleNodeKey && lease.expires < now {
                let claim = NodeLease.thisProcess(node: node, expires: now + Timestamp.millis(period))
                guard try await store.claimNodeLease(claim, now: now, key: key) == nil else { continue }
                logger.notice("taking over what a stopped node left", metadata: ["node": "\(key)", "host": "\(lease.host)"])
                try await takeOver(key)
                taken.append(key)
            }
        } catch {
            logger.error("looking for stopped nodes failed; trying again", metadata: ["error": "\(error)"])
        }
        return taken
    }

    /// Where a journal's stream went: the topic its tokens were published under (`tokens`) and
    /// one every node with a reader of it follows (`end`). A translation chat's streams keep no
    /// text (`settleOnly`): their kind comes from the head the broker kept.
    func readers(of journal: StreamJournal) async -> (tokens: Topic, end: Topic) {
        switch journal.target {
        case .roomTurn(let room, _): return (.room(room), .room(room))
        case .conversation, .alternative: return (.user(journal.user), .user(journal.user))
        case .settleOnly:
            switch await broker?.kind(of: journal.stream) {
            case .translation(let room, let lang, _, _), .roomReply(let room, _, let lang, _):
                return (.room(room, readers: lang), .room(room))
            default: return (.user(journal.user), .user(journal.user))
            }
        }
    }

    private func takeOver(_ dead: String) async throws {
        let settled = try await store.recoverLedger(node: dead)
        let allocator = ByteBufferAllocator()
        // A reply is stored as far as its readers got it: the journal, written every few tokens,
        // and after it the tokens JetStream kept.
        let broker = self.broker
        // Each journal's readers, looked up once (a translation's from JetStream) for both steps.
        var readers: [String: (tokens: Topic, end: Topic)] = [:]
        let streams = try await StreamRecovery(store: store, credits: credits, logger: logger).run(node: dead) { journal in
            let topics = await self.readers(of: journal)
            readers[journal.stream] = topics
            guard let more = await broker?.publishedTokens(of: journal.stream, readers: topics.tokens, after: journal.outputTokens),
                !more.isEmpty
            else { return journal }
            var revised = journal
            revised.text += more.joined()
            revised.outputTokens += more.count
            return revised
        } finished: { finished in
            let journal = finished.journal
            let frame = ServerFrame.streamEnd(
                stream: journal.stream, reason: .interrupted, usage: finished.usage, message: finished.stored, cost: finished.cost,
                balance: finished.balance)
            // `revise` saw every journal first (`StreamRecovery.run`).
            let end = readers.removeValue(forKey: journal.stream)?.end ?? .user(journal.user)
            broker?.endOrphan(stream: journal.stream, readers: end, frame: allocator.buffer(bytes: frame))
        }
        try await store.releaseReplySlots(node: dead)
        // Its scheduled messages in the middle of firing become this node's before its lease goes
        // (should this node stop too, whoever takes it over finds them), then fire again here:
        // the message is stored once and its credits charged once (see `ScheduleService`).
        let firings = try await schedules?.cluster?.adoptFirings(from: dead) ?? []
        // So do its debates (no other node takes them while its lease is there).
        let adopted = try await rooms?.adoptRooms(of: dead) ?? []
        try await store.releaseNodeLease(node: node, key: dead)
        schedules?.resumeFirings(firings)
        // They go on here, from the turn it cut (stored above), retried; its sockets are gone.
        rooms?.owners?.gone(dead)
        await rooms?.continueRooms(adopted)
        takeovers.increment()
        logger.notice(
            "finished what a stopped node left",
            metadata: [
                "node": "\(dead)", "streams": "\(streams)", "ledger": "\(settled)", "schedules": "\(firings.count)", "rooms": "\(adopted.count)",
            ])
    }
}
