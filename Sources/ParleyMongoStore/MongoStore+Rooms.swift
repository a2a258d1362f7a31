import ParleyCore
import ParleyStore

/// Debate rooms (one document each, replaced whole on update) and their transcript entries.
extension MongoStore {
    public func createRoom(_ room: Room) async throws {
        try await run { db in try db.insert("rooms", Self.document(room)) }
    }

    public func room(id: String) async throws -> Room? {
        try await run { db in
            try db.find("rooms", filter: .object([("_id", .string(id))]), limit: 1).first.map(Self.room(from:))
        }
    }

    public func updateRoom(_ room: Room) async throws -> Bool {
        try await run { db in
            try db.update(
                "rooms", query: .object([("_id", .string(room.id)), ("owner", .string(room.owner))]),
                update: .object([("$set", Self.mutableFields(Self.document(room)))])
            ).matched > 0
        }
    }

    // MARK: Fencing (#22)

    /// A write of a room fenced with the epoch of a lease that another node has taken since.
    public struct Superseded: Error, CustomStringConvertible {
        public let room: String
        public var description: String { "room \(room) is run by another node now (its lease changed hands)" }
    }

    /// Writes of room `id` fenced with an epoch below `epoch` are refused from now on (a node
    /// that took the room's lease at `epoch`); false when a higher epoch fenced it already.
    public func fenceRoom(_ id: String, epoch: Int64) async throws -> Bool {
        try await run { db in
            let fence = JSONValue.object([("$set", .object([("fence", .long(epoch))]))])
            if try db.update("rooms", query: Self.fenced(id, epoch), update: fence).matched > 0 { return true }
            do {
                try Self.checkFence(db, id, epoch)
                return true  // no such room: nothing to fence
            } catch is Superseded {
                return false
            }
        }
    }

    /// `updateRoom`, unless a node with a newer lease on the room fenced it (`Superseded`).
    public func updateRoom(_ room: Room, fence epoch: Int64) async throws -> Bool {
        try await run { db in
            if try db.update(
                "rooms", query: Self.fenced(room.id, epoch, owner: room.owner), update: .object([("$set", Self.mutableFields(Self.document(room)))])
            ).matched > 0 {
                return true
            }
            try Self.checkFence(db, room.id, epoch)
            return false
        }
    }

    /// `appendRoomEntry`, unless a node with a newer lease on the room fenced it (`Superseded`).
    /// The check and the insert are two steps: a writer that stalls between them for longer than
    /// a lease period can still add one entry.
    public func appendRoomEntry(_ entry: RoomEntry, fence epoch: Int64) async throws {
        try await run { db in
            try Self.checkFence(db, entry.room, epoch)
            try db.insert("room_entries", Self.document(entry))
        }
    }

    private static func fenced(_ id: String, _ epoch: Int64, owner: String? = nil) -> JSONValue {
        var fields: [(String, JSONValue)] = [("_id", .string(id))]
        if let owner { fields.append(("owner", .string(owner))) }
        let unfenced = JSONValue.object([("fence", .object([("$exists", .bool(false))]))])
        return .object(fields + [("$or", .array([unfenced, .object([("fence", .object([("$lte", .long(epoch))]))])]))])
    }

    private static func checkFence(_ db: Database, _ id: String, _ epoch: Int64) throws {
        let newer = JSONValue.object([("_id", .string(id)), ("fence", .object([("$gt", .long(epoch))]))])
        if try !db.find("rooms", filter: newer, limit: 1).isEmpty { throw Superseded(room: id) }
    }

    public func rooms(statuses: [Room.Status], limit: Int, after: String?) async throws -> [Room] {
        guard !statuses.isEmpty else { return [] }
        return try await run { db in
            var filter: [(String, JSONValue)] = [("status", .object([("$in", .array(statuses.map { .string($0.rawValue) }))]))]
            if let after { filter.append(("_id", .object([("$gt", .string(after))]))) }
            return try db.find("rooms", filter: .object(filter), sort: .object([("_id", .int(1))]), limit: limit).map(Self.room(from:))
        }
    }

    public func appendRoomEntry(_ entry: RoomEntry) async throws {
        try await run { db in try db.insert("room_entries", Self.document(entry)) }
    }

