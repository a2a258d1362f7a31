import CMongo
import CoreMetrics
import Foundation
import NIOCore
import NIOPosix
import ParleyCore
import ParleyStore
import Synchronization

/// Parley's production store: MongoDB through libmongoc. One client pool per process; every
/// blocking driver call runs on a NIOThreadPool, never on an event loop. Transient failures
/// (network, server selection, a primary stepping down) are retried with bounded exponential
/// backoff; everything else surfaces as a typed `StoreError`.
public final class MongoStore: Store {
    public struct Options: Sendable {
        /// Threads that run driver calls (and so the most commands in flight at once).
        public var threads = 4
        /// Attempts for a command that fails transiently, the first included.
        public var attempts = 4
        /// Delay before the first retry; doubled for each further one.
        public var backoff: Duration = .milliseconds(25)
        public var serverSelectionTimeoutMS: Int32 = 5_000
        /// How long a command the server stops answering holds its driver thread while the store
        /// serves (then it fails as a network failure, retried as transient), unless the URI sets
        /// `socketTimeoutMS`. Opening the store (its index builds) waits up to libmongoc's 300 s.
        public var socketTimeoutMS: Int32 = 30_000
        /// Where `parley_store_seconds{store="mongodb"}` goes.
        public var metrics: any MetricsFactory = MetricsSystem.factory
        /// The node writing through this store, stamped on what a crash can leave behind (pending
        /// ledger entries, stream journals) so that only it, or whoever takes a dead node's
        /// leftovers over, finishes them while other nodes serve.
        public var node: String?
        /// How long `ping` says `full` after a write found the database out of disk space (unless
        /// a write succeeds meanwhile).
        public var fullFor: Duration = .seconds(30)
        /// What `fullFor` is measured by.
        public var spaceClock: SpaceWatch.Clock = SpaceWatch.uptime

        public init() {}
    }

    /// 2: schedules carry their shard (#22). 3: messages carry their owner, and messages and
    /// conversations their search terms (#24). 4: a clone's `profile_json` keeps the card's
    /// fields last (see `SQLiteStore`'s v26): an earlier build must refuse the database rather
    /// than drop them. 5: users' personas (`personas`), which an earlier build would not delete
    /// with an account.
    public static let schemaVersion = 5

    private let pool: MongoClientPool
    private let threads: NIOThreadPool
    /// One thread of its own for lease claims and renewals, so that a node's proof of life never
    /// waits behind a queue of data writes (under load that queue outlasted a lease).
    private let leaseThreads: NIOThreadPool
    private let options: Options
    private let closed = Atomic(false)
    /// Each call from asking to its answer, retries included.
    private let latency: CoreMetrics.Timer
    private let errors: StoreErrorCounter
    /// A write lately found the database out of disk space, and none succeeded since: `ping`
    /// says so, for `/healthz`.
    let space: SpaceWatch

    public var database: String { pool.database }
    public var node: String? { options.node }

    /// What `node` left, or was left unstamped; everything for nil.
    func leftovers(of node: String?, _ filter: [(String, JSONValue)] = []) -> JSONValue {
        guard let node else { return .object(filter) }
        return .object(filter + [("$or", .array([.object([("node", .string(node))]), .object([("node", .object([("$exists", .bool(false))]))])]))])
    }

    private init(pool: MongoClientPool, threads: NIOThreadPool, leaseThreads: NIOThreadPool, options: Options) {
        latency = CoreMetrics.Timer(
            label: "parley_store_seconds", dimensions: [("store", "mongodb")], preferredDisplayUnit: .seconds, factory: options.metrics)
        errors = StoreErrorCounter(store: "mongodb", factory: options.metrics)
        space = SpaceWatch(window: options.fullFor, clock: options.spaceClock)
        self.pool = pool
        self.threads = threads
        self.leaseThreads = leaseThreads
        self.options = options
    }

    /// Connects, checks the schema version and creates the indexes (idempotent). Fails with a
    /// clear message, after the server selection timeout, when the server cannot be reached.
    public static func open(uri: String, options: Options = Options()) async throws -> MongoStore {
        // Two pools: building an index on a large collection may take minutes, a command while
        // serving should not hold a thread that long.
        let opening = try MongoClientPool(uri: uri, serverSelectionTimeoutMS: options.serverSelectionTimeoutMS)
        let pool = try MongoClientPool(
            uri: uri, serverSelectionTimeoutMS: options.serverSelectionTimeoutMS, socketTimeoutMS: options.socketTimeoutMS)
        let threads = NIOThreadPool(numberOfThreads: max(1, options.threads))
        threads.start()
        let leaseThreads = NIOThreadPool(numberOfThreads: 1)
        leaseThreads.start()
        let store = MongoStore(pool: pool, threads: threads, leaseThreads: leaseThreads, options: options)
        do {
            try await store.run(through: opening) { db in
                do {
                    _ = try db.command(.object([("ping", .int(1))]), attempts: 1)
                } catch {
                    throw StoreError.backend("cannot reach MongoDB at \(Self.redacted(uri)): \(error)")
                }
                try db.migrate()
            }
        } catch {
            try? await threads.shutdownGracefully()
            try? await leaseThreads.shutdownGracefully()
            throw error
        }
        return store
    }

