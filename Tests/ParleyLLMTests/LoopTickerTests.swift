import Glibc
import NIOCore
import NIOPosix
import ParleyCore
import Testing

@testable import ParleyLLM

/// A `LoopTicker` on a loop it saturates still lets that loop read its sockets (#26): NIO runs
/// every due timer before it polls, so a wheel that is due again as soon as it fired, or one fire
/// that runs every timer a long stall left, would hold every read until the load went.
@Suite struct LoopTickerTests {
    /// A timer that works for `work` when it fires; `again` times it comes back at once, late
    /// already (a wheel that fell behind).
    final class Busy: Ticking, @unchecked Sendable {
        let run: Saturation
        var again: Int

        init(_ run: Saturation, again: Int) {
            self.run = run
            self.again = again
        }

        func tick() {
            run.fire()
            if again > 0 {
                again -= 1
                _ = run.ticker.schedule(self, at: run.loop.now - .milliseconds(5))
            }
        }
    }

    /// One saturated loop and the pipe it should read meanwhile. Touched on the loop only.
    final class Saturation: @unchecked Sendable {
        let loop: any EventLoop
        let ticker: LoopTicker
        let work: TimeAmount
        /// The pipe's end the first fire writes its byte to.
        let pipe: Int32
        /// Fires come when the pipe's byte was read.
        let read: EventLoopPromise<Int>
        var fired = 0

        init(loop: any EventLoop, work: TimeAmount, pipe: Int32) {
            self.loop = loop
            self.work = work
            self.pipe = pipe
            ticker = LoopTicker(loop: loop)
            read = loop.makePromise()
        }

        /// One fire's work. The first writes the byte itself, on the loop: the byte is there for
        /// the loop's next poll, whenever the test's own tasks get a thread on a busy machine.
        func fire() {
            fired += 1
            if fired == 1 {
                var byte: UInt8 = 1
                precondition(write(pipe, &byte, 1) == 1)
            }
            busy(work)
        }
    }

    final class Reader: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let run: Saturation
        init(_ run: Saturation) { self.run = run }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { run.read.succeed(run.fired) }
    }

    /// A reply's tokens, each `work` long to handle, counted as fires.
    final class BusySink: LLMEventSink, @unchecked Sendable {
        let run: Saturation
        init(_ run: Saturation) { self.run = run }

        func received(_ event: LLMEvent) {
            guard case .token = event else { return }
            run.fire()
        }

        func finished(_ error: (any Error)?) {}
    }

    /// Starts `timers` (each firing `1 + again` times, `work` each) on a loop that reports its
    /// ticks, writes a byte to a pipe that loop reads once the first fired, and returns how many
    /// had fired when the loop read it, of how many in all.
    func timersFiredBeforeTheRead(timers: Int, again: Int, work: TimeAmount) async throws -> (atRead: Int, total: Int) {
        let atRead = try await firedBeforeTheRead(work: work) { run in
            for _ in 0..<timers { _ = run.ticker.schedule(Busy(run, again: again), at: run.loop.now) }
        }
        return (atRead, timers * (1 + again))
    }

    /// Runs `start` on a one-thread loop that reports its ticks, with a pipe that loop reads and
    /// the first fire writes to, and returns how many fires had come when the loop read it.
    func firedBeforeTheRead(work: TimeAmount, start: @escaping @Sendable (Saturation) -> Void) async throws -> Int {
        let group = LoopPolls.eventLoops(threads: 1)
        let loop = group.next()
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let run = Saturation(loop: loop, work: work, pipe: fds[1])
        let channel = try await NIOPipeBootstrap(group: loop)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Reader(run)) } }
            .takingOwnershipOfDescriptor(input: fds[0]).get()
        try await loop.submit { start(run) }.get()
        let atRead = try await run.read.futureResult.get()
        try await channel.close()
        close(fds[1])
        try await group.shutdownGracefully()
        return atRead
    }

    @Test func aWheelDueAgainAsSoonAsItFiredLetsTheLoopReadBetweenFires() async throws {
        // One timer, late every time it comes back: 500 fires of 2 ms, a second of work. The
        // loop reads the first fire's byte at its next poll: after that fire, or, without a poll
        // between fires, once all 500 are done.
        let (atRead, total) = try await timersFiredBeforeTheRead(timers: 1, again: 499, work: .milliseconds(2))
        #expect(atRead < total, "read after all \(total) fires: the loop waited for the wheel")
        #expect(atRead <= 2, "read after \(atRead) fires")
    }

    @Test func oneFireLeavesWhatIsPastItsBudgetForAfterThePoll() async throws {
        // 500 timers due at once, 2 ms each: one fire that ran them all would take a second.
        // The budget is looked at every 16 timers: the first fire stops after 16.
        let (atRead, total) = try await timersFiredBeforeTheRead(timers: 500, again: 0, work: .milliseconds(2))
        #expect(atRead < total, "read after all \(total) timers: one fire ran them all first")
        #expect(atRead <= 32, "read after \(atRead) timers")
    }

    @Test func anUnpacedReplyLetsTheLoopReadBetweenItsBatchesOfTokens() async throws {
        // 2,560 tokens due at once, 200 µs each to handle: half a second of work, handed over
        // 64 at a time. Each batch after the first must wait for the loop's poll; run as tasks
        // queued at once, NIO would run them all before it.
        let tokens = 64 * 40
        let provider = SimulatedProvider(configuration: .init(timeToFirstToken: .zero, tokensPerSecond: 0, replyTokens: tokens))
        let request = CompletionRequest(messages: [PromptMessage(role: .user, text: "Go on")], speaker: "Ada", maxOutputTokens: tokens)
        let atRead = try await firedBeforeTheRead(work: .microseconds(200)) { run in
            _ = provider.start(request, on: run.loop, sink: BusySink(run))
        }
        #expect(atRead < tokens, "read after all \(tokens) tokens: the reply held the loop")
        #expect(atRead <= 128, "read after \(atRead) tokens")
    }
}
