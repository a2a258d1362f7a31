import ParleyCore
import ParleyStore

/// Credits on MongoDB without multi-document transactions (a standalone server has none).
///
/// Applying an entry takes three steps, each atomic on one document:
/// 1. insert the ledger row with `state: "pending"` (its `_id` is the entry id: unique);
/// 2. one conditional `findAndModify` on the account: `$inc` the balance and the count of its
///    applied entries (`applies`), and `$push` the entry id onto `recent`, only if `recent` does
///    not hold the id yet and (for a debit) the balance covers it. This is the step that decides,
///    and it cannot half-happen;
/// 3. mark the row `applied` with that count as its `seq` (or `void` when step 2 refused it):
///    a page read beside the balance leaves out the rows whose `seq` is past the account's.
///
/// A crash between 1 and 2 leaves a pending row and an untouched balance; between 2 and 3, a
/// pending row whose id is in `recent`. `recoverLedger` (run at start-up, before serving) marks
/// the second kind applied; of the first kind, grants and settlements are applied and debits are
/// voided, because Parley releases tokens only after their debit returned, so a debit that never
/// finished paid for nothing the user received. The balance always equals the sum of applied rows.
extension MongoStore {
    /// How many recent entry ids an account remembers; far more than can be in flight per user.
    static let recentWindow = 1000

    public func balance(user: String) async throws -> Int64 {
        try await run { db in try Self.account(db, user)?.balance ?? 0 }
    }

    public func apply(_ entry: LedgerEntry, allowOverdraft: Bool, headroom: Int64, caps: [SpendCap]) async throws -> LedgerOutcome {
        let headroom = entry.headroom(headroom, allowOverdraft: allowOverdraft)
        let row = pending(entry)
        return try await run { db in
            do {
                try db.insert("ledger", row)
            } catch StoreError.duplicateKey {
                guard let existing = try db.find("ledger", filter: .object([("_id", .string(entry.id))]), limit: 1).first else {
                    throw StoreError.backend("ledger entry \(entry.id) vanished")
                }
                switch existing["state"]?.stringValue {
                case "applied":
                    return .alreadyApplied(balance: try Self.account(db, entry.user)?.balance ?? 0)
                case "void":
                    // Refused before; this is a new attempt with the same id, possibly for another
                    // amount: the row takes the new attempt's fields.
                    guard case .object(let fields) = row else { break }
                    _ = try db.update(
                        "ledger", query: .object([("_id", .string(entry.id)), ("state", .string("void"))]),
                        update: .object([("$set", .object(fields.filter { $0.0 != "_id" }))]))
                default:
                    break  // pending: a crashed or failed attempt; finish it now
                }
            }
            guard !caps.isEmpty else {
                return try Self.settle(
                    db, id: entry.id, user: entry.user, credits: entry.credits, allowOverdraft: allowOverdraft, headroom: headroom)
            }
            // Spend windows: a debit takes its amount from each window first (each take atomic
            // on its window's document), all given back if one or the balance refuses. A crash in
            // between leaves a window charged for nothing: stricter, never looser. A retry after
            // a lost reply counts nothing twice (`WindowCall`).
            let call = WindowCall()
            var taken: [SpendCap] = []
            if entry.credits < 0 || headroom > 0 {
                for cap in caps {
                    guard try Self.take(db, user: entry.user, cap, -entry.credits, headroom: headroom, call: call) else {
                        for done in taken { try Self.give(db, user: entry.user, done, -entry.credits, call: call) }
                        try Self.mark(db, entry.id, "void")
                        let available = try Self.available(db, user: entry.user, caps)
                        return .overLimit(balance: try Self.account(db, entry.user)?.balance ?? 0, available: available)
                    }
                    taken.append(cap)
                }
            }
            let outcome = try Self.settle(
                db, id: entry.id, user: entry.user, credits: entry.credits, allowOverdraft: allowOverdraft, headroom: headroom)
            if case .insufficient = outcome {
                for done in taken { try Self.give(db, user: entry.user, done, -entry.credits, call: call) }
            } else if entry.credits > 0, outcome.isApplied {
                for cap in caps { try Self.give(db, user: entry.user, cap, entry.credits, call: call) }
            }
            return outcome
        }
    }

    /// A spend window's document id: the user and the window.
    static func windowID(_ user: String, _ window: String) -> JSONValue { .string(user + "\u{1F}" + window) }

