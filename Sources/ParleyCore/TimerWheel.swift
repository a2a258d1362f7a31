/// A hierarchical timing wheel (Varghese & Lauck, laid out as in tokio's timer): six levels of
/// 64 slots, level `n` slots each `64^n` ticks wide, so the levels cover `2^36` ticks (21.8 years
/// at 10 ms a tick). Pure data structure: time is an integer tick count the caller advances.
///
/// - `schedule` and `cancel` are O(1): timers live in a slab, linked into their slot's list.
/// - `advance(to:)` does no work per idle tick: a 64-bit occupancy mask per level finds the next
///   non-empty slot directly. A timer is touched at most once per level on its way down (a
///   "cascade"), so firing costs O(levels) per timer however far away it was scheduled.
/// - Timers further away than the levels cover wait in an overflow list that is looked at only
///   when its earliest member comes into range, never per tick.
///
/// A timer fires in the `advance(to:)` call that first reaches its deadline tick, never before;
/// timers fired by one call come out ordered by deadline, then by scheduling order. A deadline
/// already passed fires in the next `advance`.
public struct TimerWheel<Payload> {
    @inlinable static var slotBits: Int { 6 }
    @inlinable static var slotsPerLevel: Int { 64 }
    @inlinable public static var levels: Int { 6 }
    /// Ticks covered by all the levels.
    @inlinable static var span: UInt64 { 1 << 36 }
    /// Deadlines at least this far ahead go to the overflow list. One top-level slot short of the
    /// span, so a top-level slot never holds timers from two laps of the wheel.
    @inlinable static var reach: UInt64 { span - (1 << 30) }
    @inlinable static var overflowBucket: UInt16 { UInt16(levels * slotsPerLevel) }
    @inlinable static var freeBucket: UInt16 { .max }

    @usableFromInline
    struct Entry: Sendable {
        @usableFromInline var deadline: UInt64
        @usableFromInline var sequence: UInt64
        @usableFromInline var prev: Int32
        @usableFromInline var next: Int32
        @usableFromInline var generation: UInt32
        /// Level * 64 + slot, `overflowBucket`, or `freeBucket`.
        @usableFromInline var bucket: UInt16

        @inlinable
        init(deadline: UInt64, sequence: UInt64, prev: Int32, next: Int32, generation: UInt32, bucket: UInt16) {
            self.deadline = deadline
            self.sequence = sequence
            self.prev = prev
            self.next = next
            self.generation = generation
            self.bucket = bucket
        }
    }

    @usableFromInline var entries: [Entry] = []
    @usableFromInline var payloads: [Payload?] = []
    @usableFromInline var freeHead: Int32 = -1
    @usableFromInline var heads: [Int32]
    @usableFromInline var occupied: [UInt64]
    @usableFromInline var overflowHead: Int32 = -1
    /// The earliest tick at which an overflow timer comes within reach; stale-early is harmless.
    @usableFromInline var overflowCheck: UInt64 = .max
    @usableFromInline var nextSequence: UInt64 = 0

    @usableFromInline var _now: UInt64
    /// The tick the wheel has advanced to.
    @inlinable public var now: UInt64 { _now }

    /// Pending timers.
    @usableFromInline var _count = 0
    @inlinable public var count: Int { _count }

    @inlinable
    public init(now: UInt64 = 0) {
        self._now = now
        heads = Array(repeating: -1, count: Self.levels * Self.slotsPerLevel)
        occupied = Array(repeating: 0, count: Self.levels)
    }

    /// Reserves room for `capacity` pending timers, so scheduling them does not reallocate.
    @inlinable
    public mutating func reserveCapacity(_ capacity: Int) {
        entries.reserveCapacity(capacity)
        payloads.reserveCapacity(capacity)
    }

    @inlinable public var isEmpty: Bool { count == 0 }

    /// Bytes of storage the wheel holds (array capacities, not counting the payloads' own
    /// heap allocations): for capacity planning and the benchmark.
    public var storageBytes: Int {
        entries.capacity * MemoryLayout<Entry>.stride + payloads.capacity * MemoryLayout<Payload?>.stride
            + heads.capacity * MemoryLayout<Int32>.stride + occupied.capacity * MemoryLayout<UInt64>.stride
    }

    // MARK: Scheduling

