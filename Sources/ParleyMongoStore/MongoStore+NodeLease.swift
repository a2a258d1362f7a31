import ParleyCore
import ParleyStore

/// The one node that may serve from a database, until Parley can run several (issue #22): each
/// node's start-up resumes rooms, loads schedules and recovers the ledger as if it were alone, so
/// two nodes on one database would take each other's work for a crash's leftovers.
public struct NodeLease: Sendable, Equatable {
    public var node: String
    public var host: String
    public var pid: Int64
    /// Milliseconds since the epoch; the lease is free from then on unless renewed.
    public var expires: Int64

    public init(node: String, host: String, pid: Int64, expires: Int64) {
        self.node = node
        self.host = host
        self.pid = pid
        self.expires = expires
    }
}

extension MongoStore {
    /// Takes or renews the database's node lease for `lease.node` until `lease.expires`: a
    /// conditional update of the lease that is `lease.node`'s or expired at `now`, or, when there
    /// is none yet, its insert (a lost race for that insert is a duplicate key). Not an upsert:
    /// whether an upsert's insert keeps the `_id` of a query with `$or` differs between servers.
    /// Returns nil when it is `lease.node`'s now, or the live lease of the node that holds it.
    public func claimNodeLease(_ lease: NodeLease, now: Int64) async throws -> NodeLease? {
        try await run { db in
            let filter = JSONValue.object([
                ("_id", .string("node")),
                ("$or", .array([.object([("node", .string(lease.node))]), .object([("expires", .object([("$lt", .long(now))]))])])),
            ])
            let fields: [(String, JSONValue)] = [
                ("node", .string(lease.node)), ("host", .string(lease.host)), ("pid", .long(lease.pid)), ("expires", .long(lease.expires)),
            ]
            for _ in 0..<2 {
                if try db.findAndModify("node_lease", query: filter, update: .object([("$set", .object(fields))])) != nil { return nil }
                do {
                    try db.insert("node_lease", .object([("_id", .string("node"))] + fields))
                    return nil
                } catch StoreError.duplicateKey {
                    // Held; unless it expired between the two steps (then the update takes it).
                    guard let held = try db.find("node_lease", filter: .object([("_id", .string("node"))]), limit: 1).first else { continue }
                    let holder = NodeLease(
                        node: held["node"]?.stringValue ?? "?", host: held["host"]?.stringValue ?? "?", pid: held["pid"]?.int64 ?? 0,
                        expires: held["expires"]?.int64 ?? 0)
                    if holder.node != lease.node, holder.expires >= now { return holder }
                }
            }
            throw StoreError.backend("the node lease changed hands while it was claimed; try again")
        }
    }

    /// Gives the lease up (a clean shutdown), if `node` holds it.
    public func releaseNodeLease(node: String) async throws {
        try await run { db in _ = try db.delete("node_lease", query: .object([("_id", .string("node")), ("node", .string(node))])) }
    }
}
