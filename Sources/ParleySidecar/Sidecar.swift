import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A server Parley runs beside itself (a local model server) and keeps running: started and
/// ready before Parley listens, restarted when it dies, stopped when Parley stops.
///
/// "Ready" is `GET /health` on its loopback port answering 200: llama.cpp's server and vLLM answer so once the
/// model is loaded, and a process gives no other sign a supervisor can wait on, so readiness is
/// polled (every 100 ms, bounded by `startTimeout`), while the process's exit is awaited.
public final class Sidecar: Sendable {
    public struct Configuration: Sendable {
        /// What to run; the port is already in it (Parley picks one, see `freeLoopbackPort`).
        public var arguments: [String]
        public var environment: [String: String] = [:]
        /// The environment passed on (less `withheld`, plus `environment`); nil: this process's.
        public var inherited: [String: String]?
        /// Parley's own variables (`PARLEY_JWT_SECRET`, `PARLEY_PAYMENTS_SECRET`, `PARLEY_STORE` with
        /// its password, …) are not the model server's business: they are withheld from it.
        public var withheld: @Sendable (String) -> Bool = { $0.hasPrefix("PARLEY_") }
        /// The loopback port it serves on, and the path that answers 200 once it is ready.
        public var port: Int
        public var healthPath = "/health"
        public var healthURL: String { "http://127.0.0.1:\(port)\(healthPath)" }
        /// Where the process's stdout and stderr go (appended; rotated once past 8 MiB).
        public var logPath: String
        /// How long one start may take to answer its health check.
        public var startTimeout: Duration = .seconds(60)
        /// The pause before a restart: doubles after each failed start up to `maxRestartDelay`,
        /// back to the first after a run that stayed up a minute.
        public var restartDelay: Duration = .milliseconds(250)
        public var maxRestartDelay: Duration = .seconds(30)
        /// How long a stop waits after SIGTERM before SIGKILL.
        public var stopGrace: Duration = .seconds(5)

        public init(arguments: [String], port: Int, logPath: String) {
            self.arguments = arguments
            self.port = port
            self.logPath = logPath
        }
    }

    public enum StartError: Error, CustomStringConvertible {
        case couldNotRun(String)
        case exited(ExitStatus, logTail: String)
        case notReady(after: Duration, logTail: String)

        public var description: String {
            switch self {
            case .couldNotRun(let reason): reason
            case .exited(let status, let tail): "it ended (\(status)) before it was ready" + Self.tail(tail)
            case .notReady(let after, let tail): "it did not answer its health check within \(after)" + Self.tail(tail)
            }
        }

        private static func tail(_ text: String) -> String { text.isEmpty ? "" : "; the end of its log:\n" + text }
    }

    private struct State {
        var child: ChildProcess?
        var stopping = false
        var restarts = 0
        var restartWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }

    public let configuration: Configuration
    private let logger: Logger
    private let state = NIOLockedValueBox(State())
    private let supervision = NIOLockedValueBox<Task<Void, Never>?>(nil)