    /// Schedules `payload` for tick `deadline`; a deadline not after `now` fires on the next advance.
    @inlinable
    @discardableResult
    public mutating func schedule(at deadline: UInt64, _ payload: Payload) -> TimerHandle {
        let index: Int32
        if freeHead >= 0 {
            index = freeHead
            freeHead = entries[Int(index)].next
            entries[Int(index)].deadline = deadline
            entries[Int(index)].sequence = nextSequence
            payloads[Int(index)] = payload
        } else {
            precondition(entries.count < Int(Int32.max), "too many timers")
            index = Int32(entries.count)
            entries.append(Entry(deadline: deadline, sequence: nextSequence, prev: -1, next: -1, generation: 0, bucket: Self.freeBucket))
            payloads.append(payload)
        }
        nextSequence += 1
        _count += 1
        place(index)
        return TimerHandle(index: UInt32(index), generation: entries[Int(index)].generation)
    }

    /// Cancels a pending timer and returns its payload; nil when it already fired or was cancelled.
    @inlinable
    @discardableResult
    public mutating func cancel(_ handle: TimerHandle) -> Payload? {
        let index = Int(handle.index)
        guard index < entries.count, entries[index].generation == handle.generation, entries[index].bucket != Self.freeBucket else {
            return nil
        }
        unlink(Int32(index))
        return release(Int32(index))
    }

    /// The deadline of a pending timer, nil when it is not pending.
    @inlinable
    public func deadline(of handle: TimerHandle) -> UInt64? {
        let index = Int(handle.index)
        guard index < entries.count, entries[index].generation == handle.generation, entries[index].bucket != Self.freeBucket else {
            return nil
        }
        return entries[index].deadline
    }

    // MARK: Advancing

    public struct Expired {
        public var handle: TimerHandle
        public var deadline: UInt64
        public var payload: Payload

        @inlinable
        init(handle: TimerHandle, deadline: UInt64, payload: Payload) {
            self.handle = handle
            self.deadline = deadline
            self.payload = payload
        }
    }

    /// The next tick at which `advance` has work to do (fire or cascade), nil when idle. A driver
    /// sleeps until then; waking early or late is harmless.
    @inlinable public var nextWakeup: UInt64? { nextExpiration()?.tick }

    /// Moves time forward to `tick` (never backwards) and returns the timers whose deadline it
    /// reached, ordered by deadline, then by scheduling order.
    @inlinable
    public mutating func advance(to tick: UInt64) -> [Expired] {
        var fired: [(sequence: UInt64, expired: Expired)] = []
        while let expiration = nextExpiration(), expiration.tick <= tick {
            _now = max(_now, expiration.tick)
            if expiration.bucket == Int(Self.overflowBucket) {
                refillFromOverflow()
                continue
            }
            // Take the whole slot, then fire (level 0) or move each timer down a level.
            var cursor = heads[expiration.bucket]
            heads[expiration.bucket] = -1
            let level = expiration.bucket / Self.slotsPerLevel
            occupied[level] &= ~(UInt64(1) << UInt64(expiration.bucket % Self.slotsPerLevel))
            while cursor >= 0 {
                let index = cursor
                cursor = entries[Int(index)].next
                entries[Int(index)].prev = -1
                entries[Int(index)].next = -1
                if level == 0 || entries[Int(index)].deadline <= _now {
                    let entry = entries[Int(index)]
                    let handle = TimerHandle(index: UInt32(index), generation: entry.generation)
                    let payload = release(index)!
                    fired.append((entry.sequence, Expired(handle: handle, deadline: entry.deadline, payload: payload)))
                } else {
                    place(index)
                }
            }
        }
        _now = max(_now, tick)
        if fired.count > 1 {
            fired.sort { ($0.expired.deadline, $0.sequence) < ($1.expired.deadline, $1.sequence) }
        }
        return fired.map(\.expired)
    }

    // MARK: Internals

    @inlinable
    func nextExpiration() -> (tick: UInt64, bucket: Int)? {
        var best: (tick: UInt64, bucket: Int)?
        for level in 0..<Self.levels where occupied[level] != 0 {
            best = expiration(level: level)
            break
        }
        if overflowHead >= 0, best.map({ overflowCheck < $0.tick }) ?? true {
            best = (max(overflowCheck, _now), Int(Self.overflowBucket))
        }
        return best
    }

    /// The earliest non-empty slot of `level` at or after `now`, and the tick it starts.
    @inlinable
    func expiration(level: Int) -> (tick: UInt64, bucket: Int) {
        let shift = UInt64(level * Self.slotBits)
        let slotRange: UInt64 = 1 << shift
        let levelRange: UInt64 = slotRange << UInt64(Self.slotBits)
        let nowSlot = Int((_now >> shift) & 63)
        let rotated = occupied[level].rotatedRight(by: nowSlot)
        let slot = (rotated.trailingZeroBitCount + nowSlot) & 63
        let levelStart = _now & ~(levelRange &- 1)
        var tick = levelStart + UInt64(slot) * slotRange
        if tick + slotRange <= _now {
            // Only the top level wraps: the slot is in the next lap of the wheel.
            tick += levelRange
        }
        return (max(tick, _now), level * Self.slotsPerLevel + slot)
    }

