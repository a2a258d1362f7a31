/// A JSON document with object keys kept in insertion order, so what we write is deterministic.
/// Parsing is `JSONParser`'s; writing is our own, allocation-light serializer.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): return true
        case let (.bool(a), .bool(b)): return a == b
        case let (.int(a), .int(b)): return a == b
        case let (.double(a), .double(b)): return a == b
        case let (.int(a), .double(b)), let (.double(b), .int(a)): return Double(a) == b
        case let (.string(a), .string(b)): return a == b
        case let (.array(a), .array(b)): return a == b
        case let (.object(a), .object(b)):
            return a.count == b.count && a.allSatisfy { key, value in b.first { $0.0 == key }?.1 == value }
        default: return false
        }
    }

    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }
    /// An integer, also when written as an integral floating-point number.
    public var intValue: Int64? {
        switch self {
        case .int(let i): i
        case .double(let d) where d == d.rounded() && abs(d) < 9e15: Int64(d)
        default: nil
        }
    }

    public subscript(key: String) -> JSONValue? {
        if case .object(let pairs) = self { return pairs.first { $0.0 == key }?.1 }
        return nil
    }

    public var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "boolean"
        case .int, .double: "number"
        case .string: "string"
        case .array: "array"
        case .object: "object"
        }
    }

    /// Parses UTF-8 JSON text (RFC 8259, strictly: see `JSONParser`); with a `shape`, builds only
    /// the members it names (the text is checked whole all the same, with the same errors).
    /// `refusingRepeatedKeys`: an object naming a member twice is an error, where it otherwise
    /// keeps the first value (a JOSE header, RFC 7515 4, a request body or a client frame: two
    /// readers of one text must not disagree on what it says). `stoppingAt`: a top-level object
    /// is read up to its member of that key, and what follows is neither read nor checked (for
    /// text this program wrote itself: a stored profile's card fields, megabytes, come last).
    public static func parse<Bytes: Sequence>(
        _ bytes: Bytes, keeping shape: JSONShape = .everything, refusingRepeatedKeys: Bool = false, stoppingAt stop: String? = nil
    ) throws(JSONSyntaxError) -> JSONValue where Bytes.Element == UInt8 {
        if let parsed = bytes.withContiguousStorageIfAvailable({ buffer in
            Result { () throws(JSONSyntaxError) in
                try JSONParser.parse(buffer, keeping: shape, refusingRepeatedKeys: refusingRepeatedKeys, stoppingAt: stop)
            }
        }) {
            return try parsed.get()
        }
        return try Array(bytes).withUnsafeBufferPointer { buffer throws(JSONSyntaxError) in
            try JSONParser.parse(buffer, keeping: shape, refusingRepeatedKeys: refusingRepeatedKeys, stoppingAt: stop)
        }
    }

    public func serialized() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(128)
        write(to: &out)
        return out
    }

    public func serializedString() -> String {
        String(decoding: serialized(), as: UTF8.self)
    }

    public func write(to out: inout [UInt8]) {
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .int(let i): out.append(contentsOf: String(i).utf8)
        case .double(let d):
            if d.isFinite {
                if d == d.rounded(), abs(d) < 1e15 {
                    out.append(contentsOf: String(Int64(d)).utf8)
                } else {
                    out.append(contentsOf: "\(d)".utf8)
                }
            } else {
                out.append(contentsOf: "null".utf8)
            }
        case .string(let s): JSONString.append(s, to: &out)
        case .array(let items):
            out.append(UInt8(ascii: "["))
            for (i, item) in items.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                item.write(to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let pairs):
            out.append(UInt8(ascii: "{"))
            for (i, (key, value)) in pairs.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                JSONString.append(key, to: &out)
                out.append(UInt8(ascii: ":"))
                value.write(to: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }
}

/// JSON string escaping per RFC 8259, writing straight into a byte array.
public enum JSONString {
    private static let hex = Array("0123456789abcdef".utf8)

