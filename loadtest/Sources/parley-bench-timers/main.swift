// Timer wheel vs binary heap on the same workload, with 1,000,000 timers pending.
//
//   swift run -c release parley-bench-timers            # the full run (BENCHMARKS.md)
//   swift run parley-bench-timers --timers 20000 --realtime-ms 200   # a quick smoke run
//
// Memory is the bytes of storage each structure holds (array capacities), not RSS: glibc reuses
// freed pages, which makes RSS deltas undercount.
//
// Phases: schedule N timers with deadlines spread over an hour of 10 ms ticks; cancel half;
// fire the rest by advancing simulated time tick by tick; then, with N far-future timers still
// pending, fire timers in real time and measure how late each one fires.
import Glibc
import HeapModule
import ParleyCore

struct Options {
    var timers = 1_000_000
    var realtimeMillis = 2_000
    var realtimeTimers = 20_000
    var tickMillis: Int64 = 10
    /// Set in the child processes: each structure runs in a fresh process, so neither inherits
    /// the other's heap state.
    var only: String?

    init(_ arguments: [String]) {
        var iterator = arguments.dropFirst().makeIterator()
        while let flag = iterator.next() {
            if flag == "--only" {
                only = iterator.next()
                continue
            }
            guard let value = iterator.next().flatMap(Int.init) else { usage() }
            switch flag {
            case "--timers": timers = value
            case "--realtime-ms": realtimeMillis = value
            case "--realtime-timers": realtimeTimers = value
            default: usage()
            }
        }
    }
}

func usage() -> Never {
    print("usage: parley-bench-timers [--timers N] [--realtime-ms MS] [--realtime-timers N] [--only wheel|heap]")
    exit(64)
}

/// The same operations on both structures.
protocol TimerQueue {
    init()
    mutating func reserve(_ n: Int)
    mutating func schedule(at tick: UInt64, id: UInt32)
    mutating func cancel(id: UInt32)
    /// Fires everything due at `tick`; returns how many fired.
    mutating func advance(to tick: UInt64, _ fired: (UInt32, UInt64) -> Void) -> Int
    var next: UInt64? { get }
    /// Bytes the structure and its cancel-by-id bookkeeping hold.
    var storageBytes: Int { get }
    static var name: String { get }
}

struct WheelQueue: TimerQueue {
    static let name = "timer wheel"
    var wheel = TimerWheel<UInt32>()
    var handles: [TimerHandle] = []

    mutating func reserve(_ n: Int) {
        wheel.reserveCapacity(n)
        handles.reserveCapacity(n)
    }
    mutating func schedule(at tick: UInt64, id: UInt32) {
        let handle = wheel.schedule(at: tick, id)
        if Int(id) == handles.count { handles.append(handle) } else { handles[Int(id)] = handle }
    }
    mutating func cancel(id: UInt32) { wheel.cancel(handles[Int(id)]) }
    mutating func advance(to tick: UInt64, _ fired: (UInt32, UInt64) -> Void) -> Int {
        let due = wheel.advance(to: tick)
        for expired in due { fired(expired.payload, expired.deadline) }
        return due.count
    }
    var next: UInt64? { wheel.nextWakeup }
    var storageBytes: Int { wheel.storageBytes + handles.capacity * MemoryLayout<TimerHandle>.stride }
}

/// A binary heap cannot remove from the middle: cancelled entries are tombstoned and skipped
/// when they surface, the usual way (their memory stays until then).
struct HeapQueue: TimerQueue {
    struct Entry: Comparable {
        var deadline: UInt64
        var id: UInt32
        static func < (a: Entry, b: Entry) -> Bool { (a.deadline, a.id) < (b.deadline, b.id) }
    }
    static let name = "binary heap"
    var heap = Heap<Entry>()
    var cancelled: [Bool] = []

