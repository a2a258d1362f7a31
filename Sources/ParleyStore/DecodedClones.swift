import ParleyCore
import Synchronization

/// Clones a `SQLiteStore` read lately, decoded, by id: a reply reads its clone without a trip to
/// the store, and a clone whose profile holds a megabyte of lorebook is not parsed again for
/// each reply (#26: a third of such a reply's CPU). Exact because one process holds the database
/// (the data directory's lock) and every write of a clone goes through its store, which drops
/// the clone once the write is committed. A read that raced a write does not keep what it read:
/// a write moves `generation`, and a decoded clone is kept only if no write ended since its read
/// began. At most `capacity` bytes (a clone counts its stored text twice: the text a profile
/// keeps and what was parsed of it); the least recently used go first.
final class DecodedClones: Sendable {
    struct Entry {
        var clone: Clone
        var bytes: Int
        var used: UInt64
    }

    private struct State {
        var byID: [String: Entry] = [:]
        var bytes = 0
        var generation: UInt64 = 0
        var clock: UInt64 = 0
    }

    let capacity: Int
    private let state = Mutex(State())

    init(capacity: Int) { self.capacity = capacity }

    /// Where writes stand: pass it to `keep` with what a read that began now decoded.
    var generation: UInt64 { state.withLock { $0.generation } }

    /// The clone `id` of `owner`, if decoded lately; nil to read it.
    func clone(id: String, owner: String) -> Clone? {
        state.withLock { state in
            guard let entry = state.byID[id], entry.clone.owner == owner else { return nil }
            state.clock += 1
            state.byID[id]?.used = state.clock
            return entry.clone
        }
    }

    /// Keeps `clone`, read when writes stood at `generation` and `bytes` long as stored, unless a
    /// write ended since or it is too big to keep.
    func keep(_ clone: Clone, bytes: Int, readAt generation: UInt64) {
        let bytes = 2 * bytes + 256
        guard bytes <= capacity / 4 else { return }
        state.withLock { state in
            guard state.generation == generation else { return }
            state.clock += 1
            if let old = state.byID.updateValue(Entry(clone: clone, bytes: bytes, used: state.clock), forKey: clone.id) {
                state.bytes -= old.bytes
            }
            state.bytes += bytes
            guard state.bytes > capacity else { return }
            // Over: the most recently used half of the capacity stays (a sort per half-capacity of
            // new bytes, not per clone).
            var kept = 0
            for entry in state.byID.values.sorted(by: { $0.used > $1.used }) {
                if kept + entry.bytes > capacity / 2 {
                    state.byID[entry.clone.id] = nil
                } else {
                    kept += entry.bytes
                }
            }
            state.bytes = kept
        }
    }

    /// A write of the clones `ids` (nil: any of `owner`'s, or with no owner every one) ended.
    func written(ids: [String] = [], owner: String? = nil) {
        state.withLock { state in
            state.generation += 1
            if ids.isEmpty {
                for (id, entry) in state.byID where owner == nil || entry.clone.owner == owner {
                    state.byID[id] = nil
                    state.bytes -= entry.bytes
                }
            } else {
                for id in ids {
                    if let old = state.byID.removeValue(forKey: id) { state.bytes -= old.bytes }
                }
            }
        }
    }

    /// How many clones are kept, for tests.
    var count: Int { state.withLock { $0.byID.count } }
}
