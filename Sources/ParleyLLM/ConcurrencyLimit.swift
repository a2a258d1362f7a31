import Synchronization

/// The provider was asked for more than it may run and queue at once.
public struct ProviderBusy: Error, Equatable, Sendable {
    public init() {}
}

/// Runs at most `maxConcurrent` streams of another provider at once; up to `maxQueued` more
/// wait in order (first come, first served) and any beyond that fail at once with
/// `ProviderBusy`, so a burst never piles unbounded work onto a model server. A consumer that
/// stops while waiting leaves the queue; a slot is freed when its stream ends or is cancelled.
public struct ConcurrencyLimitedProvider: LLMProvider {
    public let inner: any LLMProvider
    let gate: Gate

    public init(_ inner: any LLMProvider, maxConcurrent: Int, maxQueued: Int) {
        self.inner = inner
        gate = Gate(maxConcurrent: max(1, maxConcurrent), maxQueued: max(0, maxQueued))
    }

    public func modelName(for request: CompletionRequest) -> String { inner.modelName(for: request) }

    /// Streams running and waiting now.
    public var load: (running: Int, queued: Int) { gate.load }

    public func stream(_ request: CompletionRequest) -> LLMEventStream {
        let (stream, continuation) = LLMEventStream.makeStream()
        let inner = self.inner
        let gate = self.gate
        let task = Task {
            switch await gate.acquire() {
            case .full:
                continuation.finish(throwing: ProviderBusy())
                return
            case .cancelled:
                continuation.finish()
                return
            case .granted:
                break
            }
            defer { gate.release() }
            do {
                for try await event in inner.stream(request) { continuation.yield(event) }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    final class Gate: Sendable {
        enum Outcome { case granted, full, cancelled }

        private struct State {
            var running = 0
            var nextID: UInt64 = 0
            var waiting: [(id: UInt64, resume: CheckedContinuation<Outcome, Never>)] = []
        }

        let maxConcurrent: Int
        let maxQueued: Int
        private let state = Mutex(State())

        init(maxConcurrent: Int, maxQueued: Int) {
            self.maxConcurrent = maxConcurrent
            self.maxQueued = maxQueued
        }

        var load: (running: Int, queued: Int) { state.withLock { ($0.running, $0.waiting.count) } }

        func acquire() async -> Outcome {
            let id = state.withLock { s -> UInt64 in
                s.nextID += 1
                return s.nextID
            }
            return await withTaskCancellationHandler {
                await withCheckedContinuation { (resume: CheckedContinuation<Outcome, Never>) in
                    let now = state.withLock { s -> Outcome? in
                        if Task.isCancelled { return .cancelled }
                        if s.running < maxConcurrent {
                            s.running += 1
                            return .granted
                        }
                        guard s.waiting.count < maxQueued else { return .full }
                        s.waiting.append((id, resume))
                        return nil
                    }
                    if let now { resume.resume(returning: now) }
                }
            } onCancel: {
                let waiter = state.withLock { s -> CheckedContinuation<Outcome, Never>? in
                    guard let index = s.waiting.firstIndex(where: { $0.id == id }) else { return nil }
                    return s.waiting.remove(at: index).resume
                }
                waiter?.resume(returning: .cancelled)
            }
        }

        /// Hands the slot to the first waiter, or frees it.
        func release() {
            let next = state.withLock { s -> CheckedContinuation<Outcome, Never>? in
                guard !s.waiting.isEmpty else {
                    s.running -= 1
                    return nil
                }
                return s.waiting.removeFirst().resume
            }
            next?.resume(returning: .granted)
        }
    }
}
