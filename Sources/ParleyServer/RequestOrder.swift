import NIOConcurrencyHelpers

/// One socket's requests take effect in the order they arrived, so a client may pipeline them
/// (`room.join` then `room.control`, `chat.send` then `chat.cancel`): each request starts once
/// the one before it was *admitted*, that is once its effect is visible to the next (a room
/// joined, a stream registered, a schedule stored, a message placed). What a request does after
/// that (a reply streaming, translations running) overlaps the requests that follow.
///
/// Only a frame that cannot be parsed, or is dropped by the frame-rate limit, is answered at once.
final class RequestOrder: Sendable {
    private let last = NIOLockedValueBox<Admission?>(nil)

    /// The turn of the request that arrived just now.
    func next() -> Turn {
        let mine = Admission()
        let previous = last.withLockedValue { last in
            defer { last = mine }
            return last
        }
        return Turn(previous: previous, admission: mine)
    }

    struct Turn: Sendable {
        let previous: Admission?
        let admission: Admission

        /// Whether the request may start at once (everything before it was admitted).
        var isReady: Bool { previous?.isOpen ?? true }

        /// Runs `body` once every earlier request was admitted, with this request's admission as
        /// the task's current one (`Admission.admitCurrent()`); admits it when `body` returns, if
        /// it did not admit itself earlier.
        func run(_ body: @Sendable () async -> Void) async {
            await previous?.wait()
            await Admission.$current.withValue(admission) { await body() }
            admission.open()
        }

        /// Runs `body`, which acts at once, now when every earlier request was admitted (the usual
        /// case: no task), else in a task once they are.
        func runSoon(_ body: @escaping @Sendable () -> Void) {
            if isReady {
                body()
                admission.open()
            } else {
                Task { await run(body) }
            }
        }
    }
}

/// A one-shot signal: open once, awaited by the request after it.
final class Admission: Sendable {
    /// The admission of the request the current task serves (inherited by the tasks it starts).
    @TaskLocal static var current: Admission?

    /// Marks the request the current task serves as admitted: the socket's next request may start.
    static func admitCurrent() { current?.open() }

    private let state = NIOLockedValueBox<(isOpen: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    var isOpen: Bool { state.withLockedValue { $0.isOpen } }

    func open() {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Void, Never>] in
            guard !state.isOpen else { return [] }
            state.isOpen = true
            defer { state.waiters = [] }
            return state.waiters
        }
        waiters.forEach { $0.resume() }
    }

    func wait() async {
        await withCheckedContinuation { continuation in
            let isOpen = state.withLockedValue { state in
                if !state.isOpen { state.waiters.append(continuation) }
                return state.isOpen
            }
            if isOpen { continuation.resume() }
        }
    }
}
