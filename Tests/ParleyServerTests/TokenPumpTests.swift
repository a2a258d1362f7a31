import Logging
import MetricsTestKit
import NIOCore
import NIOPosix
import ParleyCore
import ParleyLLM
@testable import ParleyServer
import ParleyStore
import Synchronization
import Testing

/// The token path on an event loop (`TokenPump`), with a provider the test drives and a ledger
/// whose debits wait until the test lets them through: tokens wait for their batch in order, and
/// a stop never leaves a debit running beside the settlement.
@Suite struct TokenPumpTests {
    /// A ledger in memory whose `apply` waits while `held`.
    final class GatedLedger: LedgerStore, StreamJournalStore {
        private struct State {
            var balance: Int64 = 1_000
            var applied: [String] = []
            var held = true
            var waiters: [CheckedContinuation<Void, Never>] = []
            var waiting = 0
        }
        private let state = Mutex(State())

        var applied: [String] { state.withLock { $0.applied } }
        /// Debits waiting at the gate now.
        var waiting: Int { state.withLock { $0.waiting } }

        /// Debits wait at the gate again.
        func hold() { state.withLock { $0.held = true } }

        func open() {
            let waiters = state.withLock { s in
                s.held = false
                defer { s.waiters = [] }
                return s.waiters
            }
            for waiter in waiters { waiter.resume() }
        }

        func balance(user: String) async throws -> Int64 { state.withLock { $0.balance } }

        func apply(_ entry: LedgerEntry, allowOverdraft: Bool, headroom: Int64, caps: [SpendCap]) async throws -> LedgerOutcome {
            if !entry.id.hasSuffix(":in") {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let pass = state.withLock { s -> Bool in
                        guard s.held else { return true }
                        s.waiting += 1
                        s.waiters.append(c)
                        return false
                    }
                    if pass { c.resume() }
                }
            }
            return state.withLock { s in
                if s.waiting > 0, !entry.id.hasSuffix(":in") { s.waiting -= 1 }
                s.balance += entry.credits
                s.applied.append(entry.id)
                return .applied(balance: s.balance)
            }
        }