    /// One `apply`'s marks on the windows it changes: a take and a give each push theirs onto
    /// the window's `calls` in the same update that changes `spent`, and change nothing where it
    /// is there already. A command retried after its reply was lost (applied, then a network
    /// failure) so finds its first attempt instead of counting again (a take that finds nothing
    /// after a retry reads the window back for its mark); a later `apply` of the same
    /// entry (one refused before) is a new call with new marks.
    struct WindowCall {
        let take: String
        let give: String

        init() {
            let call = Database.callMark()
            take = call + "+"
            give = call + "-"
        }
    }

    /// How many calls' marks a window keeps: far more than one user's replies in flight.
    static let windowCalls = 256

    /// The update that adds `amount` to a window's `spent` and marks it with `mark`.
    private static func counting(_ amount: Int64, _ mark: String) -> JSONValue {
        .object([
            ("$inc", .object([("spent", .long(amount))])),
            ("$push", .object([("calls", .object([("$each", .array([.string(mark)])), ("$slice", .int(-Int64(windowCalls)))]))])),
        ])
    }

    /// Adds `amount` to what `cap`'s window spent if it stays within `cap.max` with `headroom`
    /// to spare: the window is made first if missing (racing makers clash harmlessly), then one
    /// conditional `$inc` on it decides, atomic on its document.
    private static func take(_ db: Database, user: String, _ cap: SpendCap, _ amount: Int64, headroom: Int64, call: WindowCall) throws -> Bool {
        guard amount + headroom <= cap.max else { return false }
        let id = windowID(user, cap.window)
        do {
            _ = try db.update(
                "spend_windows", query: .object([("_id", id)]),
                update: .object([("$setOnInsert", .object([("spent", .long(0)), ("user", .string(user)), ("span", .string(cap.window))]))]),
                upsert: true)
        } catch StoreError.duplicateKey {}
        var wasRetried = false
        let taken = try db.findAndModify(
            "spend_windows",
            query: .object([
                ("_id", id), ("spent", .object([("$lte", .long(cap.max - amount - headroom))])), ("calls", .object([("$ne", .string(call.take))])),
            ]),
            update: counting(amount, call.take), retried: { wasRetried = $0 })
        if taken != nil { return true }
        guard wasRetried else { return false }
        // Retried: refused, or taken by the attempt whose reply was lost.
        let window = try db.find("spend_windows", filter: .object([("_id", id)]), limit: 1).first
        return window?["calls"]?.strings?.contains(call.take) == true
    }

    /// Takes `amount` off what `cap`'s window spent (a refused debit undone, a settlement's return).
    private static func give(_ db: Database, user: String, _ cap: SpendCap, _ amount: Int64, call: WindowCall) throws {
        _ = try db.update(
            "spend_windows", query: .object([("_id", windowID(user, cap.window)), ("calls", .object([("$ne", .string(call.give))]))]),
            update: counting(-amount, call.give))
    }

    /// What the tightest of `caps` still allows.
    private static func available(_ db: Database, user: String, _ caps: [SpendCap]) throws -> Int64 {
        var available = Int64.max
        for cap in caps {
            let spent = try db.find("spend_windows", filter: .object([("_id", windowID(user, cap.window))]), limit: 1).first?["spent"]?.int64 ?? 0
            available = min(available, max(0, cap.max - spent))
        }
        return available
    }

    /// Steps 2 and 3 for a pending entry; a debit without overdraft must leave `headroom`.
    static func settle(
        _ db: Database, id: String, user: String, credits: Int64, allowOverdraft: Bool, headroom: Int64 = 0
    ) throws -> LedgerOutcome {
        var filter: [(String, JSONValue)] = [("_id", .string(user)), ("recent", .object([("$ne", .string(id))]))]
        let mayCreate = (credits >= 0 && headroom == 0) || allowOverdraft
        if credits < 0 || headroom > 0, !allowOverdraft {
            filter.append(("balance", .object([("$gte", .long(-credits + headroom))])))
        }
        // This call's mark: a retry after a lost reply finds its own apply, not an earlier call's.
        let call = JSONValue.string(Database.callMark())
        let update: JSONValue = .object([
            ("$inc", .object([("balance", .long(credits)), ("applies", .long(1))])),
            ("$push", .object([("recent", .object([("$each", .array([.string(id)])), ("$slice", .int(-Int64(recentWindow)))]))])),
            ("$set", .object([("call", call)])),
        ])
        var updated: JSONValue?
        do {
            updated = try db.findAndModify("accounts", query: .object(filter), update: update, upsert: mayCreate, returnNew: true)
        } catch StoreError.duplicateKey {
            updated = nil  // the upsert met an account the filter excluded: decided below
        }
        if let updated {
            try mark(db, id, "applied", seq: updated["applies"]?.int64)
            return .applied(balance: updated["balance"]?.int64 ?? 0)
        }
        let document = try db.find("accounts", filter: .object([("_id", .string(user))]), limit: 1).first
        let account = document.map(Self.account(from:))
        if let account, account.recent.contains(id) {
            try mark(db, id, "applied", seq: seq(of: id, in: account))
            // Applied by this call when its mark is the account's last.
            return document?["call"] == call ? .applied(balance: account.balance) : .alreadyApplied(balance: account.balance)
        }
        try mark(db, id, "void")
        return .insufficient(balance: account?.balance ?? 0)
    }

