/// Tables a node keeps per user or per address, bounded so that what keeps them small costs
/// O(1) an operation amortised: the whole table scanned or copied at each one, once full, was
/// the cost that grew with what the node had seen (#26).
extension Dictionary {
    /// Keeps a limiter's table of addresses within `limit`: past it, the entries `isIdle` says
    /// hold nothing are dropped, then as many as needed of those `isUnlimited` says do not limit
    /// their address now, then arbitrary ones, down to three quarters of `limit`: the next sweep
    /// is a quarter of `limit` new addresses away, O(1) an address amortised. (Swept back to
    /// `limit` exactly, a flood of new addresses, what the limiters are for, paid a copy of the
    /// whole table under the limiter's lock at each one, #26; and an address held back now is
    /// the last to be forgotten.)
    mutating func sweep(over limit: Int, dropping isIdle: (Value) -> Bool, thenDropping isUnlimited: (Value) -> Bool) {
        guard count > limit else { return }
        let keep = limit - limit / 4
        self = filter { !isIdle($0.value) }
        var excess = count - keep
        if excess > 0 {
            self = filter { entry in
                guard excess > 0, isUnlimited(entry.value) else { return true }
                excess -= 1
                return false
            }
        }
        if count > keep { self = Dictionary(uniqueKeysWithValues: prefix(keep).map { ($0.key, $0.value) }) }
    }

    /// Keeps the `count` entries newest by `time`, forgetting the rest at once: called past a
    /// capacity with half of it, the next call is half the capacity of new keys away.
    mutating func keepNewest(_ count: Int, by time: (Value) -> some Comparable) {
        let newest = sorted { time($0.value) > time($1.value) }.prefix(count)
        self = Dictionary(uniqueKeysWithValues: newest.map { ($0.key, $0.value) })
    }
}
