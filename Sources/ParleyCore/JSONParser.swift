/// A malformed JSON text: what was wrong and at which byte.
public struct JSONSyntaxError: Error, Equatable, CustomStringConvertible {
    public let offset: Int
    public let reason: String

    public var description: String { "invalid JSON at byte \(offset): \(reason)" }
    /// What is wrong and where, as an error message ends: "unexpected character at byte 7".
    public var explanation: String { "\(reason) at byte \(offset)" }
}

/// Which parts of a JSON text to build (`JSONValue.parse(_:keeping:)`); the rest are checked as
/// strictly and skipped without being built. A provider's stream chunk needs three of its dozen
/// values: building the others was most of what parsing it cost (#26).
public indirect enum JSONShape: Sendable {
    /// The value, whole.
    case everything
    /// Of an object, only these members, each kept as its shape says; of an array, each element
    /// so; a scalar is kept as it is.
    case members([(String, JSONShape)])

    /// How an object's member `key` is kept; nil when it is skipped.
    func member(_ key: String) -> JSONShape? {
        switch self {
        case .everything: .everything
        case .members(let wanted): wanted.first { $0.0 == key }?.1
        }
    }
}

/// A strict RFC 8259 parser into `JSONValue`, over contiguous bytes in one pass.
///
/// It replaced Foundation's `JSONDecoder` (which guessed each value's type through a cascade of
/// `try?` decodes, building an error per failed guess): every client frame, REST body and provider
/// stream chunk is parsed here. Same answers as the decoder: integers that fit `Int64` are `.int`,
/// other numbers `.double` (non-finite ones are refused); strings must be valid UTF-8 with no raw
/// control characters, `\u` escapes must pair their surrogates; nesting stops at 512 levels; a
/// repeated object key keeps its first value (or is refused, when asked); a leading byte order mark
/// is skipped. One difference: trailing commas (`[1,]`), which the decoder let through, are
/// refused, as RFC 8259 says.
struct JSONParser: ~Copyable {
    static let maxDepth = 512

    private let bytes: UnsafeBufferPointer<UInt8>
    private var index = 0
    private var depth = 0
    /// A repeated object key is an error rather than ignored (a JOSE header, a request, a frame).
    private let refusesRepeatedKeys: Bool

    private init(_ bytes: UnsafeBufferPointer<UInt8>, refusesRepeatedKeys: Bool) {
        self.bytes = bytes
        self.refusesRepeatedKeys = refusesRepeatedKeys
    }

    static func parse(
        _ bytes: UnsafeBufferPointer<UInt8>, keeping shape: JSONShape = .everything, refusingRepeatedKeys: Bool = false,
        stoppingAt stop: String? = nil
    ) throws(JSONSyntaxError) -> JSONValue {
        var parser = JSONParser(bytes, refusesRepeatedKeys: refusingRepeatedKeys)
        if bytes.count >= 3, bytes[0] == 0xEF, bytes[1] == 0xBB, bytes[2] == 0xBF { parser.index = 3 }
        parser.skipWhitespace()
        if let stop, parser.index < bytes.count, bytes[parser.index] == UInt8(ascii: "{") {
            let (value, stopped) = try parser.object(shape, stoppingAt: stop)
            if stopped { return value }
            parser.skipWhitespace()
            guard parser.index == bytes.count else { throw parser.error("unexpected text after the value") }
            return value
        }
        let value = try parser.value(shape)
        parser.skipWhitespace()
        guard parser.index == bytes.count else { throw parser.error("unexpected text after the value") }
        return value
    }

