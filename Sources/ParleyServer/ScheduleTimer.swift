import CoreMetrics
import NIOCore
import ParleyCore

/// Drives a `TimerWheel` from one event loop: the wheel lives on that loop, one scheduled task
/// wakes it at its next deadline (not every tick), and fired timers are handed to an
/// `AsyncStream` so firing never does I/O on the loop.
final class ScheduleTimer: Sendable {
    struct Entry: Sendable, Equatable {
        var id: String
        var owner: String
        var at: Int64
        /// A firing this node must finish (its own, or a stopped node's it took over). In a
        /// cluster a schedule found `firing` is otherwise another node's, and left to it.
        var resumes = false
    }

    private struct State {
        var wheel: TimerWheel<Entry>
        var handles: [String: TimerHandle] = [:]
        var armed: (tick: UInt64, task: Scheduled<Void>)?
        var stopped = false
    }

    let loop: any EventLoop
    let clock: WheelClock
    /// Fired timers, in deadline order.
    let fired: AsyncStream<Entry>
    private let continuation: AsyncStream<Entry>.Continuation
    private let wallClock: @Sendable () -> Int64
    private let state: NIOLoopBoundBox<State>
    private let pending: Meter
    private let lateness: Timer

    init(
        loop: any EventLoop, tickMillis: Int64, metrics: any MetricsFactory,
        wallClock: @escaping @Sendable () -> Int64 = { Int64(Timestamp.nowMillis()) }
    ) {
        self.loop = loop
        self.wallClock = wallClock
        self.clock = WheelClock(originMillis: wallClock(), tickMillis: tickMillis)
        self.state = .makeBoxSendingValue(State(wheel: TimerWheel()), eventLoop: loop)
        (fired, continuation) = AsyncStream.makeStream(of: Entry.self)
        pending = Meter(label: "parley_schedules_pending", factory: metrics)
        lateness = Timer(label: "parley_schedule_fire_lateness_seconds", factory: metrics)
    }

    /// Arms a timer for `entry.at`; a time already passed fires at once. Replaces a timer with the same id.
    func add(_ entry: Entry) {
        loop.execute { [self] in
            guard !state.value.stopped else { return }
            if let old = state.value.handles.removeValue(forKey: entry.id) { state.value.wheel.cancel(old) }
            state.value.handles[entry.id] = state.value.wheel.schedule(at: clock.deadlineTick(forMillis: entry.at), entry)
            changed()
        }
    }

    /// Adds many timers in one hop (start-up); they keep their order among equal deadlines.
    func add(_ entries: [Entry]) {
        loop.execute { [self] in
            guard !state.value.stopped else { return }
            state.value.wheel.reserveCapacity(state.value.wheel.count + entries.count)
            for entry in entries {
                if let old = state.value.handles.removeValue(forKey: entry.id) { state.value.wheel.cancel(old) }
                state.value.handles[entry.id] = state.value.wheel.schedule(at: clock.deadlineTick(forMillis: entry.at), entry)
            }
            changed()
        }
    }

    func cancel(id: String) {
        loop.execute { [self] in
            if let handle = state.value.handles.removeValue(forKey: id) {
                state.value.wheel.cancel(handle)
                changed()
            }
        }
    }

    /// Cancels the timers of every schedule id `matches` selects (the shards a node of a
    /// cluster let go).
    func cancel(where matches: @escaping @Sendable (String) -> Bool) {
        loop.execute { [self] in
            let ids = state.value.handles.keys.filter(matches)
            for id in ids {
                if let handle = state.value.handles.removeValue(forKey: id) { state.value.wheel.cancel(handle) }
            }
            if !ids.isEmpty { changed() }
        }
    }

    /// Pending timers (for tests and diagnostics).
    func count() async -> Int {
        (try? await loop.submit { [self] in state.value.wheel.count }.get()) ?? 0
    }

    /// Stops firing; pending timers stay in the store and are loaded again at the next start.
    func stop() async {
        try? await loop.submit { [self] in
            state.value.stopped = true
            state.value.armed?.task.cancel()
            state.value.armed = nil
        }.get()
        continuation.finish()
    }

    /// Fires what is due and re-arms the wake-up task for the wheel's next deadline.
    private func changed() {
        pending.set(state.value.wheel.count)
        let due = state.value.wheel.advance(to: clock.elapsedTick(atMillis: wallClock()))
        if !due.isEmpty {
            let now = wallClock()
            for expired in due {
                state.value.handles.removeValue(forKey: expired.payload.id)
                lateness.recordMilliseconds(max(0, now - expired.payload.at))
                continuation.yield(expired.payload)
            }
            pending.set(state.value.wheel.count)
        }
        guard let next = state.value.wheel.nextWakeup else {
            state.value.armed?.task.cancel()
            state.value.armed = nil
            return
        }
        if let armed = state.value.armed {
            if armed.tick <= next { return }  // an earlier wake-up is already set; it re-arms
            armed.task.cancel()
        }
        let delay = max(0, clock.millis(atTick: next) - wallClock())
        let task = loop.scheduleTask(in: .milliseconds(delay)) { [self] in
            state.value.armed = nil
            changed()
        }
        state.value.armed = (next, task)
    }
}
