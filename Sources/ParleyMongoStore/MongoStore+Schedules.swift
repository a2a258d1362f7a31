import ParleyCore
import ParleyStore

/// Scheduled messages: one document per schedule; every status change is one conditional
/// findAndModify on `{_id, status}`, so two servers (or a retry) can never both move it, and a
/// retry after a lost reply knows its first attempt moved it (`findAndModifyOnce`).
extension MongoStore {
    public func createSchedule(_ s: Schedule) async throws {
        try await run { db in try db.insert("schedules", Self.document(s)) }
    }

    public func schedule(id: String, owner: String) async throws -> Schedule? {
        try await run { db in
            try db.find("schedules", filter: .object([("_id", .string(id)), ("owner", .string(owner))]), limit: 1)
                .first.map(Self.schedule(from:))
        }
    }

    public func schedules(owner: String, limit: Int, before: String?) async throws -> [Schedule] {
        try await run { db in
            var filter: [(String, JSONValue)] = [("owner", .string(owner))]
            if let before { filter.append(("_id", .object([("$lt", .string(before))]))) }
            return try db.find("schedules", filter: .object(filter), sort: .object([("_id", .int(-1))]), limit: limit)
                .map(Self.schedule(from:))
        }
    }

    public func schedules(statuses: [Schedule.Status], owner: String?, limit: Int, after: String?) async throws -> [Schedule] {
        guard !statuses.isEmpty else { return [] }
        return try await run { db in
            var filter: [(String, JSONValue)] = [("status", .object([("$in", .array(statuses.map { .string($0.rawValue) }))]))]
            if let owner { filter.append(("owner", .string(owner))) }
            if let after { filter.append(("_id", .object([("$gt", .string(after))]))) }
            return try db.find("schedules", filter: .object(filter), sort: .object([("_id", .int(1))]), limit: limit)
                .map(Self.schedule(from:))
        }
    }

    public func transitionSchedule(id: String, from: Schedule.Status, to change: ScheduleChange) async throws -> Schedule? {
        try await run { db in try Self.transition(db, id: id, from: from, change) }
    }

    private static func transition(_ db: Database, id: String, from: Schedule.Status, _ change: ScheduleChange) throws -> Schedule? {
        var set: [(String, JSONValue)] = [("status", .string(change.status.rawValue)), ("updated_at", .long(change.updatedAt))]
        if let conversation = change.conversation { set.append(("conversation", .string(conversation))) }
        if let message = change.message { set.append(("message", .string(message))) }
        if let failure = change.failure { set.append(("failure", .string(failure))) }
        // Who fires it: in a cluster, only that node (or the one that takes it over) resumes it.
        if change.status == .firing, let node = db.options.node { set.append(("node", .string(node))) }
        return try db.findAndModifyOnce("schedules", id: .string(id), query: [("status", .string(from.rawValue))], set: set)
            .map(Self.schedule(from:))
    }

    /// No multi-document transaction on a standalone server, so each step is idempotent instead:
    /// the conversation and message inserts keep what an interrupted attempt stored, and the
    /// last step (firing → fired) is the conditional one.
    public func completeSchedule(id: String, message: Message, newConversation: Conversation?, now: Int64) async throws -> Schedule? {
        try await run { db in
            guard
                try db.find(
                    "schedules", filter: .object([("_id", .string(id)), ("status", .string(Schedule.Status.firing.rawValue))]),
                    limit: 1
                ).first != nil
            else {
                return nil
            }
            if let newConversation {
                do {
                    try db.insert("conversations", Self.document(newConversation))
                } catch StoreError.duplicateKey {
                    // Stored by an attempt a crash interrupted.
                }
            }
            try Self.append(message, db, orIgnore: true)
            return try Self.transition(
                db, id: id, from: .firing,
                ScheduleChange(status: .fired, updatedAt: now, conversation: message.conversation, message: message.id))
        }
    }

    // MARK: A cluster's schedules (#22)

    /// The pending schedules of `shards` due before `dueBefore` (all when nil), by id, from
    /// after `after`.
    public func pendingSchedules(shards: Set<Int>, dueBefore: Int64? = nil, limit: Int, after: String?) async throws -> [Schedule] {
        guard !shards.isEmpty else { return [] }
        return try await run { db in
            var filter: [(String, JSONValue)] = [
                ("status", .string(Schedule.Status.pending.rawValue)),
                ("shard", .object([("$in", .array(shards.sorted().map { .int(Int64($0)) }))])),
            ]
            if let dueBefore { filter.append(("at", .object([("$lt", .long(dueBefore))]))) }
            if let after { filter.append(("_id", .object([("$gt", .string(after))]))) }
            return try db.find("schedules", filter: .object(filter), sort: .object([("_id", .int(1))]), limit: limit)
                .map(Self.schedule(from:))
        }
    }

