/// Parley's own deterministic tokenizer: used to budget prompts and by the simulated provider.
///
/// A token is one of: a run of up to `maxWordLength` letters or digits, optionally preceded by one
/// space; or any other single character (punctuation, newline, emoji). Splitting is by grapheme
/// cluster, so a token never cuts a character in half, and joining the tokens gives back the text.
/// Real providers report their own counts; this one is close enough (about 4 characters a token
/// on English prose) to keep prompts inside a context budget.
public enum Tokenizer {
    public static let maxWordLength = 8

    public static func tokens(_ text: String) -> [Substring] {
        var out: [Substring] = []
        forEachToken(text) { out.append($0) }
        return out
    }

    public static func count(_ text: String) -> Int {
        var n = 0
        forEachToken(text) { _ in n += 1 }
        return n
    }

    @inline(__always)
    private static func isWordCharacter(_ c: Character) -> Bool {
        c.isLetter || c.isNumber
    }

    public static func forEachToken(_ text: String, _ body: (Substring) -> Void) {
        if text.utf8.allSatisfy({ $0 < 0x80 }) {
            forEachASCIIToken(text, body)
        } else {
            forEachTokenByCharacter(text, body)
        }
    }

    /// The same tokens for ASCII text, found on its bytes: each byte is a character there, but
    /// for "\r\n", which is one (a grapheme cluster), as in `forEachTokenByCharacter`.
    static func forEachASCIIToken(_ text: String, _ body: (Substring) -> Void) {
        @inline(__always) func isWord(_ b: UInt8) -> Bool {
            (b &- 0x30) < 10 || ((b | 0x20) &- 0x61) < 26
        }
        let utf8 = text.utf8
        var i = utf8.startIndex
        let end = utf8.endIndex
        while i < end {
            let start = i
            var b = utf8[i]
            if b == 0x20 {
                let next = utf8.index(after: i)
                if next < end, isWord(utf8[next]) {
                    i = next
                    b = utf8[i]
                }
            }
            if isWord(b) {
                var length = 0
                while i < end, length < maxWordLength, isWord(utf8[i]) {
                    i = utf8.index(after: i)
                    length += 1
                }
            } else {
                i = utf8.index(after: i)
                if b == 0x0D, i < end, utf8[i] == 0x0A { i = utf8.index(after: i) }
            }
            body(text[start..<i])
        }
    }

    static func forEachTokenByCharacter(_ text: String, _ body: (Substring) -> Void) {
        var i = text.startIndex
        let end = text.endIndex
        while i < end {
            let start = i
            var c = text[i]
            if c == " " {
                let next = text.index(after: i)
                if next < end, isWordCharacter(text[next]) {
                    i = next
                    c = text[i]
                }
            }
            if isWordCharacter(c) {
                var length = 0
                while i < end, length < maxWordLength, isWordCharacter(text[i]) {
                    i = text.index(after: i)
                    length += 1
                }
            } else {
                i = text.index(after: i)
            }
            body(text[start..<i])
        }
    }
}
