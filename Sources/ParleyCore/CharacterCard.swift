/// A lorebook entry (a Character Card's `character_book.entries[]`): text that enters the prompt
/// when one of its keys appears in the recent conversation.
public struct LoreEntry: Sendable, Equatable {
    public var keys: [String] { didSet { searchKeys = Self.searchKeys(keys) } }
    /// `keys` as a prompt looks for them: trimmed, the blank ones left out, as written and
    /// lowercased (for an entry that is not case-sensitive). Made once per entry, not per reply:
    /// a big book's 65,536 keys took a sixth of its reply's CPU to trim and lowercase (#26).
    public private(set) var searchKeys: (exact: [String], folded: [String])
    public var content: String
    public var enabled: Bool
    /// Lower comes first in the prompt.
    public var insertionOrder: Int
    /// When over the token budget, the lowest priority is dropped first (absent counts as 0).
    public var priority: Int?
    /// Always inserted, whatever the conversation says.
    public var constant: Bool?
    public var caseSensitive: Bool?
    /// Every other field the entry carried (name, comment, secondary_keys, extensions…), kept
    /// verbatim so an export gives back what came in.
    public var extra: [(String, JSONValue)]

    public init(
        keys: [String], content: String, enabled: Bool = true, insertionOrder: Int = 0, priority: Int? = nil,
        constant: Bool? = nil, caseSensitive: Bool? = nil, extra: [(String, JSONValue)] = []
    ) {
        self.keys = keys
        searchKeys = Self.searchKeys(keys)
        self.content = content
        self.enabled = enabled
        self.insertionOrder = insertionOrder
        self.priority = priority
        self.constant = constant
        self.caseSensitive = caseSensitive
        self.extra = extra
    }

    static func searchKeys(_ keys: [String]) -> (exact: [String], folded: [String]) {
        let exact = keys.map(\.trimmedWhitespace).filter { !$0.isEmpty }
        return (exact, exact.map { $0.lowercased() })
    }

