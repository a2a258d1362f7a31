import ParleyCore
import Testing

@Suite struct TimerWheelTests {
    @Test func firesOnItsTickAndNotBefore() {
        var wheel = TimerWheel<String>()
        wheel.schedule(at: 5, "five")
        wheel.schedule(at: 3, "three")
        #expect(wheel.count == 2)
        #expect(wheel.advance(to: 2).isEmpty)
        #expect(wheel.advance(to: 3).map(\.payload) == ["three"])
        #expect(wheel.advance(to: 4).isEmpty)
        #expect(wheel.advance(to: 5).map(\.payload) == ["five"])
        #expect(wheel.isEmpty)
        #expect(wheel.nextWakeup == nil)
    }

    @Test func aPassedDeadlineFiresOnTheNextAdvance() {
        var wheel = TimerWheel<Int>(now: 1_000)
        wheel.schedule(at: 10, 1)
        wheel.schedule(at: 1_000, 2)
        #expect(wheel.nextWakeup == 1_000)
        #expect(wheel.advance(to: 1_000).map(\.payload) == [1, 2])
    }

    @Test func sameTickFiresInDeadlineThenSchedulingOrder() {
        var wheel = TimerWheel<Int>(now: 100)
        // Overdue timers share the current tick; they come out by deadline, then as scheduled.
        wheel.schedule(at: 50, 1)
        wheel.schedule(at: 20, 2)
        wheel.schedule(at: 50, 3)
        wheel.schedule(at: 5_000, 4)
        wheel.schedule(at: 5_000, 5)
        #expect(wheel.advance(to: 100).map(\.payload) == [2, 1, 3])
        #expect(wheel.advance(to: 10_000).map(\.payload) == [4, 5])
    }

    @Test func cancelledTimersNeverFireAndStaleHandlesDoNothing() {
        var wheel = TimerWheel<Int>()
        let a = wheel.schedule(at: 70, 1)
        let b = wheel.schedule(at: 5_000, 2)
        #expect(wheel.cancel(a) == 1)
        #expect(wheel.cancel(a) == nil)
        #expect(wheel.count == 1)
        // The freed slot is reused; the old handle must not cancel the new timer.
        let c = wheel.schedule(at: 80, 3)
        #expect(wheel.cancel(a) == nil)
        #expect(wheel.deadline(of: c) == 80)
        #expect(wheel.advance(to: 10_000).map(\.payload) == [3, 2])
        #expect(wheel.cancel(b) == nil)
        #expect(wheel.deadline(of: b) == nil)
    }

    @Test func idleTimeIsSkippedNotWalked() {
        var wheel = TimerWheel<Int>()
        let year: UInt64 = 365 * 24 * 3600 * 100  // ticks of 10 ms
        wheel.schedule(at: year, 1)
        // Every wakeup moves at least one level down: a handful of steps, not 3 billion ticks.
        var wakeups = 0
        var fired: [Int] = []
        while let next = wheel.nextWakeup {
            #expect(next <= year)
            fired += wheel.advance(to: next).map(\.payload)
            wakeups += 1
        }
        #expect(fired == [1])
        #expect(wheel.now == year)
        #expect(wakeups <= TimerWheel<Int>.levels + 1)
    }

    @Test func timersBeyondTheLevelsWaitInTheOverflowList() {
        var wheel = TimerWheel<Int>()
        let far: UInt64 = 1 << 40  // ~350 years of 10 ms ticks, far past the levels' 2^36
        wheel.schedule(at: far, 1)
        wheel.schedule(at: far + 1, 2)
        let cancelled = wheel.schedule(at: far + 2, 3)
        wheel.schedule(at: 7, 4)
        #expect(wheel.cancel(cancelled) == 3)
        #expect(wheel.advance(to: far - 1).map(\.payload) == [4])
        #expect(wheel.count == 2)
        #expect(wheel.advance(to: far).map(\.payload) == [1])
        #expect(wheel.advance(to: .max - 1).map(\.payload) == [2])
    }

