import CoreMetrics
import NIOCore
import ParleyCore
import ParleyDeflate
import ParleyLLM
import ParleyStore

/// Everything `parley serve` can be told; defaults are the embedded, zero-setup configuration.
public struct ServerConfiguration: Sendable {
    public var host = "127.0.0.1"
    /// 0 picks a free port (tests); the bound port is reported by `ParleyServer.port`.
    public var port = 8080
    /// Holds the SQLite database and, when no secret is given, the generated JWT secret.
    public var dataDirectory = "./parley-data"
    /// Where data lives: nil is the embedded SQLite file in the data directory; a
    /// `mongodb://` or `mongodb+srv://` URI selects MongoDB.
    public var storeURI: String?
    /// With a certificate chain and key, HTTPS and `wss://` on `port` (TLS 1.2 at least, HSTS on
    /// every response); nil: plain HTTP, for loopback or behind a TLS-terminating proxy.
    public var tls: TLSFiles?
    /// An identity provider whose tokens are accepted beside Parley's own HS256 ones (#28).
    public var identityProvider: IdentityProvider?
    /// Threads running MongoDB driver calls.
    public var mongoThreads = 4
    /// The embedded SQLite store's commit window (`SQLiteStore.defaultCommitWindow`).
    public var sqliteCommitWindow = SQLiteStore.defaultCommitWindow
    /// How long this node's lease on a MongoDB database lasts unrenewed (renewed every third of
    /// it): the longest a second node waits for a crashed one's, and a stalled node keeps it.
    public var nodeLeasePeriod: Duration = .seconds(15)
    /// A NATS server with JetStream (`nats://host:4222`) carrying frames between nodes: the
    /// node is one of a cluster (#22). Chat works across nodes; debate rooms, translation chats
    /// and scheduled messages are refused until they hold across nodes too.
    public var brokerURL: String?
    /// This node's id among a cluster's; nil reads or creates `<data dir>/node-id`.
    public var nodeID: String?

    public var isClustered: Bool { brokerURL != nil }

    /// HS256 secret for tokens; nil reads or creates `<data dir>/jwt-secret`.
    public var jwtSecret: String?
    /// Event loop threads; nil means one per core.
    public var eventLoopThreads: Int?

    public var simulated = SimulatedProvider.Configuration()
    /// Streams the model provider may run at once (nil: no limit, the simulated default);
    /// `providerQueue` more wait their turn, and beyond that a reply fails with `rate_limited`.
    public var providerConcurrency: Int?
    public var providerQueue = 256

    /// Tokens of prompt (persona + history) sent to the provider at most.
    public var contextBudgetTokens = 4_096
    /// Messages read from the store to build a prompt, before trimming to the budget.
    public var historyMessages = 200
    /// A new conversation's title is written by the clone's model after its first reply
    /// (metered, feature `title`; the user's sockets get `conversation.title`). Off (the
    /// default): the first line of the user's message, cleaned, stays its title.
    public var generatedTitles = false
    /// Longest reply a stream may generate.
    public var maxOutputTokens = 1_024
    /// Streams one user may run at once (one per conversation in any case).
    public var maxConcurrentStreamsPerUser = 4
    /// Tokens kept per stream for `stream.resume`.
    public var resumeBufferTokens = 1_024
    /// A voiced reply's audio bytes kept per stream for `stream.resume` (`audio_after`): 2 MiB is
    /// about 43 s of 24 kHz 16-bit PCM.
    public var resumeAudioBytes = 2 << 20
    /// Text to speech for voiced replies (#29; `--tts-url`); nil: `"voice": true` is refused.
    public var speech: (any SpeechSynthesizer)?
    /// Speech to text for voice messages (#29; `--stt-url`).
    public var transcriber: (any SpeechTranscriber)?
    /// The voice of a clone that has none of its own.
    public var defaultVoice = CloneVoice(name: "alloy")
    /// The languages the speech service speaks (primary subtags: `en`, `pt`), nil: any. A
    /// translation chat's stream in another language is not voiced. The local voice speaks English.
    public var speechLanguages: Set<String>? = ["en"]

    /// The voice `clone` speaks in: its own, else the server's default.
    public func voice(of clone: Clone) -> CloneVoice { clone.profile.voice ?? defaultVoice }

