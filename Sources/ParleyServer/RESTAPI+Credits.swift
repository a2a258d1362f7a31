import Crypto
import Foundation
import ParleyCore
import ParleyStore

/// The credits routes: the caller's ledger and the admin's grants.
extension RESTAPI {
    func listCredits(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        try await credits.ensureGrants(identity.user)
        let limit = try Self.limit(request)
        // One moment for both: the balance is what the listed entries, and those before them, add up to.
        let (page, balance) = try await store.ledgerPage(user: identity.user, limit: limit + 1, before: request.query["before"])
        return HTTPResponse(
            .ok, json: .object([("balance", .int(balance))] + Self.page(page, limit: limit, as: "entries", id: \.id, \.json)))
    }

    /// `POST /v1/admin/credits {"user","credits","note"?,"key"?}`: `key` makes a retried grant
    /// apply once (ledger id `admin:<key>`).
    func adminGrant(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard identity.isAdmin else { throw APIError(.forbidden, .forbidden, "granting credits needs the admin role") }
        var reader = try JSONObjectReader(try request.json())
        let user = try reader.requiredString("user")
        guard let amount = try reader.int("credits") else { throw ValidationError("missing field 'credits'") }
        let note = try reader.string("note")
        let key = try reader.string("key")
        if let key, !(1...128).contains(key.utf8.count) { throw ValidationError("'key' must be 1-128 bytes") }
        try reader.rejectUnknown()
        try credits.validateGrant(user: user, credits: amount)
        var (entry, outcome) = try await credits.grant(
            id: "admin:" + (key ?? ids.make(.message)), user: user, credits: amount,
            note: "granted by \(identity.user)" + (note.map { ": \($0)" } ?? ""))
        if case .alreadyApplied = outcome, let stored = try await store.ledgerEntry(id: entry.id) {
            // A retry answers with what the key did the first time; another grant under it is refused.
            guard stored.user == user, stored.credits == amount else {
                throw APIError(
                    .conflict, .conflict,
                    "key '\(key ?? "")' already granted \(stored.credits) credits to \(stored.user); another grant needs a new key")
            }
            entry = stored
        }
        if outcome.isApplied {
            await audit.record(
                "credits.granted", actor: identity.user, target: user, ip: request.remoteIP,
                detail: ["credits": "\(amount)", "entry": entry.id])
        }
        return HTTPResponse(
            outcome.isApplied ? .created : .ok,
            json: .object([
                ("entry", entry.json), ("balance", .int(outcome.balance)), ("applied", .bool(outcome.isApplied)),
            ]))
    }

    /// A webhook's `timestamp` (Unix seconds) must be within the tolerance of now: an old
    /// signed body replayed later is refused.
    func checkFreshness(_ timestamp: Int64) throws {
        let skew = abs(Double(configuration.credits.clock()) / 1000 - Double(timestamp))
        guard skew <= Double(configuration.credits.paymentsTolerance.components.seconds) else {
            throw APIError(.unauthorized, .unauthorized, "the timestamp is too far from now; replays are refused")
        }
    }

    static func hexBytes(_ text: Substring) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0, !chars.isEmpty else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(chars.count / 2)
        var index = 0
        while index < chars.count {
            guard let high = Self.nibble(chars[index]), let low = Self.nibble(chars[index + 1]) else { return nil }
            bytes.append(high << 4 | low)
            index += 2
        }
        return bytes
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
