import Synchronization

/// Generates identifiers that sort by creation time: a prefix, 10 Crockford-base32 characters of
/// milliseconds since the epoch and 16 of a monotonic counter seeded at random each millisecond.
/// Sortable ids let every store paginate with `id < before` and need no separate sequence column.
///
/// The counter is guessable from a neighbouring id. Ids that grant access (`IDKind.isCapability`:
/// room ids, a link room's capability to join) add 26 characters (130 bits) from the system
/// CSPRNG after it, so they still sort in creation order. Request ids, which unauthenticated
/// callers see, take those 130 bits in place of the counter: they reveal nothing of other ids.
public final class IDGenerator: Sendable {
    private struct State {
        var lastMillis: UInt64 = 0
        var counter: UInt64 = 0
    }

    private static let alphabet = Array("0123456789ABCDEFGHJKMNPQRSTVWXYZ".utf8)
    private let state = Mutex(State())
    private let clock: @Sendable () -> UInt64

    public init(clock: @escaping @Sendable () -> UInt64 = { Timestamp.nowMillis() }) {
        self.clock = clock
    }

    /// A new id, e.g. `cl_01JD3V6Q2M0000000000000ABC`.
    public func make(_ kind: IDKind) -> String {
        if kind == .request { return Self.withRandom(kind.rawValue + "_" + Self.encode(millis: clock())) }
        let (millis, counter) = state.withLock { s -> (UInt64, UInt64) in
            let now = clock()
            if now > s.lastMillis {
                s.lastMillis = now
                // Keep the top bits clear so the counter cannot overflow within a millisecond.
                s.counter = UInt64.random(in: 0..<(1 << 60))
            } else {
                s.counter &+= 1
            }
            return (s.lastMillis, s.counter)
        }
        var out = [UInt8]()
        out.reserveCapacity(kind.rawValue.utf8.count + 1 + 26)
        out.append(contentsOf: kind.rawValue.utf8)
        out.append(UInt8(ascii: "_"))
        for shift in stride(from: 45, through: 0, by: -5) {
            out.append(Self.alphabet[Int((millis >> UInt64(shift)) & 31)])
        }
        for shift in stride(from: 75, through: 0, by: -5) {
            let value = shift >= 64 ? 0 : (counter >> UInt64(shift)) & 31
            out.append(Self.alphabet[Int(value)])
        }
        let id = String(decoding: out, as: UTF8.self)
        return kind.isCapability ? Self.withRandom(id) : id
    }

    private static func encode(millis: UInt64) -> String {
        String(decoding: stride(from: 45, through: 0, by: -5).map { alphabet[Int((millis >> UInt64($0)) & 31)] }, as: UTF8.self)
    }

    /// `id` followed by `randomCharacters` characters from the system CSPRNG (getrandom(2) on Linux).
    private static func withRandom(_ id: String) -> String {
        var random = SystemRandomNumberGenerator()
        return id + String(decoding: (0..<randomCharacters).map { _ in alphabet[Int(random.next() & 31)] }, as: UTF8.self)
    }

    /// Characters of randomness in an unguessable id: 26 × 5 = 130 bits.
    public static let randomCharacters = 26

    /// Whether `id` has the shape this generator makes for `kind` (used to reject junk early).
    /// Room ids made before they carried randomness had the counter's shape and stay valid.
    public static func isValid(_ id: String, kind: IDKind) -> Bool {
        let prefix = kind.rawValue + "_"
        guard id.hasPrefix(prefix) else { return false }
        let body = id.utf8.dropFirst(prefix.utf8.count)
        let lengths = kind.isCapability ? [26, 26 + randomCharacters] : kind == .request ? [10 + randomCharacters] : [26]
        return lengths.contains(body.count) && body.allSatisfy { alphabet.contains($0) }
    }
}

public enum IDKind: String, Sendable {
    case clone = "cl"
    case conversation = "cv"
    case message = "msg"
    case stream = "st"
    case connection = "conn"
    case schedule = "sch"
    case room = "rm"
    case roomEntry = "re"
    case audit = "au"
    case request = "req"
    case payment = "pay"
    case webhook = "wh"
    /// A voice message transcribed (#29): its ledger entry is `stt:<id>`.
    case transcription = "tr"
    /// A voiced reply's audio kept for its owner (#29).
    case voiceClip = "vc"

    /// Ids that grant access to whoever holds them: they must not be guessable from any other id.
    public var isCapability: Bool { self == .room }
}

public enum Timestamp {
    /// A duration in whole milliseconds (truncated), to add to or subtract from Unix ms.
    public static func millis(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return seconds * 1_000 + attoseconds / 1_000_000_000_000_000
    }

    public static func nowMillis() -> UInt64 {
        UInt64(max(0, (Date().timeIntervalSince1970 * 1000).rounded(.down)))
    }

    /// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T20:07:40.123Z`.
    public static func rfc3339(millis: Int64) -> String {
        let ms = Int(((millis % 1000) + 1000) % 1000)
        let seconds = (millis - Int64(ms)) / 1000
        var days = Int(seconds / 86_400)
        var rem = Int(seconds % 86_400)
        if rem < 0 {
            rem += 86_400
            days -= 1
        }
        let (year, month, day) = CivilDate.from(days: days)
        func pad(_ v: Int, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(year, 4))-\(pad(month, 2))-\(pad(day, 2))T\(pad(rem / 3600, 2)):\(pad(rem % 3600 / 60, 2)):\(pad(rem % 60, 2)).\(pad(ms, 3))Z"
    }
}
