@testable import ParleyCore
import Testing

/// The sample cards in Tests/fixtures/cards, which cover every field of each spec.
func sampleCard(_ name: String) throws -> JSONValue {
    let directory = String(#filePath.prefix(upTo: #filePath.range(of: "/Tests/")!.upperBound))
    let text = try String(contentsOfFile: directory + "fixtures/cards/\(name).json", encoding: .utf8)
    return try JSONValue.parse(Array(text.utf8))
}

/// A clone made from an imported card, as the server makes one.
func clone(from imported: CharacterCard.Imported) -> Clone {
    imported.fields.applied(
        to: Clone(
            id: "cl_1", owner: "u", name: "", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 1, updatedAt: 1,
            profile: imported.profile),
        at: 1)
}

/// Whether everything in `received` is in `exported` with the same value (objects may gain keys).
func keepsEverything(_ received: JSONValue, in exported: JSONValue?, at path: String = "") -> [String] {
    guard let exported else { return [path] }
    switch (received, exported) {
    case let (.object(pairs), .object(_)):
        return pairs.flatMap { key, value in keepsEverything(value, in: exported[key], at: path + "." + key) }
    case let (.array(a), .array(b)) where a.count == b.count:
        return zip(a, b).enumerated().flatMap { i, pair in keepsEverything(pair.0, in: pair.1, at: path + "[\(i)]") }
    default:
        return received == exported ? [] : [path]
    }
}

@Suite struct CharacterCardTests {
    @Test func aV2CardMapsOntoTheCloneAndComesBackUnchanged() throws {
        let card = try sampleCard("v2-full")
        let imported = try CharacterCard.parse(card)
        let mara = clone(from: imported)
        #expect(mara.name == "Captain Mara" && mara.systemPrompt == "Stay in character as {{char}}.")
        #expect(mara.traits == ["gruff", "loyal"] && mara.sliders == ["warmth": 35, "humor": 60] && mara.memory == ["Owes a debt to the guild"])
        let profile = mara.profile
        #expect(profile.personality == "gruff, loyal, secretly sentimental" && profile.firstMessage == "Well, well. Who let you aboard?")
        #expect(profile.alternateGreetings == ["Stowaway! Again?", "You look lost, sky-rat."])
        #expect(profile.postHistoryInstructions == "Keep replies under three sentences.")
        #expect(profile.lorebook.map(\.keys) == [["guild", "Skyguild"], ["engine"]])
        #expect(profile.lorebook.map(\.insertionOrder) == [10, 20] && profile.lorebook.map(\.priority) == [5, nil])
        #expect(profile.lorebook.map(\.enabled) == [true, false])

        let exported = CharacterCard.export(mara, spec: .v2)
        #expect(exported == card, "a V2 card with Parley's own extension comes back exactly")
        #expect(keepsEverything(card, in: exported).isEmpty)
        // The top-level V1 copies follow the clone; the card's other top-level fields stay.
        var renamed = mara
        renamed.name = "Admiral Mara"
        let again = CharacterCard.export(renamed, spec: .v2)
        #expect(again["name"] == .string("Admiral Mara") && again["data"]?["name"] == .string("Admiral Mara"))
        #expect(again["avatar"] == .string("none") && again["description"] == card["description"])
    }

    @Test func aV3CardKeepsEveryFieldItReceived() throws {
        let card = try sampleCard("v3-full")
        let ilse = clone(from: try CharacterCard.parse(card))
        #expect(ilse.model == "simulated" && ilse.sliders == ["formality": 90] && ilse.traits.isEmpty)
        let exported = CharacterCard.export(ilse, spec: .v3)
        #expect(keepsEverything(card, in: exported) == [], "V3 fields, assets, unknown extensions and entry fields all survive")
        #expect(exported["spec"] == .string("chara_card_v3") && exported["spec_version"] == .string("3.0"))
        // Importing the export gives the same clone again.
        #expect(clone(from: try CharacterCard.parse(exported)) == ilse)
    }

    @Test func aCloneMadeHereExportsAndImportsToItself() throws {
        var ada = Clone(
            id: "cl_1", owner: "u", name: "Ada", traits: ["curious"], systemPrompt: "Be brief.", sliders: ["warmth": 80],
            memory: ["Has a cat called Tom"], createdAt: 1, updatedAt: 1)
        for spec in CharacterCard.Spec.allCases {
            let card = CharacterCard.export(ada, spec: spec)
            #expect(clone(from: try CharacterCard.parse(card)) == ada, "\(spec)")
        }
        ada.model = "simulated"
        ada.profile.lorebook = [LoreEntry(keys: ["tom"], content: "Tom is a grey cat.", insertionOrder: 3, priority: 1)]
        ada.profile.scenario = "A rainy afternoon."
        for spec in CharacterCard.Spec.allCases {
            #expect(clone(from: try CharacterCard.parse(CharacterCard.export(ada, spec: spec))) == ada, "\(spec)")
        }
    }

    @Test func theStoredProfileReadsBackEqual() throws {
        let profile = clone(from: try CharacterCard.parse(try sampleCard("v2-full"))).profile
        let stored = CharacterCard.storageJSON(profile).serializedString()
        #expect(CharacterCard.profile(fromStorage: stored) == profile)
        #expect(CharacterCard.profile(fromStorage: nil).isEmpty)
    }

    func error(_ text: String) -> String? {
        do {
            _ = try CharacterCard.parse(try JSONValue.parse(Array(text.utf8)))
            return nil
        } catch let error as ValidationError {
            return error.message
        } catch {
            return "not JSON"
        }
    }

    @Test func malformedCardsAreRefusedWithAClearMessage() {
        #expect(error("[]") == "a character card must be a JSON object, not array")
        #expect(error(#"{"name":"V1 card"}"#) == "unsupported card spec (none): expected chara_card_v2 or chara_card_v3")
        #expect(error(#"{"spec":"chara_card_v9","data":{}}"#) == "unsupported card spec 'chara_card_v9': expected chara_card_v2 or chara_card_v3")
        #expect(error(#"{"spec":"chara_card_v2"}"#) == "the card has no 'data' object")
        #expect(error(#"{"spec":"chara_card_v2","data":{"name":" "}}"#) == "the card has no 'data.name'")
        #expect(error(#"{"spec":"chara_card_v2","data":{"name":"A","description":5}}"#) == "'data.description' must be a string, not number")
        #expect(
            error(#"{"spec":"chara_card_v2","data":{"name":"A","character_book":{"entries":{}}}}"#)
                == "'data.character_book.entries' must be an array")
        #expect(
            error(#"{"spec":"chara_card_v2","data":{"name":"A","character_book":{"entries":[{"content":"x"}]}}}"#)
                == "'data.character_book.entries[0].keys' is missing")
        #expect(
            error(#"{"spec":"chara_card_v2","data":{"name":"A","character_book":{"entries":[{"keys":[],"content":"x","enabled":"yes"}]}}}"#)
                == "'data.character_book.entries[0].enabled' must be a boolean")
        #expect(
            error(#"{"spec":"chara_card_v2","data":{"name":"A","extensions":{"parley":{"sliders":{"warmth":500}}}}}"#)
                == "slider 'warmth' must be between 0 and 100")
        #expect(error(#"{"spec":"chara_card_v2","data":{"name":"\#(String(repeating: "n", count: 81))"}}"#) == "'name' is longer than 80 characters")
    }
}

@Suite struct CardPNGTests {
    func base64(_ json: JSONValue) -> String { Data(json.serialized()).base64EncodedString() }

    @Test func theCardComesOutOfItsTextChunkAndV3Wins() throws {
        let v2 = try sampleCard("v2-full")
        let v3 = try sampleCard("v3-full")
        #expect(try CardPNG.card(in: CardPNG.make(text: [("chara", base64(v2))])) == v2)
        #expect(try CardPNG.card(in: CardPNG.make(text: [("chara", base64(v2)), ("ccv3", base64(v3))])) == v3)
    }

    func error(_ bytes: [UInt8]) -> String? {
        do {
            _ = try CardPNG.card(in: bytes)
            return nil
        } catch { return error.message }
    }

    @Test func imagesWithoutAReadableCardAreRefused() {
        #expect(error(CardPNG.make(text: [("Comment", "just a picture")])) == "the PNG carries no character card (no 'chara' or 'ccv3' text chunk)")
        #expect(error(Array("GIF89a".utf8)) == "not a PNG image")
        var corrupt = CardPNG.make(text: [("chara", "e30=")])
        corrupt[40] ^= 0xFF
        #expect(error(corrupt) == "the PNG is corrupt (a chunk's CRC does not match)")
        #expect(error(Array(CardPNG.make(text: [("chara", "e30=")]).prefix(30))) == "the PNG is truncated")
        #expect(error(CardPNG.make(text: [("chara", "not base64!")])) == "the PNG's card is not valid base64")
        #expect(error(CardPNG.make(text: [("chara", "bm90IGpzb24=")])) == "the PNG's card is not valid JSON: unexpected character at byte 0")
        // {"spec":"chara_card_v2","spec":"chara_card_v3"}: which one it is depends on who reads it.
        let twice = "eyJzcGVjIjoiY2hhcmFfY2FyZF92MiIsInNwZWMiOiJjaGFyYV9jYXJkX3YzIn0="
        #expect(error(CardPNG.make(text: [("chara", twice)])) == #"the PNG's card is not valid JSON: the key "spec" is repeated at byte 24"#)
    }
}

@Suite struct LoreKeyMatcherTests {
    /// Against a plain search of each message's bytes, with and without the triples' index, on
    /// random messages and keys over a small alphabet (many near misses, several-byte characters).
    @Test(arguments: [0, LoreKeyMatcher.indexedKeys])
    func aKeyOccursExactlyWhenAPlainSearchFindsItInOneMessage(keys: Int) {
        var random = SplitMix64(seed: 26)
        let alphabet = ["a", "b", "ab", "é", "🌊", " ", "A"]
        func text(_ most: Int) -> String {
            (0..<Int.random(in: 0...most, using: &random)).map { _ in alphabet.randomElement(using: &random)! }.joined()
        }
        func plain(_ key: String, _ messages: [String]) -> Bool {
            let needle = Array(key.utf8)
            return messages.contains { message in
                let bytes = Array(message.utf8)
                return bytes.count >= needle.count && (0...(bytes.count - needle.count)).contains { Array(bytes[$0..<($0 + needle.count)]) == needle }
            }
        }
        var found = 0
        for _ in 0..<300 {
            let messages = (0..<Int.random(in: 0...4, using: &random)).map { _ in text(30) }
            var matcher = LoreKeyMatcher(messages, keys: keys)
            for _ in 0..<20 {
                let key = text(6)
                let occurs = matcher.occurs(key)
                #expect(occurs == (!key.isEmpty && plain(key, messages)), "\(key) in \(messages)")
                if occurs { found += 1 }
            }
        }
        #expect(found > 500, "the draw finds keys as well as missing them")
    }

    @Test func aKeyDoesNotRunFromOneMessageIntoTheNextAndOnlyTheNewestBytesAreScanned() {
        var split = LoreKeyMatcher(["the gu", "ild"], keys: 0)
        let across = split.occurs("guild")
        #expect(!across)
        var whole = LoreKeyMatcher(["the gu", "guild"], keys: 100)
        let inOne = whole.occurs("guild")
        #expect(inOne)
        let old = "dragon " + String(repeating: "x", count: LoreKeyMatcher.maxScannedBytes)
        var long = LoreKeyMatcher([old, "hello"], keys: 100)
        let (oldest, newest) = (long.occurs("dragon"), long.occurs("hello"))
        #expect(!oldest, "past the newest 64 KiB")
        #expect(newest)
    }

    /// Keys whose every triple is in the messages but which are not: each costs a search of the
    /// whole text, and once the budget is spent such keys go unmatched (one that occurs in a
    /// short text still matches past it: its search is short).
    @Test func searchesStopAtTheBudgetWhenKeysAreCraftedAgainstTheMessages() {
        // Every triple of a and b occurs in "aaababbb" repeated; four a's in a row never do.
        let text = String(repeating: "aaababbb", count: LoreKeyMatcher.maxScannedBytes / 8)
        var matcher = LoreKeyMatcher([text], keys: 100)
        let searches = LoreKeyMatcher.searchBudget / LoreKeyMatcher.maxScannedBytes
        let absent = (0..<searches).map { _ in matcher.occurs("aaaa") }
        #expect(!absent.contains(true))
        let afterTheBudget = matcher.occurs("bbbaaab")
        #expect(!afterTheBudget, "the budget is spent: even a key that occurs goes unmatched")
        var fresh = LoreKeyMatcher([text], keys: 100)
        let withBudget = fresh.occurs("bbbaaab")
        #expect(withBudget)
    }
}

@Suite struct LorebookPromptTests {
    /// `stored`: as a store reads it back (the card's other fields parsed only when asked for).
    func mara(stored: Bool = false) throws -> Clone {
        var mara = clone(from: try CharacterCard.parse(try sampleCard("v2-full")))
        if stored { mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString()) }
        return mara
    }

    func message(_ text: String, _ role: Role = .user, _ n: Int = 0) -> Message {
        Message(id: "m\(n)", conversation: "c", role: role, text: text, createdAt: Int64(n))
    }

    @Test(arguments: [false, true]) func anEntryEntersThePromptWhenItsKeyIsMentioned(stored: Bool) throws {
        let assembler = PromptAssembler(contextBudget: 4096)
        let mara = try mara(stored: stored)
        let quiet = assembler.assemble(clone: mara, history: [message("Nice weather up here.")])
        #expect(!quiet.messages[0].text.contains("Skyguild taxes"))
        // The guild's entry is selective: "tax", its secondary key, must come up too.
        let mentioned = assembler.assemble(clone: mara, history: [message("What do you think of the GUILD's tax?")])
        #expect(mentioned.messages[0].text.contains("The Skyguild taxes every cargo that crosses the Rift."))
        // A disabled entry stays out even when its key is said.
        #expect(!assembler.assemble(clone: mara, history: [message("How is the engine?")]).messages[0].text.contains("storm-glass"))
        // Beyond the book's scan depth (3 messages) a mention no longer counts.
        let old = [message("the guild tax", .user, 0)] + (1...3).map { message("later \($0)", $0 % 2 == 1 ? .assistant : .user, $0) }
        #expect(!assembler.assemble(clone: mara, history: old).messages[0].text.contains("Skyguild taxes"))
        let within = [message("the guild tax", .user, 1)] + (2...3).map { message("later \($0)", $0 % 2 == 1 ? .assistant : .user, $0) }
        #expect(assembler.assemble(clone: mara, history: within).messages[0].text.contains("Skyguild taxes"))
    }

    /// A key is looked for trimmed (a blank one never matches), case folded unless the entry is
    /// case-sensitive; keys changed after the entry was made are the ones looked for.
    @Test func keysAreLookedForTrimmedFoldedAndAsLastSet() throws {
        var mara = try mara()
        var rift = LoreEntry(keys: ["  ", " Rift Ward "], content: "The ward holds.")
        let exact = LoreEntry(keys: ["Kestrel"], content: "Her ship.", caseSensitive: true)
        mara.profile.lorebook = [rift, exact]
        func lore(_ text: String) -> String {
            PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: [message(text)]).messages[0].text
        }
        #expect(lore("the RIFT WARD?").contains("The ward holds.") && !lore("a ward").contains("The ward holds."))
        #expect(!lore("   ").contains("The ward holds."), "a blank key matches nothing")
        #expect(lore("the Kestrel").contains("Her ship.") && !lore("the kestrel").contains("Her ship."))
        rift.keys = ["Storm"]
        mara.profile.lorebook = [rift, exact]
        #expect(lore("a storm").contains("The ward holds.") && !lore("the rift ward").contains("The ward holds."))
        #expect(rift.searchKeys.exact == ["Storm"] && rift.searchKeys.folded == ["storm"])
    }

    /// A `selective` entry needs one of its `secondary_keys` as well as one of its keys (Character
    /// Card V2/V3: "require a key from both"), each found in any of the scanned messages; without
    /// `selective`, or with no secondary keys, its keys alone bring it in.
    @Test(arguments: [false, true]) func aSelectiveEntryNeedsOneOfItsSecondaryKeysToo(stored: Bool) throws {
        let assembler = PromptAssembler(contextBudget: 4096)
        func entry(_ content: String, selective: JSONValue?, secondary: [String]?) -> LoreEntry {
            LoreEntry(
                keys: ["guild"], content: content,
                extra: (selective.map { [("selective", $0)] } ?? [])
                    + (secondary.map { [("secondary_keys", .array($0.map(JSONValue.string)))] } ?? []))
        }
        var mara = try mara()
        mara.profile.lorebook = [
            entry("Selective lore.", selective: .bool(true), secondary: ["tax", "Levy"]),
            entry("Not selective.", selective: .bool(false), secondary: ["tax"]),
            entry("No secondary keys.", selective: .bool(true), secondary: [" "]),
            entry("Secondary keys only.", selective: nil, secondary: ["tax"]),
            LoreEntry(
                keys: ["guild"], content: "Regex keys.",
                extra: [("selective", .bool(true)), ("secondary_keys", .array([.string("tax")])), ("use_regex", .bool(true))]),
        ]
        if stored { mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString()) }
        func lore(_ texts: String...) -> String {
            assembler.assemble(clone: mara, history: texts.enumerated().map { message($1, .user, $0) }).messages[0].text
        }
        let guildOnly = lore("The guild again.")
        #expect(!guildOnly.contains("Selective lore."))
        #expect(guildOnly.contains("Not selective.") && guildOnly.contains("No secondary keys.") && guildOnly.contains("Secondary keys only."))
        #expect(guildOnly.contains("Regex keys."), "V3: with use_regex the secondary keys are ignored")
        #expect(!lore("A tax again.").contains("lore."))
        #expect(lore("The guild again.", "A new LEVY.").contains("Selective lore."), "the second key, case folded, in another message")
    }

    /// SillyTavern's `selectiveLogic` (in the entry's `extensions`, as its card exports write it,
    /// or at the entry's top, as its world-info files do) says how the secondary keys combine:
    /// any (0, the default), not all (1), none (2), all (3), however the profile was read.
    @Test(arguments: [false, true]) func selectiveLogicSaysHowTheSecondaryKeysCombine(stored: Bool) throws {
        func entry(_ content: String, _ logic: JSONValue?, topLevel: Bool = false) -> LoreEntry {
            var extra: [(String, JSONValue)] = [("selective", .bool(true)), ("secondary_keys", .array([.string("tax"), .string("levy")]))]
            if let logic { extra.append(topLevel ? ("selectiveLogic", logic) : ("extensions", .object([("selectiveLogic", logic)]))) }
            return LoreEntry(keys: ["guild"], content: content, extra: extra)
        }
        var mara = try mara()
        mara.profile.lorebook = [
            entry("Any.", nil), entry("Any, said.", .int(0)), entry("Not all.", .int(1)), entry("None.", .int(2)), entry("All.", .int(3)),
            entry("All, top.", .int(3), topLevel: true), entry("Unknown: any.", .int(7)), entry("Not a number: any.", .string("3")),
        ]
        if stored { mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString()) }
        func lore(_ text: String) -> Set<String> {
            let system = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: [message(text)]).messages[0].text
            return Set(mara.profile.lorebook.map(\.content).filter { system.contains("- \($0)\n") || system.hasSuffix("- \($0)") })
        }
        let any: Set = ["Any.", "Any, said.", "Unknown: any.", "Not a number: any."]
        #expect(lore("The guild.") == ["Not all.", "None."])
        #expect(lore("The guild's tax.") == any.union(["Not all."]))
        #expect(lore("The guild's tax and levy.") == any.union(["All.", "All, top."]))
        #expect(lore("A tax and a levy, no one else.").isEmpty, "the keys themselves first")
    }

    /// A profile read from storage and unchanged is written back as the very text it was read
    /// from (an edit of the clone's own fields neither parses nor serialises its card); a change
    /// to any of its fields is written.
    @Test func anUnchangedStoredProfileIsWrittenBackAsItsTextAndAChangedOneAsChanged() throws {
        // Spaces around the text tell it from what `storageJSON` would write.
        let text = " " + CharacterCard.storageJSON(try mara().profile).serializedString() + " "
        let stored = CharacterCard.profile(fromStorage: text)
        #expect(CharacterCard.storageText(stored) == text && !stored.isEmpty)
        let changes: [(String, (inout CloneProfile) -> Void)] = [
            ("description", { $0.description = "new" }), ("personality", { $0.personality = "new" }),
            ("scenario", { $0.scenario = "new" }), ("first_mes", { $0.firstMessage = "new" }),
            ("alternate_greetings", { $0.alternateGreetings = ["new"] }), ("mes_example", { $0.exampleMessages = "new" }),
            ("post_history_instructions", { $0.postHistoryInstructions = "new" }),
            ("lorebook", { $0.lorebook = [LoreEntry(keys: ["k"], content: "new")] }), ("voice", { $0.voice = CloneVoice(name: "joe", speed: 1) }),
            ("rest", { $0.rest = [("creator_notes", .string("new"))] }), ("top", { $0.top = [] }),
        ]
        for (field, change) in changes {
            var changed = stored
            change(&changed)
            let written = CharacterCard.storageText(changed)
            #expect(written != text && CharacterCard.profile(fromStorage: written) == changed && changed != stored, "\(field)")
        }
    }

    /// A stored profile is read up to its card fields, which are stored last: what a read builds
    /// (persona, book, voice, the book's settings) reads the same with the text after them cut
    /// and replaced by what is not even JSON. A profile stored with the card fields before the
    /// voice (as before they went last) reads whole.
    @Test func aStoredProfileIsReadUpToItsCardFields() throws {
        var profile = try mara().profile
        profile.voice = CloneVoice(name: "joe", speed: 1.25)
        #expect(profile.bookSettings["scan_depth"] == .int(3) && !profile.rest.isEmpty)
        let text = CharacterCard.storageJSON(profile).serializedString()
        let cardStart = try #require(text.range(of: #""card":"#))
        let read = CharacterCard.profile(fromStorage: text[..<cardStart.upperBound] + "[not json")
        var expected = profile
        (expected.rest, expected.top) = ([], [])
        #expect(read == expected)
        #expect(read.bookSettings["scan_depth"] == .int(3) && read.bookSettings["token_budget"] == profile.bookSettings["token_budget"])

        let card = profile.cardFields
        let before = JSONValue.object(
            CharacterCard.personaJSON(profile) + [("rest", .object(card.rest)), ("top", .object(card.top)), ("voice", profile.voice!.json)])
        let old = CharacterCard.profile(fromStorage: before.serializedString())
        #expect(old == profile && old.bookSettings["scan_depth"] == .int(3))
    }

    /// A read profile's card fields (`rest`, `top`: megabytes, in a card made to weigh) are
    /// parsed from the stored text only when asked for, yet read, compared, changed and exported
    /// as if they had been parsed with the rest.
    @Test func aStoredProfilesCardFieldsReadAsIfParsedWithIt() throws {
        let original = try mara()
        let stored = try mara(stored: true)
        #expect(stored == original)
        #expect(JSONValue.object(stored.profile.rest) == .object(original.profile.rest) && !original.profile.rest.isEmpty)
        #expect(JSONValue.object(stored.profile.top) == .object(original.profile.top) && !original.profile.top.isEmpty)
        for spec in CharacterCard.Spec.allCases {
            #expect(CharacterCard.export(stored, spec: spec) == CharacterCard.export(original, spec: spec), "\(spec)")
        }
        // Setting one keeps the other, however the profile was read.
        var changed = stored
        changed.profile.rest = [("creator_notes", .string("new"))]
        #expect(JSONValue.object(changed.profile.top) == .object(original.profile.top))
        changed.profile.top = []
        #expect(JSONValue.object(changed.profile.rest) == .object([("creator_notes", .string("new"))]))
        let reread = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(changed.profile).serializedString())
        #expect(changed != original && reread == changed.profile)
    }

    @Test func thePersonaMacrosAndPostHistoryInstructionsAreInPlace() throws {
        let prompt = PromptAssembler(contextBudget: 4096).assemble(clone: try mara(), history: [message("Hello")])
        let system = prompt.messages[0].text
        #expect(system.hasPrefix("Stay in character as Captain Mara.\nYou are Captain Mara."))
        #expect(system.contains("Description: Captain Mara commands the airship Kestrel") && system.contains("Scenario: User has just stowed away"))
        #expect(system.contains("Examples of how you speak:"))
        // The card's character's note (depth 4) goes before the one message there is.
        #expect(prompt.messages.map(\.role) == [.system, .system, .user, .system])
        #expect(prompt.messages[1].text == "Mara is tired.")
        #expect(prompt.messages.last?.text == "Keep replies under three sentences.")
    }

    /// A lorebook entry the card places `before_char` goes before the character's definitions;
    /// the others (`after_char`, or none) after the persona, as before.
    @Test(arguments: [false, true]) func anEntryPlacedBeforeTheCharacterGoesBeforeItsDefinitions(stored: Bool) throws {
        var mara = try mara()
        mara.profile.lorebook.append(LoreEntry(keys: ["tax"], content: "Taxes are due at dawn.", extra: [("position", .string("after_char"))]))
        if stored { mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString()) }
        let system = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: [message("The guild's tax?")]).messages[0].text
        #expect(
            system.hasPrefix(
                "Stay in character as Captain Mara.\nYou are Captain Mara.\nWhat you know that matters here:\n"
                    + "- The Skyguild taxes every cargo that crosses the Rift.\nDescription: Captain Mara commands"), "\(system)")
        #expect(system.hasSuffix("\nWhat you know that matters here:\n- Taxes are due at dawn."), "\(system)")
    }

    /// An entry SillyTavern places "at depth" (its export's `extensions.position` 4) goes among
    /// the messages, `extensions.depth` from the end, as a message of `extensions.role`: entries
    /// of one depth and role in one message (in the order they go in), after the character's
    /// note at that depth; its tokens counted. However the profile was read.
    @Test(arguments: [false, true]) func anEntryPlacedAtADepthGoesAmongTheMessages(stored: Bool) throws {
        func entry(_ content: String, _ extensions: [(String, JSONValue)], order: Int) -> LoreEntry {
            LoreEntry(
                keys: ["guild"], content: content, insertionOrder: order,
                extra: [("position", .string("after_char")), ("extensions", .object(extensions))])
        }
        var mara = try mara()  // her character's note: "{{char}} is tired.", depth 4, system
        mara.profile.lorebook = [
            entry("The guild is watching.", [("position", .int(4)), ("depth", .int(1)), ("role", .int(0))], order: 1),
            entry("{{char}} owes the guild.", [("position", .int(4)), ("depth", .int(1))], order: 2),
            entry("The guild's envoy speaks.", [("position", .int(4)), ("depth", .int(1)), ("role", .int(1))], order: 3),
            entry("Deep lore.", [("position", .int(4)), ("depth", .int(4)), ("role", .int(2))], order: 4),
            entry("Default depth.", [("position", .int(4)), ("depth", .string("x"))], order: 5),
            entry("After the persona.", [("position", .int(1))], order: 6),
        ]
        if stored { mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString()) }
        let history = (0..<5).map { message($0 == 4 ? "The guild?" : "m\($0)", $0 % 2 == 0 ? .user : .assistant, $0) }
        let prompt = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: history)
        let lines = prompt.messages.dropFirst().map { "\($0.role.rawValue): \($0.text)" }
        #expect(
            lines == [
                "user: m0", "system: Mara is tired.", "assistant: Deep lore.", "system: Default depth.", "assistant: m1", "user: m2",
                "assistant: m3",
                "system: The guild is watching.\nCaptain Mara owes the guild.", "user: The guild's envoy speaks.", "user: The guild?",
                "system: Keep replies under three sentences.",
            ], "\(lines)")
        let system = prompt.messages[0].text
        #expect(system.hasSuffix("What you know that matters here:\n- After the persona."), "\(system)")
        #expect(!system.contains("Deep lore") && !system.contains("watching"))
        let counted = prompt.messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead }
        #expect(prompt.estimatedTokens == counted)
    }

    /// A card's example dialogues reach the persona without their `<START>` markers: each
    /// dialogue trimmed, a blank line between them.
    @Test func exampleDialoguesLoseTheirStartMarkers() throws {
        var mara = try mara()
        mara.profile.exampleMessages = "<START>\n{{user}}: Hi\n{{char}}: Ahoy.\n<start>\n\n{{char}}: Stowaway!\n<START>\n"
        let system = PromptAssembler.systemText(for: mara)
        #expect(system.hasSuffix("Examples of how you speak:\nUser: Hi\nCaptain Mara: Ahoy.\n\nCaptain Mara: Stowaway!"), "\(system)")
        #expect(PromptAssembler.exampleDialogues("No markers here. ") == "No markers here.")
        #expect(PromptAssembler.exampleDialogues("<START>\n<START>").isEmpty)
    }

    /// `{{original}}` in a card's system prompt or post-history instructions (V2: the text the
    /// card's replaces) stands for nothing here: it is not sent to the model.
    @Test func originalStandsForNothing() throws {
        var mara = try mara()
        mara.systemPrompt = "{{original}}\nStay in character as {{char}}."
        mara.profile.postHistoryInstructions = "{{original}} Be brief."
        let prompt = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: [message("Hello")])
        #expect(prompt.messages[0].text.hasPrefix("Stay in character as Captain Mara.\nYou are Captain Mara."))
        #expect(prompt.messages.last?.text == "Be brief.")
    }

    /// A card's character's note (SillyTavern's `extensions.depth_prompt`) goes `depth` messages
    /// from the end of the history, in its role, macros expanded, however the profile was read;
    /// past the history's start it goes first, at depth 0 after the last message.
    @Test(arguments: [0, 1, 2]) func theCharactersNoteGoesItsDepthFromTheEnd(read: Int) throws {
        func prompt(depth: JSONValue, role: String?, messages: Int) throws -> [String] {
            var mara = try mara()
            let note = JSONValue.object(
                [("prompt", .string(" {{char}} is tired. ")), ("depth", depth)] + (role.map { [("role", .string($0))] } ?? []))
            mara.profile.rest = mara.profile.rest.map { key, value in
                guard key == "extensions", case .object(let pairs) = value else { return (key, value) }
                return (key, .object(pairs.filter { $0.0 != "depth_prompt" } + [("depth_prompt", note)]))
            }
            switch read {
            case 1: mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString())
            case 2:
                let fields = mara.profile.cardFields
                let before = JSONValue.object(
                    CharacterCard.personaJSON(mara.profile) + [("rest", .object(fields.rest)), ("top", .object(fields.top))])
                mara.profile = CharacterCard.profile(fromStorage: before.serializedString())
            default: break
            }
            let history = (0..<messages).map { message("m\($0)", $0 % 2 == 0 ? .user : .assistant, $0) }
            return PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: history).messages.dropFirst().map {
                "\($0.role.rawValue): \($0.text)"
            }
        }
        let note = "system: Captain Mara is tired."
        let end = "system: Keep replies under three sentences."
        #expect(
            try prompt(depth: .int(2), role: nil, messages: 5) == ["user: m0", "assistant: m1", "user: m2", note, "assistant: m3", "user: m4", end])
        #expect(try prompt(depth: .int(9), role: nil, messages: 3) == [note, "user: m0", "assistant: m1", "user: m2", end])
        #expect(try prompt(depth: .int(0), role: "user", messages: 1) == ["user: m0", "user: Captain Mara is tired.", end])
        #expect(
            try prompt(depth: .string("four"), role: "narrator", messages: 5) == [
                "user: m0", note, "assistant: m1", "user: m2", "assistant: m3", "user: m4", end,
            ])
    }

    /// A V3 card's `nickname` is what `{{char}}` (and the older `<BOT>`, `<char>`) stands for in
    /// the prompt and the greeting, however the profile was read (as imported, stored, or stored
    /// before the card's fields went last); the clone's name stays its name. `<USER>` is the user.
    @Test(arguments: [0, 1, 2]) func aNicknameIsWhatCharStandsFor(read: Int) throws {
        let card = try JSONValue.parse(
            Array(
                #"""
                {"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "Captain Mara Vell", "nickname": " Mara ",
                 "description": "{{char}} flies; <BOT> and <char> too, for <User>.", "first_mes": "{{char}} here, {{user}}."}}
                """#.utf8))
        var mara = clone(from: try CharacterCard.parse(card))
        switch read {
        case 1: mara.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(mara.profile).serializedString())
        case 2:
            let fields = mara.profile.cardFields
            let before = JSONValue.object(CharacterCard.personaJSON(mara.profile) + [("rest", .object(fields.rest)), ("top", .object(fields.top))])
            mara.profile = CharacterCard.profile(fromStorage: before.serializedString())
        default: break
        }
        #expect(mara.profile.nickname == "Mara")
        let system = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: [message("Hello")]).messages[0].text
        #expect(
            system.contains("You are Captain Mara Vell.") && system.contains("Description: Mara flies; Mara and Mara too, for User."), "\(system)")
        #expect(PromptAssembler.greeting(of: mara) == "Mara here, User.")
        // Without a nickname, the name.
        var plain = mara
        plain.profile.rest = plain.profile.rest.filter { $0.0 != "nickname" }
        #expect(PromptAssembler.greeting(of: plain) == "Captain Mara Vell here, User.")
        #expect(JSONValue.object(mara.profile.rest).serializedString().contains(#""nickname":" Mara ""#), "exported as it came")
    }

    /// A user's persona is who `{{user}}` (`<USER>`) is everywhere a card's text reaches the model
    /// (system prompt, definitions, examples, lore, character's note, post-history
    /// instructions, greetings), `{{persona}}` what it says of them, and the persona says who
    /// the clone talks with; without one they are "User" and the persona says nothing of them.
    @Test func aUsersPersonaIsWhoUserStandsFor() throws {
        var mara = try mara()
        mara.systemPrompt = "Stay in character as {{char}}, talking to {{user}}."
        mara.profile.scenario = "<USER> has just stowed away. {{persona}}"
        mara.profile.exampleMessages = "<START>\n{{User}}: Hi\n{{char}}: Ahoy."
        mara.profile.postHistoryInstructions = "Answer {{user}} briefly."
        mara.profile.firstMessage = "Who goes there, {{user}}?"
        mara.profile.lorebook = [LoreEntry(keys: ["tax"], content: "{{user}} owes the guild's tax.")]
        let ana = Persona(name: "Ana", description: "A cartographer; {{char}} distrusts {{user}}.")
        let history = [message("The tax?")]
        let with = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: history, user: ana).messages
        let system = with[0].text
        #expect(system.hasPrefix("Stay in character as Captain Mara, talking to Ana.\nYou are Captain Mara."), "\(system)")
        #expect(system.contains("Scenario: Ana has just stowed away. A cartographer; {{char}} distrusts {{user}}."), "\(system)")
        #expect(
            system.contains("\nYou are talking with Ana.\nAbout Ana: A cartographer; Captain Mara distrusts Ana.\n"), "\(system)")
        #expect(system.contains("Examples of how you speak:\nAna: Hi\nCaptain Mara: Ahoy.") && system.contains("- Ana owes the guild's tax."))
        #expect(with.last?.text == "Answer Ana briefly.")
        #expect(PromptAssembler.greeting(of: mara, user: ana) == "Who goes there, Ana?")
        #expect(PromptAssembler.greetings(of: mara, user: ana).first == "Who goes there, Ana?")
        #expect(mara.json(user: ana)["greeting"] == .string("Who goes there, Ana?"))
        // A persona with no description: who, not what.
        let named = PromptAssembler.systemText(for: mara, user: Persona(name: "Bo"))
        #expect(named.contains("\nYou are talking with Bo.\n") && !named.contains("About Bo"), "\(named)")
        // Without one: "User", and nothing said of them.
        let without = PromptAssembler(contextBudget: 4096).assemble(clone: mara, history: history).messages
        #expect(without[0].text.hasPrefix("Stay in character as Captain Mara, talking to User."))
        #expect(!without[0].text.contains("talking with") && without[0].text.contains("Scenario: User has just stowed away.\n"))
        #expect(mara.json["greeting"] == .string("Who goes there, User?"))
    }

    @Test func aPersonaIsOneLineOfANameAndABoundedDescription() throws {
        func parse(_ text: String) throws -> Persona { try Persona.parse(try JSONValue.parse(Array(text.utf8))) }
        #expect(try parse(#"{"name":"  Ana  ","description":" maps \n things "}"#) == Persona(name: "Ana", description: "maps \n things"))
        #expect(try parse(#"{"name":"Ana"}"#) == Persona(name: "Ana"))
        for (body, message) in [
            (#"{}"#, "missing field 'name'"), (#"{"name":"  "}"#, "'name' must be one line of 1-50 characters"),
            (#"{"name":"A\nB"}"#, "'name' must be one line of 1-50 characters"),
            (#"{"name":"A\u0007"}"#, "'name' must be one line of 1-50 characters"),
            ("{\"name\":\"\(String(repeating: "é", count: 51))\"}", "'name' must be one line of 1-50 characters"),
            ("{\"name\":\"A\",\"description\":\"\(String(repeating: "x", count: 2_001))\"}", "'description' is longer than 2000 characters"),
            (#"{"name":"A","age":3}"#, "unknown field 'age'"), (#"{"name":3}"#, "'name' must be a string, not number"),
        ] {
            #expect(throws: ValidationError(message), "\(body)") { try parse(body) }
        }
        #expect(try parse("{\"name\":\"\(String(repeating: "é", count: 50))\"}").name.count == 50)
    }

    /// A V3 entry's content may begin with decorator lines (`@@depth 4`, fallbacks `@@@…`): they
    /// are directions to a card tool, left out of the prompt with the blank lines around them
    /// (the ones Parley follows, followed: `@@depth` puts an entry among the messages); an entry
    /// of decorators only adds nothing. A line that only contains `@@` later is text.
    @Test func decoratorLinesAreLeftOutOfTheLore() {
        var clone = Clone(id: "cl", owner: "u", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
        clone.profile.lorebook = [
            LoreEntry(keys: ["sea"], content: "@@depth 4\r\n@@@instruct_depth 4\n\nThe sea is cold.\n@@ not a decorator here", insertionOrder: 1),
            LoreEntry(keys: ["sea"], content: "@@position after_desc\n\n", insertionOrder: 2),
            LoreEntry(keys: ["sea"], content: "  @@dont_activate_after_match\nWaves.", insertionOrder: 3),
            LoreEntry(keys: ["sea"], content: "@@depth 2\r\nSalt.", insertionOrder: 4),
        ]
        let lore = PromptAssembler.lore(for: clone, recent: ["the sea"], budget: 500)
        #expect(lore.map(\.promptContent) == ["The sea is cold.\n@@ not a decorator here", "Waves.", "Salt."])
        let messages = PromptAssembler(contextBudget: 4096).assemble(clone: clone, history: [message("the sea")]).messages
        #expect(messages[0].text.hasSuffix("What you know that matters here:\n- Waves."), "\(messages[0].text)")
        #expect(
            messages.dropFirst().map { "\($0.role.rawValue): \($0.text)" } == [
                "system: The sea is cold.\n@@ not a decorator here", "system: Salt.", "user: the sea",
            ])
    }

    /// SillyTavern's per-entry settings in its exports' `extensions`: `case_sensitive` (the card's
    /// own wins), `scan_depth` (V3's `@@scan_depth` wins), and `probability` with `useProbability`
    /// (a found or constant entry goes in that often; `@@activate` always), however the profile
    /// was read.
    @Test(arguments: [false, true]) func sillyTavernsCaseSensitivityScanDepthAndChanceAreFollowed(stored: Bool) throws {
        var clone = Clone(id: "cl", owner: "u", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
        func entry(_ content: String, _ extensions: [(String, JSONValue)], keys: [String] = ["Rift"], caseSensitive: Bool? = nil) -> LoreEntry {
            LoreEntry(keys: keys, content: content, caseSensitive: caseSensitive, extra: [("extensions", .object(extensions))])
        }
        clone.profile.lorebook = [
            entry("As written.", [("case_sensitive", .bool(true))]),
            entry("Card's own wins.", [("case_sensitive", .bool(true))], caseSensitive: false),
            entry("Null: folded.", [("case_sensitive", .null)]),
            entry("Six deep.", [("scan_depth", .int(6))], keys: ["anchor"]),
            entry("@@scan_depth 1\nDecorator wins.", [("scan_depth", .int(6))], keys: ["anchor"]),
            entry("Never.", [("probability", .int(0)), ("useProbability", .bool(true))]),
            entry("Not used: always.", [("probability", .int(0)), ("useProbability", .bool(false))]),
            LoreEntry(
                keys: [], content: "Constant, half the time.", constant: true,
                extra: [("extensions", .object([("probability", .int(50)), ("useProbability", .bool(true))]))]),
            entry("@@activate\nActivated, whatever the chance.", [("probability", .int(0)), ("useProbability", .bool(true))]),
        ]
        if stored { clone.profile = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(clone.profile).serializedString()) }
        func lore(_ texts: String...) -> [String] {
            PromptAssembler.lore(for: clone, recent: Array(texts.suffix(4)), budget: 10_000, history: texts).map(\.promptContent)
        }
        let folded = lore("anchor", "w", "x", "y", "the rift")
        #expect(!folded.contains("As written.") && folded.contains("Card's own wins.") && folded.contains("Null: folded."))
        #expect(folded.contains("Six deep.") && !folded.contains("Decorator wins."), "\(folded)")
        #expect(!folded.contains("Never.") && folded.contains("Not used: always.") && folded.contains("Activated, whatever the chance."))
        #expect(lore("The Rift").contains("As written."))
        var constant = 0
        for _ in 0..<200 where lore("nothing").contains("Constant, half the time.") { constant += 1 }
        #expect((40...160).contains(constant), "\(constant) of 200")
    }

    /// The V3 decorators Parley follows: `@@activate`, `@@dont_activate`, `@@scan_depth`,
    /// `@@additional_keys`, `@@exclude_keys` (not with `use_regex`), `@@position`, `@@depth` with
    /// `@@role`; of a decorator it does not follow, the first `@@@` fallback it does.
    @Test func theDecoratorsParleyFollowsSayWhetherAndWhereAnEntryGoes() {
        var clone = Clone(id: "cl", owner: "u", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
        func entry(_ decorators: String, _ text: String, keys: [String] = ["sea"], extra: [(String, JSONValue)] = []) -> LoreEntry {
            LoreEntry(keys: keys, content: decorators + "\n" + text, extra: extra)
        }
        clone.profile.lorebook = [
            entry("@@activate", "Always.", keys: ["never said"]),
            entry("@@dont_activate", "Never."),
            entry("@@dont_activate\n@@activate", "Activate wins."),
            entry("@@scan_depth 6", "Six deep.", keys: ["anchor"]),
            entry("@@additional_keys storm, gale", "With weather."),
            entry("@@exclude_keys calm", "Not calm."),
            entry("@@exclude_keys calm", "Regex: not excluded.", extra: [("use_regex", .bool(true))]),
            entry("@@position before_desc", "Before."),
            entry("@@risu_only 3\n@@@another_app 2\n@@@depth 0\n@@@depth 9\n@@role user", "After the last, as the user."),
            entry("@@depth 1\n@@role narrator", "Depth 1, system: the role is unreadable."),
        ]
        func prompt(_ texts: String...) -> [String] {
            let history = texts.enumerated().map { message($1, $0 % 2 == 0 ? .user : .assistant, $0) }
            return PromptAssembler(contextBudget: 4096).assemble(clone: clone, history: history).messages.map {
                "\($0.role.rawValue): \($0.text)"
            }
        }
        // The book scans the last 4 messages by default: "anchor" 5 back is out of its reach,
        // but not of the entry that scans 6.
        let calm = prompt("the anchor", "x", "y", "z", "A calm sea.")
        #expect(calm[0].hasPrefix("system: You are Ada.\nWhat you know that matters here:\n- Before.\n"), "\(calm[0])")
        #expect(calm[0].hasSuffix("What you know that matters here:\n- Always.\n- Activate wins.\n- Six deep.\n- Regex: not excluded."), "\(calm[0])")
        #expect(!prompt("the anchor", "w", "x", "y", "z", "v", "A calm sea.")[0].contains("Six deep."))
        #expect(
            Array(calm.suffix(3)) == ["system: Depth 1, system: the role is unreadable.", "user: A calm sea.", "user: After the last, as the user."])
        let stormy = prompt("A stormy sea.")
        #expect(stormy[0].contains("- With weather.") && stormy[0].contains("- Not calm.") && !stormy[0].contains("Six deep."), "\(stormy[0])")
        #expect(!stormy[0].contains("Never."))
        #expect(LoreEntry(keys: [], content: "@@depth x\n@@@depth 2\ntext").decorators == [.depth(2)], "an unreadable value falls back too")
        #expect(LoreEntry(keys: [], content: "@@depth 3\n@@@depth 2\ntext").decorators == [.depth(3)], "a fallback only for one not followed")
    }

    @Test func overTheBudgetTheLowestPriorityIsDroppedFirstAndOrderIsKept() {
        let entries = [
            LoreEntry(keys: ["sea"], content: "low " + String(repeating: "word ", count: 30), insertionOrder: 1, priority: 1),
            LoreEntry(keys: ["sea"], content: "high " + String(repeating: "word ", count: 30), insertionOrder: 3, priority: 9),
            LoreEntry(keys: ["sea"], content: "mid " + String(repeating: "word ", count: 30), insertionOrder: 2, priority: 5),
            LoreEntry(keys: [], content: "always", insertionOrder: 0, constant: true),
            LoreEntry(keys: ["Sea"], content: "case", insertionOrder: 4, caseSensitive: true),
        ]
        var clone = Clone(id: "c", owner: "u", name: "N", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
        clone.profile.lorebook = entries
        let one = Tokenizer.count(entries[0].content)
        let kept = PromptAssembler.lore(for: clone, recent: ["the sea"], budget: 2 * one + 5 + Tokenizer.count("always"))
        #expect(kept.map(\.content.first) == ["a", "m", "h"], "the low-priority entry is dropped; the rest in insertion order")
        #expect(PromptAssembler.lore(for: clone, recent: ["the Sea"], budget: 10_000).map(\.content).contains("case"))
        #expect(!PromptAssembler.lore(for: clone, recent: ["the sea"], budget: 10_000).map(\.content).contains("case"))
    }
}