    /// The content as a prompt takes it: without the decorator lines it may begin with (Character
    /// Card V3: `@@depth 4`, `@@@` fallbacks; directions to a card tool, to be trimmed before the
    /// content goes into a prompt, with the blank lines around them). `decorators` says which of
    /// them Parley follows.
    public var promptContent: String {
        guard let lines = decoratorLines else { return content }
        return content.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).dropFirst(lines.count).joined(separator: "\n")
    }

    /// The lines the content begins with that are decorators, or blank (nil: it begins with none).
    private var decoratorLines: [Substring]? {
        guard content.utf8.first == UInt8(ascii: "@") || content.first?.isWhitespace == true,
            content.trimmedWhitespace.hasPrefix("@@")
        else { return nil }
        var lines: [Substring] = []
        for line in content.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {  // "\r\n" is one Character
            let trimmed = line.drop(while: \.isWhitespace)
            guard trimmed.hasPrefix("@@") || trimmed.isEmpty else { break }
            lines.append(trimmed)
        }
        return lines
    }

    /// The decorators (Character Card V3) its content begins with that Parley follows: of a
    /// line's decorator and the `@@@` fallbacks under it, the first Parley knows.
    public var decorators: [LoreDecorator] {
        guard let lines = decoratorLines else { return [] }
        var found: [LoreDecorator] = []
        var settled = true
        for line in lines where !line.isEmpty {
            if line.hasPrefix("@@@") {
                guard !settled, let decorator = LoreDecorator(line.dropFirst(3)) else { continue }
                found.append(decorator)
                settled = true
            } else if let decorator = LoreDecorator(line.dropFirst(2)) {
                found.append(decorator)
                settled = true
            } else {
                settled = false
            }
        }
        return found
    }

    /// Where the entry goes in the prompt: V3's `@@position` (`before_desc`, `after_desc`), else
    /// its `@@depth` (and `@@role`), else SillyTavern's "at depth" (its export's
    /// `extensions.position` 4 with `depth`, 4 unless a number 0-10000, and `role`, 1 user, 2
    /// assistant, else system), else the card's `position` (`before_char`, else after).
    public var placement: LorePlacement {
        let decorators = decorators
        for case .position(let before) in decorators { return before ? .beforeCharacter : .afterCharacter }
        for case .depth(let depth) in decorators {
            var role = Role.system
            for case .role(let said) in decorators { role = said }
            return .atDepth(depth, role)
        }
        if let extensions, extensions["position"]?.intValue == 4 {
            let depth = CharacterNote.depth(extensions["depth"]) ?? 4
            let role: Role =
                switch extensions["role"]?.intValue {
                case 1: .user
                case 2: .assistant
                default: .system
                }
            return .atDepth(depth, role)
        }
        return extra.first { $0.0 == "position" }?.1 == .string("before_char") ? .beforeCharacter : .afterCharacter
    }

    /// The keys of which one must come up beside one of `keys`: `secondary_keys` when the entry
    /// is `selective` (Character Card V2/V3: "require a key from both"), the first
    /// `Limits.maxKeysPerEntry` of those that are not blank; none otherwise.
    public var secondaryKeys: [String] {
        guard case .bool(true)? = extra.first(where: { $0.0 == "selective" })?.1,
            case .array(let items)? = extra.first(where: { $0.0 == "secondary_keys" })?.1,
            !usesRegex  // V3: then they are ignored
        else { return [] }
        let keys = items.lazy.compactMap(\.stringValue).filter { !$0.trimmedWhitespace.isEmpty }
        return Array(keys.prefix(CharacterCard.Limits().maxKeysPerEntry))
    }

    /// The entry's `extensions`, where SillyTavern's card exports keep its settings for it.
    private var extensions: JSONValue? { extra.first(where: { $0.0 == "extensions" })?.1 }

    /// Keys are looked for as written: the card's `case_sensitive`, else SillyTavern's
    /// `extensions.case_sensitive` (null there: its default, not).
    public var isCaseSensitive: Bool {
        if let caseSensitive { return caseSensitive }
        if case .bool(let said)? = extensions?["case_sensitive"] { return said }
        return false
    }

    /// The messages its keys are looked for in, when the entry says: V3's `@@scan_depth`, else
    /// SillyTavern's `extensions.scan_depth` (a number 0-10000; null there: the book's).
    public var scanDepth: Int? {
        for case .scanDepth(let n) in decorators { return n }
        return CharacterNote.depth(extensions?["scan_depth"])
    }

    /// The chance, in percent, that the entry goes in when it is found: SillyTavern's
    /// `extensions.probability` (0-100) when `extensions.useProbability` is true; 100 otherwise.
    public var probability: Int {
        guard extensions?["useProbability"] == .bool(true), let percent = extensions?["probability"]?.intValue, (0...100).contains(percent)
        else { return 100 }
        return Int(percent)
    }

    /// V3's `use_regex`: its keys are patterns (Parley matches them as text).
    public var usesRegex: Bool { extra.first(where: { $0.0 == "use_regex" })?.1 == .bool(true) }

    /// How `secondaryKeys` combine (SillyTavern's `selectiveLogic`, which its card exports keep
    /// in the entry's `extensions`).
    public enum SecondaryKeyLogic: Int64, Sendable {
        /// One of them comes up (the card specs' only mode, and the default).
        case andAny = 0
        /// Not every one of them comes up.
        case notAll = 1
        /// None of them comes up.
        case notAny = 2
        /// Every one of them comes up.
        case andAll = 3
    }

    /// The entry's `extensions.selectiveLogic` (or a world-info file's top-level one); `andAny`
    /// for none or a value SillyTavern does not define.
    public var secondaryKeyLogic: SecondaryKeyLogic {
        let value = extensions?["selectiveLogic"] ?? extra.first { $0.0 == "selectiveLogic" }?.1
        return value?.intValue.flatMap(SecondaryKeyLogic.init(rawValue:)) ?? .andAny
    }

    /// Whether the secondary keys let the entry in, `found` telling whether a key comes up:
    /// always without any.
    public func secondaryKeysAllow(_ found: (String) -> Bool) -> Bool {
        let secondary = secondaryKeys
        guard !secondary.isEmpty else { return true }
        switch secondaryKeyLogic {
        case .andAny: return secondary.contains(where: found)
        case .notAll: return !secondary.allSatisfy(found)
        case .notAny: return !secondary.contains(where: found)
        case .andAll: return secondary.allSatisfy(found)
        }
    }

    public static func == (a: LoreEntry, b: LoreEntry) -> Bool {
        a.keys == b.keys && a.content == b.content && a.enabled == b.enabled && a.insertionOrder == b.insertionOrder
            && a.priority == b.priority && a.constant == b.constant && a.caseSensitive == b.caseSensitive
            && JSONValue.object(a.extra) == JSONValue.object(b.extra)
    }
}