    /// The URI without its password, for messages.
    public static func redacted(_ uri: String) -> String {
        guard let at = uri.firstIndex(of: "@"), let scheme = uri.range(of: "://") else { return uri }
        return String(uri[..<scheme.upperBound]) + "…" + String(uri[at...])
    }

    public func close() async throws {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        try await threads.shutdownGracefully()
        try await leaseThreads.shutdownGracefully()
    }

    /// Which threads run a call: the data path's, or the one kept for leases.
    enum Lane {
        case data
        case leases
    }

    /// `through`: another pool than the store's (opening it).
    func run<T: Sendable>(
        on lane: Lane = .data, through other: MongoClientPool? = nil, _ body: @escaping @Sendable (Database) throws -> T
    ) async throws -> T {
        guard !closed.load(ordering: .acquiring) else { throw StoreError.closed }
        let db = Database(pool: other ?? pool, options: options, space: space)
        let started = NIODeadline.now()
        defer { latency.recordNanoseconds((NIODeadline.now() - started).nanoseconds) }
        do {
            return try await (lane == .data ? threads : leaseThreads).runIfActive { try body(db) }
        } catch is NIOThreadPoolError.ThreadPoolInactive {
            throw StoreError.closed
        } catch {
            errors.count(error)
            if case StoreError.full = error { space.failed() }
            throw error
        }
    }

    // MARK: Users

    /// Read, else insert, else (another first sight won the insert) read again: not an upsert,
    /// whose answer to concurrent first sights differs between servers (MongoDB before 4.2 gives
    /// one of them a duplicate key; SecantusDB has let both insert).
    public func ensureUser(_ id: String, now: Int64) async throws -> User {
        try await run { db in
            let filter = JSONValue.object([("_id", .string(id))])
            func existing() throws -> User? {
                try db.find("users", filter: filter, limit: 1).first.map { User(id: id, createdAt: $0["created_at"]?.int64 ?? now) }
            }
            if let user = try existing() { return user }
            do {
                try db.insert("users", .object([("_id", .string(id)), ("created_at", .long(now))]))
                return User(id: id, createdAt: now)
            } catch StoreError.duplicateKey {
                guard let user = try existing() else { throw StoreError.backend("user \(id) was created and is gone again") }
                return user
            }
        }
    }

    // MARK: Clones

    public func createClone(_ clone: Clone) async throws {
        try await run { db in try db.insert("clones", Self.document(clone)) }
    }

    public func clone(id: String, owner: String) async throws -> Clone? {
        try await run { db in
            try db.find("clones", filter: .object([("_id", .string(id)), ("owner", .string(owner))]), limit: 1).first.map(Self.clone(from:))
        }
    }

    public func clones(owner: String, limit: Int, after: String?) async throws -> [Clone] {
        try await run { db in
            var filter: [(String, JSONValue)] = [("owner", .string(owner))]
            if let after { filter.append(("_id", .object([("$gt", .string(after))]))) }
            return try db.find("clones", filter: .object(filter), sort: .object([("_id", .int(1))]), limit: limit).map(Self.clone(from:))
        }
    }

    public func cloneCount(owner: String) async throws -> Int {
        try await run { db in
            Int(try db.command(.object([("count", .string("clones")), ("query", .object([("owner", .string(owner))]))]))["n"]?.int64 ?? 0)
        }
    }

    public func updateClone(_ clone: Clone) async throws -> Bool {
        try await run { db in
            try db.update(
                "clones", query: .object([("_id", .string(clone.id)), ("owner", .string(clone.owner))]),
                update: .object([("$set", Self.mutableFields(Self.document(clone)))])
            ).matched > 0
        }
    }

    public func deleteClone(id: String, owner: String) async throws -> Bool {
        try await run { db in
            // No multi-document transactions on a standalone server: delete children first, so a
            // crash part-way leaves the clone in place and a retried delete finishes the job.
            guard try !db.find("clones", filter: .object([("_id", .string(id)), ("owner", .string(owner))]), limit: 1).isEmpty else {
                return false
            }
            let conversations = try db.find(
                "conversations", filter: .object([("clone", .string(id)), ("owner", .string(owner))]),
                projection: .object([("_id", .int(1))]))
            let ids = conversations.compactMap { $0["_id"] }
            if !ids.isEmpty {
                _ = try db.delete("messages", query: .object([("conversation", .object([("$in", .array(ids))]))]))
                _ = try db.delete("voice_clips", query: .object([("conversation", .object([("$in", .array(ids))]))]))
            }
            _ = try db.delete("conversations", query: .object([("clone", .string(id)), ("owner", .string(owner))]))
            // Found above and gone now, whatever the count says: a retry after a lost reply
            // deletes nothing where its first attempt deleted the clone.
            _ = try db.delete("clones", query: .object([("_id", .string(id)), ("owner", .string(owner))]))
            return true
        }
    }

