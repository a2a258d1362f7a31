import Logging
import ParleyCore
import ParleyStore
import Synchronization

/// The requests the server is working on, whichever service serves them: each runs as a task
/// the shutdown (and an account deletion) can wait for, and once the server stops accepting,
/// a new one is answered `unavailable` instead of started.
final class RequestTracker: Sendable {
    private struct State {
        var accepting = true
        var nextKey: UInt64 = 0
        var running: [UInt64: Task<Void, Never>] = [:]
        /// Whose request each running one is (when a user's).
        var owners: [UInt64: String] = [:]
    }

    private let state = Mutex(State())
    private let logger: Logger

    init(logger: Logger) {
        self.logger = logger
    }

    var isAccepting: Bool { state.withLock { $0.accepting } }

    /// From now on requests are answered `unavailable` (the first step of a shutdown).
    func stopAccepting() {
        state.withLock { $0.accepting = false }
    }

    /// Serves a client request in its `turn` (see `RequestOrder`), as tracked work off the event
    /// loop: a `FrameError` answered as an `error` frame with `ref`, any other failure logged and
    /// answered `internal`, and `unavailable` once the server is shutting down.
    func serve(
        _ ref: String, from connection: ClientConnection, turn: RequestOrder.Turn, what: String,
        _ body: @escaping @Sendable () async throws -> Void
    ) {
        let started = track(for: connection.identity.user) {
            await turn.run {
                do {
                    try await body()
                } catch var error as FrameError {
                    error.ref = ref
                    connection.send(ServerFrame.error(error))
                } catch {
                    var failure = self.internalFailure(error, what: what, connection: connection, ref: ref)
                    failure.ref = ref
                    connection.send(ServerFrame.error(failure))
                }
            }
        }
        if !started {
            turn.admission.open()
            connection.send(ServerFrame.error(ref: ref, code: .unavailable, message: "the server is shutting down"))
        }
    }

    /// Logs a failure the client cannot act on and returns the error it is told: `internal`, or
    /// `unavailable` when the store cannot take writes now (see `storeUnavailable`).
    func internalFailure(_ error: any Error, what: String, connection: ClientConnection? = nil, ref: String? = nil) -> FrameError {
        var metadata: Logger.Metadata = ["error": "\(error)"]
        if let connection { metadata["conn"] = "\(connection.id)" }
        if let ref { metadata["ref"] = "\(ref)" }
        logger.error("\(what) failed", metadata: metadata)
        return .storeUnavailable(error) ?? FrameError(ref: nil, code: .internal, message: "the request failed; try again")
    }

    /// Runs `body` as a request the shutdown waits for; false (and `body` never runs) once the
    /// server stopped accepting work.
    func track(for user: String? = nil, _ body: @escaping @Sendable () async -> Void) -> Bool {
        start(for: user, body) != nil
    }

    /// `track`, returning the task that runs `body` (a stream's own task, which its stop cancels).
    func start(for user: String? = nil, _ body: @escaping @Sendable () async -> Void) -> Task<Void, Never>? {
        state.withLock { r -> Task<Void, Never>? in
            guard r.accepting else { return nil }
            let key = r.nextKey
            r.nextKey += 1
            if let user { r.owners[key] = user }
            let task = Task {
                await body()
                self.state.withLock {
                    $0.running.removeValue(forKey: key)
                    $0.owners.removeValue(forKey: key)
                }
            }
            r.running[key] = task
            return task
        }
    }

    /// Stops accepting and returns the requests in flight.
    func close() -> [Task<Void, Never>] {
        state.withLock { r in
            r.accepting = false
            return Array(r.running.values)
        }
    }

    /// Waits for the user's requests in flight (their sockets are closed, so no new ones come).
    func settle(user: String) async {
        let running = state.withLock { r in r.owners.filter { $0.value == user }.compactMap { r.running[$0.key] } }
        for task in running { await task.value }
    }
}

extension FrameError {
    /// What a request that needed the store is told when `error` says the store cannot serve
    /// it now, rather than that the request met a fault: no space left (a full disk: nothing is
    /// stored until an operator frees space, so "try again" alone would mislead), or the
    /// database out of reach after the store's retries, or the store closed (a shutdown that
    /// overtook the request). Nil for any other error.
    static func storeUnavailable(_ error: any Error) -> FrameError? {
        switch error {
        case StoreError.closed:
            FrameError(ref: nil, code: .unavailable, message: "the server is shutting down")
        case StoreError.full:
            FrameError(ref: nil, code: .unavailable, message: "the server has no space left to store anything; try again later")
        case StoreError.unreachable:
            FrameError(ref: nil, code: .unavailable, message: "the server cannot reach its database; try again shortly")
        default: nil
        }
    }
}
