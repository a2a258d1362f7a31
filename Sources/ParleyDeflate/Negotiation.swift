/// The server's side of permessage-deflate (RFC 7692): what it is willing to use.
public struct DeflateSettings: Sendable, Equatable {
    /// The largest LZ77 window the server compresses with, as a power of two (9...15). Smaller
    /// costs each socket less memory and a little ratio; zlib cannot do 8 for raw deflate.
    public var windowBits: Int
    /// zlib's compression level, 1...9.
    public var level: Int

    public static let windowBitsRange = 9...15

    public init(windowBits: Int = 12, level: Int = 6) {
        self.windowBits = windowBits
        self.level = level
    }
}

/// What one socket agreed to: how the server compresses, and the response header that says so.
public struct DeflateAgreement: Sendable, Equatable {
    /// The window the server's compressor uses.
    public var serverWindowBits: Int
    /// The client asked the server to start each message from an empty window.
    public var serverNoContextTakeover: Bool
    public var level: Int

    public init(serverWindowBits: Int, serverNoContextTakeover: Bool, level: Int) {
        self.serverWindowBits = serverWindowBits
        self.serverNoContextTakeover = serverNoContextTakeover
        self.level = level
    }

    /// The `Sec-WebSocket-Extensions` value of the 101 response. It always asks the client not to
    /// take over its context (section 7.1.1.2 lets a server do so unasked): then each inbound
    /// message decompresses on its own and a socket holds no inflater between messages.
    public var responseHeader: String {
        var parts = ["permessage-deflate"]
        if serverNoContextTakeover { parts.append("server_no_context_takeover") }
        parts.append("client_no_context_takeover")
        if serverWindowBits < 15 { parts.append("server_max_window_bits=\(serverWindowBits)") }
        return parts.joined(separator: "; ")
    }
}

/// Negotiation of permessage-deflate from a client's `Sec-WebSocket-Extensions` offers.
public enum PerMessageDeflate {
    public static let name = "permessage-deflate"

    /// The agreement for the first acceptable permessage-deflate offer among `headerValues`
    /// (every `Sec-WebSocket-Extensions` line of the request, in order); nil when there is none.
    /// An offer is declined, per section 7.1, if it has an unknown or repeated parameter, a value
    /// where none belongs or a bad one, or a server window below what zlib supports (9 bits).
    public static func negotiate(offers headerValues: [String], settings: DeflateSettings) -> DeflateAgreement? {
        for offer in ExtensionHeader.parse(headerValues.joined(separator: ",")) where offer.name == name {
            if let agreement = accept(offer.parameters, settings: settings) { return agreement }
        }
        return nil
    }

    private static func accept(_ parameters: [(name: String, value: String?)], settings: DeflateSettings) -> DeflateAgreement? {
        var seen: Set<String> = []
        var agreement = DeflateAgreement(serverWindowBits: settings.windowBits, serverNoContextTakeover: false, level: settings.level)
        for (name, value) in parameters {
            guard seen.insert(name).inserted else { return nil }
            switch name {
            case "server_no_context_takeover":
                guard value == nil else { return nil }
                agreement.serverNoContextTakeover = true
            case "client_no_context_takeover":
                // The response asks for it anyway.
                guard value == nil else { return nil }
            case "server_max_window_bits":
                guard let bits = value.flatMap(windowBits) else { return nil }
                guard bits >= DeflateSettings.windowBitsRange.lowerBound else { return nil }
                agreement.serverWindowBits = min(bits, settings.windowBits)
            case "client_max_window_bits":
                // Optional value; the server decompresses any window, so it need not answer.
                if let value { guard windowBits(value) != nil else { return nil } }
            default:
                return nil
            }
        }
        return agreement
    }

    /// 8...15 written as a plain decimal (no sign, no leading zero).
    private static func windowBits(_ text: String) -> Int? {
        guard let first = text.first, first != "0", text.utf8.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }),
            let bits = Int(text), (8...15).contains(bits)
        else { return nil }
        return bits
    }
}

/// The `Sec-WebSocket-Extensions` grammar (RFC 6455 section 9.1): a comma-separated list of
/// extensions, each a token with `;`-separated parameters whose values are tokens or quoted
/// strings. A malformed element is dropped, not the whole header.
enum ExtensionHeader {
    struct Offer {
        var name: String
        var parameters: [(name: String, value: String?)]
    }

    static func parse(_ header: String) -> [Offer] {
        var offers: [Offer] = []
        for element in split(Array(header.utf8), on: UInt8(ascii: ",")) {
            let pieces = split(element, on: UInt8(ascii: ";"))
            guard let first = pieces.first, let name = token(first) else { continue }
            var parameters: [(name: String, value: String?)] = []
            var valid = true
            for piece in pieces.dropFirst() {
                guard let parameter = parameter(piece) else {
                    valid = false
                    break
                }
                parameters.append(parameter)
            }
            if valid { offers.append(Offer(name: name, parameters: parameters)) }
        }
        return offers
    }

    /// Splits on `separator` outside quoted strings.
    private static func split(_ bytes: [UInt8], on separator: UInt8) -> [[UInt8]] {
        var parts: [[UInt8]] = [[]]
        var quoted = false
        var escaped = false
        for byte in bytes {
            if quoted {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    quoted = false
                }
            } else if byte == UInt8(ascii: "\"") {
                quoted = true
            } else if byte == separator {
                parts.append([])
                continue
            }
            parts[parts.count - 1].append(byte)
        }
        return parts
    }

    private static func parameter(_ bytes: [UInt8]) -> (name: String, value: String?)? {
        guard let equals = bytes.firstIndex(of: UInt8(ascii: "=")) else {
            return token(bytes).map { ($0, nil) }
        }
        guard let name = token(Array(bytes[..<equals])) else { return nil }
        let raw = trimmed(Array(bytes[(equals + 1)...]))
        if raw.first == UInt8(ascii: "\"") {
            guard raw.count >= 2, raw.last == UInt8(ascii: "\"") else { return nil }
            var value: [UInt8] = []
            var escaped = false
            for byte in raw.dropFirst().dropLast() {
                if escaped {
                    value.append(byte)
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else {
                    value.append(byte)
                }
            }
            guard !escaped, let text = token(value) else { return nil }
            return (name, text)
        }
        return token(raw).map { (name, $0) }
    }

    /// An RFC 7230 token after trimming spaces and tabs; nil if empty or not one.
    private static func token(_ bytes: [UInt8]) -> String? {
        let bytes = trimmed(bytes)
        guard !bytes.isEmpty, bytes.allSatisfy(isTokenCharacter) else { return nil }
        return String(decoding: bytes, as: UTF8.self).lowercased()
    }

    private static func trimmed(_ bytes: [UInt8]) -> [UInt8] {
        let space: (UInt8) -> Bool = { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\t") }
        guard let start = bytes.firstIndex(where: { !space($0) }), let end = bytes.lastIndex(where: { !space($0) }) else { return [] }
        return Array(bytes[start...end])
    }

    private static func isTokenCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            true
        default:
            Array("!#$%&'*+-.^_`|~".utf8).contains(byte)
        }
    }
}