    /// `seq`: which of the account's applies it was (rows applied before `applies` was counted
    /// have none: they are older than any account read since).
    private static func mark(_ db: Database, _ id: String, _ state: String, seq: Int64? = nil) throws {
        let set: [(String, JSONValue)] = [("state", .string(state))] + (seq.map { [("seq", .long($0))] } ?? [])
        _ = try db.update("ledger", query: .object([("_id", .string(id))]), update: .object([("$set", .object(set))]))
    }

    /// Which of `account`'s applies `id` was, for a row marked by a retry or the recovery: each
    /// apply pushed one id and counted one, so the last id of `recent` is apply `applies`, the
    /// one before it `applies - 1`, and so on (ids from before the count get 0 or less: older).
    static func seq(of id: String, in account: (balance: Int64, recent: [String], applies: Int64)) -> Int64? {
        account.recent.lastIndex(of: id).map { account.applies - Int64(account.recent.count - 1 - $0) }
    }

    static func account(_ db: Database, _ user: String) throws -> (balance: Int64, recent: [String], applies: Int64)? {
        try db.find("accounts", filter: .object([("_id", .string(user))]), limit: 1).first.map(account(from:))
    }

    static func account(from doc: JSONValue) -> (balance: Int64, recent: [String], applies: Int64) {
        (doc["balance"]?.int64 ?? 0, doc["recent"]?.strings ?? [], doc["applies"]?.int64 ?? 0)
    }

    public func ledgerEntry(id: String) async throws -> LedgerEntry? {
        try await run { db in
            try db.find("ledger", filter: .object([("_id", .string(id)), ("state", .string("applied"))]), limit: 1).first.map(Self.entry(from:))
        }
    }

    public func ledgerEntries(from: Int64, to: Int64?, after: (createdAt: Int64, id: String)?, limit: Int) async throws -> [LedgerEntry] {
        try await run { db in
            var range: [(String, JSONValue)] = [("$gte", .long(from))]
            if let to { range.append(("$lt", .long(to))) }
            var filter: [(String, JSONValue)] = [("state", .string("applied")), ("created_at", .object(range))]
            if let after {
                filter.append(
                    (
                        "$or",
                        .array([
                            .object([("created_at", .object([("$gt", .long(after.createdAt))]))]),
                            .object([("created_at", .long(after.createdAt)), ("_id", .object([("$gt", .string(after.id))]))]),
                        ])
                    ))
            }
            return try db.find("ledger", filter: .object(filter), sort: .object([("created_at", .int(1)), ("_id", .int(1))]), limit: limit)
                .map(Self.entry(from:))
        }
    }

    public func costs(user: String, link: LedgerLink, ids: [String]) async throws -> [String: Int64] {
        guard !ids.isEmpty else { return [:] }
        return try await run { db in
            var costs: [String: Int64] = [:]
            let rows = try db.find(
                "ledger",
                filter: .object([
                    ("user", .string(user)), ("state", .string("applied")), (link.rawValue, .object([("$in", .array(ids.map(JSONValue.string)))])),
                ]),
                projection: .object([(link.rawValue, .int(1)), ("credits", .int(1))]))
            for row in rows {
                if let id = row[link.rawValue]?.stringValue { costs[id, default: 0] -= row["credits"]?.int64 ?? 0 }
            }
            return costs
        }
    }

    public func ledger(user: String, limit: Int, before: String?) async throws -> [LedgerEntry] {
        try await run { db in try Self.ledger(db, user: user, limit: limit, before: before) }
    }

