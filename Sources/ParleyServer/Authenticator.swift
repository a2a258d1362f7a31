import Foundation
import JWTKit
import NIOHTTP1
import ParleyCore
import Synchronization

/// Who a verified token speaks for.
public struct Identity: Sendable, Equatable {
    public var user: String
    public var role: String?
    /// When the token stops being valid (its `exp`): a socket it opened is closed then.
    public var expiresAt: Date?
    /// The session the token belongs to (its `sid`, or a provider token's `jti`): signing out
    /// ends it (#28). Nil for a token that names none.
    public var session: String?
    /// When the token was issued (`iat`): signing out everywhere ends the sessions issued before.
    public var issuedAt: Date?

    public init(user: String, role: String? = nil, expiresAt: Date? = nil, session: String? = nil, issuedAt: Date? = nil) {
        self.user = user
        self.role = role
        self.expiresAt = expiresAt
        self.session = session
        self.issuedAt = issuedAt
    }

    public var isAdmin: Bool { role == "admin" }
}

public enum AuthError: Error, Equatable, Sendable, CustomStringConvertible {
    case missingToken
    case invalidToken
    case expired
    case notYetValid
    case invalidSubject
    /// The token's session was signed out (`POST /v1/me/sign-out`).
    case signedOut

    public var description: String {
        switch self {
        case .missingToken: "missing token: send 'Authorization: Bearer <token>' or '?token=<token>'"
        case .invalidToken: "invalid token"
        case .expired: "token expired"
        case .notYetValid: "token not valid yet (its nbf is in the future)"
        case .invalidSubject: "token subject must be 1-64 characters of letters, digits, '.', '_', '-' or '@'"
        case .signedOut: "this session was signed out; sign in again"
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
    /// The session (#28), and when the token was issued.
    var sid: String?
    var iat: IssuedAtClaim?

    func verify(using algorithm: some JWTAlgorithm) throws {
        try exp.verifyNotExpired()
    }
}

/// An identity provider whose tokens Parley accepts beside its own (#28): an OIDC provider's
/// signing keys as a JWKS (RS256/384/512, ES256/384, EdDSA), the issuer and audience its tokens
/// must name, and the claim that names the user.
public struct IdentityProvider: Sendable {
    /// The JWKS at start-up.
    public var jwksJSON: String
    public var issuer: String?
    public var audience: String?
    public var subjectClaim: String
    /// Fetches the JWKS again (from the provider's `jwks_uri`); nil when `jwksJSON` is all there
    /// is (a file). With it the keys are fetched again every `refreshInterval`, and at once (at
    /// most every `unknownKeyInterval`) when a token names a key id they lack: the provider rotated.
    public var fetch: (@Sendable () async throws -> String)?
    public var refreshInterval: Duration = .seconds(600)
    public var unknownKeyInterval: Duration = .seconds(30)

    public init(
        jwksJSON: String, issuer: String? = nil, audience: String? = nil, subjectClaim: String = "sub",
        fetch: (@Sendable () async throws -> String)? = nil
    ) {
        self.jwksJSON = jwksJSON
        self.issuer = issuer
        self.audience = audience
        self.subjectClaim = subjectClaim
        self.fetch = fetch
    }

    /// More keys than any provider publishes: a bigger set is refused, so the cache stays small.
    static let maxKeys = 64

    /// The algorithms a provider token may use: never HS256 (a public key is no secret) nor none.
    static let algorithms: Set<String> = ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"]
}

/// What Parley reads of an identity provider's token: the registered claims it checks and every
/// string claim, one of which names the user.
struct ProviderClaims: JWTPayload {
    var exp: ExpirationClaim
    var nbf: NotBeforeClaim?
    var iat: IssuedAtClaim?
    var iss: String?
    var aud: [String]
    var strings: [String: String]

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: Key.self)
        exp = try container.decode(ExpirationClaim.self, forKey: Key(stringValue: "exp"))
        nbf = try container.decodeIfPresent(NotBeforeClaim.self, forKey: Key(stringValue: "nbf"))
        iat = try? container.decodeIfPresent(IssuedAtClaim.self, forKey: Key(stringValue: "iat"))
        iss = try? container.decodeIfPresent(String.self, forKey: Key(stringValue: "iss"))
        let audienceKey = Key(stringValue: "aud")
        // RFC 7519 4.1.3: one audience as a string, or several as an array.
        if let list = try? container.decodeIfPresent([String].self, forKey: audienceKey) {
            aud = list
        } else if let one = try? container.decodeIfPresent(String.self, forKey: audienceKey) {
            aud = [one]
        } else {
            aud = []
        }
        var strings: [String: String] = [:]
        for key in container.allKeys {
            if let value = try? container.decode(String.self, forKey: key) { strings[key.stringValue] = value }
        }
        self.strings = strings
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: Key.self)
        try container.encode(exp, forKey: Key(stringValue: "exp"))
    }

    func verify(using algorithm: some JWTAlgorithm) throws {
        try exp.verifyNotExpired()
    }
}

