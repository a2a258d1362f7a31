import CoreMetrics
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOWebSocket
import ParleyCore
import ParleyDeflate
import ParleyLLM
import ParleyMongoStore
import ParleyStore
import ParleyWebSocket
import Synchronization

/// The running server: event loops, listening socket, store, provider and chat service.
public final class ParleyServer: Sendable {
    public let configuration: ServerConfiguration
    /// The port actually bound (useful with port 0).
    public let port: Int
    public let store: any Store
    public let authenticator: Authenticator
    let chat: ChatService
    private var streams: StreamRunner { chat.streams }
    let schedules: ScheduleService
    let rooms: RoomService
    let hub: StreamHub
    private let group: MultiThreadedEventLoopGroup
    /// The server made its event loops (none were given to `start`), so it shuts them down.
    private let ownsGroup: Bool
    private let serverChannel: any Channel
    private let logger: Logger
    private let stopped = Mutex(false)
    /// The retention purge, running until shutdown.
    private let retention: Task<Void, Never>
    /// This process's hold on its data directory, and on its MongoDB database.
    private let dataLock: DataDirectoryLock
    private let nodeLease: NodeLeaseKeeper?
    /// The broker between nodes, when the server runs in a cluster.
    private let clusterBroker: NATSBroker?
    /// In a cluster on MongoDB: what finishes a stopped node's leftovers, and its task.
    private let reaper: NodeReaper?
    private let reaping: Task<Void, Never>?
    /// The TLS context new connections get, when TLS is on.
    private let tls: TLSContexts?

    private init(
        configuration: ServerConfiguration, port: Int, store: any Store, authenticator: Authenticator, chat: ChatService,
        schedules: ScheduleService, rooms: RoomService, hub: StreamHub, group: MultiThreadedEventLoopGroup, ownsGroup: Bool,
        serverChannel: any Channel, logger: Logger, retention: Task<Void, Never>, dataLock: DataDirectoryLock, nodeLease: NodeLeaseKeeper?,
        clusterBroker: NATSBroker?, reaper: NodeReaper?, tls: TLSContexts?
    ) {
        self.tls = tls
        self.clusterBroker = clusterBroker
        self.reaper = reaper
        reaping = reaper.map { reaper in Task { await reaper.run() } }
        self.dataLock = dataLock
        self.nodeLease = nodeLease
        self.ownsGroup = ownsGroup
        self.retention = retention
        self.schedules = schedules
        self.rooms = rooms
        self.configuration = configuration
        self.port = port
        self.store = store
        self.authenticator = authenticator
        self.chat = chat
        self.hub = hub
        self.group = group
        self.serverChannel = serverChannel
        self.logger = logger
    }

    /// Reads the TLS certificate chain and key again (SIGHUP): new connections get them, open
    /// ones keep theirs. Throws, keeping the certificate in use, when they cannot be used; false
    /// when TLS is off.
    @discardableResult
    public func reloadTLS() throws -> Bool {
        guard let tls else { return false }
        try tls.reload()
        logger.info("reloaded the TLS certificate", metadata: ["certificate": "\(tls.files.certificateChain)"])
        return true
    }