    /// A document without the fields an update never changes (id, owner, creation time).
    static func mutableFields(_ document: JSONValue) -> JSONValue {
        guard case .object(let pairs) = document else { return document }
        return .object(pairs.filter { !["_id", "owner", "created_at"].contains($0.0) })
    }

    static func document(_ c: Clone) -> JSONValue {
        .object([
            ("_id", .string(c.id)), ("owner", .string(c.owner)), ("name", .string(c.name)),
            ("traits", .array(c.traits.map(JSONValue.string))), ("system_prompt", .string(c.systemPrompt)),
            ("sliders", c.slidersJSON),
            ("memory", .array(c.memory.map(JSONValue.string))), ("model", c.model.map(JSONValue.string) ?? .null),
            // As JSON text: card keys may hold `.` or `$`, which field names cannot.
            ("profile_json", c.profile.isEmpty ? .null : .string(CharacterCard.storageText(c.profile))),
            ("created_at", .long(c.createdAt)), ("updated_at", .long(c.updatedAt)),
        ])
    }

    static func clone(from d: JSONValue) -> Clone {
        var sliders: [String: Int] = [:]
        if case .object(let pairs)? = d["sliders"] { for (k, v) in pairs { sliders[k] = v.int64.map(Int.init) ?? 0 } }
        return Clone(
            id: d["_id"]?.stringValue ?? "", owner: d["owner"]?.stringValue ?? "", name: d["name"]?.stringValue ?? "",
            traits: d["traits"]?.strings ?? [], systemPrompt: d["system_prompt"]?.stringValue ?? "", sliders: sliders,
            memory: d["memory"]?.strings ?? [], createdAt: d["created_at"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0,
            model: d["model"]?.stringValue, profile: CharacterCard.profile(fromStorage: d["profile_json"]?.stringValue)
        )
    }

    // MARK: Conversations

    /// One round trip to the pool, not one transaction: a failure part-way removes what was
    /// written, so the conversation is there whole or not at all (barring a crash in between).
    public func createConversation(_ c: Conversation, messages: [Message]) async throws {
        try await run { db in
            try db.insert("conversations", Self.document(c))
            do {
                for message in messages { try Self.append(message, db, orIgnore: false) }
            } catch {
                _ = try? db.delete("messages", query: .object([("conversation", .string(c.id))]))
                _ = try? db.delete("conversations", query: .object([("_id", .string(c.id))]))
                throw error
            }
        }
    }

    static func document(_ c: Conversation) -> JSONValue {
        .object(
            [
                ("_id", .string(c.id)), ("owner", .string(c.owner)), ("clone", .string(c.clone)), ("title", .string(c.title)),
                ("created_at", .long(c.createdAt)), ("updated_at", .long(c.updatedAt)), ("terms", Self.terms(c.title)),
            ] + (c.summary.map { [("summary", .string($0.text)), ("summary_through", .string($0.through))] } ?? []))
    }

    public func conversation(id: String, owner: String) async throws -> Conversation? {
        try await run { db in
            try db.find("conversations", filter: .object([("_id", .string(id)), ("owner", .string(owner))]), limit: 1)
                .first.map(Self.conversation(from:))
        }
    }

    public func conversations(owner: String, limit: Int, before: String?) async throws -> [Conversation] {
        try await run { db in
            var filter: [(String, JSONValue)] = [("owner", .string(owner))]
            if let before { filter.append(("_id", .object([("$lt", .string(before))]))) }
            return try db.find("conversations", filter: .object(filter), sort: .object([("_id", .int(-1))]), limit: limit)
                .map(Self.conversation(from:))
        }
    }

    static func conversation(from d: JSONValue) -> Conversation {
        Conversation(
            id: d["_id"]?.stringValue ?? "", owner: d["owner"]?.stringValue ?? "", clone: d["clone"]?.stringValue ?? "",
            title: d["title"]?.stringValue ?? "", createdAt: d["created_at"]?.int64 ?? 0, updatedAt: d["updated_at"]?.int64 ?? 0,
            summary: d["summary"]?.stringValue.flatMap { text in
                d["summary_through"]?.stringValue.map { ConversationSummary(text: text, through: $0) }
            })
    }

    // MARK: Messages

    public func appendMessage(_ m: Message) async throws {
        try await run { db in try Self.append(m, db, orIgnore: false) }
    }

    /// Inserts a message and moves its conversation's `updated_at`; `orIgnore` keeps an existing
    /// message with the same id instead of failing. Without a parent it follows the path's last
    /// message ("" when it is the first); with one, it is on the path only when that is its parent
    /// (`ChatStore.appendMessage`), or when `forceOnPath` says so (the caller moves the path itself).
    static func append(_ m: Message, _ db: Database, orIgnore: Bool, forceOnPath: Bool = false) throws {
        // The caller that moves the path itself has found the parent: nothing to look up.
        let (parent, onPath) = try forceOnPath ? (m.parent ?? "", true) : place(m, db)
        var doc: [(String, JSONValue)] = [
            ("_id", .string(m.id)), ("conversation", .string(m.conversation)), ("role", .string(m.role.rawValue)),
            ("text", .string(m.text)), ("created_at", .long(m.createdAt)),
        ]
        if let reason = m.reason { doc.append(("reason", .string(reason.rawValue))) }
        if let usage = m.usage {
            doc.append(("input_tokens", .long(Int64(usage.inputTokens))))
            doc.append(("output_tokens", .long(Int64(usage.outputTokens))))
        }
        if let stream = m.stream { doc.append(("stream", .string(stream))) }
        doc.append(("saved", .bool(m.saved)))
        // The conversation's updated_at moves first: that also names the owner, whom search
        // filters by (a message's owner never changes, so it is stored with it).
        let conversation = try db.findAndModify(
            "conversations", query: .object([("_id", .string(m.conversation))]),
            update: .object([("$max", .object([("updated_at", .long(m.createdAt))]))]), returnNew: false)
        doc.append(("owner", .string(conversation?["owner"]?.stringValue ?? "")))
        doc.append(("terms", Self.terms(m.text)))
        doc.append(("parent", .string(parent)))
        if !onPath { doc.append(("off_path", .bool(true))) }
        do {
            try db.insert("messages", .object(doc))
        } catch StoreError.duplicateKey(let key) {
            guard orIgnore else { throw StoreError.duplicateKey(key) }
        }
    }

    /// `m`'s parent, and whether `m` goes on the path (its parent is the path's last message);
    /// throws `ParentMessageGone` when the conversation no longer has its parent.
    private static func place(_ m: Message, _ db: Database) throws -> (parent: String, onPath: Bool) {
        let last = try db.find("messages", filter: Self.onPath(m.conversation), sort: Self.newestFirst, limit: 1).first?["_id"]?.stringValue ?? ""
        let parent = m.parent ?? last
        if parent != last, !parent.isEmpty,
            try db.find("messages", filter: .object([("_id", .string(parent)), ("conversation", .string(m.conversation))]), limit: 1).isEmpty
        {
            throw ParentMessageGone(id: parent)
        }
        return (parent, parent == last)
    }

    /// A text's search terms as stored (a multikey index serves `terms` with the owner).
    static func terms(_ text: String) -> JSONValue { .array(SearchText.terms(text).map(JSONValue.string)) }

    public func message(id: String, conversation: String) async throws -> Message? {
        try await run { db in
            try db.find("messages", filter: .object([("_id", .string(id)), ("conversation", .string(conversation))]), limit: 1)
                .first.map(Self.message(from:))
        }
    }

    public func message(id: String) async throws -> Message? {
        try await run { db in try db.find("messages", filter: .object([("_id", .string(id))]), limit: 1).first.map(Self.message(from:)) }
    }

    public func messages(conversation: String, limit: Int, before: String?) async throws -> [Message] {
        try await messages(conversation: conversation, limit: limit, before: before, pathOnly: true)
    }

    public func everyMessage(conversation: String, limit: Int, before: String?) async throws -> [Message] {
        try await messages(conversation: conversation, limit: limit, before: before, pathOnly: false)
    }

    private func messages(conversation: String, limit: Int, before: String?, pathOnly: Bool) async throws -> [Message] {
        try await run { db in
            let page: [(String, JSONValue)] = before.map { [("_id", .object([("$lt", .string($0))]))] } ?? []
            let filter = pathOnly ? Self.onPath(conversation, page) : .object([("conversation", .string(conversation))] + page)
            return try db.find("messages", filter: filter, sort: Self.newestFirst, limit: limit).reversed().map(Self.message(from:))
        }
    }

    /// A conversation's messages on its path (`off_path` is set only on those that left it).
    static func onPath(_ conversation: String, _ more: [(String, JSONValue)] = []) -> JSONValue {
        .object([("conversation", .string(conversation)), ("off_path", .object([("$ne", .bool(true))]))] + more)
    }

    static let newestFirst = JSONValue.object([("_id", .int(-1))])

    /// The new message is stored first, then the old branch leaves the path: a failure in between
    /// leaves both on it, never neither.
    public func appendAlternative(_ message: Message, replacing replaced: String) async throws -> Message? {
        try await run { db in
            let conversation = message.conversation
            guard let old = try db.find("messages", filter: Self.onPath(conversation, [("_id", .string(replaced))]), limit: 1).first else {
                return nil
            }
            var parent = old["parent"]?.stringValue
            if parent == nil {
                // Stored before messages had parents: its parent is the path's message before it.
                let before = Self.onPath(conversation, [("_id", .object([("$lt", .string(replaced))]))])
                parent = try db.find("messages", filter: before, sort: Self.newestFirst, limit: 1).first?["_id"]?.stringValue ?? ""
                _ = try db.update(
                    "messages", query: .object([("_id", .string(replaced))]), update: .object([("$set", .object([("parent", .string(parent!))]))]))
            }
            var stored = message
            stored.parent = parent
            try Self.append(stored, db, orIgnore: false, forceOnPath: true)
            let leaving = Self.onPath(conversation, [("_id", .object([("$gte", .string(replaced)), ("$ne", .string(message.id))]))])
            _ = try db.update("messages", query: leaving, update: .object([("$set", .object([("off_path", .bool(true))]))]), multi: true)
            stored.parent = parent!.isEmpty ? nil : parent
            return stored
        }
    }

    public func activate(message: String, conversation: String) async throws -> Bool {
        try await run { db in
            guard let path = try Self.tree(conversation, db).path(through: message) else { return false }
            try Self.setPath(path, of: conversation, db)
            return true
        }
    }

    /// The path moves first (when the message was on it), then the messages go: a failure in
    /// between leaves them off the path, not a path with a hole.
    public func deleteMessage(id: String, conversation: String) async throws -> Int {
        try await run { db in
            let tree = try Self.tree(conversation, db)
            let doomed = tree.subtree(of: id)
            guard let parent = tree.parent(of: id),
                let message = try db.find("messages", filter: .object([("_id", .string(id)), ("conversation", .string(conversation))]), limit: 1)
                    .first
            else { return 0 }
            if message["off_path"]?.boolValue != true, let path = tree.pathAfterRemoving(Set(doomed), parent: parent) {
                try Self.setPath(path, of: conversation, db)
            }
            _ = try db.delete(
                "messages",
                query: .object([("conversation", .string(conversation)), ("_id", .object([("$in", .array(doomed.map(JSONValue.string)))]))]))
            return doomed.count
        }
    }

    /// The conversation's messages as a tree.
    static func tree(_ conversation: String, _ db: Database) throws -> MessageTree {
        let nodes = try db.find(
            "messages", filter: .object([("conversation", .string(conversation))]), sort: .object([("_id", .int(1))]),
            projection: .object([("_id", .int(1)), ("parent", .int(1))]))
        return MessageTree(nodes.map { (id: $0["_id"]?.stringValue ?? "", parent: $0["parent"]?.stringValue) })
    }

    /// Makes `path` the conversation's path: it joins first, then the rest leaves it.
    static func setPath(_ path: [String], of conversation: String, _ db: Database) throws {
        let ids = JSONValue.array(path.map(JSONValue.string))
        _ = try db.update(
            "messages", query: .object([("conversation", .string(conversation)), ("_id", .object([("$in", ids)]))]),
            update: .object([("$set", .object([("off_path", .bool(false))]))]), multi: true)
        _ = try db.update(
            "messages", query: onPath(conversation, [("_id", .object([("$nin", ids)]))]),
            update: .object([("$set", .object([("off_path", .bool(true))]))]), multi: true)
    }

    public func renameConversation(id: String, owner: String, title: String) async throws -> Conversation? {
        try await run { db in
            try db.findAndModify(
                "conversations", query: .object([("_id", .string(id)), ("owner", .string(owner))]),
                update: .object([("$set", .object([("title", .string(title)), ("terms", Self.terms(title))]))])
            ).map(Self.conversation(from:))
        }
    }

    public func setSummary(_ summary: ConversationSummary, conversation id: String, owner: String, replacing previous: String?) async throws -> Bool {
        try await run { db in
            // A missing field matches null: a conversation that never had a summary. Once: a
            // retry after a lost reply finds its own summary there, not someone else's.
            try db.findAndModifyOnce(
                "conversations", id: .string(id),
                query: [("owner", .string(owner)), ("summary_through", previous.map(JSONValue.string) ?? .null)],
                set: [("summary", .string(summary.text)), ("summary_through", .string(summary.through))]) != nil
        }
    }

    /// Messages first, as for a clone: a crash part-way leaves the conversation, and a retried
    /// delete finishes the job.
    public func deleteConversation(id: String, owner: String) async throws -> Bool {
        try await run { db in
            guard try !db.find("conversations", filter: .object([("_id", .string(id)), ("owner", .string(owner))]), limit: 1).isEmpty else {
                return false
            }
            _ = try db.delete("messages", query: .object([("conversation", .string(id))]))
            _ = try db.delete("voice_clips", query: .object([("conversation", .string(id))]))
            // Found above and gone now (as for a clone).
            _ = try db.delete("conversations", query: .object([("_id", .string(id)), ("owner", .string(owner))]))
            return true
        }
    }

    public func alternatives(of messages: [String], conversation: String) async throws -> [String: Alternatives] {
        guard !messages.isEmpty else { return [:] }
        return try await run { db in
            let conversationFilter = ("conversation", JSONValue.string(conversation))
            let found = try db.find(
                "messages", filter: .object([conversationFilter, ("_id", .object([("$in", .array(messages.map(JSONValue.string)))]))]),
                projection: .object([("_id", .int(1)), ("parent", .int(1))]))
            let nodes = found.map { (id: $0["_id"]?.stringValue ?? "", parent: $0["parent"]?.stringValue) }
            let parents = Set(nodes.compactMap(\.parent))
            var siblings: [String: [String]] = [:]
            if !parents.isEmpty {
                let rows = try db.find(
                    "messages", filter: .object([conversationFilter, ("parent", .object([("$in", .array(parents.map(JSONValue.string)))]))]),
                    sort: .object([("_id", .int(1))]), projection: .object([("_id", .int(1)), ("parent", .int(1))]))
                for row in rows { siblings[row["parent"]?.stringValue ?? "", default: []].append(row["_id"]?.stringValue ?? "") }
            }
            return MessageTree.alternatives(nodes, siblings: siblings)
        }
    }

    static func message(from d: JSONValue) -> Message {
        var usage: Usage?
        if let input = d["input_tokens"]?.int64, let output = d["output_tokens"]?.int64 {
            usage = Usage(inputTokens: Int(input), outputTokens: Int(output))
        }
        return Message(
            id: d["_id"]?.stringValue ?? "", conversation: d["conversation"]?.stringValue ?? "",
            role: Role(rawValue: d["role"]?.stringValue ?? "") ?? .user, text: d["text"]?.stringValue ?? "",
            createdAt: d["created_at"]?.int64 ?? 0, reason: d["reason"]?.stringValue.flatMap(StreamEndReason.init(rawValue:)),
            usage: usage, stream: d["stream"]?.stringValue, saved: d["saved"]?.boolValue == true,
            parent: d["parent"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 }, onPath: d["off_path"]?.boolValue != true
        )
    }
}

/// The command helpers, run on a store thread: each is one or a few generic database commands.
struct Database: Sendable {
    let pool: MongoClientPool
    let options: MongoStore.Options
    /// Told when a write command succeeds: the server has space again.
    var space: SpaceWatch? = nil