    /// The account is read first; the page then holds what it had applied: rows applied with a
    /// `seq` up to its `applies` (or before `seq` was kept), and rows still pending whose id it
    /// already counts in `recent` (between steps 2 and 3). Rows applied after it are left out.
    public func ledgerPage(user: String, limit: Int, before: String?) async throws -> (entries: [LedgerEntry], balance: Int64) {
        try await run { db in
            guard let account = try Self.account(db, user) else { return ([], 0) }
            let asOf: JSONValue = .object([
                (
                    "$or",
                    .array([
                        .object([("seq", .object([("$exists", .bool(false))]))]),
                        .object([("seq", .object([("$lte", .long(account.applies))]))]),
                    ])
                )
            ])
            // The pending rows first (rarely any: an apply under way, or a node's leftovers until
            // it recovers): a row marked applied between the two reads is then in one or both.
            let counted = Set(account.recent)
            let pending = try Self.ledger(db, user: user, limit: nil, before: before, state: "pending").filter { counted.contains($0.id) }
            let applied = try Self.ledger(db, user: user, limit: limit, before: before, also: asOf)
            guard !pending.isEmpty else { return (applied, account.balance) }
            let ids = Set(applied.map(\.id))
            let entries = (applied + pending.filter { !ids.contains($0.id) }).sorted { ($0.createdAt, $0.id) > ($1.createdAt, $1.id) }
            return (Array(entries.prefix(limit)), account.balance)
        }
    }

    /// `user`'s rows in `state`, newest first, older than `before`, matching `also` as well;
    /// `limit` nil: all of them.
    private static func ledger(
        _ db: Database, user: String, limit: Int?, before: String?, state: String = "applied", also: JSONValue? = nil
    ) throws -> [LedgerEntry] {
        var filter: [(String, JSONValue)] = [("user", .string(user)), ("state", .string(state))]
        var conditions: [JSONValue] = also.map { [$0] } ?? []
        if let before {
            guard let cursor = try db.find("ledger", filter: .object([("_id", .string(before)), ("user", .string(user))]), limit: 1).first,
                let at = cursor["created_at"]?.int64
            else { return [] }
            conditions.append(
                .object([
                    (
                        "$or",
                        .array([
                            .object([("created_at", .object([("$lt", .long(at))]))]),
                            .object([("created_at", .long(at)), ("_id", .object([("$lt", .string(before))]))]),
                        ])
                    )
                ]))
        }
        if !conditions.isEmpty { filter.append(("$and", .array(conditions))) }
        return try db.find(
            "ledger", filter: .object(filter), sort: .object([("created_at", .int(-1)), ("_id", .int(-1))]), limit: limit
        ).map(Self.entry(from:))
    }

    public func recoverLedger(node: String?) async throws -> Int {
        let filter = leftovers(of: node, [("state", .string("pending"))])
        return try await run { db in
            let pending = try db.find("ledger", filter: filter, sort: .object([("created_at", .int(1))]))
            for row in pending {
                let entry = Self.entry(from: row)
                if entry.kind == .debit {
                    // Only finish a debit whose balance change already happened; void the rest.
                    if let account = try Self.account(db, entry.user), let seq = Self.seq(of: entry.id, in: account) {
                        try Self.mark(db, entry.id, "applied", seq: seq)
                    } else {
                        try Self.mark(db, entry.id, "void")
                    }
                } else {
                    _ = try Self.settle(db, id: entry.id, user: entry.user, credits: entry.credits, allowOverdraft: true)
                }
            }
            return pending.count
        }
    }

    /// A row about to be applied, stamped with this node.
    private func pending(_ entry: LedgerEntry) -> JSONValue {
        let row = Self.document(entry, state: "pending")
        guard let node, case .object(let fields) = row else { return row }
        return .object(fields + [("node", .string(node))])
    }

    static func document(_ e: LedgerEntry, state: String) -> JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("_id", .string(e.id)), ("user", .string(e.user)), ("kind", .string(e.kind.rawValue)), ("credits", .long(e.credits)),
            ("tokens", .long(Int64(e.tokens))), ("created_at", .long(e.createdAt)), ("state", .string(state)),
        ]
        for (key, value) in [
            ("stream", e.stream), ("conversation", e.conversation), ("room", e.room), ("model", e.model),
            ("feature", e.feature), ("note", e.note),
        ] {
            if let value { pairs.append((key, .string(value))) }
        }
        return .object(pairs)
    }

    static func entry(from d: JSONValue) -> LedgerEntry {
        LedgerEntry(
            id: d["_id"]?.stringValue ?? "", user: d["user"]?.stringValue ?? "",
            kind: LedgerEntry.Kind(rawValue: d["kind"]?.stringValue ?? "") ?? .debit,
            credits: d["credits"]?.int64 ?? 0, tokens: Int(d["tokens"]?.int64 ?? 0), stream: d["stream"]?.stringValue,
            conversation: d["conversation"]?.stringValue, room: d["room"]?.stringValue, model: d["model"]?.stringValue,
            feature: d["feature"]?.stringValue, note: d["note"]?.stringValue, createdAt: d["created_at"]?.int64 ?? 0
        )
    }
}
