#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import ParleyCore
import ParleyMongoStore
import Synchronization

/// An exclusive `flock` on `<data directory>/parley.lock`, held while the server runs: a second
/// process on the same directory (the same SQLite file, secret and node id) is refused with the
/// first one's pid. The kernel lets go when the process dies, so a restart after a crash is not.
final class DataDirectoryLock: Sendable {
    private let descriptor: Mutex<Int32>

    private init(_ descriptor: Int32) { self.descriptor = Mutex(descriptor) }

    static func acquire(directory: String) throws -> DataDirectoryLock {
        let path = directory + "/parley.lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ConfigurationError("cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            close(fd)
            throw ConfigurationError(
                "another parley process\(holder.isEmpty ? "" : " (pid \(holder))") is using the data directory \(directory); "
                    + "stop it, or give this one a --data-dir of its own")
        }
        // The holder's pid, for the message above.
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pwrite(fd, pid, pid.count, 0)
        return DataDirectoryLock(fd)
    }

    func release() {
        descriptor.withLock { fd in
            guard fd >= 0 else { return }
            close(fd)
            fd = -1
        }
    }

    deinit { release() }
}

/// Keeps this node's lease on a MongoDB database (`NodeLease`): claimed at start-up, waiting out
/// at most one lease period for a holder that stopped renewing (a node that crashed), then
/// renewed every third of the period, and given up at shutdown. The node's id lives in its data
/// directory (under `DataDirectoryLock`), so a restart after a crash takes its own lease back at
/// once. Losing the lease (this process stalled past the period and another node took over) is
/// reported through `lost`: the node must stop at once, as after a crash. So is a lease about to
/// expire unrenewed (a sixth of a period before: the store out of reach, or in a cluster the
/// broker, while which it is not renewed): another node may take this one's work over once it
/// expired, and this one must not be generating then.
final class NodeLeaseKeeper: Sendable {
    let node: String
    /// Which lease: the database's, or this node's own in a cluster.
    let key: String
    private let store: MongoStore
    private let period: Duration
    private let logger: Logger
    private let renewal = Mutex<Task<Void, Never>?>(nil)
    private let watchdog = Mutex<Task<Void, Never>?>(nil)
    /// Until when the lease is surely this node's (the last renewal's request plus a period),
    /// and why the last renewal failed, if it did.
    private let held: Mutex<(until: ContinuousClock.Instant, untilMillis: Int64, failure: String?)>
    /// In a cluster: whether the node can reach the others (NATS). While it cannot, the lease is
    /// not renewed, so that another node takes its work over.
    private let reachability = Mutex<(@Sendable () -> Bool)?>(nil)
    /// Why the lease was lost, once.
    private let lostSignal: AsyncStream<String>
    private let lostContinuation: AsyncStream<String>.Continuation