    /// The commands that write (a success tells the server took a write).
    static let writes: Set<String> = ["insert", "update", "delete", "findAndModify", "commitTransaction"]

    /// Indexes every query needs (created idempotently at start-up) and the schema version.
    static let indexes: [(collection: String, name: String, key: JSONValue, unique: Bool)] = [
        ("clones", "owner_id", .object([("owner", .int(1)), ("_id", .int(1))]), false),
        ("conversations", "owner_id", .object([("owner", .int(1)), ("_id", .int(1))]), false),
        ("conversations", "clone", .object([("clone", .int(1))]), false),
        // Message ids sort by creation time, so (conversation, _id) is the (conversation, created) order.
        ("messages", "conversation_id", .object([("conversation", .int(1)), ("_id", .int(1))]), false),
        // A message's alternatives: the messages that share its parent.
        ("messages", "conversation_parent", .object([("conversation", .int(1)), ("parent", .int(1))]), false),
        ("ledger", "user_created", .object([("user", .int(1)), ("created_at", .int(-1)), ("_id", .int(-1))]), false),
        ("ledger", "state", .object([("state", .int(1))]), false),
        // What a conversation or a room cost (#27).
        ("ledger", "user_conversation", .object([("user", .int(1)), ("conversation", .int(1))]), false),
        ("ledger", "user_room", .object([("user", .int(1)), ("room", .int(1))]), false),
        ("ledger", "created", .object([("created_at", .int(1)), ("_id", .int(1))]), false),
        ("schedules", "owner_id", .object([("owner", .int(1)), ("_id", .int(1))]), false),
        ("schedules", "status_id", .object([("status", .int(1)), ("_id", .int(1))]), false),
        // A cluster's node loads the pending schedules of the shards it holds.
        ("reply_slots", "user_created", .object([("user", .int(1)), ("created_at", .int(1)), ("_id", .int(1))]), false),
        ("reply_slots", "node", .object([("node", .int(1))]), false),
        ("schedules", "status_shard", .object([("status", .int(1)), ("shard", .int(1)), ("_id", .int(1))]), false),
        ("rooms", "status_id", .object([("status", .int(1)), ("_id", .int(1))]), false),
        ("room_entries", "room_id", .object([("room", .int(1)), ("_id", .int(1))]), false),
        // The privacy promises: retention by age, export by owner, deletion by speaker, the audit log.
        ("messages", "saved_created", .object([("saved", .int(1)), ("created_at", .int(1))]), false),
        ("room_entries", "created", .object([("created_at", .int(1))]), false),
        ("room_entries", "speaker", .object([("speaker", .int(1))]), false),
        ("rooms", "owner_id", .object([("owner", .int(1)), ("_id", .int(1))]), false),
        ("rooms", "members", .object([("members", .int(1))]), false),
        ("audit", "actor", .object([("actor", .int(1))]), false),
        ("audit", "target", .object([("target", .int(1))]), false),
        ("audit", "at", .object([("at", .int(1))]), false),
        // Payments (#27): a user's orders and the admin's list by key, both purged by age.
        ("payment_orders", "key", .object([("key", .int(1))]), true),
        ("payment_orders", "user_key", .object([("user", .int(1)), ("key", .int(-1))]), false),
        ("payment_orders", "updated", .object([("updated_at", .int(1))]), false),
        ("webhook_deliveries", "at", .object([("at", .int(1))]), false),
        ("webhook_deliveries", "user", .object([("user", .int(1))]), false),
        ("spend_windows", "user", .object([("user", .int(1))]), false),
        ("spend_windows", "span", .object([("span", .int(1))]), false),
        // Replies in flight: found at start-up (oldest first) and by user at account deletion.
        ("stream_journals", "created", .object([("created_at", .int(1)), ("_id", .int(1))]), false),
        ("stream_journals", "user", .object([("user", .int(1))]), false),
        // Signed-out sessions, by user (#28).
        ("session_revocations", "user", .object([("user", .int(1))]), false),
        // Search: an owner's messages and titles holding a term, newest first.
        ("messages", "owner_terms_id", .object([("owner", .int(1)), ("terms", .int(1)), ("_id", .int(-1))]), false),
        ("conversations", "owner_terms_id", .object([("owner", .int(1)), ("terms", .int(1)), ("_id", .int(-1))]), false),
        // Voiced replies' audio (#29): an owner's, a conversation's or a room's, and the unsaved by age.
        ("voice_clips", "owner_id", .object([("owner", .int(1)), ("_id", .int(-1))]), false),
        ("voice_clips", "conversation", .object([("conversation", .int(1))]), false),
        ("voice_clips", "room", .object([("room", .int(1))]), false),
        ("voice_clips", "saved_created", .object([("saved", .int(1)), ("created_at", .int(1))]), false),
    ]