    @inlinable
    mutating func place(_ index: Int32) {
        let target = max(entries[Int(index)].deadline, _now)
        if target - _now >= Self.reach {
            link(index, bucket: Self.overflowBucket)
            overflowCheck = min(overflowCheck, target - Self.reach + 1)
            return
        }
        var masked = (_now ^ target) | 63
        if masked >= Self.span { masked = Self.span - 1 }
        let level = (63 - masked.leadingZeroBitCount) / Self.slotBits
        let slot = Int((target >> UInt64(level * Self.slotBits)) & 63)
        let bucket = level * Self.slotsPerLevel + slot
        link(index, bucket: UInt16(bucket))
        occupied[level] |= UInt64(1) << UInt64(slot)
    }

    @inlinable
    mutating func refillFromOverflow() {
        var cursor = overflowHead
        overflowHead = -1
        overflowCheck = .max
        while cursor >= 0 {
            let index = cursor
            cursor = entries[Int(index)].next
            entries[Int(index)].prev = -1
            entries[Int(index)].next = -1
            place(index)  // back into the overflow list (with a new check tick) if still out of reach
        }
    }

    @inlinable
    mutating func link(_ index: Int32, bucket: UInt16) {
        let head = bucket == Self.overflowBucket ? overflowHead : heads[Int(bucket)]
        entries[Int(index)].bucket = bucket
        entries[Int(index)].prev = -1
        entries[Int(index)].next = head
        if head >= 0 { entries[Int(head)].prev = index }
        if bucket == Self.overflowBucket { overflowHead = index } else { heads[Int(bucket)] = index }
    }

    @inlinable
    mutating func unlink(_ index: Int32) {
        let entry = entries[Int(index)]
        if entry.next >= 0 { entries[Int(entry.next)].prev = entry.prev }
        if entry.prev >= 0 {
            entries[Int(entry.prev)].next = entry.next
        } else if entry.bucket == Self.overflowBucket {
            overflowHead = entry.next
        } else {
            let bucket = Int(entry.bucket)
            heads[bucket] = entry.next
            if entry.next < 0 {
                occupied[bucket / Self.slotsPerLevel] &= ~(UInt64(1) << UInt64(bucket % Self.slotsPerLevel))
            }
        }
    }

    /// Returns a detached entry to the free list; its old handles stop matching.
    @inlinable
    mutating func release(_ index: Int32) -> Payload? {
        let payload = payloads[Int(index)]
        payloads[Int(index)] = nil
        entries[Int(index)].bucket = Self.freeBucket
        entries[Int(index)].generation &+= 1
        entries[Int(index)].prev = -1
        entries[Int(index)].next = freeHead
        freeHead = index
        _count -= 1
        return payload
    }
}

extension TimerWheel: Sendable where Payload: Sendable {}

/// Identifies one scheduled timer; stale after it fires or is cancelled (a reused slot gets a
/// new generation, so an old handle cannot cancel someone else's timer).
public struct TimerHandle: Hashable, Sendable {
    @usableFromInline let index: UInt32
    @usableFromInline let generation: UInt32

    @inlinable
    init(index: UInt32, generation: UInt32) {
        self.index = index
        self.generation = generation
    }
}

extension UInt64 {
    @inlinable
    func rotatedRight(by count: Int) -> UInt64 {
        let n = UInt64(count & 63)
        return n == 0 ? self : (self >> n) | (self << (64 - n))
    }
}

/// Converts wall-clock milliseconds to wheel ticks and back, rounding deadlines up so a timer
/// never fires before its time.
public struct WheelClock: Sendable, Equatable {
    public var originMillis: Int64
    public var tickMillis: Int64

    public init(originMillis: Int64, tickMillis: Int64) {
        precondition(tickMillis > 0, "a tick must be at least 1 ms")
        self.originMillis = originMillis
        self.tickMillis = tickMillis
    }

    /// The first tick at or after `millis` (0 for times before the origin).
    public func deadlineTick(forMillis millis: Int64) -> UInt64 {
        let offset = millis - originMillis
        guard offset > 0 else { return 0 }
        return UInt64((offset + tickMillis - 1) / tickMillis)
    }

    /// The tick `millis` falls in (time elapsed, rounded down).
    public func elapsedTick(atMillis millis: Int64) -> UInt64 {
        let offset = millis - originMillis
        return offset > 0 ? UInt64(offset / tickMillis) : 0
    }

    public func millis(atTick tick: UInt64) -> Int64 {
        originMillis + Int64(tick) * tickMillis
    }
}

extension TimerWheel.Expired: Sendable where Payload: Sendable {}
