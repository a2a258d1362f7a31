import Crypto
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Where tokens come from: minted with the server's HS256 secret, or read from a file of
/// `user token` lines (for a server whose secret the operator keeps elsewhere).
struct TokenSource: Sendable {
    private let secret: String?
    private let fromFile: [String: String]

    init(secret: String?, tokensFile: String?) throws {
        self.secret = secret
        var tokens: [String: String] = [:]
        if let tokensFile {
            for line in try String(contentsOfFile: tokensFile, encoding: .utf8).split(whereSeparator: \.isNewline) {
                let parts = line.split(separator: " ", maxSplits: 1)
                if parts.count == 2 { tokens[String(parts[0])] = String(parts[1]).trimmingCharacters(in: .whitespaces) }
            }
        }
        fromFile = tokens
        guard secret != nil || !fromFile.isEmpty else { throw LoadError("give --secret, --secret-file or --tokens-file") }
    }

    func token(for user: String) throws -> String {
        if let token = fromFile[user] { return token }
        guard let secret else { throw LoadError("no token for \(user) in --tokens-file") }
        return Self.mint(secret: secret, user: user, ttl: 6 * 3600)
    }

    /// An HS256 JWT `{sub, exp}` as the server's `parley token` makes.
    static func mint(secret: String, user: String, ttl: Int) -> String {
        let header = base64URL(Data(#"{"alg":"HS256","typ":"JWT"}"#.utf8))
        let payload = base64URL(Data(#"{"sub":"\#(user)","exp":\#(Int(Date().timeIntervalSince1970) + ttl)}"#.utf8))
        let input = header + "." + payload
        let mac = HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: SymmetricKey(data: Data(secret.utf8)))
        return input + "." + base64URL(Data(mac))
    }

    private static func base64URL(_ data: Data) -> String {
        data.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }
}

struct LoadError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The REST calls a scenario needs to set itself up (clones, rooms, schedules).
struct RESTClient: Sendable {
    let base: String

    func post(_ path: String, token: String, json: [String: Any]) async throws -> [String: Any] {
        var request = URLRequest(url: URL(string: base + path)!)
        request.httpMethod = "POST"
        request.setValue("Bearer \(token)", forHTTPHeaderField: "authorization")
        request.setValue("application/json", forHTTPHeaderField: "content-type")
        request.httpBody = try JSONSerialization.data(withJSONObject: json)
        let (data, response) = try await URLSession.shared.data(for: request)
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        guard (200..<300).contains(status), let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw LoadError("POST \(path) answered \(status): \(String(decoding: data, as: UTF8.self))")
        }
        return object
    }

    /// Creates one clone for each token, `width` requests at a time; returns their ids in order.
    func createClones(tokens: [String], width: Int = 16) async throws -> [String] {
        try await boundedMap(tokens.count, width: width) { index in
            let clone = try await self.post("/v1/clones", token: tokens[index], json: ["name": "Load \(index)", "traits": ["brief"]])
            return clone["id"] as? String ?? ""
        }
    }
}

/// `body(i)` for every `i` in `0..<count`, at most `width` at a time; the results in order.
func boundedMap<T: Sendable>(_ count: Int, width: Int, _ body: @escaping @Sendable (Int) async throws -> T) async throws -> [T] {
    var results = [T?](repeating: nil, count: count)
    try await withThrowingTaskGroup(of: (Int, T).self) { group in
        var next = 0
        func add() {
            let index = next
            next += 1
            group.addTask { (index, try await body(index)) }
        }
        while next < min(width, count) { add() }
        while let (index, result) = try await group.next() {
            results[index] = result
            if next < count { add() }
        }
    }
    return results.map { $0! }
}
