import Foundation
import JWTKit
import NIOHTTP1

/// Who a verified token speaks for.
public struct Identity: Sendable, Equatable {
    public var user: String
    public var role: String?
    /// When the token stops being valid (its `exp`): a socket it opened is closed then.
    public var expiresAt: Date?

    public var isAdmin: Bool { role == "admin" }
}

public enum AuthError: Error, Equatable, Sendable, CustomStringConvertible {
    case missingToken
    case invalidToken
    case expired
    case notYetValid
    case invalidSubject

    public var description: String {
        switch self {
        case .missingToken: "missing token: send 'Authorization: Bearer <token>' or '?token=<token>'"
        case .invalidToken: "invalid token"
        case .expired: "token expired"
        case .notYetValid: "token not valid yet (its nbf is in the future)"
        case .invalidSubject: "token subject must be 1-64 characters of letters, digits, '.', '_', '-' or '@'"
        }
    }
}

/// The claims Parley puts in and expects from a token.
struct ParleyClaims: JWTPayload {
    var sub: SubjectClaim
    var exp: ExpirationClaim
    /// Not before: a token presented earlier is refused (checked in `Authenticator.verify`).
    var nbf: NotBeforeClaim?
    var role: String?

    func verify(using algorithm: some JWTAlgorithm) throws {
        try exp.verifyNotExpired()
    }
}

/// Issues and verifies HS256 tokens (jwt-kit does the cryptography).
public struct Authenticator: Sendable {
    private let keys: JWTKeyCollection

    private init(keys: JWTKeyCollection) {
        self.keys = keys
    }

    public static func make(secret: String) async -> Authenticator {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        return Authenticator(keys: keys)
    }

    public func issue(subject: String, role: String? = nil, ttl: Duration, now: Date = Date()) async throws -> String {
        guard Self.isValidSubject(subject) else { throw AuthError.invalidSubject }
        let seconds = Double(ttl.components.seconds) + Double(ttl.components.attoseconds) / 1e18
        let claims = ParleyClaims(sub: SubjectClaim(value: subject), exp: ExpirationClaim(value: now.addingTimeInterval(seconds)), role: role)
        return try await keys.sign(claims)
    }

    public func verify(_ token: String, now: Date = Date()) async throws(AuthError) -> Identity {
        // RFC 7515 4.1.11: a `crit` header names extensions the recipient must understand, and
        // Parley understands none; jwt-kit would let it pass.
        guard !Self.hasCriticalHeader(token) else { throw .invalidToken }
        let claims: ParleyClaims
        do {
            claims = try await keys.verify(token, as: ParleyClaims.self)
        } catch let error as JWTError where error.errorType == .claimVerificationFailure {
            throw .expired
        } catch {
            throw .invalidToken
        }
        guard Self.isValidSubject(claims.sub.value) else { throw .invalidSubject }
        if let nbf = claims.nbf, nbf.value > now { throw .notYetValid }
        return Identity(user: claims.sub.value, role: claims.role, expiresAt: claims.exp.value)
    }

    /// Whether the token's protected header carries `crit` (or cannot be read at all).
    static func hasCriticalHeader(_ token: String) -> Bool {
        guard let encoded = token.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false).first else { return true }
        var base64 = encoded.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        guard let data = Data(base64Encoded: base64),
            let header = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { return true }
        return header["crit"] != nil
    }

    /// Verifies the token a request carries in its `Authorization` header or `token` query item.
    public func verify(headers: HTTPHeaders, uri: String) async throws(AuthError) -> Identity {
        guard let token = Self.token(headers: headers, uri: uri) else { throw .missingToken }
        return try await verify(token)
    }

    static func token(headers: HTTPHeaders, uri: String) -> String? {
        if let header = headers.first(name: "authorization") {
            let parts = header.split(separator: " ", maxSplits: 1)
            if parts.count == 2, parts[0].lowercased() == "bearer" {
                return String(parts[1]).trimmingCharacters(in: .whitespaces)
            }
            return nil
        }
        return URLComponents(string: uri)?.queryItems?.first { $0.name == "token" }?.value
    }

    static func isValidSubject(_ subject: String) -> Bool {
        let bytes = subject.utf8
        return (1...64).contains(bytes.count)
            && bytes.allSatisfy {
                switch $0 {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                    UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"), UInt8(ascii: "@"):
                    true
                default: false
                }
            }
    }
}

/// The JWT secret: given explicitly, or generated once and kept in the data directory.
public enum SecretFile {
    /// Reads the secret at `path`, creating it (32 random bytes, hex, mode 0600) when absent.
    public static func loadOrCreate(at path: String) throws -> String {
        let directory = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        if let existing = try? String(contentsOfFile: path, encoding: .utf8) {
            let trimmed = existing.trimmingCharacters(in: .whitespacesAndNewlines)
            guard trimmed.count >= 32 else {
                throw ConfigurationError("the secret in \(path) is shorter than 32 characters; delete it to generate a new one")
            }
            return trimmed
        }
        var generator = SystemRandomNumberGenerator()
        let secret = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        // O_EXCL: two processes starting at once must not each write a different secret.
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        if fd < 0 {
            if errno == EEXIST { return try loadOrCreate(at: path) }
            throw ConfigurationError("cannot create \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let bytes = Array((secret + "\n").utf8)
        guard write(fd, bytes, bytes.count) == bytes.count, fsync(fd) == 0 else {
            throw ConfigurationError("cannot write \(path): \(String(cString: strerror(errno)))")
        }
        return secret
    }
}

/// A configuration problem an operator must fix; its message says how.
public struct ConfigurationError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