    /// Opens the store and binds the listening socket. Throws `ConfigurationError` with an
    /// operator-readable message when the data directory or address cannot be used.
    /// `eventLoopGroup`, when given, is the caller's to shut down (after `shutdown`): give the
    /// one the provider's HTTP client runs on, and a reply's upstream connection is read on the
    /// loop of the socket its tokens go to. Without it the server makes its own.
    public static func start(
        configuration: ServerConfiguration,
        provider: (any LLMProvider)? = nil,
        eventLoopGroup: MultiThreadedEventLoopGroup? = nil,
        logger: Logger = Logger(label: "parley")
    ) async throws -> ParleyServer {
        // A certificate that cannot be used is a start-up error, before anything is opened.
        let tls = try configuration.tls.map(TLSContexts.init)
        do {
            // Private to the server's user: it holds the database and the signing secret.
            try FileManager.default.createDirectory(
                atPath: configuration.dataDirectory, withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700])
        } catch {
            throw ConfigurationError("cannot create the data directory \(configuration.dataDirectory): \(error.localizedDescription)")
        }
        // One process per data directory, one node per MongoDB database (until #22's cluster).
        let dataLock = try DataDirectoryLock.acquire(directory: configuration.dataDirectory)
        let secret = try configuration.jwtSecret ?? SecretFile.loadOrCreate(at: configuration.secretPath)
        let tokens = try await Authenticator.make(secret: secret, provider: configuration.identityProvider)
        let nodeID = try configuration.nodeID ?? NodeLeaseKeeper.nodeID(directory: configuration.dataDirectory)
        let store = try await openStore(configuration, node: nodeID)
        // Tokens of signed-out sessions are refused, on every node that shares the store.
        let authenticator = tokens.checking(sessions: SessionGate(store: store, logger: logger))
        // Alone, a node recovers whatever a crash left; in a cluster, only what it left itself
        // (a dead node's leftovers are taken over by `NodeReaper`).
        let leftovers = configuration.isClustered ? nodeID : nil
        let nodeLease: NodeLeaseKeeper?
        do {
            nodeLease =
                if let mongo = store as? MongoStore {
                    try await NodeLeaseKeeper.claim(
                        store: mongo, node: nodeID, key: configuration.isClustered ? nodeID : MongoStore.soleNodeKey,
                        period: configuration.nodeLeasePeriod, logger: logger)
                } else {
                    nil
                }
        } catch {
            try? await store.close()
            throw error
        }
        var provider: any LLMProvider = provider ?? SimulatedProvider(configuration: configuration.simulated)
        if let limit = configuration.providerConcurrency {
            provider = ConcurrencyLimitedProvider(provider, maxConcurrent: limit, maxQueued: configuration.providerQueue)
        }
        let ids = IDGenerator()
        let slowReaders = Counter(label: "parley_slow_reader_disconnects_total", factory: configuration.metrics)
        let hub = StreamHub(retention: configuration.resumeRetention, maxStreamsPerUser: configuration.maxConcurrentStreamsPerUser)
        let sockets = SocketHub(maxSocketsPerUser: configuration.maxSocketsPerUser, metrics: configuration.metrics)
        let broker: any Broker
        let clusterBroker: NATSBroker?
        do {
            if let url = configuration.brokerURL {
                clusterBroker = try await NATSBroker.connect(url: url, hub: sockets, configuration: configuration, logger: logger)
            } else {
                clusterBroker = nil
            }
            broker = clusterBroker ?? LocalBroker(hub: sockets)
            // A node cut off from the others stops renewing its lease, so that one of them takes
            // its work over, and stops before it expires (`NodeLeaseKeeper`).
            if let clusterBroker { nodeLease?.renewOnlyWhile { clusterBroker.isConnected } }
        } catch {
            await nodeLease?.release()
            try? await store.close()
            throw error
        }
        // Finish or void ledger entries a crash left half-applied, before anything is charged.
        let recovered: Int
        do {
            recovered = try await store.recoverLedger(node: leftovers)
        } catch {
            await nodeLease?.release()
            try? await store.close()
            throw error
        }
        if recovered > 0 { logger.notice("recovered ledger entries left pending by a crash", metadata: ["count": "\(recovered)"]) }
        let audit = AuditLog(store: store, secret: secret, ids: ids, logger: logger)
        let plans = PlanBook(
            catalog: configuration.credits.plans, store: store, clock: configuration.credits.clock, metrics: configuration.metrics)
        let credits = Credits(
            store: store, configuration: configuration.credits, logger: logger, metrics: configuration.metrics, plans: plans,
            pseudonym: audit.pseudonym(for:))
        // Store and settle the replies a crash cut short, before anything is charged or shown.
        do {
            _ = try await StreamRecovery(store: store, credits: credits, logger: logger).run(node: leftovers)
            // Its replies are over: their conversations are free again on every node.
            if let leftovers, let mongo = store as? MongoStore { try await mongo.releaseReplySlots(node: leftovers) }
        } catch {
            await nodeLease?.release()
            try? await store.close()
            throw error
        }
        let ownsGroup = eventLoopGroup == nil
        let group = eventLoopGroup ?? Self.eventLoops(configuration)
        let writes = StoreWrites()
        let streams = StreamRunner(
            store: store, credits: credits, provider: provider, hub: hub, sockets: sockets, broker: broker,
            requests: RequestTracker(logger: logger), loops: group,
            configuration: configuration, logger: logger, ids: ids,
            slots: clusterBroker.flatMap { _ in
                (store as? MongoStore).map {
                    ReplySlots(
                        store: $0, node: nodeID, limit: configuration.maxConcurrentStreamsPerUser, logger: logger,
                        retryAfter: configuration.keptReplyRetry, writes: writes)
                }
            }, writes: writes)
        let personas = Personas(store: store, clock: configuration.credits.clock)
        let chat = ChatService(store: store, streams: streams, configuration: configuration, ids: ids, personas: personas)
        // The timer wheel lives on one event loop; firing hands work to tasks, never blocking it.
        // In a cluster on MongoDB, this node fires the schedules of the shards it holds.
        let shards = clusterBroker.flatMap { broker in
            (store as? MongoStore).map {
                ScheduleShardKeeper(
                    store: $0, broker: broker, node: nodeID, period: configuration.nodeLeasePeriod, logger: logger, metrics: configuration.metrics)
            }
        }
        let schedules = ScheduleService(
            store: store, streams: streams, configuration: configuration, logger: logger, ids: ids, loop: group.next(), cluster: shards,
            personas: personas)
        // In a cluster on MongoDB, each room runs on the node holding its lease.
        let roomOwners = clusterBroker.flatMap { broker in
            (store as? MongoStore).map {
                RoomOwners(
                    store: $0, broker: broker, node: nodeID, period: configuration.nodeLeasePeriod, logger: logger, metrics: configuration.metrics)
            }
        }
        let rooms = RoomService(
            store: store, streams: streams, configuration: configuration, logger: logger, ids: ids, audit: audit, owners: roomOwners)
        let retention = RetentionJob(
            store: store, retention: configuration.retention, auditRetention: configuration.auditRetention,
            paymentRetention: configuration.paymentRetention, mediaRetention: configuration.mediaRetention,
            interval: configuration.retentionInterval,
            logger: logger, metrics: configuration.metrics)
        /// Undoes what the start-up began, when a later step of it fails.
        func abandonStart() async {
            await schedules.stopFiring()
            await schedules.drain()
            await clusterBroker?.close()
            await nodeLease?.release()
            try? await store.close()
            if ownsGroup { try? await group.shutdownGracefully() }
        }
        do {
            // In a cluster, rooms are refused until they hold across nodes (#22): every node
            // would otherwise resume every room. So are schedules without a shared store (tests).
            if !configuration.isClustered || roomOwners != nil { try await rooms.start() }
            if !configuration.isClustered || shards != nil { try await schedules.start() }
        } catch {
            await abandonStart()
            throw error
        }
        let handshakes = configuration.handshakesPerSecondPerIP.map {
            RateLimiter.perAddress(rate: $0, limitsLoopback: configuration.limitLoopbackHandshakes)
        }
        let api = RESTAPI(
            store: store, chat: chat, schedules: schedules, rooms: rooms, credits: credits, authenticator: authenticator,
            configuration: configuration, ids: ids, logger: logger, sockets: sockets, audit: audit, retention: retention, handshakes: handshakes,
            authFailures: AuthFailureLimiter(secret: secret, limitsLoopback: configuration.limitLoopbackHandshakes),
            otherNodes: clusterBroker.map { ClusterPeers(broker: $0, store: store as? MongoStore, node: nodeID) })
        do {
            // Another node's account deletion closes the user's sockets here too.
            try clusterBroker?.serveUserClosing { user in _ = await api.closeLocally(user: user) }
            // And another node's sign-out closes the session's sockets here.
            try clusterBroker?.serveSignOuts { signOut in _ = await api.signOutLocally(signOut) }
        } catch {
            await clusterBroker?.close()
            await nodeLease?.release()
            try? await store.close()
            if ownsGroup { try? await group.shutdownGracefully() }
            throw ConfigurationError("cannot use the broker: \(error)")
        }

