import Foundation
import NIOHTTP1

/// The opening handshake's shape (RFC 6455 section 4.2.1): what a request to `/v1/ws` that NIO
/// did not upgrade did wrong, if it was a WebSocket handshake at all.
enum WebSocketHandshake {
    /// The answer to a malformed handshake; nil when the request is well formed or asks for no
    /// upgrade (then 426 says how to ask).
    /// `query`: the request's query parameters (`coalesce` must name what it joins).
    static func problem(method: HTTPMethod, version: HTTPVersion, headers: HTTPHeaders, query: [String: String] = [:]) -> APIError? {
        guard hasToken("websocket", in: headers["upgrade"]) else { return nil }
        let supported = ["sec-websocket-version": "13"] as HTTPHeaders
        if method != .GET {
            return APIError(.methodNotAllowed, .badRequest, "a WebSocket handshake is a GET request", headers: ["allow": "GET"])
        }
        if (version.major, version.minor) < (1, 1) {
            return APIError(.badRequest, .badRequest, "a WebSocket handshake needs HTTP/1.1 or later")
        }
        if headers["host"].count != 1 {
            return APIError(.badRequest, .badRequest, "a WebSocket handshake needs one Host header")
        }
        if !hasToken("upgrade", in: headers["connection"]) {
            return APIError(.badRequest, .badRequest, "a WebSocket handshake needs 'Connection: Upgrade'")
        }
        let keys = headers["sec-websocket-key"]
        if keys.count != 1 || !isValidKey(keys[0]) {
            return APIError(.badRequest, .badRequest, "a WebSocket handshake needs one Sec-WebSocket-Key: 16 bytes in base64", headers: supported)
        }
        let versions = headers["sec-websocket-version"]
        if versions.isEmpty {
            return APIError(.badRequest, .badRequest, "a WebSocket handshake needs 'Sec-WebSocket-Version: 13'", headers: supported)
        }
        if versions != ["13"] {
            return APIError(.upgradeRequired, .badRequest, "this server speaks WebSocket version 13 only", headers: supported)
        }
        if query["coalesce"] != nil, !joinsTokens(query) {
            return APIError(.badRequest, .badRequest, "coalesce=tokens is the one thing a socket can ask to have joined")
        }
        return nil
    }

    /// Whether the handshake asks for joined tokens (`?coalesce=tokens`, PROTOCOL.md "Joined tokens").
    static func joinsTokens(_ query: [String: String]) -> Bool { query["coalesce"] == "tokens" }

    /// Whether `key` is base64 of exactly 16 bytes, as section 4.1 says a client's key is.
    static func isValidKey(_ key: String) -> Bool {
        let trimmed = key.trimmingCharacters(in: .whitespaces)
        return trimmed.utf8.count == 24 && Data(base64Encoded: trimmed)?.count == 16
    }

    /// Whether a comma-separated header holds `token` (case-insensitively).
    private static func hasToken(_ token: String, in values: [String]) -> Bool {
        values.contains { $0.split(separator: ",").contains { $0.trimmingCharacters(in: .whitespaces).lowercased() == token } }
    }
}
