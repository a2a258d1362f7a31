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

    /// No relay task: the consumer's own task waits for a slot, then reads the inner stream
    /// straight through (each token used to cross a relay task and a second stream buffer).
    public func stream(_ request: CompletionRequest) -> LLMEventStream {
        let slot = Slot(gate: gate, inner: inner, request: request)
        return LLMEventStream(unfolding: { try await slot.next() })
    }

    /// One stream's place at the gate and its inner stream. Only its consumer calls `next`, one
    /// call at a time (a stream has one iterator): that is why it is unchecked Sendable. The slot
    /// is given back when the inner stream ends or fails, or when the consumer drops the stream.
    final class Slot: @unchecked Sendable {
        private let gate: Gate
        private let inner: any LLMProvider
        private let request: CompletionRequest
        private var events: LLMEventStream.AsyncIterator?
        private var holdsSlot = false
        private var finished = false

        init(gate: Gate, inner: any LLMProvider, request: CompletionRequest) {
            self.gate = gate
            self.inner = inner
            self.request = request
        }

        func next() async throws -> LLMEvent? {
            guard !finished else { return nil }
            if events == nil {
                switch await gate.acquire() {
                case .full:
                    finished = true
                    throw ProviderBusy()
                case .cancelled:
                    finished = true
                    return nil
                case .granted:
                    holdsSlot = true
                    events = inner.stream(request).makeAsyncIterator()
                }
            }
            do {
                if let event = try await events?.next() { return event }
                finish()
                return nil
            } catch {
                finish()
                throw error
            }
        }

        private func finish() {
            finished = true
            events = nil
            if holdsSlot {
                holdsSlot = false
                gate.release()
            }
        }

        deinit {
            if holdsSlot { gate.release() }
        }
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