    @Test func wheelClockNeverRoundsADeadlineDown() {
        let clock = WheelClock(originMillis: 1_000, tickMillis: 10)
        #expect(clock.deadlineTick(forMillis: 1_000) == 0)
        #expect(clock.deadlineTick(forMillis: 1_001) == 1)
        #expect(clock.deadlineTick(forMillis: 1_010) == 1)
        #expect(clock.deadlineTick(forMillis: 1_011) == 2)
        #expect(clock.deadlineTick(forMillis: 0) == 0)
        #expect(clock.elapsedTick(atMillis: 1_019) == 1)
        #expect(clock.millis(atTick: 2) == 1_020)
    }

    /// The model: a plain list of pending timers. After every `advance(to: t)` the wheel must
    /// have fired exactly the pending timers with deadline ≤ t (never early, never a tick late),
    /// each once, ordered by deadline then scheduling order, and never a cancelled one.
    @Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8] as [UInt64])
    func matchesASortedListModel(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var wheel = TimerWheel<Int>(now: UInt64.random(in: 0...(1 << 40), using: &rng))
        var pending: [Int: (deadline: UInt64, handle: TimerHandle)] = [:]
        var cancelled: [TimerHandle] = []
        var nextID = 0
        // Deadline spreads from "this tick" to "past the top level", so every level, the
        // cascades, the top level's wrap-around and the overflow list are all exercised.
        let spans: [UInt64] = [1, 64, 4_096, 1 << 18, 1 << 24, 1 << 30, 1 << 36, 1 << 38]
        for _ in 0..<3_000 {
            switch UInt64.random(in: 0..<10, using: &rng) {
            case 0..<5:
                let span = spans.randomElement(using: &rng)!
                let deadline = wheel.now &+ UInt64.random(in: 0...span, using: &rng) &- (rng.next() % 8 == 0 ? 3 : 0)
                let handle = wheel.schedule(at: deadline, nextID)
                pending[nextID] = (deadline, handle)
                nextID += 1
            case 5..<7:
                if let victim = pending.keys.randomElement(using: &rng) {
                    let handle = pending.removeValue(forKey: victim)!.handle
                    #expect(wheel.cancel(handle) == victim)
                    cancelled.append(handle)
                }
            default:
                let step: UInt64 =
                    switch rng.next() % 4 {
                    case 0: 0
                    case 1: UInt64.random(in: 1...64, using: &rng)
                    case 2: UInt64.random(in: 1...(1 << 20), using: &rng)
                    default: wheel.nextWakeup.map { $0 - wheel.now } ?? 1
                    }
                let target = wheel.now + step
                let expected = pending.filter { $0.value.deadline <= target }
                    .sorted { ($0.value.deadline, $0.key) < ($1.value.deadline, $1.key) }
                    .map(\.key)
                let fired = wheel.advance(to: target)
                #expect(fired.map(\.payload) == expected, "seed \(seed)")
                for expired in fired {
                    #expect(expired.deadline == pending[expired.payload]?.deadline)
                    pending.removeValue(forKey: expired.payload)
                }
                #expect(wheel.now == target)
            }
            #expect(wheel.count == pending.count)
            // A driver sleeping until `nextWakeup` must never oversleep the earliest deadline.
            if let earliest = pending.values.map(\.deadline).min() {
                #expect(wheel.nextWakeup != nil && wheel.nextWakeup! <= max(earliest, wheel.now), "seed \(seed)")
            }
        }
        // Drain: everything left fires exactly once, in order.
        let expected = pending.sorted { ($0.value.deadline, $0.key) < ($1.value.deadline, $1.key) }.map(\.key)
        var drained: [Int] = []
        while let next = wheel.nextWakeup {
            let batch = wheel.advance(to: next)
            for expired in batch { #expect(expired.deadline <= next) }
            drained += batch.map(\.payload)
        }
        #expect(drained == expected, "seed \(seed)")
        #expect(wheel.isEmpty)
        for handle in cancelled { #expect(wheel.cancel(handle) == nil) }
    }
}
