import Crypto
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ParleyCore
import ParleyStore
import Synchronization

/// The REST routes. Each handler gets the verified identity; ownership is enforced by the store
/// (another user's resource answers 404, exactly like a missing one).
struct RESTAPI: Sendable {
    let store: any Store
    let chat: ChatService
    var personas: Personas { chat.personas }
    let schedules: ScheduleService
    let rooms: RoomService
    let credits: Credits
    let authenticator: Authenticator
    let configuration: ServerConfiguration
    let ids: IDGenerator
    let logger: Logger
    let handshakes: RateLimiter?
    /// Each user's REST requests (`ServerConfiguration.requestsPerSecondPerUser`).
    let requests: RateLimiter?
    let authFailures: AuthFailureLimiter?
    let sockets: SocketHub
    let audit: AuditLog
    /// Sign-ins (accepted and refused) in the audit log.
    let signIns: SignInAudit
    /// Refused webhook deliveries logged lately, by address and reason.
    let refusedDeliveries = RecentKeys(capacity: 10_000)
    let retention: RetentionJob
    /// A cluster's other nodes (nil alone).
    let otherNodes: (any OtherNodes)?

    private var router = Router<Identity>()
    private let webClient = WebClient.load()
    /// A user's clone creates on this node, one at a time: each counts, then writes.
    private let cloneCreates = StripedLocks()

