import CoreMetrics
import Foundation
import Logging
import NIOCore
import ParleyCore
import ParleyMongoStore
import ParleyNATS
import Synchronization

/// Which schedules this node of a cluster fires (#22): those of the shards
/// (`ParleyCore.ScheduleShards`) it holds a lease on in MongoDB. Every third of a lease period
/// it renews its leases and evens them out: with N live nodes each holds at most ⌈64 / N⌉, so
/// it lets go of extra shards when a node joins and claims free or expired ones (a dead node's)
/// up to its share. A shard's pending schedules are loaded into the wheel when it is claimed
/// and dropped from it when it goes. A schedule created on another node arrives over NATS; a
/// message that was lost on the way is caught up from the store at the next renewal, a period
/// before it is due.
///
/// Exactly once does not rest on the leases: `pending → firing` is a compare-and-set in the
/// store, so two nodes that both believe they hold a shard (one stalled past its lease) still
/// fire each schedule once. A firing belongs to the node that claimed it (stamped in the
/// store): only it resumes it after a restart, or the node that takes it over (`NodeReaper`).
final class ScheduleShardKeeper: Sendable {
    static let leases = "schedule_shards"

    private let store: MongoStore
    private let broker: NATSBroker
    private let node: String
    private let period: Duration
    private let logger: Logger
    private let heldMeter: Meter

    private struct State {
        var held: Set<Int> = []
        var service: ScheduleService?
        var renewal: Task<Void, Never>?
        var subscriptions: [NATSSubscription] = []
        var stopped = false
    }

    private let state = Mutex(State())
    /// One renewal at a time (the periodic one, and a test's).
    private let balancing = FIFOLock()

    init(store: MongoStore, broker: NATSBroker, node: String, period: Duration, logger: Logger, metrics: any MetricsFactory) {
        heldMeter = Meter(label: "parley_schedule_shards_held", factory: metrics)
        self.store = store
        self.broker = broker
        self.node = node
        self.period = period
        self.logger = logger
    }

    /// The shards held now (for tests and diagnostics).
    var held: Set<Int> { state.withLock { $0.held } }

    /// Takes this node's share of the shards for `service`, then keeps it until `stop`.
    func start(_ service: ScheduleService) async throws {
        let added = try broker.subscribe(subject: BrokerSubjects.anyScheduleAdded) { [weak self] message in
            guard let self, let entry = Self.entry(message.payload), self.holds(entry.id) else { return }
            self.state.withLock { $0.service }?.timer.add(entry)
        }
        let deliveries = try broker.subscribe(subject: BrokerSubjects.anyDelivery) { [weak self] message in
            guard let self, let (schedule, user, frame) = Self.delivery(message.payload) else { return }
            guard let service = self.state.withLock({ $0.service }) else { return }
            Task { await service.deliverHere(frame, schedule: schedule, user: user) }
        }
        state.withLock {
            $0.service = service
            $0.subscriptions = [added, deliveries]
        }
        await balance()
        let renewal = Task { [period] in
            while true {
                do {
                    try await Task.sleep(for: period / 3)
                } catch {
                    return
                }
                await self.balance()
            }
        }
        state.withLock { $0.renewal = renewal }
    }

    /// Stops claiming and firing new shards' schedules and lets the leases go, so the other
    /// nodes take the shards at once (after the firings in flight finished).
    func stop() async {
        let (renewal, subscriptions) = state.withLock { s in
            s.stopped = true
            s.service = nil
            s.held = []
            defer { s.subscriptions = [] }
            return (s.renewal, s.subscriptions)
        }
        renewal?.cancel()
        await renewal?.value
        for subscription in subscriptions { subscription.cancel() }
        let leases = (try? await store.nodeLeases(in: Self.leases)) ?? [:]
        for (key, lease) in leases where lease.node == node { try? await store.releaseNodeLease(node: node, key: key, in: Self.leases) }
    }

    func holds(_ schedule: String) -> Bool {
        state.withLock { $0.held.contains(ScheduleShards.shard(of: schedule)) }
    }

    /// A schedule was created here: armed here when this node fires its shard, else sent to
    /// the node that does.
    func announce(_ entry: ScheduleTimer.Entry) {
        let shard = ScheduleShards.shard(of: entry.id)
        if let service = state.withLock({ $0.held.contains(shard) ? $0.service : nil }) {
            service.timer.add(entry)
        } else {
            broker.publish(subject: BrokerSubjects.scheduleAdded(shard: shard), Self.encode(entry))
        }
    }

    /// Has the nodes where `user` has sockets write a fired schedule's message to them (each
    /// records the delivery).
    func deliverElsewhere(_ frame: ByteBuffer, schedule: String, user: String) {
        broker.publish(subject: BrokerSubjects.delivery(user: user), Array((schedule + "\n" + user + "\n").utf8) + Array(frame.readableBytesView))
    }

    /// One renewal: keeps the leases held, drops the lost ones, evens the shards out, and
    /// catches up on schedules due within a period that a lost message left unarmed.
    func balance() async {
        await balancing.run { await balanceOnce() }
    }

