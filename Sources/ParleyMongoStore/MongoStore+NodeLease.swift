import ParleyCore
import ParleyStore

/// A lease on a database, by key: alone, the one node that may serve from it (key `node`: each
/// node's start-up resumes rooms, loads schedules and recovers the ledger as if it were alone, so
/// two such nodes would take each other's work for a crash's leftovers); in a cluster (#22),
/// each node's own (key: its id), which another node takes over once it expired, to finish what
/// the dead node left.
public struct NodeLease: Sendable, Equatable {
    public var node: String
    public var host: String
    public var pid: Int64
    /// Milliseconds since the epoch; the lease is free from then on unless renewed.
    public var expires: Int64
    /// Grows each time the lease changes hands (never on a renewal): by one when it is taken
    /// over, and a lease given up and claimed anew starts at the claim's time in milliseconds, so
    /// it still grows (with the nodes' clocks in step to within a lease period). What a holder
    /// writes under its lease is fenced with it (`fenceRoom`), so a holder that lost the lease
    /// while stalled cannot write over its successor.
    public var epoch: Int64

    public init(node: String, host: String, pid: Int64, expires: Int64, epoch: Int64 = 0) {
        self.node = node
        self.host = host
        self.pid = pid
        self.expires = expires
        self.epoch = epoch
    }
}

extension MongoStore {
    /// The lease of a node alone on its database.
    public static let soleNodeKey = "node"
    /// Where the nodes' leases are kept; a cluster's other leases (schedule shards) have their
    /// own collection, so a node counting or taking over nodes never sees them.
    public static let nodeLeases = "node_lease"

    /// Takes or renews the lease `key` for `lease.node` until `lease.expires`: a
    /// conditional update of the lease that is `lease.node`'s (a renewal) or expired at `now` (a
    /// takeover, which bumps its epoch), or, when there is none yet, its insert at epoch `now` (a lost
    /// race for that insert is a duplicate key). Not an upsert: whether an upsert's insert keeps
    /// the `_id` of a query with operators differs between servers.
    /// Returns nil when it is `lease.node`'s now, or the live lease of the node that holds it.
    public func claimNodeLease(
        _ lease: NodeLease, now: Int64, key: String = soleNodeKey, in collection: String = nodeLeases
    ) async throws -> NodeLease? {
        try await run(on: .leases) { db in
            let fields = Self.fields(lease)
            let mine = JSONValue.object([("_id", .string(key)), ("node", .string(lease.node))])
            let expired = JSONValue.object([("_id", .string(key)), ("expires", .object([("$lt", .long(now))]))])
            for _ in 0..<2 {
                if try db.findAndModify(collection, query: mine, update: .object([("$set", .object(fields))])) != nil { return nil }
                let takeover = JSONValue.object([("$set", .object(fields)), ("$inc", .object([("epoch", .long(1))]))])
                if try db.findAndModify(collection, query: expired, update: takeover) != nil { return nil }
                do {
                    try db.insert(collection, .object([("_id", .string(key))] + fields + [("epoch", .long(now))]))
                    return nil
                } catch StoreError.duplicateKey {
                    // Held; unless it expired between the two steps (then the update takes it).
                    guard let held = try db.find(collection, filter: .object([("_id", .string(key))]), limit: 1).first else { continue }
                    let holder = Self.nodeLease(held)
                    if holder.node != lease.node, holder.expires >= now { return holder }
                }
            }
            throw StoreError.backend("the node lease changed hands while it was claimed; try again")
        }
    }

    /// Gives the lease `key` up (a clean shutdown, a dead node's leftovers finished), if `node` holds it.
    public func releaseNodeLease(node: String, key: String = soleNodeKey, in collection: String = nodeLeases) async throws {
        try await run { db in _ = try db.delete(collection, query: .object([("_id", .string(key)), ("node", .string(node))])) }
    }

    /// Extends every lease of `collection` that `node` holds to `expires`, in one update;
    /// returns how many it holds.
    @discardableResult
    public func renewLeases(node: String, expires: Int64, in collection: String) async throws -> Int {
        try await run(on: .leases) { db in
            Int(
                try db.update(
                    collection, query: .object([("node", .string(node))]), update: .object([("$set", .object([("expires", .long(expires))]))]),
                    multi: true
                ).matched)
        }
    }

    /// Makes the lease `key` that `from` holds `lease.node`'s, live or not (`from` stopped and
    /// was taken over); false when `from` does not hold it (nor did when this call moved it and
    /// the reply was lost: `findAndModifyOnce`).
    public func transferLease(_ key: String, from: String, to lease: NodeLease, in collection: String) async throws -> Bool {
        try await run { db in
            try db.findAndModifyOnce(
                collection, id: .string(key), query: [("node", .string(from))], set: Self.fields(lease), inc: [("epoch", .long(1))]) != nil
        }
    }

    /// The lease `key`, live or expired, if any.
    public func lease(_ key: String, in collection: String) async throws -> NodeLease? {
        try await run { db in try db.find(collection, filter: .object([("_id", .string(key))]), limit: 1).first.map(Self.nodeLease) }
    }

    /// Every lease by key, live or expired.
    public func nodeLeases(in collection: String = nodeLeases) async throws -> [String: NodeLease] {
        try await run { db in
            var leases: [String: NodeLease] = [:]
            for row in try db.find(collection, filter: .object([])) {
                if let key = row["_id"]?.stringValue { leases[key] = Self.nodeLease(row) }
            }
            return leases
        }
    }

    /// The nodes whose leases are live at `now`, other than `node` (and the sole node's key).
    public func otherLiveNodes(than node: String, now: Int64) async throws -> [String] {
        try await nodeLeases().filter { $0.key != node && $0.key != Self.soleNodeKey && $0.value.expires >= now }.map(\.key)
    }

    /// A lease's stored fields but its key and epoch.
    private static func fields(_ lease: NodeLease) -> [(String, JSONValue)] {
        [("node", .string(lease.node)), ("host", .string(lease.host)), ("pid", .long(lease.pid)), ("expires", .long(lease.expires))]
    }

    private static func nodeLease(_ row: JSONValue) -> NodeLease {
        NodeLease(
            node: row["node"]?.stringValue ?? "?", host: row["host"]?.stringValue ?? "?", pid: row["pid"]?.int64 ?? 0,
            expires: row["expires"]?.int64 ?? 0, epoch: row["epoch"]?.int64 ?? 0)
    }
}