    init(
        store: any Store, chat: ChatService, schedules: ScheduleService, rooms: RoomService, credits: Credits, authenticator: Authenticator,
        configuration: ServerConfiguration, ids: IDGenerator, logger: Logger, sockets: SocketHub, audit: AuditLog, retention: RetentionJob,
        handshakes: RateLimiter? = nil, authFailures: AuthFailureLimiter? = nil, otherNodes: (any OtherNodes)? = nil
    ) {
        self.otherNodes = otherNodes
        self.sockets = sockets
        self.audit = audit
        signIns = SignInAudit(log: audit)
        self.retention = retention
        self.handshakes = handshakes
        requests = configuration.requestsPerSecondPerUser.map { RateLimiter(rate: $0) }
        self.authFailures = authFailures
        self.store = store
        self.chat = chat
        self.schedules = schedules
        self.rooms = rooms
        self.credits = credits
        self.authenticator = authenticator
        self.configuration = configuration
        self.ids = ids
        self.logger = logger
        router.add(.POST, "/v1/clones") { [self] request, _, identity in try await createClone(request, identity) }
        router.add(.POST, "/v1/clones/import") { [self] request, _, identity in try await importCard(request, identity) }
        router.add(.POST, "/v1/voice/transcriptions") { [self] request, _, identity in try await transcribeVoice(request, identity) }
        router.add(.GET, "/v1/clips") { [self] request, _, identity in try await listClips(request, identity) }
        router.add(.GET, "/v1/clips/:id") { [self] _, p, identity in try await showClip(p["id"]!, identity) }
        router.add(.GET, "/v1/clips/:id/audio") { [self] _, p, identity in try await clipAudio(p["id"]!, identity) }
        router.add(.PATCH, "/v1/clips/:id") { [self] request, p, identity in try await saveClip(p["id"]!, request, identity) }
        router.add(.DELETE, "/v1/clips/:id") { [self] _, p, identity in try await deleteClip(p["id"]!, identity) }
        router.add(.GET, "/v1/clones/:id/card") { [self] request, p, identity in try await exportCard(p["id"]!, request, identity) }
        router.add(.GET, "/v1/clones") { [self] _, _, identity in try await listClones(identity) }
        router.add(.GET, "/v1/clones/:id") { [self] _, p, identity in try await getClone(p["id"]!, identity) }
        router.add(.PATCH, "/v1/clones/:id") { [self] request, p, identity in try await patchClone(p["id"]!, request, identity) }
        router.add(.DELETE, "/v1/clones/:id") { [self] request, p, identity in try await deleteClone(p["id"]!, request, identity) }
        router.add(.GET, "/v1/conversations") { [self] request, _, identity in try await listConversations(request, identity) }
        router.add(.GET, "/v1/conversations/:id") { [self] _, p, identity in try await getConversation(p["id"]!, identity) }
        router.add(.GET, "/v1/conversations/:id/messages") { [self] request, p, identity in
            try await listMessages(p["id"]!, request, identity)
        }
        router.add(.POST, "/v1/conversations/:id/active") { [self] request, p, identity in try await chooseBranch(p["id"]!, request, identity) }
        router.add(.PATCH, "/v1/conversations/:id") { [self] request, p, identity in try await renameConversation(p["id"]!, request, identity) }
        router.add(.DELETE, "/v1/conversations/:id") { [self] request, p, identity in try await deleteConversation(p["id"]!, request, identity) }
        router.add(.DELETE, "/v1/conversations/:id/messages/:message") { [self] request, p, identity in
            try await deleteMessage(conversation: p["id"]!, message: p["message"]!, request, identity)
        }
        router.add(.GET, "/v1/search") { [self] request, _, identity in try await search(request, identity) }
        router.add(.POST, "/v1/conversations/:id/fork") { [self] request, p, identity in try await fork(p["id"]!, request, identity) }
        router.add(.POST, "/v1/schedules") { [self] request, _, identity in try await createSchedule(request, identity) }
        router.add(.GET, "/v1/schedules") { [self] request, _, identity in try await listSchedules(request, identity) }
        router.add(.GET, "/v1/schedules/:id") { [self] _, p, identity in try await getSchedule(p["id"]!, identity) }
        router.add(.DELETE, "/v1/schedules/:id") { [self] _, p, identity in try await cancelSchedule(p["id"]!, identity) }
        router.add(.POST, "/v1/rooms") { [self] request, _, identity in try await createRoom(request, identity) }
        router.add(.GET, "/v1/rooms") { [self] request, _, identity in try await listRooms(request, identity) }
        router.add(.GET, "/v1/rooms/:id") { [self] _, p, identity in try await getRoom(p["id"]!, identity) }
        router.add(.GET, "/v1/credits") { [self] request, _, identity in try await listCredits(request, identity) }
        router.add(.POST, "/v1/admin/credits") { [self] request, _, identity in try await adminGrant(request, identity) }
        router.add(.PATCH, "/v1/conversations/:id/messages/:message") { [self] request, p, identity in
            try await markSaved(conversation: p["id"]!, message: p["message"]!, request, identity)
        }
        router.add(.GET, "/v1/payments") { [self] request, _, identity in try await listPayments(request, identity) }
        router.add(.GET, "/v1/admin/payments") { [self] request, _, identity in try await listAllPayments(request, identity) }
        router.add(.GET, "/v1/admin/usage") { [self] request, _, identity in try await adminUsage(request, identity) }
        router.add(.GET, "/v1/admin/webhooks") { [self] request, _, identity in try await listWebhooks(request, identity) }
        router.add(.PUT, "/v1/me/limits") { [self] request, _, identity in try await setLimits(request, identity) }
        router.add(.GET, "/v1/me/usage") { [self] request, _, identity in try await usage(request, identity) }
        router.add(.GET, "/v1/me") { [self] _, _, identity in try await me(identity) }
        router.add(.GET, "/v1/me/persona") { [self] _, _, identity in try await persona(identity) }
        router.add(.PUT, "/v1/me/persona") { [self] request, _, identity in try await setPersona(request, identity) }
        router.add(.DELETE, "/v1/me/persona") { [self] _, _, identity in try await deletePersona(identity) }
        router.add(.GET, "/v1/me/export") { [self] _, _, identity in try await exportAccount(identity) }
        router.add(.DELETE, "/v1/me") { [self] request, _, identity in try await deleteAccount(request, identity) }
        router.add(.POST, "/v1/me/sign-out") { [self] request, _, identity in try await signOut(request, identity) }
        router.add(.GET, "/v1/admin/audit") { [self] request, _, identity in try await listAudit(request, identity) }
        router.add(.POST, "/v1/admin/retention/purge") { [self] request, _, identity in try await purgeNow(request, identity) }
    }

    /// Answers one request; never throws. Each gets one access line (id, method, path, status,
    /// time; never the query, which may hold a token) and its id back in `x-request-id`.
    func respond(to request: HTTPRequest) async -> HTTPResponse {
        let started = ContinuousClock.now
        var response = await answer(request)
        response.headers.replaceOrAdd(name: "x-request-id", value: request.id)
        let elapsed = ContinuousClock.now - started
        logger.info(
            "request",
            metadata: [
                "request": "\(request.id)", "method": "\(request.method)", "path": "\(request.path)", "status": "\(response.status.code)",
                "ms": "\(Double(elapsed.components.attoseconds / 1_000_000_000_000) / 1_000 + Double(elapsed.components.seconds) * 1_000)",
            ])
        return response
    }