    private init(configuration: Configuration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Starts the process and returns once it is ready, supervising it from then on; throws (having
    /// stopped it) when it cannot run, ends early or is not ready in time.
    public static func start(_ configuration: Configuration, logger: Logger) async throws -> Sidecar {
        let sidecar = Sidecar(configuration: configuration, logger: logger)
        let child = try await sidecar.launch()
        sidecar.supervision.withLockedValue { $0 = Task { await sidecar.supervise(child) } }
        return sidecar
    }

    /// The running process's id (nil between a death and its restart, and after `stop`).
    public var pid: pid_t? { state.withLockedValue { $0.child?.exitStatus == nil ? $0.child?.pid : nil } }

    /// Returns once the process has been restarted `count` times and is ready again, or once
    /// the sidecar is stopped.
    public func restarted(count: Int) async {
        await withCheckedContinuation { continuation in
            let done = state.withLockedValue { state -> Bool in
                if state.restarts >= count || state.stopping { return true }
                state.restartWaiters.append((count, continuation))
                return false
            }
            if done { continuation.resume() }
        }
    }

    private func resumeRestartWaiters() {
        let due = state.withLockedValue { state in
            let due = state.restartWaiters.filter { $0.count <= state.restarts || state.stopping }
            state.restartWaiters.removeAll { $0.count <= state.restarts || state.stopping }
            return due
        }
        due.forEach { $0.continuation.resume() }
    }

    /// Stops supervising and stops the process (SIGTERM, then SIGKILL after the grace). A second
    /// call only waits for the first: the process is gone, and its id may be someone else's.
    public func stop() async {
        let (child, first) = state.withLockedValue { state -> (ChildProcess?, Bool) in
            defer { state.stopping = true }
            return (state.child, !state.stopping)
        }
        let task = supervision.withLockedValue { $0 }
        guard first else { return await task?.value ?? () }
        task?.cancel()
        resumeRestartWaiters()
        if let child {
            let status = await child.stop(grace: configuration.stopGrace)
            logger.info("model server stopped", metadata: ["pid": "\(child.pid)", "status": "\(status)"])
        }
        await task?.value
    }

    private var isStopping: Bool { state.withLockedValue { $0.stopping } }

    private func supervise(_ first: ChildProcess) async {
        var child = first
        var delay = configuration.restartDelay
        while true {
            let started = ContinuousClock.now
            guard let status = await child.exited(), !isStopping else { return }  // nil: cancelled by stop()
            _ = await child.stop(grace: .zero)  // what the dead server started in its group goes too
            if ContinuousClock.now - started > .seconds(60) { delay = configuration.restartDelay }
            logger.warning("model server ended; restarting it", metadata: ["pid": "\(child.pid)", "status": "\(status)", "in": "\(delay)"])
            while true {
                // A pause between restarts, so a server that cannot start does not spin the CPU.
                try? await Task.sleep(for: delay)
                if isStopping { return }
                delay = min(delay * 2, configuration.maxRestartDelay)
                do {
                    child = try await launch()
                    state.withLockedValue { $0.restarts += 1 }
                    resumeRestartWaiters()
                    break
                } catch {
                    if isStopping { return }
                    logger.error("model server did not restart; trying again", metadata: ["error": "\(error)", "in": "\(delay)"])
                }
            }
        }
    }

    /// One start: spawn, then wait for readiness or the process's end, whichever comes first.
    private func launch() async throws -> ChildProcess {
        rotateLog()
        let child: ChildProcess
        do {
            child = try ChildProcess.spawn(
                arguments: configuration.arguments, environment: configuration.environment, inherited: configuration.inherited,
                withheld: configuration.withheld, logPath: configuration.logPath)
        } catch {
            throw StartError.couldNotRun("\(error)")
        }
        let stopped = state.withLockedValue { state -> Bool in
            state.child = child
            return state.stopping
        }
        if stopped {
            _ = await child.stop(grace: configuration.stopGrace)
            throw CancellationError()
        }
        enum Outcome: Sendable { case ready, exited(ExitStatus?), timedOut }
        let outcome = await withTaskGroup(of: Outcome.self) { group in
            group.addTask { .exited(await child.exited()) }  // nil: this start was cancelled (a stop)
            group.addTask { await self.waitUntilHealthy() ? .ready : .timedOut }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        switch outcome {
        case .ready:
            logger.notice("model server ready", metadata: ["pid": "\(child.pid)", "health": "\(configuration.healthURL)"])
            return child
        case .exited(let status?):
            _ = await child.stop(grace: .zero)  // whatever it started in its group goes with it
            throw StartError.exited(status, logTail: logTail())
        case .exited(nil):
            _ = await child.stop(grace: configuration.stopGrace)
            throw CancellationError()
        case .timedOut:
            _ = await child.stop(grace: configuration.stopGrace)
            throw StartError.notReady(after: configuration.startTimeout, logTail: logTail())
        }
    }

    /// Polls the health URL until it answers 200 (true) or the start timeout passes (false).
    private func waitUntilHealthy() async -> Bool {
        let deadline = ContinuousClock.now + configuration.startTimeout
        while ContinuousClock.now < deadline, !Task.isCancelled {
            if await HealthCheck.status(port: configuration.port, path: configuration.healthPath) == 200 { return true }
            try? await Task.sleep(for: .milliseconds(100))  // the polling interval (see the type's comment)
        }
        return false
    }

    private func rotateLog() {
        let path = configuration.logPath
        guard let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int, size > 8 << 20 else { return }
        _ = try? FileManager.default.removeItem(atPath: path + ".1")
        _ = try? FileManager.default.moveItem(atPath: path, toPath: path + ".1")
    }

    /// The last lines of the log, for a start-up failure message.
    private func logTail(lines: Int = 12) -> String {
        guard let handle = FileHandle(forReadingAtPath: configuration.logPath) else { return "" }
        defer { try? handle.close() }
        let end = (try? handle.seekToEnd()) ?? 0
        try? handle.seek(toOffset: end > 4096 ? end - 4096 : 0)
        let text = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
        return text.split(separator: "\n", omittingEmptySubsequences: true).suffix(lines).joined(separator: "\n")
    }

    /// A TCP port free on 127.0.0.1 right now, chosen below the kernel's ephemeral range: it is
    /// released at once, and a port from that range (what `bind(0)` gives) is soon the local port
    /// of some outgoing connection or another listener, so the sidecar's bind failed with
    /// "address in use" now and then. Below the range only an explicit bind can take it; a restart
    /// that still fails is retried.
    public static func freeLoopbackPort() async throws -> Int {
        let ephemeral = Self.ephemeralPortRange()
        let below = max(1024, ephemeral.lowerBound - 16_384)..<ephemeral.lowerBound
        if below.count >= 1024 {
            for _ in 0..<64 {
                let port = Int.random(in: below)
                if let bound = try? await Self.bindAndRelease(port: port) { return bound }
            }
        }
        return try await Self.bindAndRelease(port: 0)
    }

    /// The range `bind(0)` and `connect` take local ports from (Linux's default if unreadable).
    static func ephemeralPortRange() -> ClosedRange<Int> {
        let text = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8)) ?? ""
        let bounds = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).compactMap { Int($0) }
        guard bounds.count == 2, bounds[0] <= bounds[1] else { return 32768...60999 }
        return bounds[0]...bounds[1]
    }

    private static func bindAndRelease(port: Int) async throws -> Int {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: "127.0.0.1", port: port).get()
        let bound = channel.localAddress?.port
        try await channel.close()
        guard let bound else { throw SpawnError(description: "no port was bound") }
        return bound
    }
}
