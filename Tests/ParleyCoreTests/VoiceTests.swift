import ParleyCore
import Testing

@Suite struct VoiceTests {
    /// Feeds `text` in pieces of `size` characters, as tokens arrive.
    private func sentences(of text: String, pieces size: Int) -> [String] {
        var splitter = SentenceSplitter()
        var out: [String] = []
        var index = text.startIndex
        while index < text.endIndex {
            let end = text.index(index, offsetBy: size, limitedBy: text.endIndex) ?? text.endIndex
            out += splitter.feed(text[index..<end])
            index = end
        }
        return out + (splitter.finish().map { [$0] } ?? [])
    }

    @Test(arguments: [1, 3, 7, 1000])
    func sentencesComeOutWholeHoweverTheTextIsCut(_ size: Int) {
        let text = "Hello there, friend. Mr. Smith said \"we go now!\" Did he? Yes… truly.\nA list:\n1. one thing and another"
        #expect(
            sentences(of: text, pieces: size) == [
                "Hello there, friend.", "Mr. Smith said \"we go now!\"", "Did he? Yes…", "truly.", "A list:", "1. one thing and another",
            ])
    }

    @Test func aSentenceIsGivenOutAsSoonAsTheSpaceAfterItArrives() {
        var splitter = SentenceSplitter()
        #expect(splitter.feed("The first one is done.") == [])  // "done." could be "done.5" yet
        #expect(splitter.feed(" And") == ["The first one is done."])
        #expect(splitter.finish() == "And")
        #expect(splitter.finish() == nil)
    }

    @Test func anEndlessSentenceIsCutAtItsLastSpace() {
        var splitter = SentenceSplitter()
        splitter.maximumLength = 20
        #expect(splitter.feed("aaaa bbbb cccc dddd eeee ffff") == ["aaaa bbbb cccc dddd"])
        #expect(splitter.finish() == "eeee ffff")
    }

    @Test func anAudioFrameRoundTripsAndIsTheOnlyBinaryFrame() throws {
        let header = AudioFrame.Header(stream: "st_1", chunk: 3, sentence: 2)
        let bytes = AudioFrame.encode(header, audio: [1, 2, 3, 4])
        #expect(bytes[0] == AudioFrame.marker)
        let (decoded, payload) = try #require(AudioFrame.decode(bytes))
        #expect(decoded["chunk"] == .int(3) && decoded["sentence"] == .int(2) && decoded["stream"] == .string("st_1"))
        #expect(decoded["sample_rate"] == .int(24_000) && decoded["format"] == .string("pcm"))
        #expect(Array(payload) == [1, 2, 3, 4])
        #expect(AudioFrame.isBinary(firstByte: bytes.first))
        #expect(!AudioFrame.isBinary(firstByte: ServerFrame.welcome(user: "u").first))
        #expect(AudioFrame.decode(Array(bytes.prefix(5))) == nil)
        #expect(AudioFrame.decode(Array("{}".utf8)) == nil)
    }

    @Test func voicePricesRoundUpAndParse() throws {
        let price = VoicePrice(speechPer1KCharacters: 15, transcriptionPerMinute: 6)
        #expect(price.speechCost(characters: 0) == 0)
        #expect(price.speechCost(characters: 1) == 1)
        #expect(price.speechCost(characters: 200) == 3)
        #expect(price.transcriptionCost(seconds: 0.2) == 1)  // a second at least: 0.1 → 1
        #expect(price.transcriptionCost(seconds: 59.5) == 6)
        let table = try PricingTable.parse(
            try JSONValue.parse(
                Array(#"{"models":{},"voice":{"speech_per_1k_characters":15,"transcription_per_minute":6}}"#.utf8)))
        #expect(table.voice == price)
        #expect(try PricingTable.parse(try JSONValue.parse(Array(#"{"models":{}}"#.utf8))).voice == .standard)
        #expect(throws: ValidationError.self) {
            try PricingTable.parse(try JSONValue.parse(Array(#"{"models":{},"voice":{"speech_per_1k_characters":-1}}"#.utf8)))
        }
    }

    @Test func aClonesVoiceIsCheckedSetAndCleared() throws {
        func fields(_ json: String) throws -> CloneFields { try CloneFields.parse(try JSONValue.parse(Array(json.utf8)), requireName: false) }
        #expect(try fields(#"{"voice":{"name":"joe","speed":1.25}}"#).voice == .voice(CloneVoice(name: "joe", speed: 1.25)))
        #expect(try fields(#"{"voice":{"name":"joe"}}"#).voice == .voice(CloneVoice(name: "joe", speed: 1)))
        #expect(try fields(#"{"voice":null}"#).voice == .serverDefault)
        #expect(try fields(#"{}"#).voice == nil)
        for bad in [#"{"voice":{"name":""}}"#, #"{"voice":{"name":"joe","speed":5}}"#, #"{"voice":{"name":"joe","pitch":1}}"#, #"{"voice":"joe"}"#] {
            #expect(throws: ValidationError.self, "\(bad)") { try fields(bad) }
        }
        var clone = Clone(id: "cl", owner: "u", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)
        clone = try fields(#"{"voice":{"name":"joe","speed":0.5}}"#).applied(to: clone, at: 1)
        let stored = CharacterCard.profile(fromStorage: CharacterCard.storageJSON(clone.profile).serializedString())
        #expect(stored.voice == CloneVoice(name: "joe", speed: 0.5), "kept with the profile in both stores")
        #expect(clone.json["voice"] == .object([("name", .string("joe")), ("speed", .double(0.5))]))
        #expect(CharacterCard.profileJSON(clone.profile)["voice"] == nil)
        clone = try fields(#"{"voice":null}"#).applied(to: clone, at: 2)
        #expect(clone.profile.voice == nil && clone.profile.isEmpty)
    }

    @Test func chatFramesAskForVoiceAndResumesForAudio() throws {
        #expect(
            try ClientFrame.parse(Array(#"{"type":"chat.send","id":"c","clone":"cl","text":"hi","voice":true}"#.utf8))
                == .chat(.send(id: "c", clone: "cl", conversation: nil, text: "hi", voice: true)))
        #expect(
            try ClientFrame.parse(Array(#"{"type":"chat.regenerate","id":"c","message":"m"}"#.utf8))
                == .chat(.regenerate(id: "c", message: "m", voice: false)))
        #expect(
            try ClientFrame.parse(Array(#"{"type":"stream.resume","id":"r","stream":"st","after":4,"audio_after":2}"#.utf8))
                == .chat(.resume(id: "r", stream: "st", after: 4, audioAfter: 2)))
        #expect(throws: FrameError.self) {
            try ClientFrame.parse(Array(#"{"type":"stream.resume","id":"r","stream":"st","after":4,"audio_after":-1}"#.utf8))
        }
        #expect(throws: FrameError.self) { try ClientFrame.parse(Array(#"{"type":"chat.send","id":"c","clone":"cl","text":"hi","voice":1}"#.utf8)) }
    }
}