    private func error(_ reason: String) -> JSONSyntaxError { JSONSyntaxError(offset: index, reason: reason) }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x0A, 0x0D, 0x09: index += 1
            default: return
            }
        }
    }

    private mutating func value(_ shape: JSONShape = .everything) throws(JSONSyntaxError) -> JSONValue {
        guard index < bytes.count else { throw error("unexpected end of input") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return try object(shape)
        case UInt8(ascii: "["): return try array(shape)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): return try literal("true", .bool(true))
        case UInt8(ascii: "f"): return try literal("false", .bool(false))
        case UInt8(ascii: "n"): return try literal("null", .null)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default: throw error("unexpected character")
        }
    }

    private mutating func literal(_ word: StaticString, _ value: JSONValue) throws(JSONSyntaxError) -> JSONValue {
        let count = word.utf8CodeUnitCount
        guard index + count <= bytes.count else { throw error("unexpected end of input") }
        for offset in 0..<count where bytes[index + offset] != word.utf8Start[offset] { throw error("unexpected character") }
        index += count
        return value
    }

    /// Past an opening bracket, one level deeper (the caller goes back up): true when the
    /// container closes at once (`{}`, `[]`), past its closing bracket.
    private mutating func enterIsEmpty(closing bracket: Unicode.Scalar) throws(JSONSyntaxError) -> Bool {
        depth += 1
        guard depth <= Self.maxDepth else { throw error("nested more than \(Self.maxDepth) levels deep") }
        index += 1
        skipWhitespace()
        guard index < bytes.count, bytes[index] == UInt8(ascii: bracket) else { return false }
        index += 1
        return true
    }

    private mutating func object(_ shape: JSONShape) throws(JSONSyntaxError) -> JSONValue {
        try object(shape, stoppingAt: nil).value
    }

    /// An object; with `stop`, only up to its member of that key (`stopped`), what follows unread.
    private mutating func object(_ shape: JSONShape, stoppingAt stop: String?) throws(JSONSyntaxError) -> (value: JSONValue, stopped: Bool) {
        defer { depth -= 1 }
        var pairs: [(String, JSONValue)] = []
        var keys: Set<String> = []
        if try enterIsEmpty(closing: "}") { return (.object(pairs), false) }
        while true {
            try atKey()
            let keyStart = index
            let key = try string()
            if key == stop { return (.object(pairs), true) }
            try pastColon()
            if let kept = shape.member(key) {
                let member = try value(kept)
                if Self.isNew(key, in: pairs, keys: &keys) {
                    pairs.append((key, member))
                } else if refusesRepeatedKeys {
                    throw JSONSyntaxError(offset: keyStart, reason: "the key \(Self.quoted(key)) is repeated")
                }
            } else {
                try skip()
            }
            if try closes(with: "}") { return (.object(pairs), false) }
        }
    }

    /// Whether no member of `pairs` has `key` yet. A small object is scanned; past
    /// `scannedMembers`, `keys` (built then, and given every new key after) answers, so a large
    /// object costs linear time, not quadratic (while every key scanned the ones before it, a 980
    /// KB REST body of 90,000 keys held a thread 12.5 s in a release build; now 0.02 s).
    private static func isNew(_ key: String, in pairs: [(String, JSONValue)], keys: inout Set<String>) -> Bool {
        if pairs.count < scannedMembers { return !pairs.contains { $0.0 == key } }
        if keys.isEmpty { keys = Set(pairs.map(\.0)) }
        return keys.insert(key).inserted
    }

    static let scannedMembers = 16

    /// A key as an error message names it: quoted, and cut at 64 characters (the message goes
    /// back to the client, and into the log).
    private static func quoted(_ key: String) -> String {
        key.count <= 64 ? "\"\(key)\"" : "\"\(key.prefix(64))…\""
    }

    /// At an object's member: its key's opening quote must be here.
    private func atKey() throws(JSONSyntaxError) {
        guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else { throw error("expected a key in quotes") }
    }

    /// After a member's key: past the colon and the whitespace around it.
    private mutating func pastColon() throws(JSONSyntaxError) {
        skipWhitespace()
        guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw error("expected ':' after a key") }
        index += 1
        skipWhitespace()
    }

    private mutating func array(_ shape: JSONShape) throws(JSONSyntaxError) -> JSONValue {
        defer { depth -= 1 }
        var items: [JSONValue] = []
        if try enterIsEmpty(closing: "]") { return .array(items) }
        while true {
            items.append(try value(shape))
            if try closes(with: "]") { return .array(items) }
        }
    }

    /// Checks the value at `index` as `value()` would, with the same errors, without building it.
    private mutating func skip() throws(JSONSyntaxError) {
        guard index < bytes.count else { throw error("unexpected end of input") }
        switch bytes[index] {
        case UInt8(ascii: "{"):
            defer { depth -= 1 }
            if try enterIsEmpty(closing: "}") { return }
            while true {
                try atKey()
                try skipString()
                try pastColon()
                try skip()
                if try closes(with: "}") { return }
            }
        case UInt8(ascii: "["):
            defer { depth -= 1 }
            if try enterIsEmpty(closing: "]") { return }
            while true {
                try skip()
                if try closes(with: "]") { return }
            }
        case UInt8(ascii: "\""): try skipString()
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): try skipNumber()
        default: _ = try value()  // a literal: nothing to allocate
        }
    }

    /// `string()` without the text: plain ASCII is only scanned; an escape or a byte past ASCII
    /// goes through `string()` itself, which checks them.
    private mutating func skipString() throws(JSONSyntaxError) {
        let opening = index
        index += 1
        while index < bytes.count {
            let byte = bytes[index]
            if byte == UInt8(ascii: "\"") {
                index += 1
                return
            }
            if byte == UInt8(ascii: "\\") || byte >= 0x80 {
                index = opening
                _ = try string()
                return
            }
            guard byte >= 0x20 else { throw error("a control character inside a string") }
            index += 1
        }
        throw error("unterminated string")
    }

    /// After a member: true past the closing bracket, false past a comma (another member follows).
    private mutating func closes(with bracket: Unicode.Scalar) throws(JSONSyntaxError) -> Bool {
        skipWhitespace()
        guard index < bytes.count else { throw error("unexpected end of input") }
        switch bytes[index] {
        case UInt8(ascii: ","):
            index += 1
            skipWhitespace()
            return false
        case UInt8(ascii: bracket):
            index += 1
            return true
        default:
            throw error("expected ',' or '\(bracket)'")
        }
    }

    /// A string at `index` (its opening quote); its text unescaped.
    private mutating func string() throws(JSONSyntaxError) -> String {
        index += 1
        let start = index
        // The common case: no escapes, so the bytes are the text; plain ASCII needs no UTF-8 check.
        var highBits: UInt8 = 0
        while index < bytes.count {
            let byte = bytes[index]
            if byte == UInt8(ascii: "\"") {
                let utf8 = UnsafeBufferPointer(rebasing: bytes[start..<index])
                let text = highBits < 0x80 ? String(decoding: utf8, as: UTF8.self) : try validated(utf8, at: start)
                index += 1
                return text
            }
            if byte == UInt8(ascii: "\\") { break }
            guard byte >= 0x20 else { throw error("a control character inside a string") }
            highBits |= byte
            index += 1
        }
        var unescaped = Array(bytes[start..<index])
        while index < bytes.count {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "\""):
                let text = try unescaped.withUnsafeBufferPointer { buffer throws(JSONSyntaxError) in try validated(buffer, at: start) }
                index += 1
                return text
            case UInt8(ascii: "\\"):
                index += 1
                guard index < bytes.count else { throw error("unexpected end of input") }
                let escape = bytes[index]
                index += 1
                switch escape {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): unescaped.append(escape)
                case UInt8(ascii: "b"): unescaped.append(0x08)
                case UInt8(ascii: "f"): unescaped.append(0x0C)
                case UInt8(ascii: "n"): unescaped.append(0x0A)
                case UInt8(ascii: "r"): unescaped.append(0x0D)
                case UInt8(ascii: "t"): unescaped.append(0x09)
                case UInt8(ascii: "u"): try appendEscapedScalar(to: &unescaped)
                default: throw error("an unknown escape")
                }
            default:
                guard byte >= 0x20 else { throw error("a control character inside a string") }
                unescaped.append(byte)
                index += 1
            }
        }
        throw error("unterminated string")
    }

    /// `String(decoding:)` repairs what is not UTF-8, so the bytes are UTF-8 exactly when it
    /// changed none of them. (`String(validating:)` went through an unspecialised generic that
    /// looked up its type metadata on every call: 1% of the provider path's samples, #26.)
    private func validated(_ utf8: UnsafeBufferPointer<UInt8>, at start: Int) throws(JSONSyntaxError) -> String {
        var text = String(decoding: utf8, as: UTF8.self)
        // Compared as two buffers: over `String.UTF8View` the comparison was 1.5% of the provider path.
        let same = text.utf8.count == utf8.count && text.withUTF8 { $0.elementsEqual(utf8) }
        guard same else {
            throw JSONSyntaxError(offset: start, reason: "a string that is not UTF-8")
        }
        return text
    }

    /// `\uXXXX` (its `u` just read), or a surrogate pair of two, appended as UTF-8.
    private mutating func appendEscapedScalar(to out: inout [UInt8]) throws(JSONSyntaxError) {
        var value = try hex4()
        if (0xD800...0xDBFF).contains(value) {
            guard index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                throw error("a high surrogate without its low surrogate")
            }
            index += 2
            let low = try hex4()
            guard (0xDC00...0xDFFF).contains(low) else { throw error("a high surrogate without its low surrogate") }
            value = 0x10000 + ((value - 0xD800) << 10) + (low - 0xDC00)
        } else if (0xDC00...0xDFFF).contains(value) {
            throw error("a low surrogate without its high surrogate")
        }
        out.append(contentsOf: Unicode.UTF8.encode(Unicode.Scalar(value)!)!)
    }

    private mutating func hex4() throws(JSONSyntaxError) -> UInt32 {
        guard index + 4 <= bytes.count else { throw error("unexpected end of input") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error("a \\u escape needs four hex digits")
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    /// -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
    private mutating func number() throws(JSONSyntaxError) -> JSONValue {
        let start = index
        let (negative, digits, integral) = try scanNumber()
        if integral, index - digits <= 18 {
            // 18 digits fit Int64 whatever they are: no overflow to check.
            var value: Int64 = 0
            for offset in digits..<index { value = value &* 10 &+ Int64(bytes[offset] &- UInt8(ascii: "0")) }
            return .int(negative ? -value : value)
        }
        return try converted(from: start, negative: negative, integral: integral)
    }

    /// `number()` without the value: an integer of at most 18 digits, surely in range, is only
    /// scanned (a card's megabytes of numbers that no one reads are not converted).
    private mutating func skipNumber() throws(JSONSyntaxError) {
        let start = index
        let (negative, digits, integral) = try scanNumber()
        if integral, index - digits <= 18 { return }
        _ = try converted(from: start, negative: negative, integral: integral)
    }

    /// Moves past the number at `index`, checking its grammar: whether it has a sign, where its
    /// integer digits begin, and whether it has neither fraction nor exponent.
    private mutating func scanNumber() throws(JSONSyntaxError) -> (negative: Bool, digits: Int, integral: Bool) {
        let negative = bytes[index] == UInt8(ascii: "-")
        if negative { index += 1 }
        guard index < bytes.count, isDigit(bytes[index]) else { throw error("a number needs a digit") }
        let digits = index
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
            if index < bytes.count, isDigit(bytes[index]) { throw error("a number with a leading zero") }
        } else {
            while index < bytes.count, isDigit(bytes[index]) { index += 1 }
        }
        var integral = true
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            integral = false
            index += 1
            guard index < bytes.count, isDigit(bytes[index]) else { throw error("a digit must follow the decimal point") }
            while index < bytes.count, isDigit(bytes[index]) { index += 1 }
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") {
            integral = false
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard index < bytes.count, isDigit(bytes[index]) else { throw error("a digit must follow the exponent") }
            while index < bytes.count, isDigit(bytes[index]) { index += 1 }
        }
        return (negative, digits, integral)
    }

    /// The number just scanned from `start`: `.int` when it is an integer that fits, else a finite `.double`.
    private func converted(from start: Int, negative: Bool, integral: Bool) throws(JSONSyntaxError) -> JSONValue {
        if integral, let value = integer(bytes[start..<index], negative: negative) { return .int(value) }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)
        guard let double = Double(text), double.isFinite else { throw JSONSyntaxError(offset: start, reason: "a number out of range") }
        return .double(double)
    }

    private func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    /// The integer the digits say, nil past `Int64`'s range.
    private func integer(_ text: Slice<UnsafeBufferPointer<UInt8>>, negative: Bool) -> Int64? {
        var value: Int64 = 0
        for byte in text.dropFirst(negative ? 1 : 0) {
            let digit = Int64(byte - UInt8(ascii: "0"))
            let (shifted, overflowA) = value.multipliedReportingOverflow(by: 10)
            let (next, overflowB) = negative ? shifted.subtractingReportingOverflow(digit) : shifted.addingReportingOverflow(digit)
            if overflowA || overflowB { return nil }
            value = next
        }
        return value
    }
}