    public static func append(_ string: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for byte in string.utf8 {
            switch byte {
            case UInt8(ascii: "\""):
                out.append(UInt8(ascii: "\\"))
                out.append(byte)
            case UInt8(ascii: "\\"):
                out.append(UInt8(ascii: "\\"))
                out.append(byte)
            case 0x0A:
                out.append(UInt8(ascii: "\\"))
                out.append(UInt8(ascii: "n"))
            case 0x0D:
                out.append(UInt8(ascii: "\\"))
                out.append(UInt8(ascii: "r"))
            case 0x09:
                out.append(UInt8(ascii: "\\"))
                out.append(UInt8(ascii: "t"))
            case 0..<0x20:
                out.append(contentsOf: "\\u00".utf8)
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0xF)])
            default: out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

/// Reads typed fields out of a JSON object with error messages a client can act on, and
/// rejects fields it was not asked about so a typo never silently changes the meaning of a request.
public struct JSONObjectReader {
    public let pairs: [(String, JSONValue)]
    private var consumed: Set<String> = []
    /// Prepended to every field name in messages (`profile.`), so a nested object's errors say
    /// where the field is.
    public let prefix: String

    public init(_ value: JSONValue, what: String = "body", prefix: String = "") throws(ValidationError) {
        guard case .object(let pairs) = value else {
            throw ValidationError("\(what) must be a JSON object, not \(value.typeName)")
        }
        self.pairs = pairs
        self.prefix = prefix
    }

    public func has(_ key: String) -> Bool { pairs.contains { $0.0 == key } }

    /// The fields nobody has read yet, in their order.
    public var unread: [(String, JSONValue)] { pairs.filter { !consumed.contains($0.0) } }

    private mutating func raw(_ key: String) -> JSONValue? {
        consumed.insert(key)
        guard let value = pairs.first(where: { $0.0 == key })?.1 else { return nil }
        if case .null = value { return nil }
        return value
    }

    /// Any value under `key` (nil when absent or null).
    public mutating func value(_ key: String) throws(ValidationError) -> JSONValue? {
        raw(key)
    }

    public mutating func string(_ key: String) throws(ValidationError) -> String? {
        guard let value = raw(key) else { return nil }
        guard case .string(let s) = value else { throw ValidationError("'\(prefix)\(key)' must be a string, not \(value.typeName)") }
        return s
    }

    public mutating func requiredString(_ key: String) throws(ValidationError) -> String {
        guard let s = try string(key) else { throw ValidationError("missing field '\(prefix)\(key)'") }
        return s
    }

    public mutating func bool(_ key: String) throws(ValidationError) -> Bool? {
        guard let value = raw(key) else { return nil }
        guard case .bool(let b) = value else { throw ValidationError("'\(prefix)\(key)' must be true or false, not \(value.typeName)") }
        return b
    }

    public mutating func int(_ key: String) throws(ValidationError) -> Int64? {
        guard let value = raw(key) else { return nil }
        switch value {
        case .int(let i): return i
        case .double(let d) where d == d.rounded() && abs(d) < 9e15: return Int64(d)
        default: throw ValidationError("'\(prefix)\(key)' must be an integer, not \(value.typeName)")
        }
    }

    public mutating func stringArray(_ key: String) throws(ValidationError) -> [String]? {
        guard let value = raw(key) else { return nil }
        guard case .array(let items) = value else { throw ValidationError("'\(prefix)\(key)' must be an array of strings") }
        var out: [String] = []
        out.reserveCapacity(items.count)
        for (i, item) in items.enumerated() {
            guard case .string(let s) = item else { throw ValidationError("'\(prefix)\(key)[\(i)]' must be a string, not \(item.typeName)") }
            out.append(s)
        }
        return out
    }

    public mutating func intMap(_ key: String) throws(ValidationError) -> [String: Int64]? {
        guard let value = raw(key) else { return nil }
        guard case .object(let pairs) = value else { throw ValidationError("'\(prefix)\(key)' must be an object") }
        var out: [String: Int64] = [:]
        for (name, v) in pairs {
            switch v {
            case .int(let i): out[name] = i
            case .double(let d) where d == d.rounded() && abs(d) < 9e15: out[name] = Int64(d)
            default: throw ValidationError("'\(prefix)\(key).\(name)' must be an integer, not \(v.typeName)")
            }
        }
        return out
    }

    /// Throws when the object holds a field nobody read.
    public func rejectUnknown() throws(ValidationError) {
        if let unknown = pairs.first(where: { !consumed.contains($0.0) }) {
            throw ValidationError("unknown field '\(prefix)\(unknown.0)'")
        }
    }
}

/// A request that cannot be served as sent; its message is safe to show the client.
public struct ValidationError: Error, Equatable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
}