/// An identity provider's current keys, fetched again as `IdentityProvider` says.
final class ProviderKeys: Sendable {
    let provider: IdentityProvider
    private struct State {
        var collection: JWTKeyCollection
        /// The key ids of the provider's JWKS: a token naming one is the provider's.
        var kids: Set<String>
        var fetchedAt: ContinuousClock.Instant
        var refreshing: Task<Void, Never>?
        var lastUnknownKeyFetch: ContinuousClock.Instant?
    }
    private let state: Mutex<State>

    init(_ provider: IdentityProvider) async throws {
        self.provider = provider
        let (collection, kids) = try await Self.keys(provider.jwksJSON)
        state = Mutex(State(collection: collection, kids: kids, fetchedAt: .now))
    }

    /// The keys of a JWKS; throws `ConfigurationError` for one that cannot be used.
    static func keys(_ json: String) async throws -> (JWTKeyCollection, Set<String>) {
        let collection = JWTKeyCollection()
        var kids = Set<String>()
        do {
            let jwks = try JSONDecoder().decode(JWKS.self, from: Data(json.utf8))
            guard jwks.keys.count <= IdentityProvider.maxKeys else {
                throw ConfigurationError("the JWKS has \(jwks.keys.count) keys; at most \(IdentityProvider.maxKeys) are taken")
            }
            for key in jwks.keys {
                guard let kid = key.keyIdentifier?.string else { throw ConfigurationError("a key of the JWKS has no 'kid'") }
                if let algorithm = key.algorithm?.rawValue, !IdentityProvider.algorithms.contains(algorithm) {
                    throw ConfigurationError(
                        "the JWKS key '\(kid)' is for \(algorithm); accepted: \(IdentityProvider.algorithms.sorted().joined(separator: ", "))")
                }
                try await collection.add(jwk: key)
                kids.insert(kid)
            }
        } catch let error as ConfigurationError {
            throw error
        } catch {
            throw ConfigurationError("cannot use the identity provider's JWKS: \(error)")
        }
        guard !kids.isEmpty else { throw ConfigurationError("the identity provider's JWKS has no key") }
        return (collection, kids)
    }

    /// The keys for a token naming `kid`: fetched again first when they lack it (at most every
    /// `unknownKeyInterval`), and in the background when they are older than `refreshInterval`.
    func keys(for kid: String) async -> (JWTKeyCollection, Set<String>) {
        guard provider.fetch != nil else { return current }
        let now = ContinuousClock.now
        let (known, stale, mayFetch) = state.withLock { s in
            (
                s.kids.contains(kid), now - s.fetchedAt > provider.refreshInterval,
                s.lastUnknownKeyFetch.map { now - $0 > provider.unknownKeyInterval } ?? true
            )
        }
        if !known, mayFetch {
            state.withLock { $0.lastUnknownKeyFetch = now }
            await refresh().value
        } else if stale {
            _ = refresh()
        }
        return current
    }

    private var current: (JWTKeyCollection, Set<String>) { state.withLock { ($0.collection, $0.kids) } }

    /// One fetch at a time; a failed one keeps the keys in use.
    private func refresh() -> Task<Void, Never> {
        state.withLock { s in
            if let running = s.refreshing { return running }
            let task = Task { [self] in
                let fresh: (JWTKeyCollection, Set<String>)?
                if let fetch = provider.fetch, let json = try? await fetch() {
                    fresh = try? await Self.keys(json)
                } else {
                    fresh = nil
                }
                state.withLock { s in
                    if let (collection, kids) = fresh {
                        s.collection = collection
                        s.kids = kids
                    }
                    s.fetchedAt = .now  // a failed try waits its interval too
                    s.refreshing = nil
                }
            }
            s.refreshing = task
            return task
        }
    }
}

/// Issues and verifies Parley's HS256 tokens, and verifies an identity provider's (jwt-kit does
/// the cryptography).
public struct Authenticator: Sendable {
    private let keys: JWTKeyCollection
    private let provider: ProviderKeys?
    /// Where signed-out sessions are looked up; nil checks none.
    private var sessions: SessionGate?

    private init(keys: JWTKeyCollection, provider: ProviderKeys?) {
        self.keys = keys
        self.provider = provider
    }

    /// `user` signed out here: their next token is checked against the store at once.
    func forgetSessions(of user: String) { sessions?.forget(user) }

    /// This authenticator, refusing the tokens of sessions `gate` says were signed out.
    func checking(sessions gate: SessionGate) -> Authenticator {
        var copy = self
        copy.sessions = gate
        return copy
    }

    public static func make(secret: String) async -> Authenticator {
        // A valid secret and no provider cannot fail.
        try! await make(secret: secret, provider: nil)
    }

