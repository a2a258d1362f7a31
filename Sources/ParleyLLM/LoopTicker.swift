import NIOCore
import ParleyCore
import Synchronization

/// Something a `LoopTicker` wakes at its deadline, on the ticker's loop.
protocol Ticking: AnyObject {
    func tick()
}

/// One event loop's clock for many small timers: every waiting `Ticking` sits in one timer
/// wheel of 1 ms ticks, and one NIO timer (for the earliest of them) wakes the loop. A thousand
/// paced replies then cost a wheel slot per token instead of a scheduled task (a closure, a
/// promise and a heap entry) each: NIO's scheduled-task heap was 15% of the chat benchmark's
/// CPU (#26). A deadline is rounded up to its millisecond: never early, at most 1 ms late.
/// Touched only on `loop`, hence unchecked Sendable.
final class LoopTicker: @unchecked Sendable {
    private let loop: any EventLoop
    private var wheel: TimerWheel<any Ticking>
    /// The tick the NIO timer is set for (0: as soon as the loop has polled), and that timer.
    private var armed: (tick: UInt64, timer: Scheduled<Void>)?
    /// Timers whose deadline passed and that a fire left for the next (`budget`), oldest first.
    private var expired = CircularBuffer<TimerWheel<any Ticking>.Expired>()
    /// The loop's tick (`LoopPolls`) in which this wheel last fired.
    private var firedInTick: UInt64?

    init(loop: any EventLoop) {
        self.loop = loop
        wheel = TimerWheel(now: loop.now.uptimeNanoseconds / 1_000_000)
    }

    /// The first millisecond tick at or after `deadline`.
    private static func tick(of deadline: NIODeadline) -> UInt64 {
        (deadline.uptimeNanoseconds + 999_999) / 1_000_000
    }

    /// Wakes `target` once `deadline` has passed.
    func schedule(_ target: any Ticking, at deadline: NIODeadline) -> TimerHandle {
        loop.preconditionInEventLoop()
        let handle = wheel.schedule(at: Self.tick(of: deadline), target)
        arm()
        return handle
    }

    func cancel(_ handle: TimerHandle) {
        loop.preconditionInEventLoop()
        if wheel.cancel(handle) == nil, let index = expired.firstIndex(where: { $0.handle == handle }) {
            expired.remove(at: index)
        }
    }

    /// Sets the NIO timer for the wheel's next wakeup unless it is set for that or earlier.
    private func arm() {
        guard let next = expired.isEmpty ? wheel.nextWakeup : 0 else { return }
        if let armed, armed.tick <= next { return }
        armed?.timer.cancel()
        let timer = loop.scheduleTask(deadline: .uptimeNanoseconds(next * 1_000_000)) { [self] in fire() }
        armed = (next, timer)
    }

    /// Fires the timers whose deadline passed, for at most `budget`, and at most once per tick
    /// of the loop: NIO runs every due timer and ready task before it polls the loop's sockets,
    /// so a wheel that fell behind, due again as soon as it fired, would keep a saturated loop
    /// from reading anything (#26: ticks of 5–9 s at 10,000 streams, pongs unread and live
    /// sockets closed as silent). It waits for the poll instead (`LoopPolls`), looking again in
    /// a moment, and what it left fires after it, before what came due since.
    private func fire() {
        if let ticks = LoopPolls.finishedTicks {
            if ticks == firedInTick {
                armed = (0, loop.scheduleTask(in: Self.pollWait) { [self] in fire() })
                return
            }
            firedInTick = ticks
        }
        armed = nil
        // The ticks wholly passed: a timer's tick is never reached before its deadline.
        expired.append(contentsOf: wheel.advance(to: loop.now.uptimeNanoseconds / 1_000_000))
        let stop = NIODeadline.now() + Self.budget
        var fired = 0
        while let next = expired.popFirst() {
            next.payload.tick()
            fired += 1
            if fired % 16 == 0, NIODeadline.now() >= stop { break }
        }
        arm()
    }

    /// The most one fire runs before the loop polls again (its timers' writes come on top).
    static let budget = TimeAmount.milliseconds(2)
    /// How long a ticker that already fired in the loop's current tick waits before it looks
    /// again: the rest of the tick's tasks run meanwhile, then the poll.
    static let pollWait = TimeAmount.microseconds(200)
}

/// The `LoopTicker` of each event loop a provider pushes on, made on first use. Held by the
/// provider, so it lives as long as the provider does.
final class LoopTickers: Sendable {
    private let tickers = Mutex<[ObjectIdentifier: LoopTicker]>([:])

    func ticker(for loop: any EventLoop) -> LoopTicker {
        tickers.withLock { tickers in
            if let ticker = tickers[ObjectIdentifier(loop)] { return ticker }
            let ticker = LoopTicker(loop: loop)
            tickers[ObjectIdentifier(loop)] = ticker
            return ticker
        }
    }
}
