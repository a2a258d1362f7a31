import NIOCore
import NIOPosix
import Synchronization

/// The provider was asked for more than it may run and queue at once.
public struct ProviderBusy: Error, Equatable, Sendable {
    public init() {}
}

/// Runs at most `maxConcurrent` replies of another provider at once; up to `maxQueued` more
/// wait in order (first come, first served) and any beyond that fail at once with
/// `ProviderBusy`, so a burst never piles unbounded work onto a model server. A reply cancelled
/// while waiting leaves the queue; a slot is freed when its reply ends or is cancelled.
public struct ConcurrencyLimitedProvider: PushingLLMProvider {
    public let inner: any LLMProvider
    let gate: Gate

    public init(_ inner: any LLMProvider, maxConcurrent: Int, maxQueued: Int) {
        self.inner = inner
        gate = Gate(maxConcurrent: max(1, maxConcurrent), maxQueued: max(0, maxQueued))
    }

    public func modelName(for request: CompletionRequest) -> String { inner.modelName(for: request) }

    /// Replies running and waiting now.
    public var load: (running: Int, queued: Int) { gate.load }

    /// Waits for a slot, then runs the inner provider's reply on `loop` with nothing between its
    /// events and `sink`; the slot is given back when that reply finishes or is cancelled.
    public func start(_ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink) -> any LLMRun {
        let run = LimitedRun(gate: gate, inner: inner, request: request, loop: loop, sink: sink)
        run.queue()
        return run
    }

    public func stream(_ request: CompletionRequest) -> LLMEventStream {
        pulledStream(request, on: MultiThreadedEventLoopGroup.singleton.any())
    }

    /// One reply's place at the gate, then its inner run. `sink` is used only on `loop`; the
    /// place is guarded by a lock, because a cancel from any thread gives the slot back at once.
    final class LimitedRun: LLMRun, LLMEventSink, @unchecked Sendable {
        private enum Place {
            case waiting(UInt64)
            case starting
            case running(any LLMRun)
            /// The inner reply finished and the slot is back.
            case ended
            /// Cancelled, or refused as full.
            case done
        }

        private let gate: Gate
        private let inner: any LLMProvider
        private let request: CompletionRequest
        private let loop: any EventLoop
        private let sink: any LLMEventSink
        private let place = Mutex(Place.starting)

        init(gate: Gate, inner: any LLMProvider, request: CompletionRequest, loop: any EventLoop, sink: any LLMEventSink) {
            self.gate = gate
            self.inner = inner
            self.request = request
            self.loop = loop
            self.sink = sink
        }

        func queue() {
            let loop = self.loop
            // The answer always comes through `loop`, after `place` holds the ticket.
            let ticket = gate.acquire { outcome in loop.execute { self.answered(outcome) } }
            place.withLock { if case .starting = $0 { $0 = .waiting(ticket) } }
        }

        private func answered(_ outcome: Gate.Outcome) {
            switch outcome {
            case .granted:
                let proceed = place.withLock { p -> Bool in
                    guard case .waiting = p else { return false }
                    p = .starting
                    return true
                }
                guard proceed else {
                    gate.release()  // cancelled while the slot was on its way
                    return
                }
                let run = startPushing(inner, request, on: loop, sink: self)
                let cancelled = place.withLock { p -> Bool in
                    switch p {
                    case .starting:
                        p = .running(run)
                        return false
                    case .ended: return false  // it finished as it started
                    case .waiting, .running, .done: return true
                    }
                }
                if cancelled {
                    run.cancel()
                    gate.release()
                }
            case .full:
                let queued = place.withLock { p -> Bool in
                    guard case .waiting = p else { return false }
                    p = .done
                    return true
                }
                if queued { sink.finished(ProviderBusy()) }
            case .cancelled:
                break
            }
        }

        func cancel() {
            let was = place.withLock { p -> Place in
                defer { if case .ended = p {} else { p = .done } }
                return p
            }
            switch was {
            case .waiting(let ticket): gate.leave(ticket)
            case .running(let run):
                run.cancel()
                gate.release()
            case .starting, .ended, .done: break  // from `.starting`, `answered` sees `.done` and gives the slot back
            }
        }

        func received(_ event: LLMEvent) { sink.received(event) }

        func finished(_ error: (any Error)?) {
            let ran = place.withLock { p -> Bool in
                switch p {
                case .running, .starting:
                    p = .ended
                    return true
                case .waiting, .ended, .done: return false
                }
            }
            guard ran else { return }
            gate.release()
            sink.finished(error)
        }
    }

    final class Gate: Sendable {
        enum Outcome { case granted, full, cancelled }

        private struct State {
            var running = 0
            var nextTicket: UInt64 = 0
            var waiting: [(ticket: UInt64, answer: @Sendable (Outcome) -> Void)] = []
        }

        let maxConcurrent: Int
        let maxQueued: Int
        private let state = Mutex(State())

        init(maxConcurrent: Int, maxQueued: Int) {
            self.maxConcurrent = maxConcurrent
            self.maxQueued = maxQueued
        }

        var load: (running: Int, queued: Int) { state.withLock { ($0.running, $0.waiting.count) } }

        /// Asks for a slot: `answer` is called once, at once when a slot is free or the queue is
        /// full, otherwise when a slot is handed over or the ticket leaves the queue.
        func acquire(_ answer: @escaping @Sendable (Outcome) -> Void) -> UInt64 {
            let (ticket, now) = state.withLock { s -> (UInt64, Outcome?) in
                s.nextTicket += 1
                if s.running < maxConcurrent {
                    s.running += 1
                    return (s.nextTicket, .granted)
                }
                guard s.waiting.count < maxQueued else { return (s.nextTicket, .full) }
                s.waiting.append((s.nextTicket, answer))
                return (s.nextTicket, nil)
            }
            if let now { answer(now) }
            return ticket
        }

        /// Takes a waiting ticket out of the queue (answered `.cancelled`); a ticket already
        /// granted is not here, and its holder gives the slot back.
        func leave(_ ticket: UInt64) {
            let waiter = state.withLock { s -> (@Sendable (Outcome) -> Void)? in
                guard let index = s.waiting.firstIndex(where: { $0.ticket == ticket }) else { return nil }
                return s.waiting.remove(at: index).answer
            }
            waiter?(.cancelled)
        }

        /// Hands the slot to the first waiter, or frees it.
        func release() {
            let next = state.withLock { s -> (@Sendable (Outcome) -> Void)? in
                guard !s.waiting.isEmpty else {
                    s.running -= 1
                    return nil
                }
                return s.waiting.removeFirst().answer
            }
            next?(.granted)
        }
    }
}
