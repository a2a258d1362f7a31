import Foundation
import NIOWebSocket
import ParleyCore
import ParleyStore

/// The privacy routes: export, deletion, saved messages, and the admin's audit log and purge.
extension RESTAPI {
    /// Rows read from the store per page while exporting.
    static let exportPage = 200

    /// `GET /v1/me/export`: the caller's account, clones, conversations with their messages
    /// (newest first), rooms they own with their transcripts, schedules, ledger, payment orders and their own
    /// audit events (what they did and what was done to their account) as one JSON
    /// document, written page by page as it is read (never built whole in memory).
    func exportAccount(_ identity: Identity) async throws -> HTTPResponse {
        let user = identity.user
        let account = try await store.ensureUser(user, now: Int64(Timestamp.nowMillis()))
        let balance = try await store.balance(user: user)
        let persona = try await store.persona(user: user)
        let store = self.store
        let header = JSONValue.object([
            ("format", .string("parley-export")), ("version", .int(1)),
            ("exported_at", .string(Timestamp.rfc3339(millis: Int64(Timestamp.nowMillis())))),
            (
                "account",
                .object([
                    ("user", .string(user)), ("created_at", .string(Timestamp.rfc3339(millis: account.createdAt))), ("balance", .int(balance)),
                    ("persona", persona?.json ?? .null),
                ])
            ),
        ])
        return HTTPResponse(.ok, contentType: "application/json; charset=utf-8") { out in
            // The header object without its closing brace; each section follows as a member.
            try await out.write(Array(header.serialized().dropLast()))
            try await out.write(#","clones":["#)
            let clones = { (after: String?) in try await store.clones(owner: user, limit: Self.clonePage, after: after) }
            try await Self.pages(&out, clones, cursor: \.id, size: Self.clonePage) { out, clone in
                try await out.write(clone.json(user: persona).serialized())
            }
            try await out.write(#"],"conversations":["#)
            try await Self.pages(&out, { try await store.conversations(owner: user, limit: Self.exportPage, before: $0) }, cursor: \.id) {
                out, conversation in
                try await out.write(#"{"conversation":"#)
                try await out.write(conversation.json.serialized())
                try await out.write(#","messages":["#)
                try await Self.pages(
                    &out, { Array(try await store.everyMessage(conversation: conversation.id, limit: Self.exportPage, before: $0).reversed()) },
                    cursor: \.id
                ) { out, message in try await out.write(message.exportJSON.serialized()) }
                try await out.write("]}")
            }
            try await out.write(#"],"rooms":["#)
            try await Self.pages(&out, { try await store.rooms(owner: user, limit: Self.exportPage, after: $0) }, cursor: \.id) { out, room in
                try await out.write(#"{"room":"#)
                try await out.write(room.json.serialized())
                try await out.write(#","transcript":["#)
                try await Self.pages(
                    &out, { Array(try await store.roomEntries(room: room.id, limit: Self.exportPage, before: $0).reversed()) },
                    cursor: \.id
                ) { out, entry in try await out.write(entry.json.serialized()) }
                try await out.write("]}")
            }
            try await out.write(#"],"schedules":["#)
            try await Self.pages(&out, { try await store.schedules(owner: user, limit: Self.exportPage, before: $0) }, cursor: \.id) {
                out, schedule in try await out.write(schedule.json.serialized())
            }
            try await out.write(#"],"ledger":["#)
            try await Self.pages(&out, { try await store.ledger(user: user, limit: Self.exportPage, before: $0) }, cursor: \.id) {
                out, entry in try await out.write(entry.json.serialized())
            }
            try await out.write(#"],"payments":["#)
            try await Self.pages(&out, { try await store.paymentOrders(user: user, limit: Self.exportPage, before: $0) }, cursor: \.key) {
                out, order in try await out.write(order.json.serialized())
            }
            try await out.write(#"],"voice_clips":["#)
            try await Self.pages(&out, { try await store.clips(owner: user, limit: Self.exportPage, before: $0) }, cursor: \.id) {
                out, clip in try await out.write(clip.json(expiresAt: self.expiry(of: clip)).serialized())
            }
            try await out.write(#"],"audit":["#)
            try await Self.pages(&out, { try await store.auditEvents(limit: Self.exportPage, before: $0, involving: user) }, cursor: \.id) {
                out, event in try await out.write(event.json.serialized())
            }
            try await out.write("]}")
        }
    }

    /// Writes every item of a paged query, comma-separated: `fetch` gets the cursor of the last
    /// item written (nil first) and answers the next page (`size` items unless it is the last)
    /// in the order to write it.
    static func pages<Item>(
        _ out: inout HTTPBodyWriter, _ fetch: (String?) async throws -> [Item], cursor: KeyPath<Item, String>, size: Int = exportPage,
        _ write: (inout HTTPBodyWriter, Item) async throws -> Void
    ) async throws {
        var after: String?
        var first = true
        while true {
            let page = try await fetch(after)
            for item in page {
                if !first { try await out.write(",") }
                first = false
                try await write(&out, item)
            }
            guard page.count == size, let last = page.last else { return }
            after = last[keyPath: cursor]
        }
    }

    /// Closes `user`'s sockets on this node (1008 "account deleted") and stops their replies
    /// once what the sockets asked for before they closed finished (a chat.send stores the
    /// message it answers): nothing of theirs is written here afterwards. Returns the sockets closed.
    /// `deletingHere`: this node deletes the account (`KeptReplies.forget`'s `untilDeleted`).
    func closeLocally(user: String, deletingHere: Bool = false) async -> Int {
        let closing = sockets.connections(of: user).map { $0.close(code: .policyViolation, reason: "account deleted") }
        for socket in closing { try? await socket.get() }
        await chat.streams.stopStreams(owner: user, untilDeleted: deletingHere)
        await chat.requests.settle(user: user)
        await chat.streams.stopStreams(owner: user, untilDeleted: deletingHere)
        credits.forget(user)
        personas.forget(user)
        return closing.count
    }

    /// `POST /v1/me/sign-out {"all"?}`: 204. Ends the token's session (or, with `"all": true`,
    /// every session of the caller issued until now): its tokens are refused from now on, and
    /// its sockets close (1008 "signed out") here and, in a cluster, on every other live node
    /// before the answer. A token that names no session can only sign out everywhere.
    func signOut(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var all = false
        if !(request.body?.readableBytes == 0 || request.body == nil) {
            var reader = try JSONObjectReader(try request.json())
            all = try reader.bool("all") ?? false
            try reader.rejectUnknown()
        }
        guard all || identity.session != nil else {
            throw APIError(.badRequest, .badRequest, "this token names no session: sign out with {\"all\": true}")
        }
        let signOut = SignOut(user: identity.user, session: all ? nil : identity.session, at: Int64(Timestamp.nowMillis()))
        try await store.revokeSessions(user: signOut.user, session: signOut.session, at: signOut.at)
        _ = await signOutLocally(signOut)
        _ = await otherNodes?.signOutEverywhere(signOut)
        await audit.record(
            all ? "session.signed_out_everywhere" : "session.signed_out", actor: identity.user, target: identity.session, ip: request.remoteIP)
        return HTTPResponse(.noContent)
    }

    /// Ends `signOut`'s sockets on this node (1008 "signed out") and drops what this node cached
    /// of the user's sessions, so their tokens are refused here at once. Returns the sockets closed.
    func signOutLocally(_ signOut: SignOut) async -> Int {
        authenticator.forgetSessions(of: signOut.user)
        let closing = sockets.signOut(signOut).map { $0.close(code: .policyViolation, reason: "signed out") }
        for socket in closing { try? await socket.get() }
        return closing.count
    }

    /// `DELETE /v1/me`: the caller's sockets close at once (1008 "account deleted"), their
    /// replies stop, pending schedules are cancelled, rooms they own end, and the store deletes
    /// everything of them but the ledger rows the law requires (kept under a pseudonym).
    func deleteAccount(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let user = identity.user
        let closed = await closeLocally(user: user, deletingHere: true)
        // In a cluster every other node does the same for its sockets and streams first.
        let elsewhere = await otherNodes?.closeEverywhere(user: user) ?? 0
        await schedules.cancelAll(owner: user)
        await rooms.forget(user: user)
        let pseudonym = audit.pseudonym(for: user)
        let first = try await store.deleteUser(user, pseudonym: pseudonym)
        // A scheduled reply or a REST call that raced the deletion may have stored something
        // since: a second pass (idempotent) takes that too.
        await chat.streams.stopStreams(owner: user, untilDeleted: true)
        let report = first + (try await store.deleteUser(user, pseudonym: pseudonym))
        chat.streams.kept.deleted(owner: user)
        credits.forget(user)
        personas.forget(user)
        await audit.record("user.deleted", actor: pseudonym, target: pseudonym, ip: request.remoteIP, detail: report.detail)
        logger.notice("account deleted", metadata: ["pseudonym": "\(pseudonym)", "sockets": "\(closed)", "nodes": "\(elsewhere)"])
        return HTTPResponse(
            .ok,
            json: .object([
                ("deleted", .bool(true)),
                (
                    "removed",
                    .object([
                        ("clones", .int(Int64(report.clones))), ("conversations", .int(Int64(report.conversations))),
                        ("messages", .int(Int64(report.messages))), ("schedules", .int(Int64(report.schedules))),
                        ("rooms", .int(Int64(report.rooms))), ("room_entries", .int(Int64(report.roomEntries))),
                        ("voice_clips", .int(Int64(report.voiceClips))),
                    ])
                ),
                ("ledger_rows_kept", .int(Int64(report.ledgerRowsKept))),
            ]))
    }

    /// `PATCH /v1/conversations/{id}/messages/{message} {"saved": true|false}`.
    func markSaved(conversation: String, message: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var reader = try JSONObjectReader(try request.json())
        guard let saved = try reader.bool("saved") else { throw ValidationError("missing field 'saved' (true or false)") }
        try reader.rejectUnknown()
        guard try await store.conversation(id: conversation, owner: identity.user) != nil else {
            throw APIError(.notFound, .notFound, "no conversation \(conversation)")
        }
        guard try await store.setMessageSaved(id: message, conversation: conversation, saved: saved),
            let stored = try await store.message(id: message, conversation: conversation)
        else {
            throw APIError(.notFound, .notFound, "no message \(message) in conversation \(conversation)")
        }
        return HTTPResponse(.ok, json: stored.json)
    }

    /// `GET /v1/admin/audit?limit&before`: the audit log, newest first (admin role).
    func listAudit(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard identity.isAdmin else { throw APIError(.forbidden, .forbidden, "the audit log needs the admin role") }
        let limit = try Self.limit(request)
        let page = try await store.auditEvents(limit: limit + 1, before: request.query["before"], involving: nil)
        return HTTPResponse(.ok, json: .object(Self.page(page, limit: limit, as: "events", id: \.id, \.json)))
    }

    /// `POST /v1/admin/retention/purge {"older_than_seconds"?}`: a retention pass now (admin
    /// role): audit events past the audit retention, and unsaved content with the configured
    /// limit unless the body gives a stricter one; with content retention off and no limit given,
    /// content is kept (`older_than_seconds` null).
    func purgeNow(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard identity.isAdmin else { throw APIError(.forbidden, .forbidden, "purging needs the admin role") }
        var age = configuration.retention
        if let body = request.body, body.readableBytes > 0 {
            var reader = try JSONObjectReader(try request.json())
            if let seconds = try reader.int("older_than_seconds") {
                guard seconds >= 0 else { throw ValidationError("'older_than_seconds' must be 0 or more") }
                let asked = Duration.seconds(seconds)
                age = age.map { min($0, asked) } ?? asked
            }
            try reader.rejectUnknown()
        }
        var content = PurgeResult()
        if let age { content = try await retention.purge(olderThan: age) }
        let auditEvents = try await retention.purgeAudit()
        let paymentRecords = try await retention.purgePayments()
        let voiceClips = try await retention.purgeClips()
        var detail = [
            "messages": "\(content.messages)", "room_entries": "\(content.roomEntries)", "audit_events": "\(auditEvents)",
            "payment_records": "\(paymentRecords)", "voice_clips": "\(voiceClips)",
        ]
        if let age { detail["older_than_seconds"] = "\(age.components.seconds)" }
        await audit.record("retention.purged", actor: identity.user, ip: request.remoteIP, detail: detail)
        return HTTPResponse(
            .ok,
            json: .object([
                ("messages", .int(Int64(content.messages))), ("room_entries", .int(Int64(content.roomEntries))),
                ("older_than_seconds", age.map { .int($0.components.seconds) } ?? .null), ("audit_events", .int(Int64(auditEvents))),
                ("audit_older_than_seconds", .int(retention.auditRetention.components.seconds)),
                ("payment_records", .int(Int64(paymentRecords))), ("voice_clips", .int(Int64(voiceClips))),
                ("voice_clips_older_than_seconds", .int(retention.mediaRetention.components.seconds)),
            ]))
    }
}