/// Where a lorebook entry goes in a prompt.
public enum LorePlacement: Sendable, Equatable {
    /// Before the character's definitions.
    case beforeCharacter
    /// After the persona.
    case afterCharacter
    /// Among the messages, that many from the end, as a message of that role.
    case atDepth(Int, Role)
}

/// A Character Card V3 decorator that Parley follows (a lorebook entry's `@@name value` line).
public enum LoreDecorator: Sendable, Equatable {
    /// `@@depth N`: among the messages, N from the end (below 1: after the last).
    case depth(Int)
    /// `@@role assistant|system|user`: the role of the message `@@depth` makes.
    case role(Role)
    /// `@@activate`: in, whatever else says.
    case activate
    /// `@@dont_activate`: out, unless `@@activate`.
    case dontActivate
    /// `@@scan_depth N`: its keys are looked for in the last N messages, whatever the book says.
    case scanDepth(Int)
    /// `@@additional_keys A,B`: one of them must come up too.
    case additionalKeys([String])
    /// `@@exclude_keys A,B`: none of them may come up.
    case excludeKeys([String])
    /// `@@position before_desc|after_desc`: before or after the character's definitions.
    case position(before: Bool)

    /// From a line past its `@@` (or `@@@`): nil for a decorator Parley does not follow, or a
    /// value it cannot read.
    init?(_ line: Substring) {
        let name = line.prefix { !$0.isWhitespace }.lowercased()
        let value = String(line.dropFirst(name.count)).trimmedWhitespace
        func number() -> Int? { Int(value).map { min(max($0, 0), 10_000) } }
        func list() -> [String]? {
            let items = value.split(separator: ",").map { String($0).trimmedWhitespace }.filter { !$0.isEmpty }
            return items.isEmpty ? nil : Array(items.prefix(CharacterCard.Limits().maxKeysPerEntry))
        }
        let decorator: LoreDecorator? =
            switch name {
            case "depth": number().map(LoreDecorator.depth)
            case "role": Role(rawValue: value.lowercased()).map(LoreDecorator.role)
            case "activate": .activate
            case "dont_activate": .dontActivate
            case "scan_depth": number().map(LoreDecorator.scanDepth)
            case "additional_keys": list().map(LoreDecorator.additionalKeys)
            case "exclude_keys": list().map(LoreDecorator.excludeKeys)
            case "position" where ["before_desc", "after_desc"].contains(value.lowercased()): .position(before: value.lowercased() == "before_desc")
            default: nil
            }
        guard let decorator else { return nil }
        self = decorator
    }
}

/// The persona fields a Character Card carries beyond Parley's own clone fields, and the rest of
/// the card as received, so import then export is lossless (the spec forbids dropping unknown
/// `extensions` keys).
public struct CloneProfile: Sendable, Equatable {
    // Each field that storage keeps says when it changes: a profile read from storage and
    // unchanged is written back as the very text it was read from (see `CharacterCard.storageText`).
    public var description = "" { didSet { extras.changed() } }
    public var personality = "" { didSet { extras.changed() } }
    public var scenario = "" { didSet { extras.changed() } }
    public var firstMessage = "" { didSet { extras.changed() } }
    public var alternateGreetings: [String] = [] { didSet { extras.changed() } }
    /// `mes_example`: example dialogue showing the clone's style.
    public var exampleMessages = "" { didSet { extras.changed() } }
    /// Instructions placed after the conversation history in the prompt.
    public var postHistoryInstructions = "" { didSet { extras.changed() } }
    public var lorebook: [LoreEntry] = [] { didSet { extras.changed() } }
    /// The card's other `data` fields in their order (creator_notes, tags, extensions without
    /// `parley`, `character_book` without its entries, V3 fields, unknown keys); fields equal to
    /// what an export writes by default are left out.
    public var rest: [(String, JSONValue)] {
        get { extras.fields.rest }
        set { extras = .parsed(rest: newValue, top: extras.fields.top) }
    }
    /// Fields beside `spec` and `data` at the card's top level (tools keep V1 copies of the
    /// persona there for older readers), in their order.
    public var top: [(String, JSONValue)] {
        get { extras.fields.top }
        set { extras = .parsed(rest: extras.fields.rest, top: newValue) }
    }
    /// `rest` and `top`, which only an export reads: a card's unknown fields can take megabytes,
    /// and every reply reads its clone.
    private var extras = Extras.parsed(rest: [], top: [])