    func migrate() throws {
        let stored = try find("meta", filter: .object([("_id", .string("schema"))]), limit: 1).first?["version"]?.int64 ?? 0
        guard stored <= Int64(MongoStore.schemaVersion) else {
            throw StoreError.schemaTooNew(found: Int(stored), supported: MongoStore.schemaVersion)
        }
        for (collection, entries) in Dictionary(grouping: Self.indexes, by: \.collection) {
            _ = try command(
                .object([
                    ("createIndexes", .string(collection)),
                    ("indexes", .array(entries.map { .object([("key", $0.key), ("name", .string($0.name)), ("unique", .bool($0.unique))]) })),
                ]))
        }
        if stored < 2 {
            // Schedules stored before version 2 learn their shard (the same on every node).
            for row in try find(
                "schedules", filter: .object([("shard", .object([("$exists", .bool(false))]))]), projection: .object([("_id", .int(1))]))
            {
                guard let id = row["_id"]?.stringValue else { continue }
                _ = try update(
                    "schedules", query: .object([("_id", .string(id))]),
                    update: .object([("$set", .object([("shard", .int(Int64(ScheduleShards.shard(of: id))))]))]))
            }
        }
        if stored < 3 { try addSearchTerms() }
        if stored < Int64(MongoStore.schemaVersion) {
            _ = try update(
                "meta", query: .object([("_id", .string("schema"))]),
                update: .object([("$set", .object([("version", .int(Int64(MongoStore.schemaVersion)))]))]), upsert: true)
        }
    }