    /// Parley's own tokens, and `provider`'s when given. Throws `ConfigurationError` for a JWKS
    /// that cannot be used (not JSON, a key without `kid`, an algorithm not accepted).
    public static func make(secret: String, provider: IdentityProvider?) async throws -> Authenticator {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        var providerKeys: ProviderKeys?
        if let provider { providerKeys = try await ProviderKeys(provider) }
        return Authenticator(keys: keys, provider: providerKeys)
    }

    /// A token of a new session (`sid`), issued now (`iat`).
    public func issue(subject: String, role: String? = nil, ttl: Duration, now: Date = Date()) async throws -> String {
        guard Self.isValidSubject(subject) else { throw AuthError.invalidSubject }
        let seconds = Double(ttl.components.seconds) + Double(ttl.components.attoseconds) / 1e18
        let session = "ses_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        let claims = ParleyClaims(
            sub: SubjectClaim(value: subject), exp: ExpirationClaim(value: now.addingTimeInterval(seconds)), role: role, sid: session,
            iat: IssuedAtClaim(value: now))
        return try await keys.sign(claims)
    }

    public func verify(_ token: String, now: Date = Date()) async throws(AuthError) -> Identity {
        // RFC 7515 4.1.11: a `crit` header names extensions the recipient must understand, and
        // Parley understands none; jwt-kit would let it pass.
        guard let header = Self.header(token), header["crit"] == nil else { throw .invalidToken }
        let algorithm = header["alg"]?.stringValue
        if let provider, let kid = header["kid"]?.stringValue {
            let (collection, kids) = await provider.keys(for: kid)
            if kids.contains(kid) {
                guard let algorithm, IdentityProvider.algorithms.contains(algorithm) else { throw .invalidToken }
                return try await verifyProvider(token, provider.provider, collection, now: now)
            }
        }
        // Parley's own: HS256 with its secret, and no key id (a provider's unknown kid is no fallback).
        guard algorithm == "HS256", header["kid"] == nil else { throw .invalidToken }
        let claims = try await Self.verified(token, as: ParleyClaims.self, by: keys)
        guard Self.isValidSubject(claims.sub.value) else { throw .invalidSubject }
        if let nbf = claims.nbf, nbf.value > now { throw .notYetValid }
        return try await admitted(
            Identity(user: claims.sub.value, role: claims.role, expiresAt: claims.exp.value, session: claims.sid, issuedAt: claims.iat?.value))
    }

    /// An identity provider's token: its signature by a key of the JWKS, `exp`, `nbf`, the
    /// issuer and audience when configured, and the user from the configured claim. It grants no
    /// role: admin stays a Parley token's (`parley token --role admin`).
    private func verifyProvider(
        _ token: String, _ provider: IdentityProvider, _ keys: JWTKeyCollection, now: Date
    ) async throws(AuthError) -> Identity {
        let claims = try await Self.verified(token, as: ProviderClaims.self, by: keys)
        if let nbf = claims.nbf, nbf.value > now { throw .notYetValid }
        if let issuer = provider.issuer, claims.iss != issuer { throw .invalidToken }
        if let audience = provider.audience, !claims.aud.contains(audience) { throw .invalidToken }
        guard let subject = claims.strings[provider.subjectClaim], Self.isValidSubject(subject) else { throw .invalidSubject }
        return try await admitted(
            Identity(user: subject, expiresAt: claims.exp.value, session: claims.strings["sid"] ?? claims.strings["jti"], issuedAt: claims.iat?.value)
        )
    }

    /// The token's claims, its signature checked by `keys` and its `exp` by the payload.
    private static func verified<Claims: JWTPayload>(_ token: String, as: Claims.Type, by keys: JWTKeyCollection) async throws(AuthError) -> Claims {
        do {
            return try await keys.verify(token, as: Claims.self)
        } catch let error as JWTError where error.errorType == .claimVerificationFailure {
            throw .expired
        } catch {
            throw .invalidToken
        }
    }

    /// `identity` unless its session was signed out.
    private func admitted(_ identity: Identity) async throws(AuthError) -> Identity {
        if let sessions, await !sessions.admits(identity) { throw .signedOut }
        return identity
    }

    /// The token's protected header, a JSON object; nil when it cannot be read, or names a
    /// member twice (RFC 7515 4: refused, so no two readers of it can disagree on its `alg`).
    /// Read with our own parser: Foundation's `JSONSerialization` was 5% of the server's CPU
    /// while thousands of sockets connected (#26).
    static func header(_ token: String) -> JSONValue? {
        guard let encoded = token.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false).first else { return nil }
        var base64 = encoded.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        guard let data = Data(base64Encoded: base64), let header = try? JSONValue.parse(data, refusingRepeatedKeys: true), case .object = header
        else { return nil }
        return header
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
        // Read as every query is (a query that reads two ways is refused before this counts).
        return (try? HTTPRequest.parameters(of: uri).get())?["token"]
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