    /// `rest` and `top` together (one parse when read from storage).
    var cardFields: (rest: [(String, JSONValue)], top: [(String, JSONValue)]) { extras.fields }

    /// How the clone sounds when its replies are voiced (#29); nil: the server's default voice.
    /// Kept with the profile so both stores hold it without a column of its own.
    public var voice: CloneVoice? { didSet { extras.changed() } }

    public init() {}

    /// A profile read from storage and unchanged is not empty (an empty one is stored as none),
    /// which is answered without parsing its card fields.
    public var isEmpty: Bool { storedText == nil && self == CloneProfile() }

    /// The text this profile was read from, while nothing of it has changed.
    var storedText: String? {
        if case .stored(let text, _, unchanged: true) = extras { text } else { nil }
    }

    public static func == (a: CloneProfile, b: CloneProfile) -> Bool {
        guard
            a.description == b.description && a.personality == b.personality && a.scenario == b.scenario
                && a.firstMessage == b.firstMessage && a.alternateGreetings == b.alternateGreetings
                && a.exampleMessages == b.exampleMessages && a.postHistoryInstructions == b.postHistoryInstructions
                && a.lorebook == b.lorebook && a.voice == b.voice
        else { return false }
        let (x, y) = (a.cardFields, b.cardFields)
        return JSONValue.object(x.rest) == .object(y.rest) && JSONValue.object(x.top) == .object(y.top)
    }

    static func book(in rest: [(String, JSONValue)]) -> [(String, JSONValue)] {
        if case .object(let pairs)? = rest.first(where: { $0.0 == "character_book" })?.1 { pairs } else { [] }
    }

    /// What a prompt reads of the card's fields: from `rest` itself, or as storage kept them
    /// beside it (a stored profile's `rest` is parsed only when asked for).
    var promptFields: PromptFields {
        switch extras {
        case .parsed(let rest, _): PromptFields(rest: rest)
        case .stored(_, let read, _): read
        }
    }

    /// The book-level fields a prompt reads (scan_depth, token_budget), without the rest.
    var bookSettings: JSONValue { promptFields.bookSettings }

    /// The card's `nickname` (V3): what `{{char}}` stands for in a prompt instead of the clone's
    /// name; empty for none.
    public var nickname: String { promptFields.nickname }

    /// The card's character's note (SillyTavern's `extensions.depth_prompt`: `prompt`, `depth`,
    /// `role`): text the prompt carries `depth` messages from the end of the history; nil for none.
    public var characterNote: CharacterNote? { promptFields.characterNote }

    /// What a prompt reads of the card's fields, copied where storage keeps them before the rest.
    struct PromptFields: Sendable {
        var bookSettings: JSONValue
        /// A string of 1-100 characters once trimmed; empty for none.
        var nickname: String
        var characterNote: CharacterNote?

        /// As storage keeps them (`CharacterCard.storageJSON`'s `book`, `nickname`, `character_note`).
        init(bookSettings: JSONValue, nickname: JSONValue?, characterNote: JSONValue?) {
            self.bookSettings = bookSettings
            let name = nickname?.stringValue?.trimmedWhitespace ?? ""
            self.nickname = name.fits(characters: 100) ? name : ""
            self.characterNote = CharacterNote(characterNote)
        }

        /// From a card's other fields.
        init(rest: [(String, JSONValue)]) {
            let extensions = rest.first { $0.0 == "extensions" }?.1
            self.init(
                bookSettings: .object(CloneProfile.book(in: rest).filter { key, _ in CharacterCard.bookSettingKeys.contains(key) }),
                nickname: rest.first { $0.0 == "nickname" }?.1, characterNote: extensions?["depth_prompt"])
        }
    }

    /// Its other fields set from the stored `text`: `rest` and `top` are parsed from it only when
    /// asked for (`read`: what a prompt reads of them, parsed at once), and from now on a change
    /// to any field is a change to the text.
    mutating func readFromStorage(_ text: String, _ read: PromptFields) {
        extras = .stored(text, read, unchanged: true)
    }