    /// A mark of one call's writes, so that a read after a retry can tell them from another
    /// writer's: the store retries a command that failed on the network, which may have been
    /// applied with its reply lost. 64 random bits: short, and never the same twice among the
    /// marks a document keeps.
    static func callMark() -> String { String(UInt64.random(in: 0...UInt64.max), radix: 36) }

    /// Runs a command, retrying transient failures with exponential backoff. `retried` tells the
    /// body's caller whether an earlier attempt may have been applied already.
    func command(_ json: JSONValue, attempts: Int? = nil, retried: ((Bool) -> Void)? = nil) throws -> JSONValue {
        let limit = max(1, attempts ?? options.attempts)
        var delay = options.backoff
        var attempt = 0
        while true {
            retried?(attempt > 0)
            do {
                let answer = try pool.command(json)
                if let space, case .object(let fields) = json, let name = fields.first?.0, Self.writes.contains(name) { space.stored() }
                return answer
            } catch let error as MongoCommandError {
                attempt += 1
                if error.isDuplicateKey { throw StoreError.duplicateKey(error.message) }
                if error.isOutOfDiskSpace { throw StoreError.full("\(error)") }
                guard error.isTransient, attempt < limit else {
                    let message = attempt > 1 ? "\(error) (after \(attempt) attempts)" : "\(error)"
                    throw error.isTransient ? StoreError.unreachable(message) : StoreError.backend(message)
                }
                // A store thread, never an event loop: sleeping here blocks nobody else.
                let (seconds, attoseconds) = delay.components
                usleep(UInt32(seconds * 1_000_000 + attoseconds / 1_000_000_000_000))
                delay *= 2
            }
        }
    }