    mutating func reserve(_ n: Int) {
        heap.reserveCapacity(n)
        cancelled.reserveCapacity(n)
    }
    mutating func schedule(at tick: UInt64, id: UInt32) {
        heap.insert(Entry(deadline: tick, id: id))
        if Int(id) == cancelled.count { cancelled.append(false) } else { cancelled[Int(id)] = false }
    }
    mutating func cancel(id: UInt32) { cancelled[Int(id)] = true }
    mutating func advance(to tick: UInt64, _ fired: (UInt32, UInt64) -> Void) -> Int {
        var count = 0
        while let min = heap.min, min.deadline <= tick {
            heap.removeMin()
            if cancelled[Int(min.id)] { continue }
            fired(min.id, min.deadline)
            count += 1
        }
        return count
    }
    var next: UInt64? {
        heap.min?.deadline  // may be a tombstone: waking for it is wasted work, as in practice
    }
    /// Heap does not expose its capacity: its count is a lower bound (cancelled entries stay).
    var storageBytes: Int { heap.count * MemoryLayout<Entry>.stride + cancelled.capacity }
}

func nowNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func rate(_ count: Int, _ nanos: UInt64) -> String {
    let perSecond = Double(count) / (Double(max(nanos, 1)) / 1e9)
    return perSecond >= 1e6 ? "\((perSecond / 1e6).formatted(2)) M/s" : "\((perSecond / 1e3).formatted(1)) k/s"
}

extension Double {
    func formatted(_ digits: Int) -> String {
        var factor = 1.0
        for _ in 0..<digits { factor *= 10 }
        let rounded = (self * factor).rounded() / factor
        return String(rounded)
    }
}

struct Result {
    var name: String
    var scheduleRate: String
    var bytesPerTimer: Double
    var cancelRate: String
    var fireRate: String
    var lateness: (p50: Double, p99: Double, max: Double)
    var wakeups: Int
    var slowestAdvanceMicros: UInt64
    var lateTicks: Int
}

