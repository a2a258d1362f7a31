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
    /// The tick the NIO timer is set for, and that timer.
    private var armed: (tick: UInt64, timer: Scheduled<Void>)?

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
        _ = wheel.cancel(handle)
    }

    /// Sets the NIO timer for the wheel's next wakeup unless it is set for that or earlier.
    private func arm() {
        guard let next = wheel.nextWakeup else { return }
        if let armed, armed.tick <= next { return }
        armed?.timer.cancel()
        let timer = loop.scheduleTask(deadline: .uptimeNanoseconds(next * 1_000_000)) { [self] in fire() }
        armed = (next, timer)
    }

    private func fire() {
        armed = nil
        // The ticks wholly passed: a timer's tick is never reached before its deadline.
        for expired in wheel.advance(to: loop.now.uptimeNanoseconds / 1_000_000) { expired.payload.tick() }
        arm()
    }
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