        func ledgerEntry(id: String) async throws -> LedgerEntry? { nil }
        func ledger(user: String, limit: Int, before: String?) async throws -> [LedgerEntry] { [] }
        func ledgerPage(user: String, limit: Int, before: String?) async throws -> (entries: [LedgerEntry], balance: Int64) { ([], 0) }
        func costs(user: String, link: LedgerLink, ids: [String]) async throws -> [String: Int64] { [:] }
        func ledgerEntries(from: Int64, to: Int64?, after: (createdAt: Int64, id: String)?, limit: Int) async throws -> [LedgerEntry] { [] }
        func recoverLedger(node: String?) async throws -> Int { 0 }
        func saveStreamJournal(_ journal: StreamJournal) async throws {}
        func deleteStreamJournal(stream: String) async throws {}
        func streamJournals(limit: Int, node: String?) async throws -> [StreamJournal] { [] }
    }

    /// A pushing provider whose events the test sends, on the run's loop.
    final class DrivenProvider: PushingLLMProvider {
        struct Run: LLMRun {
            let provider: DrivenProvider
            func cancel() { provider.cancelled.store(true, ordering: .relaxed) }
        }
        let sink = Mutex<NIOLoopBound<any LLMEventSink>?>(nil)
        let cancelled = Atomic(false)

        func modelName(for request: CompletionRequest) -> String { SimulatedProvider.modelName }
        func stream(_ request: CompletionRequest) -> LLMEventStream { LLMEventStream { $0.finish() } }
        func start(_ request: CompletionRequest, on loop: any EventLoop, sink: any LLMEventSink) -> any LLMRun {
            self.sink.withLock { $0 = NIOLoopBound(sink, eventLoop: loop) }
            return Run(provider: self)
        }
    }

    /// Publishes nothing anywhere; the frames a stream published are kept in order.
    final class RecordingBroker: Broker {
        let frames = Mutex<[String]>([])
        func publish(_ frame: ByteBuffer, to topic: Topic, audience: Audience) {
            frames.withLock { $0.append(String(buffer: frame)) }
        }
    }

    struct Fixture {
        let loop: any EventLoop
        let ledger = GatedLedger()
        let provider = DrivenProvider()
        let broker: RecordingBroker
        let pumped: Task<ReleasedReply, Never>

        init(loop: any EventLoop, batchTokens: Int = 2) async throws {
            self.loop = loop
            let broker = RecordingBroker()
            self.broker = broker
            var configuration = CreditsConfiguration()
            configuration.batchTokens = batchTokens
            let credits = Credits(
                store: ledger, configuration: configuration, logger: Logger(label: "test"), metrics: TestMetrics(), pseudonym: { $0 })
            let meter = credits.meter(user: "alice", stream: "st1", conversation: "cv1", model: SimulatedProvider.modelName, feature: .chat)
            try await meter.begin(inputTokens: 1)
            let reply = Self.reply(ledger: ledger, broker: broker)
            let (provider, metrics) = (self.provider, StreamMetrics(factory: TestMetrics()))
            pumped = Task {
                await TokenPump.pump(
                    CompletionRequest(messages: [], maxOutputTokens: 10), with: provider, on: loop, meter: meter, reply: reply, metrics: metrics,
                    logger: Logger(label: "test"))
            }
            // The pump has started once the provider was given its sink.
            while provider.sink.withLock({ $0 == nil }) { await Task.yield() }
        }

        /// An empty reply of stream "st1", journaled to `ledger`.
        static func reply(ledger: GatedLedger, broker: RecordingBroker) -> ReleasedReply {
            let live = LiveStream(
                id: "st1", owner: "alice", model: SimulatedProvider.modelName, kind: .reply(conversation: "cv1", clone: "cl1", schedule: nil),
                bufferCapacity: 100, readers: [], broker: broker, hub: SocketHub())
            let journal = StreamJournals(store: ledger, logger: Logger(label: "test")).open(
                StreamJournal(
                    stream: "st1", user: "alice", model: SimulatedProvider.modelName, feature: "chat", inputTokens: 1, target: .settleOnly(),
                    messageID: "msg1", createdAt: 0))
            return ReleasedReply(live: live, journal: journal, allocator: ByteBufferAllocator())
        }

        /// Sends `events` to the pump on its loop, in order, then `finished` when `finish`.
        func push(_ events: [LLMEvent], finish: Bool = false) async throws {
            let sink = provider.sink.withLock { $0! }
            try await loop.submit {
                for event in events { sink.value.received(event) }
                if finish { sink.value.finished(nil) }
            }.get()
        }

        var tokenFrames: [String] { broker.frames.withLock { $0.filter { $0.contains("\"token\"") } } }
    }

    /// A reply stopped because its tokens could not be paid for says why with a code the client
    /// can act on: `unavailable` when the store had no space or could not be reached (it said
    /// `provider_error`, blaming the model), `internal` for another store failure.
    @Test func aReplyStoppedByTheStoreSaysSoInItsCode() {
        let metrics = StreamMetrics(factory: TestMetrics())
        var reply = Fixture.reply(ledger: GatedLedger(), broker: RecordingBroker())
        reply.fail(StoreError.full("disk full"), metrics: metrics, logger: Logger(label: "test"))
        #expect(reply.failureCode == .unavailable)
        #expect(reply.failure == "the server has no space left to store anything; try again later")
        reply.fail(StoreError.unreachable("no primary"), metrics: metrics, logger: Logger(label: "test"))
        #expect(reply.failureCode == .unavailable)
        #expect(reply.failure == "the server cannot reach its database; try again shortly")
        reply.fail(StoreError.backend("gone"), metrics: metrics, logger: Logger(label: "test"))
        #expect(reply.failureCode == .internal)
        #expect(reply.failure == "credits could not be charged; try again")
    }

    @Test func tokensThatArriveWhileABatchIsBoughtGoOutInOrderOncePaid() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let f = try await Fixture(loop: group.next())
        try await f.push([.token("a"), .token("b"), .token("c")])
        // Token 1 needs a batch; its purchase waits at the gate, and so do all three tokens.
        #expect(f.tokenFrames.isEmpty)
        try await f.push([.usage(Usage(inputTokens: 1, outputTokens: 3))], finish: true)
        f.ledger.open()
        let reply = await f.pumped.value
        #expect(reply.text == "abc")
        #expect(reply.seq == 3)
        #expect(reply.reported == Usage(inputTokens: 1, outputTokens: 3))
        #expect(f.tokenFrames.count == 3)
        #expect(zip(f.tokenFrames, ["\"seq\":1", "\"seq\":2", "\"seq\":3"]).allSatisfy { $0.contains($1) })
        // Batches of two: tokens 1-2, then token 3.
        #expect(f.ledger.applied == ["st1:in", "st1:1", "st1:2"])
        try await group.shutdownGracefully()
    }

    @Test func aStopDuringAPurchaseReturnsOnlyOnceTheDebitIsDone() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let f = try await Fixture(loop: group.next())
        try await f.push([.token("a")])
        while f.ledger.waiting == 0 { await Task.yield() }
        f.pumped.cancel()
        // The stop reached the loop (the provider was told) while the debit still waits.
        while !f.provider.cancelled.load(ordering: .relaxed) { try await f.loop.submit {}.get() }
        // An absence has no event to await: the pump must not return within a bound while the
        // debit waits (a correct pump never does, so this cannot fail spuriously).
        let returnedEarly = await withTaskGroup(of: Bool.self) { race in
            race.addTask {
                _ = await f.pumped.value
                return true
            }
            race.addTask {
                try? await Task.sleep(for: .milliseconds(300))
                f.ledger.open()  // and the pump may end
                return false
            }
            return await race.next()!
        }
        #expect(!returnedEarly, "the pump returned while its debit was still being applied")
        let reply = await f.pumped.value
        #expect(f.ledger.applied.contains("st1:1"))
        #expect(reply.seq == 0)  // the waiting token was not sent
        #expect(f.tokenFrames.isEmpty)
        try await group.shutdownGracefully()
    }

    /// The next batch is bought while the last `purchaseLead` paid tokens go out, so a token
    /// seldom waits for the store: with batches of 8 then 16, the first is bought as generation
    /// starts, the second once token 4 is out (4 paid left), and tokens 5 to 8 go out meanwhile.
    @Test func theNextBatchIsBoughtAheadWhileThePaidTokensGoOut() async throws {
        #expect(TokenPump.purchaseLead == 4)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let f = try await Fixture(loop: group.next(), batchTokens: 8)
        try await waitUntil { f.ledger.waiting == 1 }  // batch 1, before any token came
        f.ledger.open()
        try await waitUntil { f.ledger.applied.contains("st1:1") }
        f.ledger.hold()
        try await f.push((1...3).map { .token("t\($0) ") })
        #expect(f.tokenFrames.count == 3)
        #expect(f.ledger.waiting == 0, "5 paid tokens left: too early for the next batch")
        try await f.push([.token("t4 ")])
        try await waitUntil { f.ledger.waiting == 1 }  // batch 2, held at the gate
        try await f.push((5...9).map { .token("t\($0) ") })
        #expect(f.tokenFrames.count == 8, "tokens 5 to 8 were paid: they do not wait for the purchase")
        f.ledger.open()
        try await waitUntil { f.tokenFrames.count == 9 }
        try await f.push([.usage(Usage(inputTokens: 1, outputTokens: 9))], finish: true)
        let reply = await f.pumped.value
        #expect(reply.seq == 9)
        #expect(f.ledger.applied == ["st1:in", "st1:1", "st1:2"])
        try await group.shutdownGracefully()
    }
}
