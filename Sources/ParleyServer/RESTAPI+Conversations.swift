import ParleyCore
import ParleyStore

/// What a user does to a conversation as a whole (#24): rename it, delete it or one of its
/// messages with what follows it, fork it.
extension RESTAPI {
    static let maxTitleLength = 200

    /// `PATCH /v1/conversations/{id} {"title"}`: 200 with the renamed conversation.
    func renameConversation(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var reader = try JSONObjectReader(try request.json())
        let title = try reader.requiredString("title").trimmedWhitespace
        try reader.rejectUnknown()
        guard !title.isEmpty, title.count <= Self.maxTitleLength, !title.contains(where: \.isNewline) else {
            throw APIError(.badRequest, .badRequest, "'title' must be one line of 1-\(Self.maxTitleLength) characters")
        }
        guard let renamed = try await store.renameConversation(id: id, owner: identity.user, title: title) else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        return HTTPResponse(.ok, json: renamed.json)
    }

    /// `DELETE /v1/conversations/{id}`: 204. Its replies still streaming stop (and are stored)
    /// first, then it goes with every message.
    func deleteConversation(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard try await store.conversation(id: id, owner: identity.user) != nil else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        let deleted = try await chat.streams.stopStreams(conversation: id, owner: identity.user) {
            try await store.deleteConversation(id: id, owner: identity.user)
        }
        guard deleted else { throw APIError(.notFound, .notFound, "no conversation \(id)") }
        await audit.record("conversation.deleted", actor: identity.user, target: id, ip: request.remoteIP)
        return HTTPResponse(.noContent)
    }

    /// `DELETE /v1/conversations/{id}/messages/{message}`: 200 `{"deleted": n}`, the message and
    /// every message below it; 409 while a reply streams in the conversation or waits to be stored
    /// there.
    func deleteMessage(conversation id: String, message: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard try await store.conversation(id: id, owner: identity.user) != nil else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        let deleted = try await chat.whileNoReplyStreams(user: identity.user, conversation: id) {
            try await store.deleteMessage(id: message, conversation: id)
        }
        guard let deleted else {
            throw APIError(.conflict, .conflict, "a reply in conversation \(id) is streaming or waiting to be stored; delete once it is stored")
        }
        guard deleted > 0 else { throw APIError(.notFound, .notFound, "no message \(message) in conversation \(id)") }
        await audit.record("message.deleted", actor: identity.user, target: message, ip: request.remoteIP)
        return HTTPResponse(.ok, json: .object([("deleted", .int(Int64(deleted)))]))
    }

    /// `POST /v1/conversations/{id}/fork {"message"}`: 201 with a new conversation (same clone)
    /// holding copies of the path up to that message, which must be on the path.
    func fork(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var reader = try JSONObjectReader(try request.json())
        let messageID = try reader.requiredString("message")
        try reader.rejectUnknown()
        guard let source = try await store.conversation(id: id, owner: identity.user) else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        guard let last = try await store.message(id: messageID, conversation: id) else {
            throw APIError(.notFound, .notFound, "no message \(messageID) in conversation \(id)")
        }
        guard last.onPath else {
            throw APIError(.badRequest, .badRequest, "message \(messageID) is an alternative not on the path; choose it first")
        }
        // The path up to it, oldest first, a page at a time.
        var path = [last]
        while true {
            let page = try await store.messages(conversation: id, limit: 200, before: path[0].id)
            path.insert(contentsOf: page, at: 0)
            if page.count < 200 { break }
        }
        let now = Int64(Timestamp.nowMillis())
        let copy = Conversation(
            id: ids.make(.conversation), owner: identity.user, clone: source.clone, title: source.title, createdAt: now, updatedAt: now)
        var parent: String?
        let copied = path.map { message in
            let copied = Message(
                id: ids.make(.message), conversation: copy.id, role: message.role, text: message.text, createdAt: message.createdAt,
                reason: message.reason, usage: message.usage, saved: message.saved, parent: parent)
            parent = copied.id
            return copied
        }
        try await store.createConversation(copy, messages: copied)
        let stored = try await store.conversation(id: copy.id, owner: identity.user) ?? copy
        return HTTPResponse(.created, json: stored.json, headers: ["location": "/v1/conversations/\(copy.id)"])
    }
}

/// Search over the caller's words (#24).
extension RESTAPI {
    static let maxSearchLength = 500

    /// `GET /v1/search?q=…&limit=&before=`: 200 `{"items", "next_before"}`, the caller's messages
    /// (on the path or not) and conversation titles holding every word of `q`, newest first,
    /// each with a snippet whose matching words are marked.
    func search(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let limit = try Self.limit(request)
        let text = request.query["q"] ?? ""
        guard text.count <= Self.maxSearchLength else {
            throw APIError(.badRequest, .badRequest, "'q' must be at most \(Self.maxSearchLength) characters")
        }
        guard let query = try SearchQuery.parse(text) else {
            throw APIError(.badRequest, .badRequest, "'q' must name at least one word to search for")
        }
        let page = try await store.search(owner: identity.user, query: query, limit: limit + 1, before: request.query["before"])
        return HTTPResponse(.ok, json: .object(Self.page(page, limit: limit, as: "items", id: \.id) { $0.json(query) }))
    }
}

extension SearchHit {
    func json(_ query: SearchQuery) -> JSONValue {
        var pairs: [(String, JSONValue)] = [("kind", .string(kind.rawValue)), ("id", .string(id)), ("conversation", conversation.json)]
        if let message {
            pairs += [
                (
                    "message",
                    .object([
                        ("id", .string(message.id)), ("role", .string(message.role.rawValue)),
                        ("created_at", .string(Timestamp.rfc3339(millis: message.createdAt))), ("on_path", .bool(message.onPath)),
                    ])
                ),
                ("snippet", SearchSnippet(text: message.text, query: query).json),
            ]
        } else {
            pairs.append(("snippet", SearchSnippet(text: conversation.title, query: query).json))
        }
        return .object(pairs)
    }
}