    /// The schedules `node` started firing and has not finished (a crash, or a kill), by id.
    public func firingSchedules(node: String) async throws -> [Schedule] {
        try await run { db in
            try db.find(
                "schedules", filter: .object([("status", .string(Schedule.Status.firing.rawValue)), ("node", .string(node))]),
                sort: .object([("_id", .int(1))])
            ).map(Self.schedule(from:))
        }
    }

    /// Makes the schedules `dead` was firing `node`'s to finish (a takeover): if `node` dies
    /// in turn, whoever takes it over finds them. Returns them.
    public func adoptFiringSchedules(from dead: String, to node: String) async throws -> [Schedule] {
        try await run { db in
            let filter = JSONValue.object([("status", .string(Schedule.Status.firing.rawValue)), ("node", .string(dead))])
            let found = try db.find("schedules", filter: filter, sort: .object([("_id", .int(1))]))
            _ = try db.update("schedules", query: filter, update: .object([("$set", .object([("node", .string(node))]))]), multi: true)
            return found.map(Self.schedule(from:))
        }
    }

    /// Whether the pending schedule `id` is among its owner's first `limit` pending ones (ids
    /// order by creation): how a node counts a user's pending schedules across a cluster.
    public func isWithinPendingLimit(id: String, owner: String, limit: Int) async throws -> Bool {
        try await run { db in
            try db.find(
                "schedules", filter: .object([("owner", .string(owner)), ("status", .string(Schedule.Status.pending.rawValue))]),
                sort: .object([("_id", .int(1))]), projection: .object([("_id", .int(1))]), limit: limit
            ).contains { $0["_id"]?.stringValue == id }
        }
    }

    /// Removes a schedule that is still pending (one created over the limit); false when it
    /// started firing meanwhile. Gone without a deletion counted is withdrawn too: a retry after
    /// a lost reply finds nothing to delete where its first attempt deleted it (taken for "firing",
    /// the user was told it was scheduled, and it never fired).
    public func withdrawSchedule(id: String) async throws -> Bool {
        try await run { db in
            try db.delete("schedules", query: .object([("_id", .string(id)), ("status", .string(Schedule.Status.pending.rawValue))])) == 1
                || db.find("schedules", filter: .object([("_id", .string(id))]), limit: 1).isEmpty
        }
    }

    static func document(_ s: Schedule) -> JSONValue {
        var doc: [(String, JSONValue)] = [
            ("_id", .string(s.id)), ("owner", .string(s.owner)), ("clone", .string(s.clone)),
            ("conversation", s.conversation.map(JSONValue.string) ?? .null), ("at", .long(s.at)),
            ("shard", .int(Int64(ScheduleShards.shard(of: s.id)))),
        ]
        switch s.content {
        case .prompt(let prompt): doc += [("kind", .string("prompt")), ("body", .string(prompt))]
        case .text(let text): doc += [("kind", .string("text")), ("body", .string(text))]
        }
        doc += [("status", .string(s.status.rawValue)), ("created_at", .long(s.createdAt)), ("updated_at", .long(s.updatedAt))]
        if let message = s.message { doc.append(("message", .string(message))) }
        if let failure = s.failure { doc.append(("failure", .string(failure))) }
        return .object(doc)
    }

    static func schedule(from d: JSONValue) -> Schedule {
        let body = d["body"]?.stringValue ?? ""
        return Schedule(
            id: d["_id"]?.stringValue ?? "", owner: d["owner"]?.stringValue ?? "", clone: d["clone"]?.stringValue ?? "",
            conversation: d["conversation"]?.stringValue, at: d["at"]?.int64 ?? 0,
            content: d["kind"]?.stringValue == "prompt" ? .prompt(body) : .text(body),
            status: Schedule.Status(rawValue: d["status"]?.stringValue ?? "") ?? .failed,
            createdAt: d["created_at"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0,
            message: d["message"]?.stringValue, failure: d["failure"]?.stringValue
        )
    }
}