func run<Q: TimerQueue>(_ type: Q.Type, options: Options) -> Result {
    var rng = SystemRandomNumberGenerator()
    let n = options.timers
    let horizon: UInt64 = 3_600_000 / UInt64(options.tickMillis)  // an hour of ticks
    let deadlines = (0..<n).map { _ in UInt64.random(in: 1...horizon, using: &rng) }
    let victims = Array((0..<UInt32(n)).shuffled(using: &rng).prefix(n / 2))

    // Schedule.
    var queue = Q()
    queue.reserve(n)
    var start = nowNanos()
    for (i, deadline) in deadlines.enumerated() { queue.schedule(at: deadline, id: UInt32(i)) }
    let scheduleNanos = nowNanos() - start
    let bytes = Double(queue.storageBytes) / Double(n)

    // Cancel half.
    start = nowNanos()
    for id in victims { queue.cancel(id: id) }
    let cancelNanos = nowNanos() - start

    // Fire the rest, tick by tick through the hour (the way a driver that ticks would).
    var fired = 0
    var late = 0
    start = nowNanos()
    for tick in 1...horizon {
        fired += queue.advance(to: tick) { _, deadline in if deadline != tick { late += 1 } }
    }
    let fireNanos = nowNanos() - start
    precondition(fired == n - victims.count, "\(Q.name) fired \(fired) of \(n - victims.count)")
    precondition(late == 0, "\(Q.name) fired \(late) timers off their tick")

    // Real time: N far-future timers pending, then timers due over the next few seconds; the
    // driver sleeps until the structure's next deadline and records how late each one fires.
    for i in 0..<n { queue.schedule(at: horizon * 1_000 + UInt64(i), id: UInt32(i)) }
    let tickNanos = UInt64(options.tickMillis) * 1_000_000
    // Timers come due from `lead` after the origin on, so none is due before all are scheduled.
    let lead: UInt64 = 200_000_000
    let origin = nowNanos()
    let base = UInt32(n)
    var dueAt: [UInt64] = []
    dueAt.reserveCapacity(options.realtimeTimers)
    for i in 0..<options.realtimeTimers {
        let offset = lead + UInt64.random(in: 0..<UInt64(options.realtimeMillis) * 1_000_000, using: &rng)
        dueAt.append(origin + offset)
        // The tick at or after the due time: never early.
        queue.schedule(at: horizon + (offset + tickNanos - 1) / tickNanos, id: base + UInt32(i))
    }
    precondition(nowNanos() < origin + lead, "scheduling the real-time timers took longer than the lead")
    var latenessMillis: [Double] = []
    latenessMillis.reserveCapacity(options.realtimeTimers)
    var wakeups = 0
    var slowest: UInt64 = 0
    var lateTicks = 0
    let end = origin + lead + UInt64(options.realtimeMillis) * 1_000_000 + 2 * tickNanos
    while nowNanos() < end {
        guard let next = queue.next else { break }
        // Simulated time stands at `horizon`: real time continues from there.
        let wakeAt = min(end, origin + (max(next, horizon) - horizon) * tickNanos)
        let now = nowNanos()
        if wakeAt > now {
            var ts = timespec(tv_sec: Int((wakeAt - now) / 1_000_000_000), tv_nsec: Int((wakeAt - now) % 1_000_000_000))
            nanosleep(&ts, nil)
        }
        wakeups += 1
        let tick = horizon + (nowNanos() - origin) / tickNanos
        let t0 = nowNanos()
        _ = queue.advance(to: tick) { id, deadline in
            if id >= base, tick - deadline > 1 { lateTicks += 1 }
            if id >= base { latenessMillis.append(Double(Int64(nowNanos()) - Int64(dueAt[Int(id - base)])) / 1e6) }
        }
        slowest = max(slowest, nowNanos() - t0)
        if tick >= horizon * 1_000 { break }
    }
    precondition(
        latenessMillis.count == options.realtimeTimers, "\(Q.name) fired \(latenessMillis.count) of \(options.realtimeTimers) real-time timers")
    precondition(latenessMillis.allSatisfy { $0 >= 0 }, "\(Q.name) fired a timer early")
    latenessMillis.sort()
    func percentile(_ p: Double) -> Double { latenessMillis[min(latenessMillis.count - 1, Int(Double(latenessMillis.count) * p))] }
    return Result(
        name: Q.name, scheduleRate: rate(n, scheduleNanos), bytesPerTimer: bytes, cancelRate: rate(victims.count, cancelNanos),
        fireRate: rate(fired, fireNanos), lateness: (percentile(0.5), percentile(0.99), latenessMillis.last ?? 0), wakeups: wakeups,
        slowestAdvanceMicros: slowest / 1_000, lateTicks: lateTicks)
}

let options = Options(CommandLine.arguments)
if let only = options.only {
    let r =
        switch only {
        case "wheel": run(WheelQueue.self, options: options)
        case "heap": run(HeapQueue.self, options: options)
        default: usage()
        }
    print(
        "| \(r.name) | \(r.scheduleRate) | \(r.bytesPerTimer.formatted(1)) B | \(r.cancelRate) | \(r.fireRate) | \(r.lateness.p50.formatted(2)) / \(r.lateness.p99.formatted(2)) / \(r.lateness.max.formatted(2)) ms | \(r.lateTicks) | \(r.slowestAdvanceMicros) µs | \(r.wakeups) |"
    )
} else {
    print(
        "\(options.timers) timers, deadlines over one hour of \(options.tickMillis) ms ticks; half cancelled; then \(options.realtimeTimers) timers fired in real time over \(options.realtimeMillis) ms with \(options.timers) more pending"
    )
    print(
        "| structure | schedule | bytes per timer | cancel | fire (tick by tick) | real-time lateness p50 / p99 / max | fired > 1 tick late | slowest advance | wake-ups |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    let arguments = "--timers \(options.timers) --realtime-ms \(options.realtimeMillis) --realtime-timers \(options.realtimeTimers)"
    for structure in ["wheel", "heap"] {
        fflush(nil)
        guard system("'\(CommandLine.arguments[0])' \(arguments) --only \(structure)") == 0 else { exit(1) }
    }
}
