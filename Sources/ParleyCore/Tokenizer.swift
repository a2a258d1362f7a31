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
        split(text, text.utf8, isWord: { ($0 &- 0x30) < 10 || (($0 | 0x20) &- 0x61) < 26 }, space: 0x20, body: body) { utf8, i in
            let next = utf8.index(after: i)
            return utf8[i] == 0x0D && next < utf8.endIndex && utf8[next] == 0x0A ? utf8.index(after: next) : next
        }
    }

    static func forEachTokenByCharacter(_ text: String, _ body: (Substring) -> Void) {
        split(text, text, isWord: { $0.isLetter || $0.isNumber }, space: " ", body: body) { text, i in text.index(after: i) }
    }

    /// The tokens of `text`, read as the elements of `view` (its characters, or its bytes when
    /// they are all ASCII); `afterCharacter` steps over one character that is not a word's.
    @inline(__always)
    private static func split<View: Collection>(
        _ text: String, _ view: View, isWord: (View.Element) -> Bool, space: View.Element, body: (Substring) -> Void,
        afterCharacter: (View, View.Index) -> View.Index
    ) where View.Index == String.Index, View.Element: Equatable {
        var i = view.startIndex
        let end = view.endIndex
        while i < end {
            let start = i
            var c = view[i]
            if c == space {
                let next = view.index(after: i)
                if next < end, isWord(view[next]) {
                    i = next
                    c = view[i]
                }
            }
            if isWord(c) {
                var length = 0
                while i < end, length < maxWordLength, isWord(view[i]) {
                    i = view.index(after: i)
                    length += 1
                }
            } else {
                i = afterCharacter(view, i)
            }
            body(text[start..<i])
        }
    }
}