    private func answer(_ request: HTTPRequest) async -> HTTPResponse {
        do {
            if let queryError = request.queryError { throw queryError }
            switch request.path {
            case "/healthz":
                guard request.method == .GET || request.method == .HEAD else { throw Self.methodNotAllowed([.GET]) }
                return await health()
            case "/", "/app.js", "/app.css":
                guard request.method == .GET || request.method == .HEAD else { throw Self.methodNotAllowed([.GET]) }
                guard let file = webClient.response(for: request.path) else {
                    throw APIError(.notFound, .notFound, "the web client is not installed")
                }
                return file
            case "/v1/info":
                guard request.method == .GET || request.method == .HEAD else { throw Self.methodNotAllowed([.GET]) }
                return HTTPResponse(
                    .ok,
                    json: .object([
                        ("protocol", .int(1)), ("dev", .bool(configuration.devSignIn)),
                        ("models", .array(configuration.models.map { .string($0) })),
                        ("model", .string(configuration.models[0])), ("model_host", .string(configuration.modelHost)),
                        (
                            "voice",
                            .object([("speech", .bool(configuration.speech != nil)), ("transcription", .bool(configuration.transcriber != nil))])
                        ),
                    ]))
            case "/metrics":
                guard request.method == .GET || request.method == .HEAD else { throw Self.methodNotAllowed([.GET]) }
                guard let render = configuration.metricsExposition else { throw APIError(.notFound, .notFound, "this server exports no metrics") }
                guard try await authenticate(request).isAdmin else { throw APIError(.forbidden, .forbidden, "metrics need the admin role") }
                return HTTPResponse(.ok, body: render(), headers: ["content-type": "text/plain; version=0.0.4; charset=utf-8"])
            case "/v1/dev/token":
                guard request.method == .POST else { throw Self.methodNotAllowed([.POST]) }
                return try await devToken(request)
            case "/v1/plans":
                guard request.method == .GET || request.method == .HEAD else { throw Self.methodNotAllowed([.GET]) }
                return HTTPResponse(.ok, json: configuration.credits.plans.json)
            case "/v1/credits/prices":
                guard request.method == .GET || request.method == .HEAD else { throw Self.methodNotAllowed([.GET]) }
                return HTTPResponse(.ok, json: configuration.credits.pricing.json)
            case "/v1/webhooks/payments":
                guard request.method == .POST else { throw Self.methodNotAllowed([.POST]) }
                return try await paymentWebhook(request)
            case "/v1/ws":
                // Reached only when the WebSocket upgrade was declined: for the handshake rate, its shape, or the token.
                if let ip = request.remoteIP, handshakes?.isLimited(ip) == true {
                    throw APIError(
                        .tooManyRequests, .rateLimited, "too many WebSocket handshakes from this address; try again shortly",
                        headers: ["retry-after": "1"])
                }
                if let problem = WebSocketHandshake.problem(
                    method: request.method, version: request.version, headers: request.headers, query: request.query)
                {
                    throw problem
                }
                _ = try await authenticate(request)
                throw APIError(
                    .upgradeRequired, .badRequest, "this endpoint speaks WebSocket; send an Upgrade: websocket request",
                    headers: ["upgrade": "websocket", "connection": "upgrade"])
            default:
                break
            }
            switch router.match(request.method, path: request.path) {
            case .notFound:
                throw APIError(.notFound, .notFound, "no route \(request.path)")
            case .methodNotAllowed(let allowed):
                throw Self.methodNotAllowed(allowed)
            case .found(let handler, let parameters):
                let identity = try await authenticate(request)
                if let requests, !requests.allow(identity.user) {
                    // A bucket refills a request within a second at any rate of one or more.
                    throw APIError(
                        .tooManyRequests, .rateLimited, "more than \(requests.rate) requests a second from \(identity.user); try again shortly",
                        headers: ["retry-after": "1"])
                }
                return try await handler(request, parameters, identity)
            }
        } catch let error as APIError {
            return error.response
        } catch let error as FrameError {
            return APIError(error).response
        } catch let error as ValidationError {
            return APIError(.badRequest, .badRequest, error.message).response
        } catch {
            logger.error(
                "request failed",
                metadata: ["request": "\(request.id)", "method": "\(request.method)", "path": "\(request.path)", "error": "\(error)"])
            if let unavailable = FrameError.storeUnavailable(error) { return APIError(unavailable).response }
            return APIError(.internalServerError, .internal, "the request failed; try again").response
        }
    }