    private enum Extras: Sendable {
        case parsed(rest: [(String, JSONValue)], top: [(String, JSONValue)])
        /// The stored profile's text, read up to its card fields; `unchanged` while the
        /// profile's other fields are as read from it.
        case stored(String, PromptFields, unchanged: Bool)

        mutating func changed() {
            if case .stored(let text, let read, true) = self { self = .stored(text, read, unchanged: false) }
        }

        var fields: (rest: [(String, JSONValue)], top: [(String, JSONValue)]) {
            switch self {
            case .parsed(let rest, let top):
                return (rest, top)
            case .stored(let text, _, _):
                let keep = JSONShape.members([("rest", .everything), ("top", .everything)])
                let value = try? JSONValue.parse(text.utf8, keeping: .members([("card", keep)] + [("rest", .everything), ("top", .everything)]))
                let card = value?["card"] ?? value
                func pairs(_ member: JSONValue?) -> [(String, JSONValue)] { if case .object(let pairs)? = member { pairs } else { [] } }
                return (pairs(card?["rest"]), pairs(card?["top"]))
            }
        }
    }
}

/// SillyTavern's character's note (a card's `extensions.depth_prompt`), as a prompt uses it.
public struct CharacterNote: Sendable, Equatable {
    /// Not yet expanded (`{{char}}`…): the prompt does that.
    public var text: String
    /// Messages from the end of the history: 0 after the last one, 4 (the default) before the
    /// fourth from last; past the history's start, before its first message.
    public var depth: Int
    public var role: Role

    /// From a `depth_prompt` value: nil unless its `prompt` is text (not blank, at most 32,000
    /// characters); a depth that is not a number 0-10000 is 4, a role other than `user` or
    /// `assistant` is `system`.
    init?(_ value: JSONValue?) {
        guard let text = value?["prompt"]?.stringValue, !text.trimmedWhitespace.isEmpty, text.fits(characters: 32_000) else { return nil }
        self.text = text.trimmedWhitespace
        depth = Self.depth(value?["depth"]) ?? 4
        role = value?["role"]?.stringValue.flatMap(Role.init(rawValue:)) ?? .system
    }

    /// A depth as a card gives it (the note's, a lorebook entry's): a number 0-10000; nil otherwise.
    static func depth(_ value: JSONValue?) -> Int? { value?.intValue.flatMap { (0...10_000).contains($0) ? Int($0) : nil } }

    var json: JSONValue { .object([("prompt", .string(text)), ("depth", .int(Int64(depth))), ("role", .string(role.rawValue))]) }
}

/// Character Card V2 (`chara_card_v2`) and V3 (`chara_card_v3`), the format SillyTavern and most
/// persona tools exchange: parsing into a clone and exporting a clone back.
public enum CharacterCard {
    public enum Spec: String, Sendable, CaseIterable {
        case v2 = "chara_card_v2"
        case v3 = "chara_card_v3"

        public init?(query: String) {
            switch query {
            case "v2", "chara_card_v2": self = .v2
            case "v3", "chara_card_v3": self = .v3
            default: return nil
            }
        }

        var version: String { self == .v2 ? "2.0" : "3.0" }
    }

    /// Limits on what a card may bring beyond the clone limits.
    public struct Limits: Sendable, Equatable {
        public var maxTextLength = 32_000
        public var maxGreetings = 64
        public var maxLoreEntries = 1_024
        public var maxKeysPerEntry = 64
        public init() {}
    }

    /// What a card turns into: the clone's own fields (validated as a clone body is) and its profile.
    public struct Imported: Sendable, Equatable {
        public var fields: CloneFields
        public var profile: CloneProfile
    }

    /// What an export writes when the card had nothing of its own there; an imported field equal
    /// to it is not kept, so a clone exported and imported again is equal to the original.
    static func defaults(_ spec: Spec?) -> [(String, JSONValue)] {
        var out: [(String, JSONValue)] = [
            ("creator_notes", .string("")), ("tags", .array([])), ("creator", .string("")), ("character_version", .string("")),
        ]
        if spec != .v2 { out.append(("group_only_greetings", .array([]))) }
        return out
    }

    // MARK: Import

