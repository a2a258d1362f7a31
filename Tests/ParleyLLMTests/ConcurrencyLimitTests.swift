import NIOEmbedded
import NIOCore
import ParleyCore
import ParleyLLM
import Synchronization
import Testing

/// A provider whose streams each wait until the test lets them finish, and which counts how
/// many are running.
final class HeldProvider: LLMProvider {
    let running = Atomic<Int>(0)
    private let (released, release) = AsyncStream<Void>.makeStream()

    func modelName(for request: CompletionRequest) -> String { "held" }

    func stream(_ request: CompletionRequest) -> LLMEventStream {
        let (stream, continuation) = LLMEventStream.makeStream()
        running.add(1, ordering: .sequentiallyConsistent)
        let released = self.released
        Task {
            var iterator = released.makeAsyncIterator()
            _ = await iterator.next()
            continuation.yield(.token("done"))
            continuation.yield(.usage(Usage(inputTokens: 1, outputTokens: 1)))
            self.running.subtract(1, ordering: .sequentiallyConsistent)
            continuation.finish()
        }
        return stream
    }

    /// Lets one waiting stream finish.
    func finishOne() { release.yield() }
}

func drain(_ stream: LLMEventStream) async throws -> [LLMEvent] {
    var out: [LLMEvent] = []
    for try await event in stream { out.append(event) }
    return out
}

@Suite struct ConcurrencyLimitTests {
    let request = CompletionRequest(messages: [], maxOutputTokens: 8)

    @Test func beyondTheRunningAndQueuedLimitsAStreamFailsAtOnceAndTheQueueMovesInOrder() async throws {
        let held = HeldProvider()
        let limited = ConcurrencyLimitedProvider(held, maxConcurrent: 1, maxQueued: 1)
        let first = Task { try await drain(limited.stream(self.request)) }
        // The slot is taken at once; the provider is reached from the loop a moment later.
        while held.running.load(ordering: .sequentiallyConsistent) < 1 { await Task.yield() }
        let second = Task { try await drain(limited.stream(self.request)) }
        while limited.load.queued < 1 { await Task.yield() }
        await #expect(throws: ProviderBusy.self) { try await drain(limited.stream(self.request)) }
        #expect(held.running.load(ordering: .sequentiallyConsistent) == 1, "the queued one has not reached the provider")

        held.finishOne()
        #expect(try await first.value == [.token("done"), .usage(Usage(inputTokens: 1, outputTokens: 1))])
        while limited.load.queued > 0 { await Task.yield() }  // the slot went to the waiter
        held.finishOne()
        #expect(try await second.value.count == 2)
        #expect(limited.load.running == 0 && limited.load.queued == 0)
    }

    @Test func aConsumerThatStopsWhileQueuedLeavesTheQueue() async throws {
        let held = HeldProvider()
        let limited = ConcurrencyLimitedProvider(held, maxConcurrent: 1, maxQueued: 1)
        let first = Task { try await drain(limited.stream(self.request)) }
        while limited.load.running < 1 { await Task.yield() }
        let waiting = Task { try await drain(limited.stream(self.request)) }
        while limited.load.queued < 1 { await Task.yield() }
        waiting.cancel()
        _ = try? await waiting.value
        #expect(limited.load.queued == 0, "its place is free again")
        let third = Task { try await drain(limited.stream(self.request)) }
        while limited.load.queued < 1 { await Task.yield() }
        held.finishOne()
        _ = try await first.value
        held.finishOne()
        #expect(try await third.value.count == 2)
    }

    /// Whether every slot is back within 10 s: a slot comes back on the run's event loop, which
    /// may be just after the consumer's task ended (a cancel that met the grant on its way).
    static func slotsFree(_ limited: ConcurrencyLimitedProvider) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(10)
        while limited.load.running > 0, ContinuousClock.now < deadline { await Task.yield() }
        return limited.load.running == 0
    }

    /// The slot is the consumer's until the stream ends: one that stops reading, or is cancelled,
    /// gives it back (the limit has no relay task of its own to notice).
    @Test func aConsumerThatStopsReadingOrIsCancelledGivesItsSlotBack() async throws {
        let held = HeldProvider()
        let limited = ConcurrencyLimitedProvider(held, maxConcurrent: 1, maxQueued: 0)
        held.finishOne()
        for try await event in limited.stream(request) {
            #expect(event == .token("done"))
            break
        }
        #expect(await Self.slotsFree(limited))
        let reader = Task { try await drain(limited.stream(self.request)) }
        while limited.load.running < 1 { await Task.yield() }
        reader.cancel()
        _ = try? await reader.value
        #expect(await Self.slotsFree(limited))
        held.finishOne()  // the cancelled reader's upstream, still waiting (the held provider ignores cancellation)
        held.finishOne()
        #expect(try await drain(limited.stream(request)).count == 2, "the slot is free for the next")
    }

    final class Recorder: LLMEventSink {
        var tokens = 0
        var finishes: [String] = []
        func received(_ event: LLMEvent) { if case .token = event { tokens += 1 } }
        func finished(_ error: (any Error)?) { finishes.append(error.map { "\($0)" } ?? "ok") }
    }

    /// A pushing provider behind the limit pushes on the loop it was started on, straight
    /// through; a waiting reply starts once a running one finishes, and one cancelled while it
    /// waits never starts and leaves its place.
    @Test func aPushingProviderBehindTheLimitWaitsItsTurnOnItsLoop() {
        let loop = EmbeddedEventLoop()
        let simulated = SimulatedProvider(configuration: .init(timeToFirstToken: .milliseconds(100), tokensPerSecond: 10, replyTokens: 3))
        let limited = ConcurrencyLimitedProvider(simulated, maxConcurrent: 1, maxQueued: 2)
        let (first, second, third, fourth) = (Recorder(), Recorder(), Recorder(), Recorder())
        _ = limited.start(request, on: loop, sink: first)
        _ = limited.start(request, on: loop, sink: second)
        let cancelled = limited.start(request, on: loop, sink: third)
        _ = limited.start(request, on: loop, sink: fourth)
        loop.run()
        #expect(limited.load == (running: 1, queued: 2) && fourth.finishes == ["ProviderBusy()"])
        cancelled.cancel()
        #expect(limited.load.queued == 1)
        loop.advanceTime(by: .milliseconds(300))  // the first reply's three tokens: 100, 200, 300 ms
        #expect(first.tokens == 3 && first.finishes == ["ok"] && second.tokens == 0)
        #expect(limited.load == (running: 1, queued: 0), "the slot went to the second")
        loop.advanceTime(by: .milliseconds(300))
        #expect(second.tokens == 3 && second.finishes == ["ok"])
        #expect(third.tokens == 0 && third.finishes.isEmpty, "a cancelled reply hears nothing")
        #expect(limited.load == (running: 0, queued: 0))
    }
}