        let socketServices = ServerSocketServices(
            hub: sockets, chat: chat, schedules: schedules, rooms: rooms, roomsRefused: configuration.isClustered && roomOwners == nil,
            schedulesRefused: configuration.isClustered && shards == nil)
        let httpConnections = HTTPConnectionRegistry(limit: configuration.maxHTTPConnections ?? HTTPConnectionRegistry.defaultLimit())
        let flushes = FlushBatches(group)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: ClientConnection.waterMark(maxQueuedBytes: configuration.maxQueuedBytesPerSocket))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard httpConnections.admit(channel) else {
                        channel.close(promise: nil)
                        return
                    }
                    if let size = configuration.socketSendBufferBytes {
                        try channel.syncOptions?.setOption(.socketOption(.so_sndbuf), value: SocketOptionValue(size))
                    }
                    try Self.configurePipeline(
                        channel, api: api, sockets: socketServices, authenticator: authenticator,
                        configuration: configuration, ids: ids, slowReaders: slowReaders, logger: logger,
                        httpConnections: httpConnections, flushes: flushes)
                    // In front of everything, the timeouts' byte watcher included: it sees plain HTTP.
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context), position: .first) }
                }
            }
        let serverChannel: any Channel
        do {
            serverChannel = try await bootstrap.bind(host: configuration.host, port: configuration.port).get()
        } catch {
            await abandonStart()
            throw ConfigurationError("cannot listen on \(configuration.host):\(configuration.port): \(error)")
        }
        let port = serverChannel.localAddress?.port ?? configuration.port
        let reaper = (store as? MongoStore).flatMap { mongo in
            configuration.isClustered
                ? NodeReaper(
                    store: mongo, node: nodeID, period: configuration.nodeLeasePeriod, credits: credits, broker: clusterBroker,
                    schedules: schedules, rooms: rooms, logger: logger, metrics: configuration.metrics) : nil
        }
        logger.info("listening", metadata: ["host": "\(configuration.host)", "port": "\(port)", "store": "\(describeStore(configuration))"])
        if WebClient.resources == nil {
            logger.warning("the web client is not beside this binary (its parley_ParleyServer.resources directory): / answers 404")
        }
        if provider is SimulatedProvider || (provider as? ConcurrencyLimitedProvider)?.inner is SimulatedProvider {
            logger.notice("LLM provider: simulated (a development and load-test stand-in, not a model)")
        } else {
            logger.notice("LLM provider", metadata: ["type": "\(type(of: provider))"])
        }
        return ParleyServer(
            configuration: configuration, port: port, store: store, authenticator: authenticator, chat: chat, schedules: schedules, rooms: rooms,
            hub: hub,
            group: group, ownsGroup: ownsGroup, serverChannel: serverChannel, logger: logger, retention: Task { await retention.run() },
            dataLock: dataLock, nodeLease: nodeLease, clusterBroker: clusterBroker, reaper: reaper, tls: tls
        )
    }

    /// Opens the configured store: SQLite in the data directory unless a MongoDB URI is given.
    static func openStore(_ configuration: ServerConfiguration, node: String) async throws -> any Store {
        guard let uri = configuration.storeURI else {
            return try await SQLiteStore.open(
                path: configuration.sqlitePath, metrics: configuration.metrics, commitWindow: configuration.sqliteCommitWindow)
        }
        guard uri.hasPrefix("mongodb://") || uri.hasPrefix("mongodb+srv://") else {
            throw ConfigurationError("unsupported store '\(uri)': give a mongodb:// URI, or none for the embedded SQLite store")
        }
        var options = MongoStore.Options()
        options.threads = configuration.mongoThreads
        options.metrics = configuration.metrics
        options.node = node
        do {
            return try await MongoStore.open(uri: uri, options: options)
        } catch {
            throw ConfigurationError("\(error)")
        }
    }

    static func describeStore(_ configuration: ServerConfiguration) -> String {
        configuration.storeURI.map { "mongodb \(MongoStore.redacted($0))" } ?? "sqlite \(configuration.sqlitePath)"
    }

    private static func configurePipeline(
        _ channel: any Channel, api: RESTAPI, sockets: ServerSocketServices, authenticator: Authenticator,
        configuration: ServerConfiguration, ids: IDGenerator, slowReaders: Counter, logger: Logger,
        httpConnections: HTTPConnectionRegistry, flushes: FlushBatches
    ) throws {
        // The identity the handshake's check verified, for the upgrade that follows on this
        // loop: a token is checked once a socket (#26: twice was a tenth of a join's CPU). A
        // sign-out between the check and the socket's registration is caught as it registers
        // (`SocketHub.signOut`), an expiry in the upgrade below.
        let verified = NIOLoopBoundBox<Identity?>(nil, eventLoop: channel.eventLoop)
        let upgrader = NIOWebSocketServerUpgrader(
            maxFrameSize: configuration.maxMessageBytes,
            // WebSocketHandler answers decoder errors itself, with a lingering close (not a reset).
            automaticErrorHandling: false,
            shouldUpgrade: { channel, head in
                // A malformed handshake is declined, and the HTTP handler answers what is wrong.
                let request = HTTPRequest(head: head, body: nil)
                guard request.path == "/v1/ws", request.queryError == nil,
                    WebSocketHandshake.problem(method: head.method, version: head.version, headers: head.headers, query: request.query) == nil
                else {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                let ip = api.clientIP(channel, head.headers)
                // Over its handshake rate: declined, and the HTTP handler answers 429.
                if let handshakes = api.handshakes, let ip, !handshakes.allow(ip) {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                // Blocked for failed sign-ins: declined, and the HTTP handler answers 429. A
                // failed check below is declined too, and the HTTP handler's check counts it.
                if let ip, api.authFailures?.retryAfter(ip) != nil {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                // A refused upgrade falls through to the HTTP handler, which answers 401.
                return channel.eventLoop.makeFutureWithTask { () -> Identity? in
                    guard let identity = try? await authenticator.verify(headers: head.headers, uri: head.uri) else { return nil }
                    await api.signIns.accepted(identity, ip: ip, via: "socket")
                    return identity
                }.map { identity -> HTTPHeaders? in
                    guard let identity else { return nil }
                    verified.value = identity
                    var headers = HTTPHeaders()
                    if let deflate = deflateAgreement(head, configuration) {
                        headers.add(name: "Sec-WebSocket-Extensions", value: deflate.responseHeader)
                    }
                    return headers
                }
            },
            upgradePipelineHandler: { channel, head in
                channel.eventLoop.makeCompletedFuture { () throws -> Identity in
                    guard let identity = verified.value else { throw AuthError.invalidToken }
                    if let expiresAt = identity.expiresAt, expiresAt <= Date() { throw AuthError.expired }
                    return identity
                }.flatMapError { error in
                    // The token expired between the check and the upgrade.
                    channel.writeAndFlush(ClientConnection.closeFrame(code: .policyViolation, reason: "\(error)", allocator: channel.allocator))
                        .flatMap { channel.close() }
                        .flatMapThrowing { throw error }
                }.flatMapThrowing { identity in
                    let connection = ClientConnection(
                        id: ids.make(.connection), identity: identity, channel: channel, remoteIP: api.clientIP(channel, head.headers),
                        maxQueuedBytes: configuration.maxQueuedBytesPerSocket, slowReaderCutOffs: slowReaders,
                        flushes: flushes[channel.eventLoop], joinsTokens: WebSocketHandshake.joinsTokens(HTTPRequest(head: head, body: nil).query))
                    let deflate = deflateAgreement(head, configuration)
                    try channel.pipeline.syncOperations.addHandler(WebSocketFrameValidator(allowsRSV1: deflate != nil))
                    if let deflate {
                        try channel.pipeline.syncOperations.addHandler(
                            PerMessageDeflateHandler(
                                agreement: deflate, maxMessageBytes: configuration.maxMessageBytes,
                                idleRelease: TimeAmount(configuration.deflateIdleRelease)))
                    }
                    try channel.pipeline.syncOperations.addHandlers([
                        NIOWebSocketFrameAggregator(
                            minNonFinalFragmentSize: 0,
                            maxAccumulatedFrameCount: 1024,
                            maxAccumulatedFrameSize: configuration.maxMessageBytes
                        ),
                        WebSocketHandler(
                            connection: connection, services: sockets,
                            limits: configuration.frameLimits, pingInterval: configuration.webSocketPingInterval.map(TimeAmount.init),
                            frameRate: configuration.maxFramesPerSecond),
                    ])
                    // Without permessage-deflate no handler after the encoder changes an outbound frame;
                    // without TLS none is between the encoder and the socket at all.
                    if deflate == nil { try connection.writePastEncoder(straightToSocket: configuration.tls == nil) }
                }
            }
        )
        let timeouts = HTTPTimeoutHandler(timeouts: configuration.httpTimeouts, registry: httpConnections)
        let http = HTTPHandler(
            api: api, maxBodyBytes: configuration.maxRequestBodyBytes,
            bodyLimits: ["/v1/clones/import": configuration.maxCardBytes, "/v1/voice/transcriptions": configuration.maxVoiceMessageBytes],
            timeouts: timeouts,
            headers: configuration.tls == nil ? [:] : HTTPHeaders([TLSContexts.hsts]))
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(
            withServerUpgrade: (
                upgraders: [upgrader],
                completionHandler: { context in
                    // A WebSocket now: its own keepalive and limits apply, and it leaves the HTTP cap.
                    _ = context.pipeline.removeHandler(name: HTTPHandler.name)
                    _ = context.pipeline.removeHandler(name: HTTPTimeoutHandler.name)
                }
            ),
            // `HTTPHandler` answers what the parser refuses (a JSON body, then closed).
            withErrorHandling: false
        )
        try channel.pipeline.syncOperations.addHandler(http, name: HTTPHandler.name)
        try channel.pipeline.syncOperations.addHandler(timeouts, name: HTTPTimeoutHandler.name, position: .first)
    }

    /// The server's event loops: they tell `LoopPolls` when each tick ends (the simulated
    /// provider's timers that fell behind wait for the loop to read, #26), and a tick of
    /// `LoopPolls.stall` or more, a loop that read nothing that long, counts in
    /// `parley_event_loop_stalls_total`.
    public static func eventLoops(_ configuration: ServerConfiguration) -> MultiThreadedEventLoopGroup {
        let stalls = Counter(label: "parley_event_loop_stalls_total", factory: configuration.metrics)
        return LoopPolls.eventLoops(threads: configuration.eventLoopThreads ?? System.coreCount, stalled: { _ in stalls.increment() })
    }

    /// permessage-deflate for this upgrade request, if the server has it on and the client offered
    /// an acceptable configuration; the same answer for the 101's header and the pipeline.
    private static func deflateAgreement(_ head: HTTPRequestHead, _ configuration: ServerConfiguration) -> DeflateAgreement? {
        guard let settings = configuration.webSocketDeflate else { return nil }
        let offers = head.headers["Sec-WebSocket-Extensions"]
        return offers.isEmpty ? nil : PerMessageDeflate.negotiate(offers: offers, settings: settings)
    }

    /// Returns why, if this node loses its lease on its MongoDB database (another node may be
    /// serving from it now: stop the process at once, as after a crash, and let the journal and
    /// ledger recovery of the next start finish what was cut); nil when there is no lease (the
    /// embedded store) or after `shutdown`. Await it from one task only.
    public func nodeLeaseLost() async -> String? {
        await nodeLease?.lost()
    }

    /// When this node is told to stop unless it renews its lease first (nil without a lease).
    var nodeLeaseStopsAtMillis: Int64? { nodeLease?.stopsAtMillis }

    /// Waits until the broker between nodes has this node's subscriptions (a socket that just
    /// connected reads the streams other nodes start from now on). Nothing to wait for alone.
    func brokerRoundTrip() async throws {
        try await clusterBroker?.flush()
    }

    /// Measures now how far JetStream lags behind this node's publishes (every 5 s otherwise).
    func jetStreamLag() async throws {
        try await clusterBroker?.measureJetStreamLag()
    }

    /// Renews and evens out this node's schedule shards now instead of at the next renewal;
    /// returns the shards it holds then (none alone, or without a shared store).
    func balanceScheduleShards() async -> Set<Int> {
        guard let shards = schedules.cluster else { return [] }
        await shards.balance()
        return shards.held
    }

    /// Looks for stopped nodes now instead of at the next sweep; returns those taken over.
    func takeOverStoppedNodes() async -> [String] {
        await reaper?.sweep() ?? []
    }

    /// Stops cleanly: stops accepting connections and requests, lets the replies in flight finish
    /// for up to `drainGrace`, ends the rest with reason `shutdown` (their partial replies
    /// stored), closes every socket with 1001, then flushes and closes the store. Idempotent.
    public func shutdown() async {
        let first = stopped.withLock { s -> Bool in
            defer { s = true }
            return !s
        }
        guard first else { return }
        logger.info("shutting down", metadata: ["sockets": "\(chat.streams.sockets.connectionCount)"])
        // Requests first, then connections: once the port refuses, every request is refused too.
        streams.requests.stopAccepting()
        try? await serverChannel.close()
        await schedules.stopFiring()
        retention.cancel()
        let streaming = hub.liveStreams.count
        if await streams.drain(grace: configuration.drainGrace) {
            if streaming > 0 { logger.info("drained: every reply in flight finished", metadata: ["streams": "\(streaming)"]) }
        } else {
            logger.notice(
                "grace period over; ending the replies still streaming with reason shutdown",
                metadata: ["streams": "\(hub.liveStreams.count)", "grace": "\(configuration.drainGrace)"])
        }
        await rooms.shutdown()  // ends debate turns and translations in flight and stores the rooms paused
        await streams.shutdown()  // ends every other stream (chat replies, scheduled messages)
        await schedules.drain()
        await streams.flushJournals()
        let closing = chat.streams.sockets.allConnections.map { $0.close(code: .goingAway, reason: "server shutting down") }
        if !closing.isEmpty {
            let all = EventLoopFuture.andAllComplete(closing, on: group.any())
            let grace = configuration.shutdownGrace
            await withTaskGroup(of: Void.self) { waiters in
                waiters.addTask { try? await all.get() }
                waiters.addTask { try? await Task.sleep(for: grace) }
                await waiters.next()
                waiters.cancelAll()
            }
        }
        reaping?.cancel()
        await reaping?.value
        await clusterBroker?.close()
        await nodeLease?.release()
        do {
            try await store.close()
        } catch {
            logger.error("closing the store failed", metadata: ["error": "\(error)"])
        }
        dataLock.release()
        if ownsGroup { try? await group.shutdownGracefully() }
        logger.info("stopped")
    }
}