    /// The client's address on `channel`: its peer's, or, when the peer is a trusted proxy, the
    /// one its `X-Forwarded-For` names (`--trusted-proxies`).
    func clientIP(_ channel: any Channel, _ headers: HTTPHeaders) -> String? {
        configuration.trustedProxies.client(peer: channel.remoteAddress?.ipAddress, forwardedFor: headers["x-forwarded-for"])
    }

    /// How long `/healthz` waits for the store before calling it down.
    static let healthTimeout: Duration = .seconds(2)

    /// `GET /healthz`: 200 when the store answers a round trip within `healthTimeout`, else 503
    /// (a balancer then sends no one here), and 503 `"store":"full"` while its latest write
    /// found no space (nearly every request writes: a reply its debit); 503 `draining` once a
    /// shutdown began, so a balancer stops sending new sockets while the replies in flight
    /// finish. Says nothing more to the unauthenticated caller.
    private func health() async -> HTTPResponse {
        let store = self.store
        // Unstructured, so a store that hangs cannot hold the answer (a task group would wait for it).
        let storeState = await withCheckedContinuation { (continuation: CheckedContinuation<String, Never>) in
            let pending = Mutex<CheckedContinuation<String, Never>?>(continuation)
            let answer: @Sendable (String) -> Void = { state in pending.withLock { $0.take() }?.resume(returning: state) }
            let timer = Task {
                try? await Task.sleep(for: Self.healthTimeout)
                answer("unreachable")
            }
            Task {
                do {
                    try await store.ping()
                    answer("ok")
                } catch StoreError.full {
                    answer("full")
                } catch {
                    answer("unreachable")
                }
                timer.cancel()
            }
        }
        let healthy = storeState == "ok"
        if storeState == "unreachable" { logger.warning("health check: the store did not answer") }
        if storeState == "full" { logger.warning("health check: the store has no space left") }
        let draining = !chat.streams.isAccepting
        // A cluster's node cut off from NATS would take sockets whose tabs elsewhere it cannot reach.
        let broker = (chat.streams.broker as? NATSBroker)?.isConnected
        if broker == false { logger.warning("health check: the broker is not connected") }
        let ready = healthy && broker != false
        var fields: [(String, JSONValue)] = [
            ("status", .string(draining ? "draining" : ready ? "ok" : "unavailable")), ("store", .string(storeState)),
        ]
        if let broker { fields.append(("broker", .string(broker ? "ok" : "unreachable"))) }
        return HTTPResponse(ready && !draining ? .ok : .serviceUnavailable, json: .object(fields))
    }

    /// The caller's identity. An address blocked for failed sign-ins is refused (429) before its
    /// token is looked at; every failure counts against the address, a success clears it.
    private func authenticate(_ request: HTTPRequest) async throws(APIError) -> Identity {
        let ip = request.remoteIP
        if let ip, let wait = authFailures?.retryAfter(ip) {
            let seconds = max(1, (wait.nanoseconds + 999_999_999) / 1_000_000_000)
            throw APIError(
                .tooManyRequests, .rateLimited, "too many failed sign-ins from this address; try again in \(seconds) s",
                headers: ["retry-after": "\(seconds)"])
        }
        do {
            let identity = try await authenticator.verify(headers: request.headers, uri: request.uri)
            if let ip { authFailures?.succeeded(ip) }
            await signIns.accepted(identity, ip: ip, via: "http")
            return identity
        } catch {
            if let ip { authFailures?.failed(ip) }
            await signIns.refused(error, ip: ip)
            throw APIError.unauthorized(error)
        }
    }

