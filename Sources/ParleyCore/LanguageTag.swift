/// A BCP 47 language tag (RFC 5646), checked for well-formedness and kept in its canonical
/// case: language lower-case, script title-case, region upper-case (`pt-br` → `pt-BR`).
///
/// Two tags name the same language for a reader when their primary language subtags match
/// (`en-US` and `en-GB`); translations are still made per distinct tag.
public struct LanguageTag: Sendable, Hashable, CustomStringConvertible {
    public let value: String
    /// The primary language subtag (`pt` for `pt-BR`).
    public let language: String

    public var description: String { value }

    /// The language's English name followed by the tag ("French (fr-CA)"), or the tag alone for
    /// a language not in the short list below: prompts name languages this way because a small
    /// model knows "French" far better than "fr".
    public var promptName: String {
        guard let name = Self.englishNames[language] else { return value }
        return "\(name) (\(value))"
    }

    /// English names of widely used languages, by primary subtag (ISO 639-1).
    static let englishNames: [String: String] = [
        "ar": "Arabic", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
        "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French",
        "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
        "ko": "Korean", "ms": "Malay", "nb": "Norwegian", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
        "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil",
        "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
    ]

    /// Longest tag accepted; real tags are far shorter.
    public static let maxLength = 35

    public init?(_ text: String) {
        guard !text.isEmpty, text.utf8.count <= Self.maxLength,
            text.utf8.allSatisfy({ $0 == UInt8(ascii: "-") || Self.isAlphanumeric($0) })
        else { return nil }
        let parts = text.split(separator: "-", omittingEmptySubsequences: false).map { String($0) }
        guard !parts.contains(where: \.isEmpty) else { return nil }
        var out: [String] = []
        var index = 0
        func alpha(_ s: String, _ range: ClosedRange<Int>) -> Bool { range.contains(s.utf8.count) && s.utf8.allSatisfy(Self.isAlpha) }
        func digits(_ s: String, _ count: Int) -> Bool { s.utf8.count == count && s.utf8.allSatisfy(Self.isDigit) }
        func alnum(_ s: String, _ range: ClosedRange<Int>) -> Bool { range.contains(s.utf8.count) }

        // Private-use-only tags (`x-klingon`) have no language to translate into.
        guard alpha(parts[0], 2...3) || alpha(parts[0], 5...8) else { return nil }
        let primary = parts[0].lowercased()
        out.append(primary)
        index = 1
        // extlang: up to three 3-letter subtags after a 2-3 letter language.
        var extlangs = 0
        while index < parts.count, primary.utf8.count <= 3, extlangs < 3, alpha(parts[index], 3...3) {
            out.append(parts[index].lowercased())
            index += 1
            extlangs += 1
        }
        if index < parts.count, alpha(parts[index], 4...4) {
            out.append(parts[index].prefix(1).uppercased() + parts[index].dropFirst().lowercased())
            index += 1
        }
        if index < parts.count, alpha(parts[index], 2...2) || digits(parts[index], 3) {
            out.append(parts[index].uppercased())
            index += 1
        }
        var variants = Set<String>()
        while index < parts.count {
            let p = parts[index]
            let isVariant = alnum(p, 5...8) || (p.utf8.count == 4 && Self.isDigit(p.utf8.first!))
            guard isVariant else { break }
            guard variants.insert(p.lowercased()).inserted else { return nil }  // repeated variant
            out.append(p.lowercased())
            index += 1
        }
        var singletons = Set<String>()
        while index < parts.count, parts[index].utf8.count == 1 {
            let singleton = parts[index].lowercased()
            index += 1
            if singleton == "x" {
                guard index < parts.count else { return nil }
                out.append("x")
                while index < parts.count {
                    guard alnum(parts[index], 1...8) else { return nil }
                    out.append(parts[index].lowercased())
                    index += 1
                }
                break
            }
            guard singletons.insert(singleton).inserted, index < parts.count else { return nil }
            out.append(singleton)
            var count = 0
            while index < parts.count, alnum(parts[index], 2...8) {
                out.append(parts[index].lowercased())
                index += 1
                count += 1
            }
            guard count > 0 else { return nil }
        }
        guard index == parts.count else { return nil }
        value = out.joined(separator: "-")
        language = primary
    }

    /// Whether a reader of `self` reads `other` without translation.
    public func sharesLanguage(with other: LanguageTag) -> Bool { language == other.language }

    private static func isAlpha(_ c: UInt8) -> Bool { (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) }
    private static func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }
    private static func isAlphanumeric(_ c: UInt8) -> Bool { isAlpha(c) || isDigit(c) }
}