    private static func document(_ e: RoomEntry) -> JSONValue {
        var doc: [(String, JSONValue)] = [
            ("_id", .string(e.id)), ("room", .string(e.room)), ("kind", .string(e.kind.rawValue)), ("speaker", .string(e.speaker)),
            ("text", .string(e.text)), ("created_at", .long(e.createdAt)),
        ]
        if let reason = e.reason { doc.append(("reason", .string(reason.rawValue))) }
        if let stream = e.stream { doc.append(("stream", .string(stream))) }
        if let lang = e.lang { doc.append(("lang", .string(lang.value))) }
        if let source = e.source { doc.append(("source", .string(source))) }
        doc.append(("speaker_is_clone", .bool(e.speakerIsClone)))
        return .object(doc)
    }

    public func roomEntries(room: String, limit: Int, before: String?) async throws -> [RoomEntry] {
        try await run { db in
            var filter: [(String, JSONValue)] = [("room", .string(room))]
            if let before { filter.append(("_id", .object([("$lt", .string(before))]))) }
            return try db.find("room_entries", filter: .object(filter), sort: .object([("_id", .int(-1))]), limit: limit).reversed().map { d in
                RoomEntry(
                    id: d["_id"]?.stringValue ?? "", room: d["room"]?.stringValue ?? "",
                    kind: RoomEntry.Kind(rawValue: d["kind"]?.stringValue ?? "") ?? .said, speaker: d["speaker"]?.stringValue ?? "",
                    text: d["text"]?.stringValue ?? "", createdAt: d["created_at"]?.int64 ?? 0,
                    reason: d["reason"]?.stringValue.flatMap(StreamEndReason.init(rawValue:)), stream: d["stream"]?.stringValue,
                    lang: d["lang"]?.stringValue.flatMap(LanguageTag.init), source: d["source"]?.stringValue,
                    speakerIsClone: d["speaker_is_clone"]?.boolValue)
            }
        }
    }

    static func document(_ r: Room) -> JSONValue {
        .object([
            ("_id", .string(r.id)), ("owner", .string(r.owner)), ("topic", .string(r.topic)),
            (
                "debaters",
                .array(r.debaters.map(\.json))
            ),
            ("rounds", .long(Int64(r.rounds))), ("policy", .string(r.policy.rawValue)), ("max_tokens", .long(Int64(r.maxTokensPerTurn))),
            ("visibility", .string(r.visibility.rawValue)), ("status", .string(r.status.rawValue)), ("turns_taken", .long(Int64(r.turnsTaken))),
            ("muted", .array(r.muted.map(JSONValue.string))), ("kicked", .array(r.kicked.map(JSONValue.string))),
            ("created_at", .long(r.createdAt)), ("updated_at", .long(r.updatedAt)),
            ("kind", .string(r.kind.rawValue)), ("members", .array(r.members.map(JSONValue.string))),
            ("languages", RoomCoding.languages(r.languages)),
        ])
    }

    static func room(from d: JSONValue) -> Room {
        Room(
            id: d["_id"]?.stringValue ?? "", kind: Room.Kind(rawValue: d["kind"]?.stringValue ?? "") ?? .debate, owner: d["owner"]?.stringValue ?? "",
            topic: d["topic"]?.stringValue ?? "",
            debaters: (d["debaters"]?.arrayValue ?? []).map(Room.Debater.init(json:)),
            rounds: Int(d["rounds"]?.int64 ?? 0), policy: Room.TurnPolicy(rawValue: d["policy"]?.stringValue ?? "") ?? .roundRobin,
            maxTokensPerTurn: Int(d["max_tokens"]?.int64 ?? 0),
            visibility: Room.Visibility(rawValue: d["visibility"]?.stringValue ?? "") ?? .private,
            status: Room.Status(rawValue: d["status"]?.stringValue ?? "") ?? .ended, turnsTaken: Int(d["turns_taken"]?.int64 ?? 0),
            muted: d["muted"]?.strings ?? [], kicked: d["kicked"]?.strings ?? [], members: d["members"]?.strings ?? [],
            languages: RoomCoding.languages(d["languages"] ?? .object([])),
            createdAt: d["created_at"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0
        )
    }
}
