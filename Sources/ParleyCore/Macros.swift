/// A card's curly-braced macros (Character Card V3's "CBS"), found in any case: `{{char}}`,
/// `{{user}}`, `{{persona}}` (SillyTavern's: the user's persona), `{{original}}` (nothing: Parley
/// has no text a card's prompt replaces), `{{random:A,B}}` (one of them, each time; `\,` is a
/// comma; SillyTavern's `{{random::A::B}}` too), `{{pick:A,B}}` (one of them, the same each time
/// for one clone), `{{roll:N}}` / `{{roll:dN}}` (1 to N), `{{reverse:A}}`, and `{{// A}}`,
/// `{{comment: A}}`, `{{hidden_key:A}}` (nothing: Parley's lore is not scanned recursively).
/// Macros nest (`{{random:Hi {{user}},Hello}}`); one it does not know stays as written.
struct Macros {
    var char: String
    var user: String
    var persona: String
    /// What `{{pick}}` is stable for (the clone's id).
    var seed: String
    /// `{{pick}}`s seen so far: the n-th of a text picks by its place too.
    private var picks = 0

    init(char: String, user: String, persona: String, seed: String) {
        self.char = char
        self.user = user
        self.persona = persona
        self.seed = seed
    }

    /// Nesting deeper than this is left as written.
    static let maxDepth = 8
    /// The largest `{{roll}}`.
    static let maxRoll: Int64 = 1_000_000_000

    mutating func expand(_ text: String) -> String { expand(text[...], depth: 0) }

    private mutating func expand(_ text: Substring, depth: Int) -> String {
        let bytes = text.utf8
        var out = ""
        var copied = text.startIndex
        var i = text.startIndex
        while let open = Self.find(UInt8(ascii: "{"), in: bytes, from: i) {
            // The `}}` that closes it, past the macros nested in it; none: the rest is text.
            var level = 1
            var j = bytes.index(open, offsetBy: 2)
            var close: String.Index?
            while j < bytes.endIndex, bytes.index(after: j) < bytes.endIndex {
                let pair = (bytes[j], bytes[bytes.index(after: j)])
                if pair == (UInt8(ascii: "{"), UInt8(ascii: "{")) {
                    level += 1
                    j = bytes.index(j, offsetBy: 2)
                } else if pair == (UInt8(ascii: "}"), UInt8(ascii: "}")) {
                    level -= 1
                    if level == 0 {
                        close = j
                        break
                    }
                    j = bytes.index(j, offsetBy: 2)
                } else {
                    j = bytes.index(after: j)
                }
            }
            guard let close else { break }
            let inner = text[bytes.index(open, offsetBy: 2)..<close]
            let body = depth < Self.maxDepth && inner.utf8.contains(UInt8(ascii: "{")) ? expand(inner, depth: depth + 1) : String(inner)
            out += text[copied..<open]
            out += evaluate(body) ?? "{{\(body)}}"
            i = bytes.index(close, offsetBy: 2)
            copied = i
        }
        out += text[copied...]
        return out
    }

    /// The start of the next `{{` from `from`.
    private static func find(_ brace: UInt8, in bytes: Substring.UTF8View, from: String.Index) -> String.Index? {
        var i = from
        while let open = bytes[i...].firstIndex(of: brace) {
            let next = bytes.index(after: open)
            guard next < bytes.endIndex else { return nil }
            if bytes[next] == brace { return open }
            i = next
        }
        return nil
    }

    /// What the macro `body` (between the braces, its own macros expanded) stands for; nil for
    /// one that is not known.
    private mutating func evaluate(_ body: String) -> String? {
        let trimmed = body.trimmedWhitespace
        if trimmed.hasPrefix("//") { return "" }
        guard let colon = trimmed.firstIndex(of: ":") else {
            switch trimmed.lowercased() {
            case "char": return char
            case "user": return user
            case "persona": return persona
            case "original": return ""
            default: return nil
            }
        }
        let argument = trimmed[trimmed.index(after: colon)...]
        switch String(trimmed[..<colon]).trimmedWhitespace.lowercased() {
        case "random":
            let options = Self.options(argument)
            return options.isEmpty ? "" : options.randomElement()!
        case "pick":
            let options = Self.options(argument)
            guard !options.isEmpty else { return "" }
            picks += 1
            return options[Int(Self.fnv1a("\(seed)\u{0}\(picks)\u{0}\(trimmed)") % UInt64(options.count))]
        case "roll":
            var sides = String(argument).trimmedWhitespace[...]
            if sides.first == "d" || sides.first == "D" { sides = sides.dropFirst() }
            guard let n = Int64(sides), (1...Self.maxRoll).contains(n) else { return nil }
            return String(Int64.random(in: 1...n))
        case "reverse": return String(argument.reversed())
        case "comment", "hidden_key": return ""
        default: return nil
        }
    }

    /// `{{random}}`'s choices: split on `::` when the argument begins with `:` (SillyTavern's
    /// `{{random::A::B}}`), else on commas that are not escaped (`\,`); each trimmed.
    static func options(_ argument: Substring) -> [String] {
        if argument.hasPrefix(":") {
            return argument.dropFirst().split(separator: "::", omittingEmptySubsequences: false).map { String($0).trimmedWhitespace }
        }
        var options: [String] = []
        var current = ""
        var escaped = false
        for character in argument {
            if escaped {
                current.append(character == "," ? "," : "\\\(character)")
                escaped = false
            } else if character == "\\" {
                escaped = true
            } else if character == "," {
                options.append(current.trimmedWhitespace)
                current = ""
            } else {
                current.append(character)
            }
        }
        if escaped { current.append("\\") }
        options.append(current.trimmedWhitespace)
        return options == [""] ? [] : options
    }

    /// FNV-1a over the UTF-8 of `text`: the same on every run and node (Swift's `Hasher` is
    /// seeded per process).
    static func fnv1a(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01b3
        }
        return hash
    }
}
