/// Full-text search over a user's words (`GET /v1/search`): how text splits into terms, what a
/// query asks for, and the snippet shown with a hit. Every store matches whole terms, all of
/// them, case-insensitively and diacritics kept: the rule of SQLite FTS5's tokenizer
/// `unicode61 remove_diacritics 0` (a term is a run of letters, digits and private-use
/// characters), which the MongoDB store's term lists follow by calling `SearchText.terms`.
public enum SearchText {
    /// Terms longer than this (in bytes) are cut to it: they are still found by their first
    /// bytes, and one long run of letters cannot grow an index entry without bound.
    public static let maxTermBytes = 64
    /// Distinct terms a query may name; more is refused (`SearchQuery.parse`).
    public static let maxQueryTerms = 8
    /// Distinct terms indexed of one text (a store's term list); the rest of a very long
    /// message is not searchable by a term it has not used before that point.
    public static let maxIndexedTerms = 4_096

    /// Whether a scalar belongs to a term: FTS5 unicode61's default categories `L* N* Co`.
    @inline(__always)
    static func isTermScalar(_ s: Unicode.Scalar) -> Bool {
        if s.isASCII {
            let v = s.value
            return (v >= 0x30 && v <= 0x39) || (v >= 0x41 && v <= 0x5A) || (v >= 0x61 && v <= 0x7A)
        }
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter,
            .decimalNumber, .letterNumber, .otherNumber, .privateUse:
            return true
        default:
            return false
        }
    }

    /// The text's terms in order with their scalar ranges, lowercased and cut to `maxTermBytes`.
    static func tokens(_ text: String) -> [(term: String, range: Range<String.Index>)] {
        var out: [(String, Range<String.Index>)] = []
        let scalars = text.unicodeScalars
        var i = scalars.startIndex
        while i < scalars.endIndex {
            guard isTermScalar(scalars[i]) else {
                i = scalars.index(after: i)
                continue
            }
            let start = i
            while i < scalars.endIndex, isTermScalar(scalars[i]) { i = scalars.index(after: i) }
            out.append((normalized(String(scalars[start..<i])), start..<i))
        }
        return out
    }

    static func normalized(_ term: String) -> String {
        let lower = term.lowercased()
        guard lower.utf8.count > maxTermBytes else { return lower }
        var cut = ""
        for scalar in lower.unicodeScalars {
            guard cut.utf8.count + String(scalar).utf8.count <= maxTermBytes else { break }
            cut.unicodeScalars.append(scalar)
        }
        return cut
    }

    /// The distinct terms of `text`, sorted, at most `maxIndexedTerms` (the first ones used).
    public static func terms(_ text: String) -> [String] {
        var seen = Set<String>()
        for token in tokens(text) where seen.count < maxIndexedTerms { seen.insert(token.term) }
        return seen.sorted()
    }
}

/// A parsed search request: the distinct terms every hit must contain.
public struct SearchQuery: Sendable, Equatable {
    public var terms: [String]

    public init(terms: [String]) { self.terms = terms }

    /// Nil when `text` names no term; throws when it names more than `maxQueryTerms`.
    public static func parse(_ text: String) throws(ValidationError) -> SearchQuery? {
        var terms: [String] = []
        for token in SearchText.tokens(text) where !terms.contains(token.term) { terms.append(token.term) }
        guard !terms.isEmpty else { return nil }
        guard terms.count <= SearchText.maxQueryTerms else {
            throw ValidationError("a search names at most \(SearchText.maxQueryTerms) words; this one names \(terms.count)")
        }
        return SearchQuery(terms: terms)
    }

    /// The FTS5 query: each term as a quoted string (terms hold no quote), all of them required.
    public var ftsExpression: String { terms.map { "\"\($0)\"" }.joined(separator: " ") }

    /// Whether `text` holds every term (a store that over-fetches checks its candidates).
    public func matches(_ text: String) -> Bool {
        let found = Set(SearchText.tokens(text).map(\.term))
        return terms.allSatisfy(found.contains)
    }
}

