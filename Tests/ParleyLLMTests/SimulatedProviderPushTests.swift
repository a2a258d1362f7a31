import NIOCore
import NIOEmbedded
import ParleyCore
import ParleyLLM
import Testing

/// The simulated provider's pushed path (`start` on an event loop), on an embedded loop whose
/// clock the test moves: the same events as its stream, at the same deadlines.
@Suite struct SimulatedProviderPushTests {
    let request = SimulatedProviderTests().request

    func provider(ttft: Duration = .zero, tps: Double = 0, reply: Int = 30) -> SimulatedProvider {
        SimulatedProviderTests().provider(ttft: ttft, tps: tps, reply: reply)
    }

    /// Every event with the loop's time when it arrived; `cancelAfter` cancels the run from
    /// inside the sink once that many tokens arrived.
    final class Recorder: LLMEventSink {
        let loop: EmbeddedEventLoop
        var events: [(event: LLMEvent, at: Int64)] = []
        var finishes: [String] = []
        var run: (any LLMRun)?
        var cancelAfter: Int?

        init(loop: EmbeddedEventLoop) { self.loop = loop }

        var tokens: [String] { events.compactMap { if case .token(let t) = $0.event { t } else { nil } } }
        var millis: [Int64] { events.map { $0.at / 1_000_000 } }

        func received(_ event: LLMEvent) {
            events.append((event, loop.now.uptimeNanoseconds.int64))
            if let cancelAfter, tokens.count == cancelAfter { run?.cancel() }
        }

        func finished(_ error: (any Error)?) { finishes.append(error.map { "\($0)" } ?? "ok") }
    }

    func started(_ p: SimulatedProvider, _ request: CompletionRequest, cancelAfter: Int? = nil) -> (EmbeddedEventLoop, Recorder) {
        let loop = EmbeddedEventLoop()
        let recorder = Recorder(loop: loop)
        recorder.cancelAfter = cancelAfter
        recorder.run = p.start(request, on: loop, sink: recorder)
        return (loop, recorder)
    }

    @Test func pushesTheStreamsEventsEachAtItsDeadline() async throws {
        let p = provider(ttft: .milliseconds(200), tps: 10, reply: 5)
        // The pulled stream first: the embedded loop below must not outlive an `await` (it may
        // resume on another thread, and an embedded loop is only for the thread that made it).
        var pulled: [LLMEvent] = []
        for try await event in p.stream(request) { pulled.append(event) }
        let (loop, recorder) = started(p, request)
        loop.advanceTime(by: .milliseconds(199))
        #expect(recorder.events.isEmpty)
        for _ in 0..<10 { loop.advanceTime(by: .milliseconds(100)) }
        #expect(recorder.tokens == p.replyTokens(for: request))
        // First token at the time to first token, then one every 100 ms; usage with the last.
        #expect(recorder.millis == [200, 300, 400, 500, 600, 600])
        #expect(recorder.events.last?.event == .usage(Usage(inputTokens: SimulatedProvider.inputTokens(request), outputTokens: 5)))
        #expect(recorder.finishes == ["ok"])
        #expect(pulled == recorder.events.map(\.event), "the pulled stream gives the same events")
    }

    /// The replies of one loop share its clock (one timer wheel, one NIO timer for the earliest):
    /// each still gets every token at its own deadline rounded up to the millisecond, never
    /// before it, and a cancelled one leaves the others' timing alone.
    @Test func repliesSharingALoopEachGetTheirOwnDeadlines() {
        let p = provider(ttft: .milliseconds(50), tps: 30, reply: 6)
        let loop = EmbeddedEventLoop()
        var recorders: [(Recorder, startedAt: Int64)] = []
        for index in 0..<40 {
            let recorder = Recorder(loop: loop)
            if index == 7 { recorder.cancelAfter = 2 }
            recorder.run = p.start(request, on: loop, sink: recorder)
            recorders.append((recorder, Int64(loop.now.uptimeNanoseconds)))
            loop.advanceTime(by: .microseconds(370))  // starts between the millisecond ticks
        }
        for _ in 0..<2_000 { loop.advanceTime(by: .microseconds(250)) }
        let interval = Int64(1e9 / 30)
        for (index, (recorder, startedAt)) in recorders.enumerated() {
            let arrivals = recorder.events.filter { if case .token = $0.event { true } else { false } }.map(\.at)
            #expect(arrivals.count == (index == 7 ? 2 : 6))
            for (token, at) in arrivals.enumerated() {
                let due = startedAt + 50_000_000 + interval * Int64(token)
                let tick = (due + 999_999) / 1_000_000 * 1_000_000
                #expect(at >= due, "reply \(index) token \(token) came early")
                // The loop's clock moves in 250 µs steps here: the first step at or after the tick.
                #expect(at < tick + 250_000, "reply \(index) token \(token) came \(at - due) ns late")
            }
            #expect(recorder.finishes == (index == 7 ? [] : ["ok"]))
        }
    }

    @Test func anUnpacedReplyArrivesWhole() {
        let p = provider(reply: 300)
        let (loop, recorder) = started(p, request)
        loop.run()
        #expect(recorder.tokens == p.replyTokens(for: request))
        #expect(recorder.tokens.count == 300)
        #expect(recorder.finishes == ["ok"])
    }

    @Test func aCancelledRunPushesNothingMore() {
        let p = provider(ttft: .milliseconds(10), tps: 100, reply: 50)
        let (loop, recorder) = started(p, request, cancelAfter: 3)
        loop.advanceTime(by: .seconds(5))
        #expect(recorder.tokens.count == 3)
        #expect(recorder.events.count == 3)  // no usage
        #expect(recorder.finishes.isEmpty)
    }

    @Test func aReplyOfNoTokensReportsItsUsage() {
        var empty = request
        empty.maxOutputTokens = 0
        let (loop, recorder) = started(provider(ttft: .seconds(1)), empty)
        loop.run()
        #expect(recorder.events.map(\.event) == [.usage(Usage(inputTokens: SimulatedProvider.inputTokens(empty), outputTokens: 0))])
        #expect(recorder.finishes == ["ok"])
    }
}

extension UInt64 {
    fileprivate var int64: Int64 { Int64(self) }
}