    public static func parse(
        _ card: JSONValue, cloneLimits: CloneLimits = CloneLimits(), limits: Limits = Limits()
    ) throws(ValidationError) -> Imported {
        guard case .object(let top) = card else { throw ValidationError("a character card must be a JSON object, not \(card.typeName)") }
        let specName = top.first { $0.0 == "spec" }?.1.stringValue
        guard let specName, Spec(rawValue: specName) != nil else {
            throw ValidationError("unsupported card spec \(specName.map { "'\($0)'" } ?? "(none)"): expected chara_card_v2 or chara_card_v3")
        }
        guard let dataValue = top.first(where: { $0.0 == "data" })?.1 else { throw ValidationError("the card has no 'data' object") }
        var data = try JSONObjectReader(dataValue, what: "'data'", prefix: "data.")
        func text(_ key: String) throws(ValidationError) -> String {
            let value = try data.string(key) ?? ""
            guard value.fits(characters: limits.maxTextLength) else {
                throw ValidationError("'data.\(key)' is longer than \(limits.maxTextLength) characters")
            }
            return value
        }

        var profile = CloneProfile()
        guard let name = try data.string("name"), !name.trimmedWhitespace.isEmpty else { throw ValidationError("the card has no 'data.name'") }
        let systemPrompt = try data.string("system_prompt") ?? ""
        profile.description = try text("description")
        profile.personality = try text("personality")
        profile.scenario = try text("scenario")
        profile.firstMessage = try text("first_mes")
        profile.exampleMessages = try text("mes_example")
        profile.postHistoryInstructions = try text("post_history_instructions")
        profile.alternateGreetings = try data.stringArray("alternate_greetings") ?? []
        guard profile.alternateGreetings.count <= limits.maxGreetings else {
            throw ValidationError("'data.alternate_greetings' has more than \(limits.maxGreetings) entries")
        }

        // Parley's own fields travel in extensions.parley; every other extension is kept as is.
        var clone: [(String, JSONValue)] = [("name", .string(name.trimmedWhitespace)), ("system_prompt", .string(systemPrompt))]
        var extensions: [(String, JSONValue)] = []
        if let value = try data.value("extensions") {
            guard case .object(let pairs) = value else { throw ValidationError("'data.extensions' must be an object") }
            for (key, value) in pairs {
                if key == "parley" {
                    guard case .object(let own) = value else { throw ValidationError("'data.extensions.parley' must be an object") }
                    clone += own.filter { ["traits", "sliders", "memory", "model"].contains($0.0) }
                } else {
                    extensions.append((key, value))
                }
            }
        }
        var rest: [(String, JSONValue)] = []
        if let value = try data.value("character_book") {
            var book = try JSONObjectReader(value, what: "'data.character_book'", prefix: "data.character_book.")
            guard case .array(let entries)? = try book.value("entries") else {
                throw ValidationError("'data.character_book.entries' must be an array")
            }
            guard entries.count <= limits.maxLoreEntries else {
                throw ValidationError("'data.character_book.entries' has more than \(limits.maxLoreEntries) entries")
            }
            profile.lorebook = try entries.enumerated().map { (i, entry) throws(ValidationError) in try loreEntry(entry, index: i, limits: limits) }
            // Book-level fields are kept; so is an empty book (an export writes a non-empty one anyway).
            if !book.unread.isEmpty || entries.isEmpty { rest.append(("character_book", .object(book.unread))) }
        }
        rest += data.unread  // the fields Parley does not read itself
        if !extensions.isEmpty { rest.append(("extensions", .object(extensions))) }
        let defaults = Self.defaults(nil)
        profile.rest = rest.filter { pair in !defaults.contains { $0.0 == pair.0 && $0.1 == pair.1 } }
        profile.top = top.filter { !["spec", "spec_version", "data"].contains($0.0) }
        let fields = try CloneFields.parse(.object(clone), requireName: true, limits: cloneLimits)
        return Imported(fields: fields, profile: profile)
    }