    private func balanceOnce() async {
        guard let service = state.withLock({ $0.stopped ? nil : $0.service }) else { return }
        do {
            let now = Int64(Timestamp.nowMillis())
            let expires = now + Timestamp.millis(period)
            try await store.renewLeases(node: node, expires: expires, in: Self.leases)
            let leases = try await store.nodeLeases(in: Self.leases)
            var mine = Set(leases.filter { $0.value.node == node }.compactMap { Int($0.key) })
            let nodes = try await store.otherLiveNodes(than: node, now: now).count + 1
            let share = (ScheduleShards.count + nodes - 1) / nodes
            if mine.count > share {
                let extra = Set(mine.sorted().suffix(mine.count - share))
                mine.subtract(extra)
                drop(extra, from: service)
                for shard in extra { try await store.releaseNodeLease(node: node, key: "\(shard)", in: Self.leases) }
            }
            drop(state.withLock { $0.held }.subtracting(mine), from: service)
            var claimed: Set<Int> = []
            let free = (0..<ScheduleShards.count).filter { shard in
                guard let lease = leases["\(shard)"] else { return true }
                return lease.node != node && lease.expires < now
            }
            for shard in free.shuffled() where mine.count + claimed.count < share {
                let lease = NodeLease.thisProcess(node: node, expires: expires)
                if try await store.claimNodeLease(lease, now: now, key: "\(shard)", in: Self.leases) == nil { claimed.insert(shard) }
            }
            // Held before loading: a schedule announced meanwhile is armed, not dropped.
            let kept = state.withLock { s -> Set<Int> in
                guard !s.stopped else { return [] }
                let kept = s.held.intersection(mine)
                s.held = mine.union(claimed)
                return kept
            }
            heldMeter.set(mine.count + claimed.count)
            let loading = mine.union(claimed).subtracting(kept)
            if !loading.isEmpty {
                logger.info("firing the schedules of more shards", metadata: ["shards": "\(loading.sorted())"])
                try await service.load(shards: loading)
            }
            // Within a period of their time, every pending schedule of a held shard is armed.
            if !kept.isEmpty { try await service.load(shards: kept, dueBefore: now + Timestamp.millis(period)) }
        } catch {
            logger.error("renewing the schedule shards failed; trying again", metadata: ["error": "\(error)"])
        }
    }

    private func drop(_ shards: Set<Int>, from service: ScheduleService) {
        guard !shards.isEmpty else { return }
        heldMeter.set(
            state.withLock { s in
                s.held.subtract(shards)
                return s.held.count
            })
        logger.info("no longer firing the schedules of some shards", metadata: ["shards": "\(shards.sorted())"])
        service.timer.cancel { shards.contains(ScheduleShards.shard(of: $0)) }
    }

    // MARK: The store's side

    /// The schedules this node was firing when it stopped.
    func ownFirings() async throws -> [Schedule] { try await store.firingSchedules(node: node) }

    /// Makes the firings of the stopped node `dead` this node's (`NodeReaper`).
    func adoptFirings(from dead: String) async throws -> [Schedule] { try await store.adoptFiringSchedules(from: dead, to: node) }

    func pending(shards: Set<Int>, dueBefore: Int64?, limit: Int, after: String?) async throws -> [Schedule] {
        try await store.pendingSchedules(shards: shards, dueBefore: dueBefore, limit: limit, after: after)
    }

    func isWithinPendingLimit(_ schedule: Schedule, limit: Int) async throws -> Bool {
        try await store.isWithinPendingLimit(id: schedule.id, owner: schedule.owner, limit: limit)
    }

    /// Removes a schedule created over the limit; false when it started firing meanwhile.
    func withdraw(_ schedule: Schedule) async throws -> Bool { try await store.withdrawSchedule(id: schedule.id) }

    // MARK: Messages

    static func encode(_ entry: ScheduleTimer.Entry) -> [UInt8] {
        JSONValue.object([("id", .string(entry.id)), ("owner", .string(entry.owner)), ("at", .int(entry.at))]).serialized()
    }

    static func entry(_ payload: [UInt8]) -> ScheduleTimer.Entry? {
        guard let json = try? JSONValue.parse(payload), let id = json["id"]?.stringValue, let owner = json["owner"]?.stringValue,
            let at = json["at"]?.intValue
        else { return nil }
        return ScheduleTimer.Entry(id: id, owner: owner, at: at)
    }

    static func delivery(_ payload: [UInt8]) -> (schedule: String, user: String, frame: ByteBuffer)? {
        guard let first = payload.firstIndex(of: 0x0A), let second = payload[(first + 1)...].firstIndex(of: 0x0A) else { return nil }
        return (
            String(decoding: payload[..<first], as: UTF8.self), String(decoding: payload[(first + 1)..<second], as: UTF8.self),
            ByteBuffer(bytes: payload[(second + 1)...])
        )
    }
}
