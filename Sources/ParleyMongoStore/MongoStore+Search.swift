import ParleyCore
import ParleyStore

extension MongoStore {
    /// Through the `owner_terms_id` indexes: documents of the owner that list every term, each
    /// kind's newest `limit`, merged. Neither test server supports `$text` (and a text index
    /// would search every user's words before the owner filter), so the terms are Parley's own.
    public func search(owner: String, query: SearchQuery, limit: Int, before: String?) async throws -> [SearchHit] {
        try await run { db in
            func filter(_ bound: String?) -> JSONValue {
                var filter: [(String, JSONValue)] = [
                    ("owner", .string(owner)), ("terms", .object([("$all", .array(query.terms.map(JSONValue.string)))])),
                ]
                if let bound { filter.append(("_id", .object([("$lt", .string(bound))]))) }
                return .object(filter)
            }
            let newest = JSONValue.object([("_id", .int(-1))])
            let noTerms = JSONValue.object([("terms", .int(0))])
            let messages = try db.find(
                "messages", filter: filter(SearchHit.bound(before, prefix: .message)), sort: newest, projection: noTerms, limit: limit
            ).map(Self.message(from:))
            let titles = try db.find(
                "conversations", filter: filter(SearchHit.bound(before, prefix: .conversation)), sort: newest, projection: noTerms, limit: limit
            ).map(Self.conversation(from:))
            var conversations = Dictionary(titles.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
            let missing = Set(messages.map(\.conversation)).subtracting(conversations.keys)
            if !missing.isEmpty {
                for found in try db.find(
                    "conversations",
                    filter: .object([("_id", .object([("$in", .array(missing.map(JSONValue.string)))])), ("owner", .string(owner))]),
                    projection: noTerms)
                {
                    let conversation = Self.conversation(from: found)
                    conversations[conversation.id] = conversation
                }
            }
            let hits =
                messages.compactMap { m in conversations[m.conversation].map { SearchHit(kind: .message, id: m.id, conversation: $0, message: m) } }
                + titles.map { SearchHit(kind: .title, id: $0.id, conversation: $0) }
            return SearchHit.newestFirst(hits, limit: limit)
        }
    }
}

extension Database {
    /// Schema 3: messages stored before learn their owner and terms, conversations their title's
    /// terms, a batch at a time (idempotent: a start-up a crash cut short goes on where it was).
    func addSearchTerms() throws {
        let lacking = JSONValue.object([("terms", .object([("$exists", .bool(false))]))])
        while true {
            let batch = try find("conversations", filter: lacking, limit: 500)
            if batch.isEmpty { break }
            for row in batch {
                guard let id = row["_id"] else { continue }
                _ = try update(
                    "conversations", query: .object([("_id", id)]),
                    update: .object([("$set", .object([("terms", MongoStore.terms(row["title"]?.stringValue ?? ""))]))]))
            }
        }
        var owners: [String: String] = [:]
        while true {
            let batch = try find(
                "messages", filter: lacking, projection: .object([("_id", .int(1)), ("conversation", .int(1)), ("text", .int(1))]), limit: 500)
            if batch.isEmpty { break }
            for row in batch {
                guard let id = row["_id"], let conversation = row["conversation"]?.stringValue else { continue }
                if owners[conversation] == nil {
                    owners[conversation] =
                        try find("conversations", filter: .object([("_id", .string(conversation))]), limit: 1).first?["owner"]?.stringValue ?? ""
                }
                _ = try update(
                    "messages", query: .object([("_id", id)]),
                    update: .object([
                        (
                            "$set",
                            .object([("owner", .string(owners[conversation] ?? "")), ("terms", MongoStore.terms(row["text"]?.stringValue ?? ""))])
                        )
                    ]))
            }
        }
    }
}
