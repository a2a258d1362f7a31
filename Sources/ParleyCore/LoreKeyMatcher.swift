/// Which lorebook keys occur in the recent messages: a key occurs when its UTF-8 bytes are found
/// in one message's bytes (as JavaScript's `includes`, which card tools use, finds code units:
/// inside a word too). A card may bring 1,024 entries of 64 keys and a book scanning the whole
/// history: searching each key through each message held a thread for seconds a reply (10 s for
/// 65,536 keys beside six short messages). The messages' bytes are indexed once instead (which
/// bytes, pairs and triples of bytes occur), so most keys are answered by a few lookups, and a
/// key is searched for only when every triple of its bytes occurs somewhere. What is scanned is
/// the newest `maxScannedBytes` of the messages, and the searches of one matcher read at most
/// `searchBudget` bytes: keys crafted against the messages (every triple there, the key not)
/// then go unmatched rather than holding the thread (natural text spends a small part of it).
public struct LoreKeyMatcher {
    /// The messages, newest last, joined by 0xFF: a byte no UTF-8 text holds, so no key found
    /// runs from one message into the next.
    private let text: [UInt8]
    private var singles = [Bool](repeating: false, count: 256)
    private var pairs = Bits(count: 1 << 16)
    /// A bit per triple of bytes; built only when there are keys enough to pay for its 2 MiB.
    private var triples: Bits?
    /// Bytes the searches may still read.
    private var budget = Self.searchBudget

    /// Most bytes of the recent messages scanned, the newest kept (a prompt holds far fewer).
    public static let maxScannedBytes = 64 * 1024
    /// Keys at which the triples' index pays for itself.
    public static let indexedKeys = 64
    /// Bytes all of one matcher's searches may read (256 searches of the whole 64 KiB).
    public static let searchBudget = 16 * 1024 * 1024

    public init(_ messages: [String], keys: Int) {
        var newestFirst: [ArraySlice<UInt8>] = []
        var scanned = 0
        for message in messages.reversed() where scanned < Self.maxScannedBytes {
            // A cut through a character cannot make a key match: a key starts with a lead byte.
            let kept = Array(message.utf8).suffix(Self.maxScannedBytes - scanned)
            newestFirst.append(kept)
            scanned += kept.count
        }
        var joined: [UInt8] = []
        joined.reserveCapacity(scanned + newestFirst.count)
        for (i, message) in newestFirst.reversed().enumerated() {
            if i > 0 { joined.append(0xFF) }
            joined.append(contentsOf: message)
        }
        text = joined
        triples = keys >= Self.indexedKeys ? Bits(count: 1 << 24) : nil
        for (i, byte) in joined.enumerated() {
            singles[Int(byte)] = true
            guard i + 1 < joined.count else { continue }
            pairs.insert(Self.pair(joined, at: i))
            guard i + 2 < joined.count else { continue }
            triples?.insert(Self.triple(joined, at: i))
        }
    }

    /// Whether `key`'s bytes occur in one of the messages (false once the search budget is spent).
    public mutating func occurs(_ key: String) -> Bool {
        let key = Array(key.utf8)
        switch key.count {
        case 0: return false
        case 1: return singles[Int(key[0])]
        case 2: return pairs.contains(Self.pair(key, at: 0))
        default:
            guard key.count <= text.count else { return false }
            if let triples, !(0..<(key.count - 2)).allSatisfy({ triples.contains(Self.triple(key, at: $0)) }) { return false }
            guard budget >= text.count else { return false }
            budget -= text.count
            return Self.find(key, in: text)
        }
    }

    /// The pair, and the triple, of bytes at `i`, as one number: the index's bit for it.
    private static func pair(_ bytes: [UInt8], at i: Int) -> Int { Int(bytes[i]) << 8 | Int(bytes[i + 1]) }
    private static func triple(_ bytes: [UInt8], at i: Int) -> Int { pair(bytes, at: i) << 8 | Int(bytes[i + 2]) }

    /// A fixed set of small numbers, a bit each.
    private struct Bits {
        private var words: [UInt64]
        init(count: Int) { words = [UInt64](repeating: 0, count: count / 64) }
        mutating func insert(_ n: Int) { words[n >> 6] |= 1 << UInt64(n & 63) }
        func contains(_ n: Int) -> Bool { words[n >> 6] & (1 << UInt64(n & 63)) != 0 }
    }

    /// Knuth-Morris-Pratt: linear in the text and the key, whatever bytes they repeat (a key
    /// crafted against the messages cannot make it quadratic).
    static func find(_ key: [UInt8], in text: [UInt8]) -> Bool {
        guard !key.isEmpty else { return true }
        var fallback = [Int](repeating: 0, count: key.count)
        var k = 0
        for i in 1..<key.count {
            while k > 0, key[i] != key[k] { k = fallback[k - 1] }
            if key[i] == key[k] { k += 1 }
            fallback[i] = k
        }
        var matched = 0
        for byte in text {
            while matched > 0, byte != key[matched] { matched = fallback[matched - 1] }
            if byte == key[matched] { matched += 1 }
            if matched == key.count { return true }
        }
        return false
    }
}
