import ParleyCore
import ParleyLLM
import Testing

@Suite struct LanguageTagTests {
    @Test func wellFormedTagsParseInCanonicalCase() {
        let cases: [(String, String, String)] = [
            ("en", "en", "en"), ("PT-br", "pt-BR", "pt"), ("zh-hant-tw", "zh-Hant-TW", "zh"), ("sr-Latn", "sr-Latn", "sr"),
            ("es-419", "es-419", "es"), ("de-CH-1996", "de-CH-1996", "de"), ("zh-yue-HK", "zh-yue-HK", "zh"),
            ("en-US-x-twain", "en-US-x-twain", "en"), ("sl-rozaj-biske", "sl-rozaj-biske", "sl"), ("en-a-bbb-x-a-ccc", "en-a-bbb-x-a-ccc", "en"),
        ]
        for (text, canonical, language) in cases {
            let tag = LanguageTag(text)
            #expect(tag?.value == canonical, "\(text)")
            #expect(tag?.language == language, "\(text)")
        }
    }

    @Test func malformedTagsAreRefused() {
        for text in [
            "", "e", "english!", "pt_BR", "en--US", "-en", "en-", "x-klingon", "en-US-US", "de-1996-1996", "en-a", "en-a-x", "en-x",
            "toolongtag", "en-" + String(repeating: "a", count: 40), "ünï",
        ] {
            #expect(LanguageTag(text) == nil, "\(text)")
        }
    }

    @Test func readersShareALanguageByPrimarySubtag() {
        #expect(LanguageTag("en-US")!.sharesLanguage(with: LanguageTag("en-GB")!))
        #expect(!LanguageTag("pt")!.sharesLanguage(with: LanguageTag("es")!))
        #expect(LanguageTag("pt-br") == LanguageTag("pt-BR"))
    }
}

@Suite struct TranslationChatTests {
    let en = LanguageTag("en")!, enUS = LanguageTag("en-US")!, pt = LanguageTag("pt")!, ptBR = LanguageTag("pt-BR")!, zh = LanguageTag("zh")!

    func room(muted: [String] = []) -> Room {
        Room(
            id: "rm_1", kind: .translation, owner: "alice", topic: "", debaters: [Room.Debater(clone: "cl_z", stance: "", name: "Zoé")], rounds: 0,
            policy: .roundRobin, maxTokensPerTurn: 0, visibility: .private, muted: muted, members: ["bruno", "chen", "dave"],
            languages: ["alice": en, "bruno": pt, "chen": zh, "dave": enUS, "cl_z": LanguageTag("fr")!, "gone": LanguageTag("de")!],
            createdAt: 0, updatedAt: 0)
    }

    @Test func targetsAreTheOtherMembersLanguagesTheSenderDoesNotShare() {
        #expect(TranslationChat.targets(room: room(), speaker: "alice", lang: en).map(\.value) == ["fr", "pt", "zh"])
        #expect(TranslationChat.targets(room: room(), speaker: "bruno", lang: pt).map(\.value) == ["en", "en-US", "fr", "zh"])
        #expect(
            TranslationChat.targets(room: room(muted: ["cl_z"]), speaker: "alice", lang: en).map(\.value) == ["pt", "zh"],
            "a muted clone needs no translation; 'gone' is no member")
    }

    func entry(
        _ id: String, _ kind: RoomEntry.Kind, _ text: String, _ lang: LanguageTag, source: String? = nil, reason: StreamEndReason? = .complete
    ) -> RoomEntry {
        RoomEntry(
            id: id, room: "rm_1", kind: kind, speaker: "x", text: text, createdAt: 0, reason: kind == .said ? nil : reason, lang: lang, source: source
        )
    }

    @Test func aReaderSeesOriginalsInTheirLanguageAndTranslationsOfTheRest() {
        let transcript = [
            entry("re_1", .said, "Hello", en),
            entry("re_3", .translation, "Olá", pt, source: "re_1"),
            entry("re_2", .said, "Bom dia", pt),
            entry("re_4", .translation, "Good morning", en, source: "re_2"),
            entry("re_5", .translation, "Good mor", enUS, source: "re_2", reason: .cancelled),
            entry("re_6", .said, "你好", zh),
        ]
        func texts(_ lang: LanguageTag?, pending: Set<String> = []) -> [String] {
            TranslationChat.view(transcript, for: lang, pending: pending).map { $0.untranslated ? "!" + $0.entry.text : $0.entry.text }
        }
        #expect(texts(en) == ["Hello", "Good morning", "!你好"])
        #expect(texts(enUS) == ["Hello", "Good morning", "!你好"], "an incomplete en-US translation gives way to the en one")
        #expect(texts(ptBR) == ["Olá", "Bom dia", "!你好"])
        #expect(texts(zh) == ["!Hello", "!Bom dia", "你好"])
        #expect(texts(nil) == ["Hello", "Bom dia", "你好"])
        #expect(texts(pt, pending: ["re_6"]) == ["Olá", "Bom dia"])
    }

    @Test func theTranslatorIsToldTheLanguagesAndGivenContextNotToTranslate() {
        let context = [entry("re_1", .said, "The bank by the river", en), entry("re_2", .translation, "O banco", pt, source: "re_1")]
        let prompt = TranslationChat.prompt(text: "Meet me at the bank", from: en, to: pt, context: context, names: [:])
        #expect(prompt.messages.count == 2 && prompt.messages[1].text == "Meet me at the bank")
        #expect(prompt.messages[0].text.contains("from English (en) into Portuguese (pt)"))
        #expect(prompt.messages[0].text.contains("- x: The bank by the river"))
        #expect(!prompt.messages[0].text.contains("O banco"), "translations are not context")
        #expect(prompt.estimatedTokens == prompt.messages.reduce(0) { $0 + Tokenizer.count($1.text) + PromptAssembler.perMessageOverhead })
    }

    @Test func promptsNameALanguageInEnglishWithItsTag() {
        #expect(LanguageTag("fr-ca")?.promptName == "French (fr-CA)")
        #expect(LanguageTag("zh-Hant")?.promptName == "Chinese (zh-Hant)")
        #expect(LanguageTag("tlh")?.promptName == "tlh", "a language the list lacks keeps its tag")
    }

    @Test func theSimulatedStandInIsLabelledAndExact() {
        let request = CompletionRequest(messages: [], maxOutputTokens: 100, translation: TranslationTask(text: "Bom dia, Ana", from: pt, to: en))
        let tokens = SimulatedProvider().replyTokens(for: request)
        #expect(tokens.joined() == "[simulated en translation] Bom dia, Ana")
        var capped = request
        capped.maxOutputTokens = 2
        #expect(SimulatedProvider().replyTokens(for: capped).count == 2)
    }
}