    /// Whether the speech service speaks `language`.
    public func speaks(_ language: LanguageTag) -> Bool {
        speechLanguages.map { $0.contains(language.language) } ?? true
    }
    /// A voice message's largest upload (4 MiB: minutes of Opus, about 90 s of 22 kHz WAV) and
    /// longest audio; longer is refused with `too_large` and not charged.
    public var maxVoiceMessageBytes = 4 << 20
    public var maxVoiceMessageSeconds = 120.0
    /// Voiced replies' audio is kept this long unless its owner saves it (the privacy policies'
    /// "up to 90 days unless explicitly saved"), then purged by the retention job.
    public var mediaRetention: Duration = .seconds(90 * 86_400)
    /// How long an ended stream stays resumable.
    public var resumeRetention: Duration = .seconds(60)
    /// Largest WebSocket message accepted (after reassembling fragments), in bytes.
    public var maxMessageBytes = 64 * 1024
    /// How long a client may take to send a request head, to send the next request on a kept-alive
    /// connection, and between two pieces of a body.
    public var httpTimeouts = HTTPTimeouts()
    /// Connections still speaking HTTP (not upgraded) at once; past it the oldest one waiting for
    /// a request is closed. nil: a quarter of the process's descriptor limit.
    public var maxHTTPConnections: Int?
    /// Largest HTTP request body accepted, in bytes.
    public var maxRequestBodyBytes = 1024 * 1024
    /// Largest character card accepted by `POST /v1/clones/import` (card PNGs carry a picture).
    public var maxCardBytes = 8 * 1024 * 1024
    /// Clones one user may have (a plan may allow fewer): creating one is free, and each may
    /// carry a card of `maxCardBytes`, so without it one user could fill the disk.
    public var maxClonesPerUser = 1_000
    /// Bytes a socket may have waiting to be written before it is closed (1008) as too slow.
    public var maxQueuedBytesPerSocket = 4 * 1024 * 1024
    /// SO_SNDBUF of accepted sockets; nil leaves the kernel's autotuning alone.
    public var socketSendBufferBytes: Int?
    /// WebSocket handshakes one client IP may make per second (bursts of twice that); beyond it
    /// the upgrade is refused with 429. nil: no limit.
    public var handshakesPerSecondPerIP: Int? = 10
    /// Whether loopback clients are held to it too (they are a local proxy or a load test).
    public var limitLoopbackHandshakes = false
    /// Proxies whose `X-Forwarded-For` names the client (per-address limits, the audit address).
    public var trustedProxies = TrustedProxies.none
    /// Sockets one user may hold open at once; one more is closed with 1008.
    public var maxSocketsPerUser = 16
    /// Client frames a socket may send per second (token bucket, bursts of twice that); beyond
    /// it frames are dropped with an `error` `rate_limited`, and a socket that keeps going is
    /// closed with 1008. nil: no limit.
    public var maxFramesPerSecond: Int? = 50
    /// REST requests one user may make per second on this node (token bucket, bursts of twice
    /// that), counted once the token is accepted; beyond it 429 `rate_limited`. It bounds what one
    /// account's script costs everyone else (a common word's search holds a store thread for
    /// 25-40 ms). nil: no limit.
    public var requestsPerSecondPerUser: Int? = 20
    /// Server pings on every WebSocket this often; a socket silent for a whole interval after a
    /// ping (no pong, no frame) is closed with 1011. nil: no keepalive.
    public var webSocketPingInterval: Duration? = .seconds(30)
    /// permessage-deflate (RFC 7692) for clients that offer it; nil: no extension is negotiated.
    public var webSocketDeflate: DeflateSettings? = DeflateSettings()
    /// How long a socket's compressor is kept without a message to compress (then freed).
    public var deflateIdleRelease: Duration = .seconds(30)
    /// Development mode: `POST /v1/dev/token` mints a token for any name (the web client's dev
    /// sign-in). Never on a server others can reach.
    public var devSignIn = false
    /// How long a clean shutdown (SIGTERM) lets the replies in flight finish on their own before
    /// ending the rest with reason `shutdown`. New requests are refused (`unavailable`) meanwhile.
    public var drainGrace: Duration = .seconds(10)
    /// How long a clean shutdown then waits for sockets to finish closing.
    public var shutdownGrace: Duration = .seconds(5)
    /// How long a reply whose message or settlement the store refused waits before it is tried
    /// again (doubling each time, up to a minute, or less once the store takes a write; see
    /// `KeptReplies`); in a cluster, a conversation's release across the nodes too (`ReplySlots`).
    public var keptReplyRetry: Duration = .seconds(1)

    /// Messages and room transcripts older than this are deleted unless their owner saved them;
    /// nil (the default) keeps them until the user deletes them or the account, as the privacy
    /// policy promises for text (#28). Setting it departs from that promise.
    public var retention: Duration?
    /// Audit events older than this are purged: the privacy policy keeps sign-ins and the rest
    /// "up to 24 months" (#28).
    public var auditRetention: Duration = .seconds(730 * 86_400)
    /// Payment orders and webhook deliveries older than this are purged: kept 7 years for tax
    /// and disputes (#27).
    public var paymentRetention: Duration = .seconds(2_557 * 86_400)
    /// How often the retention purge runs; the first pass comes a minute after start (not at
    /// once: a start has enough to do, and an admin's purge right after start never races it).
    public var retentionInterval: Duration = .seconds(3_600)

    /// The scheduled-message timer wheel's tick: deadlines are met to within one tick.
    public var scheduleTickMillis: Int64 = 10
    /// Schedules fired at once (a backlog after an outage queues behind these). Most of a firing
    /// is waiting for store commits, which group commit shares, so this can be generous.
    public var maxConcurrentFirings = 256
    /// How long a schedule whose conversation is busy (a reply streaming) waits before retrying.
    public var scheduleBusyRetry: Duration = .seconds(1)
    /// How long a schedule whose firing failed (the store was unreachable) waits before retrying.
    public var scheduleErrorRetry: Duration = .seconds(30)

    public var credits = CreditsConfiguration()
    /// The models the provider serves: the first is the default, and a clone may name any of
    /// them (each needs a price).
    public var models = [SimulatedProvider.modelName]
    /// Where the default model runs, for `GET /v1/info`: simulated, local (a model server Parley
    /// supervises), openai or anthropic.
    public var modelHost = "simulated"
    /// Where metrics go: the process-wide swift-metrics backend unless a test gives its own.
    public var metrics: any MetricsFactory = MetricsSystem.factory
    /// Renders every metric in the Prometheus text format for `GET /metrics` (admin role); nil
    /// when the backend has no exposition (the route is then 404).
    public var metricsExposition: (@Sendable () -> [UInt8])?

    public var frameLimits = FrameLimits()
    public var cloneLimits = CloneLimits()

    public init() {}

    /// The model to ask for a clone's reply: its own while the server still offers it, else the
    /// default (nil), so a model an operator withdrew never strands a clone.
    public func model(for clone: Clone) -> String? {
        clone.model.flatMap { models.contains($0) ? $0 : nil }
    }

    public var sqlitePath: String { dataDirectory + "/parley.sqlite" }
    public var secretPath: String { dataDirectory + "/jwt-secret" }
}