    static func loreEntry(_ value: JSONValue, index i: Int, limits: Limits) throws(ValidationError) -> LoreEntry {
        let at = "'data.character_book.entries[\(i)]"
        var entry = try JSONObjectReader(value, what: at + "'", prefix: "data.character_book.entries[\(i)].")
        guard let keys = try entry.stringArray("keys") else { throw ValidationError(at + ".keys' is missing") }
        guard keys.count <= limits.maxKeysPerEntry else { throw ValidationError(at + ".keys' has more than \(limits.maxKeysPerEntry) keys") }
        guard let content = try entry.string("content") else { throw ValidationError(at + ".content' is missing") }
        guard content.fits(characters: limits.maxTextLength) else {
            throw ValidationError(at + ".content' is longer than \(limits.maxTextLength) characters")
        }
        func flag(_ key: String) throws(ValidationError) -> Bool? {
            guard let value = try entry.value(key) else { return nil }
            guard let bool = value.boolValue else { throw ValidationError(at + ".\(key)' must be a boolean") }
            return bool
        }
        func number(_ key: String) throws(ValidationError) -> Int? {
            do { return try entry.int(key).map { Int(clamping: $0) } } catch { throw ValidationError(at + ".\(key)' must be an integer") }
        }
        return LoreEntry(
            keys: keys, content: content, enabled: try flag("enabled") ?? true, insertionOrder: try number("insertion_order") ?? 0,
            priority: try number("priority"), constant: try flag("constant"), caseSensitive: try flag("case_sensitive"),
            // An empty `extensions` is what an export writes anyway.
            extra: entry.unread.filter { !($0.0 == "extensions" && $0.1 == .object([])) })
    }

    // MARK: Export

    /// The clone as a card of `spec`: the profile's kept fields with Parley's current values over
    /// them, Parley's own fields in `extensions.parley`.
    public static func export(_ clone: Clone, spec: Spec) -> JSONValue {
        let profile = clone.profile
        let (rest, top) = profile.cardFields  // parsed from storage on each read
        var data: [(String, JSONValue)] = [
            ("name", .string(clone.name)),
            ("description", .string(profile.description)),
            ("personality", .string(profile.personality)),
            ("scenario", .string(profile.scenario)),
            ("first_mes", .string(profile.firstMessage)),
            ("mes_example", .string(profile.exampleMessages)),
            ("system_prompt", .string(clone.systemPrompt)),
            ("post_history_instructions", .string(profile.postHistoryInstructions)),
            ("alternate_greetings", .array(profile.alternateGreetings.map(JSONValue.string))),
        ]
        for (key, value) in defaults(spec) where !rest.contains(where: { $0.0 == key }) { data.append((key, value)) }
        var extensions: [(String, JSONValue)] = []
        for (key, value) in rest {
            switch key {
            case "extensions": if case .object(let pairs) = value { extensions = pairs }
            case "character_book": break
            default: data.append((key, value))
            }
        }
        if !profile.lorebook.isEmpty || rest.contains(where: { $0.0 == "character_book" }) {
            data.append(("character_book", .object(CloneProfile.book(in: rest) + [("entries", .array(profile.lorebook.map(json)))])))
        }
        var parley: [(String, JSONValue)] = [
            ("traits", .array(clone.traits.map(JSONValue.string))),
            ("sliders", clone.slidersJSON),
            ("memory", .array(clone.memory.map(JSONValue.string))),
        ]
        if let model = clone.model { parley.append(("model", .string(model))) }
        extensions.append(("parley", .object(parley)))
        data.append(("extensions", .object(extensions)))
        // Top-level V1 copies of the persona say what the clone says now; other fields come back as they were.
        let copies = top.map { key, value in
            v1Copies.contains(key) ? (key, data.first { $0.0 == key }?.1 ?? value) : (key, value)
        }
        return .object([("spec", .string(spec.rawValue)), ("spec_version", .string(spec.version)), ("data", .object(data))] + copies)
    }

    /// Fields older readers find at a card's top level, copies of the ones in `data`.
    static let v1Copies: Set<String> = ["name", "description", "personality", "scenario", "first_mes", "mes_example"]