/// Where a hit's text shows its match: a window of the text around the first matching term,
/// split into runs, each a match or not, so a client highlights without parsing markup.
public struct SearchSnippet: Sendable, Equatable {
    public struct Run: Sendable, Equatable {
        public var text: String
        public var match: Bool
        public init(_ text: String, match: Bool) {
            self.text = text
            self.match = match
        }
    }

    public var runs: [Run]

    public init(runs: [Run]) { self.runs = runs }

    /// Characters (scalars) of context kept before the first match and in the whole window.
    public static let before = 40
    public static let width = 160

    /// The window of `text` around its first term in `query`, every matching term in it marked;
    /// "…" where the window cuts the text. The start of the text when nothing matches.
    public init(text: String, query: SearchQuery) {
        let wanted = Set(query.terms)
        let tokens = SearchText.tokens(text).filter { wanted.contains($0.term) }
        let scalars = text.unicodeScalars
        var start = scalars.startIndex
        if let first = tokens.first {
            start = scalars.index(first.range.lowerBound, offsetBy: -Self.before, limitedBy: scalars.startIndex) ?? scalars.startIndex
            // Start at a term's first scalar rather than inside a word.
            while start > scalars.startIndex, start < first.range.lowerBound,
                SearchText.isTermScalar(scalars[scalars.index(before: start)])
            {
                start = scalars.index(after: start)
            }
        }
        let end = scalars.index(start, offsetBy: Self.width, limitedBy: scalars.endIndex) ?? scalars.endIndex
        var runs: [Run] = []
        var cursor = start
        for token in tokens where token.range.lowerBound >= start && token.range.lowerBound < end {
            if cursor < token.range.lowerBound { runs.append(Run(String(scalars[cursor..<token.range.lowerBound]), match: false)) }
            let upper = min(token.range.upperBound, end)
            runs.append(Run(String(scalars[token.range.lowerBound..<upper]), match: true))
            cursor = upper
        }
        if cursor < end { runs.append(Run(String(scalars[cursor..<end]), match: false)) }
        if start > scalars.startIndex { runs.insert(Run("…", match: false), at: 0) }
        if end < scalars.endIndex { runs.append(Run("…", match: false)) }
        self.runs = Self.merged(runs)
    }

    /// Neighbouring runs of the same kind as one.
    static func merged(_ runs: [Run]) -> [Run] {
        var out: [Run] = []
        for run in runs where !run.text.isEmpty {
            if let last = out.last, last.match == run.match {
                out[out.count - 1].text += run.text
            } else {
                out.append(run)
            }
        }
        return out
    }

    public var json: JSONValue {
        .array(
            runs.map { run in run.match ? .object([("text", .string(run.text)), ("match", .bool(true))]) : .object([("text", .string(run.text))]) })
    }
}

/// One search result: a message, or a conversation whose title matched.
public struct SearchHit: Sendable, Equatable {
    public enum Kind: String, Sendable { case message, title }
    public var kind: Kind
    /// The message's id, or the conversation's for a title.
    public var id: String
    public var conversation: Conversation
    /// The message (nil for a title hit).
    public var message: Message?

    public init(kind: Kind, id: String, conversation: Conversation, message: Message? = nil) {
        self.kind = kind
        self.id = id
        self.conversation = conversation
        self.message = message
    }

    /// Where the hit sorts, newest first, across kinds: ids start with their kind's prefix and go
    /// on with the creation time, so the part after the first `_` orders messages and
    /// conversations together.
    public var order: Substring { Self.order(of: id) }

    public static func order(of id: String) -> Substring {
        guard let underscore = id.firstIndex(of: "_") else { return Substring(id) }
        return id[id.index(after: underscore)...]
    }

    /// The id `kind` would have at the position of `before` (any hit's id): a store pages each
    /// kind with its own `id < bound`.
    public static func bound(_ before: String?, prefix: IDKind) -> String? {
        before.map { prefix.rawValue + "_" + order(of: $0) }
    }

    /// Hits of every kind, newest first, `limit` at most.
    public static func newestFirst(_ hits: [SearchHit], limit: Int) -> [SearchHit] {
        Array(hits.sorted { $0.order > $1.order }.prefix(limit))
    }
}