    /// `POST /v1/dev/token {"user"}`: a token for any name, for the web client's dev sign-in.
    /// Only on a server started with `--dev` (which refuses a non-loopback address).
    private func devToken(_ request: HTTPRequest) async throws -> HTTPResponse {
        guard configuration.devSignIn else {
            throw APIError(.notFound, .notFound, "dev sign-in is off on this server (it is on only with parley serve --dev)")
        }
        var reader = try JSONObjectReader(try request.json())
        let user = try reader.requiredString("user")
        try reader.rejectUnknown()
        guard Authenticator.isValidSubject(user) else {
            throw ValidationError("'user' must be 1-64 characters of letters, digits, '.', '_', '-' and '@'")
        }
        let ttl = Self.devTokenLifetime
        let token = try await authenticator.issue(subject: user, ttl: ttl)
        return HTTPResponse(
            .created,
            json: .object([
                ("token", .string(token)), ("user", .string(user)), ("expires_in", .int(ttl.components.seconds)),
            ]))
    }

    static let devTokenLifetime: Duration = .seconds(12 * 3600)

    private static func methodNotAllowed(_ allowed: [HTTPMethod]) -> APIError {
        APIError(
            .methodNotAllowed, .badRequest, "method not allowed",
            headers: ["allow": allowed.map(\.rawValue).joined(separator: ", ")])
    }

    // MARK: Clones

    private func createClone(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        try await create(
            try offered(CloneFields.parse(try request.json(), requireName: true, limits: configuration.cloneLimits)), identity,
            remoteIP: request.remoteIP)
    }

    /// A clone from validated fields (and a card's profile), stored and answered with 201.
    private func create(
        _ fields: CloneFields, profile: CloneProfile = CloneProfile(), _ identity: Identity, remoteIP: String?
    ) async throws -> HTTPResponse {
        let now = Int64(Timestamp.nowMillis())
        _ = try await store.ensureUser(identity.user, now: now)
        let clone = fields.applied(
            to: Clone(
                id: ids.make(.clone), owner: identity.user, name: "", traits: [], systemPrompt: "", sliders: [:], memory: [],
                createdAt: now, updatedAt: now, profile: profile),
            at: now
        )
        try await cloneCreates.run(for: identity.user) {
            try await allowClones(try await store.cloneCount(owner: identity.user) + 1, of: identity.user)
            try await store.createClone(clone)
            // Another node may have counted and written at the same moment: each counts again
            // once written and takes its clone back if there are too many. The last one kept
            // counted every other one kept, so no more than the limit stay (two nodes racing for
            // the last place may both refuse).
            do {
                try await allowClones(try await store.cloneCount(owner: identity.user), of: identity.user)
            } catch {
                _ = try await store.deleteClone(id: clone.id, owner: identity.user)
                throw error
            }
        }
        await audit.record(
            "clone.created", actor: identity.user, target: clone.id, ip: remoteIP,
            detail: profile.isEmpty ? [:] : ["source": "card"])
        return HTTPResponse(.created, json: try await shown(clone, to: identity), headers: ["location": "/v1/clones/\(clone.id)"])
    }

    /// Throws unless `user` may have `count` clones: the plan's limit (when it sets one), then
    /// the server's.
    private func allowClones(_ count: Int, of user: String) async throws {
        if let plans = credits.plans, try await plans.plan(of: user).limits.clones != nil {
            try await plans.require(count, of: .clones, user: user, ref: nil, what: "clones")
        }
        guard count <= configuration.maxClonesPerUser else {
            throw APIError(
                .tooManyRequests, .limitExceeded, "at most \(configuration.maxClonesPerUser) clones per user; delete one to make another")
        }
    }

    /// `POST /v1/clones/import`: a Character Card V2/V3 as JSON, or as a PNG that carries one.
    private func importCard(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard let body = request.body, body.readableBytes > 0 else {
            throw APIError(.badRequest, .badRequest, "the request needs a card: JSON, or a PNG image that carries one")
        }
        let type = request.headers.first(name: "content-type")?.lowercased() ?? ""
        let card =
            type.hasPrefix("image/") || CardPNG.isPNG(body.readableBytesView)
            ? try CardPNG.card(in: Array(body.readableBytesView))
            : try request.json()
        let imported = try CharacterCard.parse(card, cloneLimits: configuration.cloneLimits)
        return try await create(try offered(imported.fields), profile: imported.profile, identity, remoteIP: request.remoteIP)
    }