    func insert(_ collection: String, _ document: JSONValue) throws {
        var wasRetried = false
        let reply = try command(
            .object([("insert", .string(collection)), ("documents", .array([document]))]),
            retried: { wasRetried = $0 })
        if let error = reply["writeErrors"]?.arrayValue?.first {
            let code = error["code"]?.int64 ?? 0
            // A retry after a lost reply finds its own first attempt: that is success, not a clash.
            if code == 11000, wasRetried, Self.isIDClash(error) { return }
            if code == 11000 || code == 11001 { throw StoreError.duplicateKey(error["errmsg"]?.stringValue ?? "duplicate key") }
            throw StoreError.backend("insert into \(collection) failed: \(error["errmsg"]?.stringValue ?? "\(error)")")
        }
    }

    private static func isIDClash(_ error: JSONValue) -> Bool {
        (error["errmsg"]?.stringValue ?? "").contains("_id")
    }

    func find(_ collection: String, filter: JSONValue, sort: JSONValue? = nil, projection: JSONValue? = nil, limit: Int? = nil) throws -> [JSONValue]
    {
        var cmd: [(String, JSONValue)] = [("find", .string(collection)), ("filter", filter)]
        if let sort { cmd.append(("sort", sort)) }
        if let projection { cmd.append(("projection", projection)) }
        if let limit { cmd.append(("limit", .long(Int64(limit)))) }
        var reply = try command(.object(cmd))
        var documents = reply["cursor"]?["firstBatch"]?.arrayValue ?? []
        while let id = reply["cursor"]?["id"]?.int64, id != 0 {
            reply = try command(.object([("getMore", .long(id)), ("collection", .string(collection))]))
            documents += reply["cursor"]?["nextBatch"]?.arrayValue ?? []
        }
        return documents
    }