    private init(node: String, key: String, store: MongoStore, period: Duration, logger: Logger) {
        self.node = node
        self.key = key
        self.store = store
        self.period = period
        self.logger = logger
        held = Mutex((ContinuousClock.now + period, Int64(Timestamp.nowMillis()) + Timestamp.millis(period), nil))
        (lostSignal, lostContinuation) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    /// Renews the lease only while `reachable` says the node can reach the other nodes.
    func renewOnlyWhile(_ reachable: @escaping @Sendable () -> Bool) {
        reachability.withLock { $0 = reachable }
    }

    /// This node's id: kept in `directory` (under `DataDirectoryLock`), made at its first start.
    static func nodeID(directory: String) throws -> String {
        String(try SecretFile.loadOrCreate(at: directory + "/node-id").prefix(16))
    }

    /// Claims lease `key` for `node`: the database's (`MongoStore.soleNodeKey`) for a node alone
    /// on it, the node's own in a cluster. Throws `ConfigurationError` naming the holder when
    /// another node keeps it past one period.
    static func claim(store: MongoStore, node: String, key: String, period: Duration, logger: Logger) async throws -> NodeLeaseKeeper {
        try await refuseTheOtherMode(store: store, key: key)
        let keeper = NodeLeaseKeeper(node: node, key: key, store: store, period: period, logger: logger)
        let giveUp = ContinuousClock.now + period + .seconds(1)
        while true {
            let asked = (ContinuousClock.now, Int64(Timestamp.nowMillis()))
            guard let holder = try await keeper.claimOnce() else {
                keeper.held(from: asked)
                break
            }
            guard ContinuousClock.now < giveUp else {
                if key != MongoStore.soleNodeKey {
                    throw ConfigurationError(
                        "node \(holder.node) on \(holder.host) (pid \(holder.pid)) holds this node's lease (\(key)) while it finishes what "
                            + "this node left; start it again in a moment, or give it another --node-id")
                }
                throw ConfigurationError(
                    "another Parley node (\(holder.node) on \(holder.host), pid \(holder.pid)) is serving from this MongoDB database; "
                        + "a node without --broker runs alone on its database, so stop that one or give this one a database of its own")
            }
            logger.notice("waiting for the node lease", metadata: ["holder": "\(holder.node) on \(holder.host)", "lease": "\(key)"])
            try await Task.sleep(for: min(period / 3, giveUp - ContinuousClock.now))
        }
        keeper.renewal.withLock { $0 = Task { await keeper.renew() } }
        keeper.watchdog.withLock { $0 = Task { await keeper.watch() } }
        return keeper
    }

    /// A node alone on its database and a cluster's nodes must not serve from one database: each
    /// would take the other's work for a crash's leftovers. Refused when the other kind holds a
    /// live lease there (two starting at the same moment can still both pass).
    private static func refuseTheOtherMode(store: MongoStore, key: String) async throws {
        let now = Int64(Timestamp.nowMillis())
        let live = try await store.nodeLeases().filter { $0.value.expires >= now }
        if key == MongoStore.soleNodeKey, let (_, other) = live.first(where: { $0.key != MongoStore.soleNodeKey }) {
            throw ConfigurationError(
                "the nodes of a cluster (\(other.node) on \(other.host), pid \(other.pid)) serve from this MongoDB database; "
                    + "start this one with --broker to join them, or give it a database of its own")
        }
        if key != MongoStore.soleNodeKey, let other = live[MongoStore.soleNodeKey] {
            throw ConfigurationError(
                "a node without --broker (\(other.node) on \(other.host), pid \(other.pid)) serves from this MongoDB database; "
                    + "stop it, or start it with --broker too")
        }
    }

    /// The lease as this node claims it now.
    private func claimOnce() async throws -> NodeLease? {
        let now = Int64(Timestamp.nowMillis())
        let lease = NodeLease.thisProcess(node: node, expires: now + Timestamp.millis(period))
        return try await store.claimNodeLease(lease, now: now, key: key)
    }

    private func renew() async {
        while true {
            do {
                try await Task.sleep(for: period / 3)
            } catch {
                return  // cancelled: the shutdown gives the lease up
            }
            if let reachable = reachability.withLock({ $0 }), !reachable() {
                held.withLock { $0.failure = "this node is cut off from the broker" }
                logger.error("cut off from the broker: not renewing the node lease, so that another node takes this one's work over")
                continue
            }
            // The lease runs from when it was asked for, not from when the store answered.
            let asked = (ContinuousClock.now, Int64(Timestamp.nowMillis()))
            do {
                if let holder = try await claimOnce() {
                    lostContinuation.yield("node \(holder.node) on \(holder.host) (pid \(holder.pid)) took the node lease (\(key)) over")
                    return
                }
                held(from: asked)
            } catch {
                held.withLock { $0.failure = "\(error)" }
                logger.error("renewing the node lease failed; trying again", metadata: ["error": "\(error)"])
            }
        }
    }

    /// A renewal asked for at `asked` (monotonic, wall) succeeded: the lease is this node's
    /// until a period after it, by either clock (the store counted from a later moment).
    private func held(from asked: (ContinuousClock.Instant, Int64)) {
        held.withLock { $0 = (asked.0 + period, asked.1 + Timestamp.millis(period), nil) }
    }

    /// When (milliseconds since the epoch) the node is told to stop unless it renews first: a
    /// sixth of a period before the stored lease can expire.
    var stopsAtMillis: Int64 { held.withLock { $0.untilMillis } - Timestamp.millis(period / 6) }

    /// Reports the lease lost a sixth of a period before it expires unrenewed, however long a
    /// renewal in flight blocks (a store out of reach answers only after its own timeout).
    private func watch() async {
        while true {
            let (until, _, failure) = held.withLock { $0 }
            let deadline = until - period / 6
            guard ContinuousClock.now < deadline else {
                lostContinuation.yield("the node lease could not be renewed before it expired: \(failure ?? "no answer from the store")")
                return
            }
            do {
                try await Task.sleep(until: deadline)
            } catch {
                return
            }
        }
    }

    /// Returns why, when this node lost its lease (another node may be serving from the
    /// database now: the caller stops the process at once); nil after `release`.
    func lost() async -> String? {
        var iterator = lostSignal.makeAsyncIterator()
        return await iterator.next()
    }

    /// Stops renewing and gives the lease up (a clean shutdown).
    func release() async {
        for task in [renewal.withLock { $0 }, watchdog.withLock { $0 }] {
            task?.cancel()
            await task?.value
        }
        lostContinuation.finish()
        do {
            try await store.releaseNodeLease(node: node, key: key)
        } catch {
            logger.warning("could not give up the node lease; it expires by itself", metadata: ["error": "\(error)"])
        }
    }
}

extension NodeLease {
    /// A lease for `node` held by this process (its host and pid, for the message another node
    /// gets), until `expires`.
    static func thisProcess(node: String, expires: Int64) -> NodeLease {
        NodeLease(node: node, host: ProcessInfo.processInfo.hostName, pid: Int64(getpid()), expires: expires)
    }
}