    /// `GET /v1/clones/{id}/card?spec=v2|v3` (v2 unless asked).
    private func exportCard(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let asked = request.query["spec"] ?? "v2"
        guard let spec = CharacterCard.Spec(query: asked) else {
            throw APIError(.badRequest, .badRequest, "spec must be v2 or v3, not '\(asked)'")
        }
        return HTTPResponse(.ok, json: CharacterCard.export(try await ownedClone(id, identity), spec: spec))
    }

    /// `fields`, once their model (if named) is one this server offers.
    private func offered(_ fields: CloneFields) throws -> CloneFields {
        if case .named(let model)? = fields.model, !configuration.models.contains(model) {
            throw APIError(.badRequest, .badRequest, "model '\(model)' is not offered here; offered: \(configuration.models.joined(separator: ", "))")
        }
        return fields
    }

    /// `clone` as the caller sees it: its greetings name their persona.
    private func shown(_ clone: Clone, to identity: Identity) async throws -> JSONValue {
        clone.json(user: try await personas.persona(of: identity.user))
    }

    /// Clones read from the store per page for a list or an export: each may carry megabytes.
    static let clonePage = 16

    /// `GET /v1/clones`: one page is answered whole; more are written page by page as they are
    /// read (chunked), never held in memory together. A store that fails before the first page
    /// is a clean error; after it, a truncated body (as for every streamed answer).
    private func listClones(_ identity: Identity) async throws -> HTTPResponse {
        let (store, user) = (self.store, identity.user)
        let first = try await store.clones(owner: user, limit: Self.clonePage, after: nil)
        let persona = try await personas.persona(of: user)
        guard first.count == Self.clonePage else {
            return HTTPResponse(.ok, json: .object([("clones", .array(first.map { $0.json(user: persona) }))]))
        }
        return HTTPResponse(.ok, contentType: "application/json; charset=utf-8") { out in
            try await out.write(#"{"clones":["#)
            try await Self.pages(
                &out,
                { after in
                    guard let after else { return first }
                    return try await store.clones(owner: user, limit: Self.clonePage, after: after)
                }, cursor: \.id, size: Self.clonePage
            ) { out, clone in try await out.write(clone.json(user: persona).serialized()) }
            try await out.write("]}")
        }
    }

    private func getClone(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        HTTPResponse(.ok, json: try await shown(try await ownedClone(id, identity), to: identity))
    }

    private func patchClone(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let fields = try offered(CloneFields.parse(try request.json(), requireName: false, limits: configuration.cloneLimits))
        let updated = fields.applied(to: try await ownedClone(id, identity), at: Int64(Timestamp.nowMillis()))
        guard try await store.updateClone(updated) else { throw Self.noClone(id) }
        return HTTPResponse(.ok, json: try await shown(updated, to: identity))
    }

    private func deleteClone(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        _ = try await ownedClone(id, identity)
        // Replies still streaming end (and are stored) before their transcript is deleted, and
        // the clone's pending scheduled messages are cancelled.
        let deleted = try await chat.streams.stopStreams(clone: id, owner: identity.user) {
            await schedules.cancelAll(clone: id, owner: identity.user)
            return try await store.deleteClone(id: id, owner: identity.user)
        }
        guard deleted else { throw Self.noClone(id) }
        await audit.record("clone.deleted", actor: identity.user, target: id, ip: request.remoteIP)
        return HTTPResponse(.noContent)
    }

    private func ownedClone(_ id: String, _ identity: Identity) async throws -> Clone {
        guard let clone = try await store.clone(id: id, owner: identity.user) else { throw Self.noClone(id) }
        return clone
    }

    private static func noClone(_ id: String) -> APIError { APIError(.notFound, .notFound, "no clone \(id)") }

    // MARK: Conversations

    private func listConversations(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let limit = try Self.limit(request)
        let before = request.query["before"]
        let page = try await store.conversations(owner: identity.user, limit: limit + 1, before: before)
        let costs = try await store.costs(user: identity.user, link: .conversation, ids: page.prefix(limit).map(\.id))
        return HTTPResponse(
            .ok, json: .object(Self.page(page, limit: limit, as: "conversations", id: \.id) { Self.adding(cost: costs[$0.id] ?? 0, to: $0.json) }))
    }

    private func getConversation(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        guard let conversation = try await store.conversation(id: id, owner: identity.user) else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        let cost = try await store.costs(user: identity.user, link: .conversation, ids: [id])[id] ?? 0
        guard case .object(var pairs) = Self.adding(cost: cost, to: conversation.json) else { return HTTPResponse(.ok, json: conversation.json) }
        // A reply being written in it on this node: a page reloaded mid-reply resumes it.
        if let live = chat.streams.hub.liveStreams(of: identity.user).first(where: { $0.room == nil && $0.conversation == id }) {
            var streaming: [(String, JSONValue)] = [("stream", .string(live.id))]
            if let message = live.kind.message { streaming.append(("message", .string(message))) }
            if let parent = live.kind.parent { streaming.append(("parent", .string(parent))) }
            pairs.append(("streaming", .object(streaming)))
        }
        return HTTPResponse(.ok, json: .object(pairs))
    }

    private func listMessages(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard try await store.conversation(id: id, owner: identity.user) != nil else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        return HTTPResponse(.ok, json: try await pathPage(id, limit: try Self.limit(request), before: request.query["before"]))
    }

    /// A page of a conversation's path, each message with its parent (the one before it on the
    /// path) and its alternatives.
    func pathPage(_ conversation: String, limit: Int, before: String?) async throws -> JSONValue {
        let page = try await store.messages(conversation: conversation, limit: limit + 1, before: before)
        // The store returns the page oldest first; the extra row, if any, is the oldest.
        let items = page.count > limit ? Array(page.dropFirst()) : page
        let alternatives = try await store.alternatives(of: items.map(\.id), conversation: conversation)
        var parent = page.count > limit ? page.first?.id : nil
        var messages: [JSONValue] = []
        for message in items {
            guard case .object(var pairs) = message.json else { continue }
            let place = alternatives[message.id] ?? .only(message.id)
            pairs += [
                ("parent", parent.map(JSONValue.string) ?? .null), ("alternatives", .int(Int64(place.count))),
                ("alternative", .int(Int64(place.index))),
            ]
            messages.append(.object(pairs))
            parent = message.id
        }
        return .object([("messages", .array(messages)), ("next_before", page.count > limit ? .string(items.first!.id) : .null)])
    }

    /// `POST /v1/conversations/{id}/active {"message", "alternative"?}`: the path through that
    /// message (or through its sibling at index `alternative`, a swipe) becomes the
    /// conversation's (its ancestors, it, then each newest child); answers the path's first page.
    private func chooseBranch(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var reader = try JSONObjectReader(try request.json())
        var message = try reader.requiredString("message")
        let alternative = try reader.int("alternative")
        try reader.rejectUnknown()
        guard try await store.conversation(id: id, owner: identity.user) != nil else {
            throw APIError(.notFound, .notFound, "no conversation \(id)")
        }
        if let alternative {
            // A swipe: the alternative at that index among the message's siblings.
            guard let siblings = try await store.alternatives(of: [message], conversation: id)[message]?.siblings else {
                throw APIError(.notFound, .notFound, "no message \(message) in conversation \(id)")
            }
            guard siblings.indices.contains(Int(alternative)) else {
                throw APIError(.badRequest, .badRequest, "'alternative' must be 0-\(siblings.count - 1) for message \(message)")
            }
            message = siblings[Int(alternative)]
        }
        let chosen = try await chat.whileNoReplyStreams(user: identity.user, conversation: id) { [message] in
            try await store.activate(message: message, conversation: id)
        }
        guard let chosen else {
            throw APIError(.conflict, .conflict, "a reply in conversation \(id) is streaming or waiting to be stored; choose once it is stored")
        }
        guard chosen else { throw APIError(.notFound, .notFound, "no message \(message) in conversation \(id)") }
        return HTTPResponse(.ok, json: try await pathPage(id, limit: Self.defaultPageSize, before: nil))
    }

    static let defaultPageSize = 50
    static let maxPageSize = 200

    /// A list page's fields: `fetched` holds up to `limit + 1` items (asked for so), the one past
    /// `limit` only saying that another page follows, from the last item shown (`cursor`).
    static func page<Item>(
        _ fetched: [Item], limit: Int, as field: String, cursor: String = "next_before", id: (Item) -> String, _ json: (Item) -> JSONValue
    ) -> [(String, JSONValue)] {
        let items = fetched.prefix(limit)
        let next = fetched.count > limit ? items.last.map(id) : nil
        return [(field, .array(items.map(json))), (cursor, next.map(JSONValue.string) ?? .null)]
    }

    static func limit(_ request: HTTPRequest) throws(APIError) -> Int {
        guard let raw = request.query["limit"] else { return defaultPageSize }
        guard let limit = Int(raw), (1...maxPageSize).contains(limit) else {
            throw APIError(.badRequest, .badRequest, "'limit' must be an integer from 1 to \(maxPageSize)")
        }
        return limit
    }

    // MARK: Schedules

    /// `POST /v1/schedules`: the fields of the `schedule.create` frame, without `type` and `id`.
    private func createSchedule(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        if configuration.isClustered, schedules.cluster == nil { throw APIError(.serviceUnavailable, .unavailable, ClusterRefusal.schedules) }
        var reader = try JSONObjectReader(try request.json())
        let fields = try ScheduleRequest.read(&reader, now: Int64(Timestamp.nowMillis()), limits: configuration.frameLimits.schedule)
        try reader.rejectUnknown()
        do {
            let schedule = try await schedules.create(owner: identity.user, fields)
            return HTTPResponse(.created, json: schedule.json, headers: ["location": "/v1/schedules/\(schedule.id)"])
        } catch {
            throw APIError(error)
        }
    }

    private func listSchedules(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let limit = try Self.limit(request)
        let page = try await store.schedules(owner: identity.user, limit: limit + 1, before: request.query["before"])
        return HTTPResponse(.ok, json: .object(Self.page(page, limit: limit, as: "schedules", id: \.id, \.json)))
    }

    private func getSchedule(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        guard let schedule = try await store.schedule(id: id, owner: identity.user) else {
            throw APIError(.notFound, .notFound, "no schedule \(id)")
        }
        return HTTPResponse(.ok, json: schedule.json)
    }

    /// Cancels a pending schedule and answers it (status `cancelled`); 409 once it started firing.
    private func cancelSchedule(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        do {
            return HTTPResponse(.ok, json: try await schedules.cancel(owner: identity.user, id: id).json)
        } catch {
            throw APIError(error)
        }
    }

    // MARK: Rooms

    /// A cluster's nodes run rooms only on their shared store (without one: tests only)
    /// (`ClusterRefusal`).
    private func refuseInACluster(_ request: RoomRequest) throws {
        guard configuration.isClustered else { return }
        if rooms.owners == nil { throw APIError(.serviceUnavailable, .unavailable, ClusterRefusal.message) }
    }

    private func createRoom(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let body = try RoomRequest.parse(try request.json(), limits: configuration.frameLimits.rooms)
        try refuseInACluster(body)
        do {
            let room = try await rooms.create(owner: identity.user, body)
            await audit.record("room.created", actor: identity.user, target: room.id, ip: request.remoteIP, detail: ["kind": room.kind.rawValue])
            return HTTPResponse(.created, json: room.json, headers: ["location": "/v1/rooms/\(room.id)"])
        } catch {
            throw APIError(error)
        }
    }

    /// The room's state and its newest transcript entries (chronological).
    /// `GET /v1/rooms?limit=&after=`: the rooms the caller made, oldest first (as the store keeps
    /// them by owner), so a client lists them again after a reload.
    private func listRooms(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let limit = try Self.limit(request)
        let page = try await store.rooms(owner: identity.user, limit: limit + 1, after: request.query["after"])
        let costs = try await store.costs(user: identity.user, link: .room, ids: page.prefix(limit).map(\.id))
        return HTTPResponse(
            .ok,
            json: .object(
                Self.page(page, limit: limit, as: "rooms", cursor: "next_after", id: \.id) { Self.adding(cost: costs[$0.id] ?? 0, to: $0.json) }))
    }

    private func getRoom(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        let (room, transcript): (Room, [JSONValue])
        do {
            (room, transcript) = try await rooms.snapshot(id: id, user: identity.user)
        } catch {
            throw APIError(error)
        }
        let cost = try await store.costs(user: identity.user, link: .room, ids: [id])[id] ?? 0
        return HTTPResponse(.ok, json: .object([("room", Self.adding(cost: cost, to: room.json)), ("transcript", .array(transcript))]))
    }

    /// `json` (an object) with `cost`: the credits the caller spent on it (#27).
    static func adding(cost: Int64, to json: JSONValue) -> JSONValue {
        guard case .object(let pairs) = json else { return json }
        return .object(pairs + [("cost", .int(cost))])
    }
}