    func update(
        _ collection: String, query: JSONValue, update: JSONValue, upsert: Bool = false, multi: Bool = false
    ) throws -> (matched: Int64, modified: Int64) {
        try updates(collection, [.object([("q", query), ("u", update), ("upsert", .bool(upsert)), ("multi", .bool(multi))])])
    }

    /// Several update statements (`q`, `u`, `upsert`, `multi`) in one command.
    func updates(_ collection: String, _ statements: [JSONValue]) throws -> (matched: Int64, modified: Int64) {
        let reply = try command(.object([("update", .string(collection)), ("updates", .array(statements))]))
        if let error = reply["writeErrors"]?.arrayValue?.first {
            let code = error["code"]?.int64 ?? 0
            if code == 11000 || code == 11001 { throw StoreError.duplicateKey(error["errmsg"]?.stringValue ?? "duplicate key") }
            throw StoreError.backend("update of \(collection) failed: \(error["errmsg"]?.stringValue ?? "\(error)")")
        }
        return (reply["n"]?.int64 ?? 0, reply["nModified"]?.int64 ?? 0)
    }

    func delete(_ collection: String, query: JSONValue, limit: Int = 0) throws -> Int64 {
        let reply = try command(
            .object([
                ("delete", .string(collection)),
                ("deletes", .array([.object([("q", query), ("limit", .int(Int64(limit)))])])),
            ]))
        return reply["n"]?.int64 ?? 0
    }

    /// Atomic read-modify-write of one document; returns it (after the update when `returnNew`).
    /// `retried`, as `command`'s: whether an earlier attempt may have been applied already.
    func findAndModify(
        _ collection: String, query: JSONValue, update: JSONValue, upsert: Bool = false, returnNew: Bool = true,
        retried: ((Bool) -> Void)? = nil
    ) throws -> JSONValue? {
        let reply = try command(
            .object([
                ("findAndModify", .string(collection)), ("query", query), ("update", update),
                ("upsert", .bool(upsert)), ("new", .bool(returnNew)),
            ]),
            retried: retried)
        guard let value = reply["value"], value != .null else { return nil }
        return value
    }

    /// `findAndModify` of the document `id` with an update that makes `query` false for it (a
    /// status moved on, a lease changed hands), `set` and `inc` being the update's `$set` and
    /// `$inc`; returns the document after it, nil when `query` did not hold. A retry after a lost
    /// reply (its first attempt applied, then the network failed) finds `query` false and would
    /// answer nil for a change this call made, so the update also sets `call` to a mark of this
    /// call's, and a retried call that finds nothing reads the document back: its own mark there
    /// means its first attempt made the change.
    func findAndModifyOnce(
        _ collection: String, id: JSONValue, query: [(String, JSONValue)], set: [(String, JSONValue)], inc: [(String, JSONValue)] = []
    ) throws -> JSONValue? {
        let mark = JSONValue.string(Database.callMark())
        var update: [(String, JSONValue)] = [("$set", .object(set + [("call", mark)]))]
        if !inc.isEmpty { update.append(("$inc", .object(inc))) }
        var wasRetried = false
        if let value = try findAndModify(collection, query: .object([("_id", id)] + query), update: .object(update), retried: { wasRetried = $0 }) {
            return value
        }
        guard wasRetried, let now = try find(collection, filter: .object([("_id", id)]), limit: 1).first, now["call"] == mark else { return nil }
        return now
    }
}

extension JSONValue {
    var strings: [String]? { arrayValue?.compactMap(\.stringValue) }
    /// Also reads canonical extended JSON's `{"$numberLong":"…"}`.
    var int64: Int64? { intValue ?? self["$numberLong"]?.stringValue.flatMap { Int64($0) } }
}
