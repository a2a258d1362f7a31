import Foundation
import Logging
import NIOPosix
import ParleyLLM
import ParleyCore
import ParleyServer

/// A real Parley server on an ephemeral port with its own temporary data directory.
public final class TestServer: Sendable {
    public let server: ParleyServer
    public let dataDirectory: String
    public let configuration: ServerConfiguration

    public var port: Int { server.port }

    /// The stores a server test can run on: the embedded default, and MongoDB (the wire test
    /// server, or the real one named by PARLEY_TEST_MONGODB_URI).
    public enum StoreKind: String, Sendable, CaseIterable, CustomStringConvertible {
        case sqlite, mongodb
        public var description: String { rawValue }
    }

    /// `provider` replaces the simulated one, `eventLoopGroup` the server's own (the caller's to
    /// shut down after `stop`; neither is kept by `restarted`).
    public static func start(
        store: StoreKind = .sqlite, provider: (any LLMProvider)? = nil, eventLoopGroup: MultiThreadedEventLoopGroup? = nil,
        _ configure: (inout ServerConfiguration) -> Void = { _ in }
    ) async throws -> TestServer {
        var configuration = ServerConfiguration()
        configuration.port = 0
        configuration.dataDirectory = Scratch.path("server")
        configuration.eventLoopThreads = 2
        configuration.simulated.timeToFirstToken = .zero
        configuration.simulated.tokensPerSecond = 0
        configuration.simulated.replyTokens = 24
        configuration.credits.startingGrant = 1_000_000
        // Most tests stop a server to see what shutdown does to streams; draining tests ask for a grace.
        configuration.drainGrace = .zero
        if store == .mongodb { configuration.storeURI = MongoFixture.uri() }
        configure(&configuration)
        return try await start(configuration, provider: provider, eventLoopGroup: eventLoopGroup)
    }

    private static func start(
        _ configuration: ServerConfiguration, provider: (any LLMProvider)? = nil, eventLoopGroup: MultiThreadedEventLoopGroup? = nil
    ) async throws -> TestServer {
        var logger = Logger(label: "parley-test")
        logger.logLevel = .warning
        let server = try await ParleyServer.start(configuration: configuration, provider: provider, eventLoopGroup: eventLoopGroup, logger: logger)
        return TestServer(server: server, configuration: configuration)
    }

    private init(server: ParleyServer, configuration: ServerConfiguration) {
        self.server = server
        self.configuration = configuration
        self.dataDirectory = configuration.dataDirectory
    }

    /// Shuts this server down cleanly and starts a new one on the same data (same data
    /// directory, same MongoDB database), as an operator's restart would.
    public func restarted(_ reconfigure: (inout ServerConfiguration) -> Void = { _ in }) async throws -> TestServer {
        await server.shutdown()
        var configuration = self.configuration
        reconfigure(&configuration)
        return try await Self.start(configuration)
    }

    public func token(_ user: String, role: String? = nil, ttl: Duration = .seconds(600)) async throws -> String {
        try await server.authenticator.issue(subject: user, role: role, ttl: ttl)
    }

    /// Creates a clone through the REST API and returns its JSON.
    public func createClone(token: String, name: String = "Ada", fields: [(String, JSONValue)] = []) async throws -> JSONValue {
        let response = try await TestHTTPClient.json(
            port: port, .POST, "/v1/clones", token: token,
            json: .object([("name", .string(name))] + fields))
        guard response.status == .created else { throw TestTimeout(description: "clone creation answered \(response.status): \(response.text)") }
        return try response.json()
    }

    /// Connects a WebSocket as `token` and consumes the welcome frame.
    public func connect(token: String) async throws -> TestWebSocket {
        let socket = try await TestWebSocket.connect(port: port, token: token)
        let welcome = try await socket.nextJSON()
        guard welcome["type"] == .string("welcome") else { throw TestTimeout(description: "expected welcome, got \(welcome)") }
        return socket
    }

    public func stop() async {
        await server.shutdown()
        try? FileManager.default.removeItem(atPath: dataDirectory)
    }
}