    static func json(_ entry: LoreEntry) -> JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("keys", .array(entry.keys.map(JSONValue.string))), ("content", .string(entry.content)),
            ("enabled", .bool(entry.enabled)), ("insertion_order", .int(Int64(entry.insertionOrder))),
        ]
        if let priority = entry.priority { pairs.append(("priority", .int(Int64(priority)))) }
        if let constant = entry.constant { pairs.append(("constant", .bool(constant))) }
        if let caseSensitive = entry.caseSensitive { pairs.append(("case_sensitive", .bool(caseSensitive))) }
        // V2 requires `extensions` on every entry.
        if !entry.extra.contains(where: { $0.0 == "extensions" }) { pairs.append(("extensions", .object([]))) }
        return .object(pairs + entry.extra)
    }

    /// The profile as the REST API shows it (the card's other fields come with its export).
    public static func profileJSON(_ profile: CloneProfile) -> JSONValue {
        .object(personaJSON(profile))
    }

    /// The profile's own fields, as the API shows them and storage keeps them.
    static func personaJSON(_ profile: CloneProfile) -> [(String, JSONValue)] {
        [
            ("description", .string(profile.description)), ("personality", .string(profile.personality)),
            ("scenario", .string(profile.scenario)), ("first_mes", .string(profile.firstMessage)),
            ("alternate_greetings", .array(profile.alternateGreetings.map(JSONValue.string))),
            ("mes_example", .string(profile.exampleMessages)), ("post_history_instructions", .string(profile.postHistoryInstructions)),
            ("lorebook", .array(profile.lorebook.map(json))),
        ]
    }

    // MARK: Storage

    /// The profile as one JSON document (both stores keep it as text: card keys may hold `.` or
    /// `$`, which MongoDB field names cannot). The card's other fields come last, under `card`,
    /// after a copy of the book's settings a prompt reads: a read stops where they begin.
    public static func storageJSON(_ profile: CloneProfile) -> JSONValue {
        let card = profile.cardFields
        let read = profile.promptFields
        return .object(
            personaJSON(profile) + (profile.voice.map { [("voice", $0.json)] } ?? [])
                + [("book", read.bookSettings)] + (read.nickname.isEmpty ? [] : [("nickname", .string(read.nickname))])
                + (read.characterNote.map { [("character_note", $0.json)] } ?? [])
                + [("card", .object([("rest", .object(card.rest)), ("top", .object(card.top))]))])
    }

    /// The book's fields a prompt reads.
    static let bookSettingKeys = ["scan_depth", "token_budget"]

    /// The text storage keeps for `profile`: the text it was read from while nothing of it has
    /// changed (a write of a clone whose card holds megabytes, and whose edit touched only the
    /// clone's own fields, neither parses nor serialises the card), else `storageJSON`'s.
    public static func storageText(_ profile: CloneProfile) -> String {
        profile.storedText ?? storageJSON(profile).serializedString()
    }

    /// What of a stored profile a read builds: everything up to the card's fields (`card`, not
    /// read; see `CloneProfile.rest`). Text stored before they went last has them as `rest` and
    /// `top` before `voice`: checked, not built, but for the book's settings.
    static let storedShape = JSONShape.members(
        [
            "description", "personality", "scenario", "first_mes", "alternate_greetings", "mes_example", "post_history_instructions",
            "lorebook", "voice", "book", "nickname", "character_note",
        ].map { ($0, .everything) } + [
            (
                "rest",
                .members([
                    ("character_book", .members(bookSettingKeys.map { ($0, .everything) })), ("nickname", .everything),
                    ("extensions", .members([("depth_prompt", .everything)])),
                ])
            )
        ])

    /// Reads what `storageJSON` wrote; nil or unreadable text is an empty profile.
    public static func profile(fromStorage text: String?) -> CloneProfile {
        guard let text, !text.isEmpty, let value = try? JSONValue.parse(text.utf8, keeping: storedShape, stoppingAt: "card") else {
            return CloneProfile()
        }
        var profile = CloneProfile()
        profile.description = value["description"]?.stringValue ?? ""
        profile.personality = value["personality"]?.stringValue ?? ""
        profile.scenario = value["scenario"]?.stringValue ?? ""
        profile.firstMessage = value["first_mes"]?.stringValue ?? ""
        profile.alternateGreetings = value["alternate_greetings"]?.arrayValue?.compactMap(\.stringValue) ?? []
        profile.exampleMessages = value["mes_example"]?.stringValue ?? ""
        profile.postHistoryInstructions = value["post_history_instructions"]?.stringValue ?? ""
        profile.lorebook = (value["lorebook"]?.arrayValue ?? []).enumerated().compactMap { try? loreEntry($1, index: $0, limits: Limits()) }
        profile.voice = value["voice"].flatMap { try? CloneVoice.parse($0) }
        // Text stored before the card's fields went last has no `book`: its `rest` was read for them.
        let read =
            if let book = value["book"] {
                CloneProfile.PromptFields(bookSettings: book, nickname: value["nickname"], characterNote: value["character_note"])
            } else if case .object(let rest)? = value["rest"] {
                CloneProfile.PromptFields(rest: rest)
            } else {
                CloneProfile.PromptFields(rest: [])
            }
        profile.readFromStorage(text, read)
        return profile
    }
}
