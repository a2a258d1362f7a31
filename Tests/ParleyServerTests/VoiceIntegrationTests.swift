import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1
import ParleyCore
import ParleyLLM
import ParleyTestSupport
import Synchronization
import Testing

@testable import ParleyServer

/// A speech service that makes two bytes of "audio" per character of the sentence, in two
/// chunks, and can be told to fail one request (counted from 1) before any audio.
final class ScriptedSpeech: SpeechSynthesizer {
    let model = "scripted-tts"
    private let failing: Int?
    private let calls = Mutex<[SpeechRequest]>([])

    init(failing: Int? = nil) { self.failing = failing }

    var requests: [SpeechRequest] { calls.withLock { $0 } }

    func synthesize(_ request: SpeechRequest) -> AsyncThrowingStream<ByteBuffer, any Error> {
        let number = calls.withLock {
            $0.append(request)
            return $0.count
        }
        return AsyncThrowingStream { continuation in
            if number == failing {
                continuation.finish(throwing: SpeechServiceError("the speech service answered HTTP 500"))
                return
            }
            let audio = [UInt8](repeating: 7, count: request.text.count * 2)
            continuation.yield(ByteBuffer(bytes: audio.prefix(audio.count / 2 / 2 * 2)))
            continuation.yield(ByteBuffer(bytes: audio.dropFirst(audio.count / 2 / 2 * 2)))
            continuation.finish()
        }
    }
}

/// A transcription service that hears what it is told, for as long as it is told.
struct ScriptedTranscriber: SpeechTranscriber {
    let model = "scripted-stt"
    var text: String
    var duration: Double?

    func transcribe(_ audio: ByteBuffer, contentType: String, filename: String) async throws -> Transcript {
        Transcript(text: text, duration: duration)
    }
}

/// A voiced stream as a client saw it.
struct VoicedStream {
    var reply: StreamedReply
    var chunks: [(header: JSONValue, audio: [UInt8])]
    var audio: JSONValue { reply.end["audio"] ?? .null }
}

extension TestWebSocket {
    func chatSendVoiced(id: String, clone: String) async throws {
        try await send(
            .object([
                ("type", .string("chat.send")), ("id", .string(id)), ("clone", .string(clone)), ("text", .string("Speak")), ("voice", .bool(true)),
            ]))
    }

    /// Reads a voiced stream to its end (or `chunks` audio chunks, when given).
    func readVoiced(chunks wanted: Int? = nil) async throws -> VoicedStream {
        var start: JSONValue?
        var tokens: [JSONValue] = []
        var chunks: [(header: JSONValue, audio: [UInt8])] = []
        while true {
            switch try await next() {
            case .binary(let bytes):
                let (header, audio) = try #require(AudioFrame.decode(bytes))
                chunks.append((header, Array(audio)))
                if let wanted, chunks.count == wanted {
                    return VoicedStream(reply: StreamedReply(start: start ?? .null, tokens: tokens, end: .null), chunks: chunks)
                }
            case .text(let text):
                let frame = try JSONValue.parse(Array(text.utf8))
                switch frame["type"]?.stringValue {
                case "stream.start": start = frame
                case "token": tokens.append(frame)
                case "paywall", "room.event": continue
                case "stream.end": return VoicedStream(reply: StreamedReply(start: start ?? .null, tokens: tokens, end: frame), chunks: chunks)
                default: throw TestTimeout(description: "unexpected frame in a voiced stream: \(frame)")
                }
            case let other: throw TestTimeout(description: "unexpected \(other)")
            }
        }
    }
}

@Suite struct VoiceIntegrationTests {
    /// One credit per output token and per character voiced; prompts free.
    private func server(
        _ store: TestServer.StoreKind, grant: Int64 = 100_000, speech: ScriptedSpeech, replyTokens: Int = 40, tokensPerSecond: Double = 0,
        _ more: @escaping (inout ServerConfiguration) -> Void = { _ in }
    ) async throws -> TestServer {
        try await creditServer(store, grant: grant, replyTokens: replyTokens, tokensPerSecond: tokensPerSecond) {
            $0.credits.pricing.voice = VoicePrice(speechPer1KCharacters: 1_000, transcriptionPerMinute: 60)
            $0.speech = speech
            $0.defaultVoice = CloneVoice(name: "house", speed: 1)
            more(&$0)
        }
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func eachSentenceIsPaidForThenSpokenInOrderAndTheLedgerBalances(_ store: TestServer.StoreKind) async throws {
        let speech = ScriptedSpeech()
        let server = try await server(store, speech: speech)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token, fields: [("voice", .object([("name", .string("joe")), ("speed", .double(1.5))]))])
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone["id"]!.stringValue!)
        let voiced = try await socket.readVoiced()
        #expect(voiced.reply.reason == "complete" && voiced.audio["reason"] == .string("complete"))

        // What the speech service was asked: the reply's sentences, whole, in order, in the clone's voice.
        let spoken = speech.requests
        #expect(spoken.map(\.text).joined(separator: " ") == voiced.reply.text.trimmedWhitespace)
        #expect(spoken.count >= 2 && spoken.allSatisfy { $0.voice == "joe" && $0.speed == 1.5 })
        #expect(voiced.chunks.map { $0.header["chunk"]!.intValue! } == Array(1...Int64(2 * spoken.count)))
        for (index, sentence) in spoken.enumerated() {
            let chunks = voiced.chunks.filter { $0.header["sentence"] == .int(Int64(index + 1)) }
            #expect(chunks.flatMap(\.audio).count == sentence.text.count * 2)
            // Each chunk says through which token its sentence's text had come: never ahead of the text.
            let seq = try #require(chunks.first?.header["seq"]?.intValue)
            #expect(voiced.reply.tokens.prefix(Int(seq)).map { $0["text"]!.stringValue! }.joined().contains(sentence.text))
        }
        let seqs = voiced.chunks.map { $0.header["seq"]!.intValue! }
        #expect(seqs == seqs.sorted())
        #expect(voiced.chunks.last?.header["seq"] == .int(Int64(voiced.reply.tokens.count)), "the last sentence ends with the reply")
        let characters = spoken.reduce(0) { $0 + $1.text.count }
        #expect(voiced.audio["characters"] == .int(Int64(characters)) && voiced.audio["cost"] == .int(Int64(characters)))
        #expect(voiced.audio["sentences"] == .int(Int64(spoken.count)) && voiced.audio["chunks"] == .int(Int64(2 * spoken.count)))

        let (balance, entries) = try await creditsOf(server, token: token)
        let voice = entries.filter { $0["feature"] == .string("voice") }
        #expect(voice.count == spoken.count && voice.allSatisfy { $0["model"] == .string("scripted-tts") })
        #expect(balance == voiced.reply.end["balance"]!.intValue!)
        #expect(balance == 100_000 - voiced.reply.end["cost"]!.intValue! - Int64(characters))
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func theVoiceStopsAtTheFirstSentenceItCannotPayFor(_ store: TestServer.StoreKind) async throws {
        // 40 tokens of text (40 credits) and 70 for the voice: not every sentence. Text and voice
        // draw on the one balance as they go, so the text may reach the paywall too.
        let speech = ScriptedSpeech()
        let server = try await server(store, grant: 110, speech: speech)
        let token = try await server.token("bob")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone)
        let voiced = try await socket.readVoiced()
        #expect(["complete", "insufficient_credits"].contains(voiced.reply.reason))
        #expect(voiced.audio["reason"] == .string("insufficient_credits"))
        let paid = voiced.audio["sentences"]!.intValue!
        #expect(Int64(speech.requests.count) == paid, "nothing unpaid is synthesised")
        #expect(voiced.audio["cost"]! == .int(Int64(speech.requests.reduce(0) { $0 + $1.text.count })))
        #expect(voiced.reply.end["cost"]!.intValue! + voiced.audio["cost"]!.intValue! <= 110)
        #expect(voiced.reply.end["balance"]!.intValue! >= 0)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aSentenceTheServiceFailsIsGivenBackAndTheVoiceSaysWhy(_ store: TestServer.StoreKind) async throws {
        let speech = ScriptedSpeech(failing: 2)
        let server = try await server(store, speech: speech)
        let token = try await server.token("carol")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone)
        let voiced = try await socket.readVoiced()
        #expect(voiced.reply.reason == "complete")
        #expect(voiced.audio["reason"] == .string("error"))
        #expect(voiced.audio["error"]?.stringValue?.contains("HTTP 500") == true)
        #expect(voiced.audio["sentences"] == .int(2) && voiced.chunks.count == 2)
        let first = Int64(speech.requests[0].text.count)
        #expect(voiced.audio["cost"] == .int(first), "only the spoken sentence is paid for")
        let (_, entries) = try await creditsOf(server, token: token)
        let voice = entries.filter { $0["feature"] == .string("voice") }
        #expect(voice.reduce(0) { $0 + $1["credits"]!.intValue! } == -first)
        #expect(voice.contains { $0["id"]!.stringValue!.hasSuffix(":voice:2:back") })
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test func aCancelledReplyStopsItsVoice() async throws {
        let speech = ScriptedSpeech()
        let server = try await server(.sqlite, speech: speech, replyTokens: 400, tokensPerSecond: 200)
        let token = try await server.token("dan")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone)
        let first = try await socket.readVoiced(chunks: 1)
        try await socket.chatCancel(id: "x", stream: first.reply.stream)
        let rest = try await socket.readVoiced()
        #expect(rest.reply.reason == "cancelled")
        #expect(rest.audio["reason"] == .string("cancelled"))
        #expect(rest.reply.tokens.count + first.reply.tokens.count < 400)
        try await expectInvariant(server, token: token)
        await server.stop()
    }

    @Test func audioKeptForResumesIsBoundedAndAnEvictedChunkIsGone() async throws {
        let speech = ScriptedSpeech()
        // Room for about one sentence's audio: the first chunks are evicted by the end.
        let server = try await server(.sqlite, speech: speech, replyTokens: 60) { $0.resumeAudioBytes = 200 }
        let token = try await server.token("eve")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone)
        let voiced = try await socket.readVoiced()
        let stream = voiced.reply.start["stream"]!
        let last = voiced.chunks.count
        #expect(last >= 4)
        func resume(audioAfter: Int) async throws -> (JSONValue, [Int64]) {
            try await socket.send(
                .object([
                    ("type", .string("stream.resume")), ("id", .string("r\(audioAfter)")), ("stream", stream), ("after", .int(60)),
                    ("audio_after", .int(Int64(audioAfter))),
                ]))
            let first = try await socket.nextJSON()
            guard first["type"] == .string("stream.start") else { return (first, []) }
            let rest = try await socket.readVoiced()
            return (first, rest.chunks.map { $0.header["chunk"]!.intValue! })
        }
        let (ack, replayed) = try await resume(audioAfter: last - 1)
        #expect(ack["ref"] == .string("r\(last - 1)") && replayed == [Int64(last)])
        let (gone, _) = try await resume(audioAfter: 0)
        #expect(gone["code"] == .string("stream_gone"))
        await server.stop()
    }

    @Test func withoutASpeechServiceVoiceIsRefusedAndPlansCanGateIt() async throws {
        let server = try await creditServer(grant: 1_000)
        let token = try await server.token("fay")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone)
        let refusal = try await socket.nextJSON()
        #expect(refusal["code"] == .string("bad_request") && refusal["ref"] == .string("v1"))
        await server.stop()

        let plans = try PlanCatalog(
            parsing:
                try JSONValue.parse(
                    Array(
                        #"{"default":"free","plans":[{"id":"free","name":"Free","features":["chat"]},{"id":"talk","name":"Talk"}]}"#.utf8)))
        let gated = try await self.server(.sqlite, speech: ScriptedSpeech()) { $0.credits.plans = plans }
        let token2 = try await gated.token("gus")
        let clone2 = try await gated.createClone(token: token2)["id"]!.stringValue!
        let socket2 = try await gated.connect(token: token2)
        try await socket2.chatSendVoiced(id: "v1", clone: clone2)
        let planRefusal = try await socket2.nextJSON()
        #expect(planRefusal["code"] == .string("plan_required") && planRefusal["plan"] == .string("talk"))
        await gated.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aVoiceMessageIsChargedByItsLengthOnlyWhenItsTranscriptIsUsable(_ store: TestServer.StoreKind) async throws {
        func upload(_ server: TestServer, _ token: String, type: String = "audio/webm") async throws -> TestHTTPResponse {
            try await TestHTTPClient.request(
                port: server.port, .POST, "/v1/voice/transcriptions", token: token, headers: ["content-type": type], body: [1, 2, 3])
        }
        func server(heard: String, seconds: Double?, grant: Int64 = 1_000) async throws -> TestServer {
            try await self.server(store, grant: grant, speech: ScriptedSpeech()) {
                $0.transcriber = ScriptedTranscriber(text: heard, duration: seconds)
                $0.maxVoiceMessageSeconds = 60
            }
        }
        // 60 credits a minute: one a second, any part of a second counted whole.
        let heard = try await server(heard: "  Hello there. ", seconds: 2.2)
        let token = try await heard.token("hal")
        let answer = try await upload(heard, token).json()
        #expect(answer["text"] == .string("Hello there.") && answer["cost"] == .int(3) && answer["balance"] == .int(997))
        // The recording is kept as it came, with no expiry: the user's own voice.
        let recording = try #require(answer["clip"]?.stringValue)
        let kept = try await heard.get("/v1/clips/\(recording)/audio", token: token)
        #expect(kept.body == [1, 2, 3] && kept.headers.first(name: "content-type") == "audio/webm")
        let shown = try await heard.get("/v1/clips/\(recording)", token: token).json()
        #expect(shown["kind"] == .string("recording") && shown["expires_at"] == .null && shown["saved"] == .bool(true))
        #expect(try await upload(heard, token, type: "text/plain").status == .unsupportedMediaType)
        try await expectInvariant(heard, token: token)
        await heard.stop()

        for (text, seconds, status) in [("", 2.0, HTTPResponseStatus.badRequest), ("A long one.", 61, .badRequest)] {
            let refused = try await server(heard: text, seconds: seconds)
            let token = try await refused.token("ivy")
            let response = try await upload(refused, token)
            #expect(response.status == status)
            #expect(try await creditsOf(refused, token: token).balance == 1_000, "nothing charged")
            await refused.stop()
        }
        let broke = try await server(heard: "Hi there.", seconds: 30, grant: 10)
        let brokeToken = try await broke.token("jo")
        let refusal = try await upload(broke, brokeToken)
        #expect(try refusal.status == .paymentRequired && refusal.json()["error"]?["code"] == .string("insufficient_credits"))
        #expect(try await creditsOf(broke, token: brokeToken).balance == 10)
        await broke.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aVoicedDebateSpeaksEachTurnInItsClonesVoiceToEveryMember(_ store: TestServer.StoreKind) async throws {
        let speech = ScriptedSpeech()
        let server = try await server(store, speech: speech, replyTokens: 30)
        let mod = try await server.token("mod")
        let ada = try await server.createClone(
            token: mod, name: "Ada", fields: [("voice", .object([("name", .string("joe")), ("speed", .double(1.2))]))])["id"]!
        let bob = try await server.createClone(token: mod, name: "Bob")["id"]!
        let body = JSONValue.object([
            ("kind", .string("debate")), ("topic", .string("Is tea better than coffee?")),
            ("clones", .array([.object([("clone", ada)]), .object([("clone", bob)])])), ("rounds", .int(1)),
            ("visibility", .string("link")), ("voice", .bool(true)),
        ])
        let created = try await TestHTTPClient.json(port: server.port, .POST, "/v1/rooms", token: mod, json: body)
        #expect(created.status == .created)
        let room = try created.json()
        #expect(room["clones"]?.arrayValue?.map { $0["voice"]?["name"] } == [.string("joe"), .string("house")])
        let roomID = room["id"]!.stringValue!
        let stored = try await server.get("/v1/rooms/\(roomID)", token: mod).json()
        #expect(stored["room"]?["clones"]?.arrayValue?.map { $0["voice"]?["name"] } == [.string("joe"), .string("house")], "\(stored)")

        let moderator = try await server.connect(token: mod)
        let viewer = try await server.connect(token: try await server.token("vic"))
        _ = try await moderator.join(roomID)
        _ = try await viewer.join(roomID)
        _ = try await moderator.roomEvent("joined")
        try await moderator.control(roomID, "start")
        var heard: [[Int]] = [[], []]
        for (index, socket) in [moderator, viewer].enumerated() {
            _ = try await socket.roomEvent("started")
            for _ in 0..<2 {
                _ = try await socket.roomEvent("turn")
                let turn = try await socket.readVoiced()
                #expect(turn.reply.reason == "complete" && turn.audio["reason"] == .string("complete"))
                #expect(turn.chunks.map { $0.header["chunk"]!.intValue! } == Array(1...Int64(turn.chunks.count)))
                #expect((turn.audio["cost"] != nil) == (index == 0), "only the payer sees what the voice cost")
                heard[index].append(turn.chunks.count)
            }
        }
        #expect(heard[0] == heard[1] && heard[0].allSatisfy { $0 >= 2 })
        // The first turn's sentences in Ada's voice, the second's in the server's default (Bob has none).
        let voices = speech.requests.map(\.voice)
        let first = voices.firstIndex(of: "house") ?? voices.count
        #expect(first > 0 && voices[..<first].allSatisfy { $0 == "joe" } && voices[first...].allSatisfy { $0 == "house" })
        #expect(speech.requests[..<first].allSatisfy { $0.speed == 1.2 })
        let (_, entries) = try await creditsOf(server, token: mod)
        #expect(entries.filter { $0["feature"] == .string("voice") }.count == speech.requests.count)
        try await expectInvariant(server, token: mod)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aVoicedRepliesAudioIsKeptNinetyDaysUnlessSavedAndExported(_ store: TestServer.StoreKind) async throws {
        let speech = ScriptedSpeech()
        let server = try await server(store, speech: speech)
        let token = try await server.token("kim")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSendVoiced(id: "v1", clone: clone)
        let first = try await socket.readVoiced()
        try await socket.chatSendVoiced(id: "v2", clone: clone)
        let second = try await socket.readVoiced()
        let kept = try #require(first.audio["clip"]?.stringValue)
        let dropped = try #require(second.audio["clip"]?.stringValue)

        // The clip is the audio that was sent, as WAV, and it says when it goes.
        let wav = try await server.get("/v1/clips/\(kept)/audio", token: token)
        #expect(wav.status == .ok && wav.headers.first(name: "content-type") == "audio/wav")
        #expect(Array(wav.body.prefix(4)) == Array("RIFF".utf8) && Array(wav.body.dropFirst(44)) == first.chunks.flatMap(\.audio))
        let listed = try await server.get("/v1/clips", token: token).json()["clips"]!.arrayValue!
        #expect(listed.map { $0["id"]!.stringValue! } == [dropped, kept])
        #expect(listed.allSatisfy { $0["expires_at"]?.stringValue != nil && $0["saved"] == .bool(false) })
        #expect(try await server.get("/v1/clips/\(kept)/audio", token: try await server.token("lee")).status == .notFound)

        let saved = try await TestHTTPClient.json(
            port: server.port, .PATCH, "/v1/clips/\(kept)", token: token, json: .object([("saved", .bool(true))]))
        #expect(try saved.json()["saved"] == .bool(true) && saved.json()["expires_at"] == .null)
        let export = try await server.get("/v1/me/export", token: token).json()
        #expect(export["voice_clips"]?.arrayValue?.count == 2)

        // 91 days on: the unsaved clip is purged, the saved one kept.
        let job = RetentionJob(
            store: server.server.store, retention: nil, auditRetention: .seconds(730 * 86_400), paymentRetention: .seconds(2_557 * 86_400),
            mediaRetention: .seconds(90 * 86_400), interval: .seconds(3_600), logger: Logger(label: "test"), metrics: NOOPMetricsHandler.instance)
        #expect(try await job.purgeClips(now: Int64(Timestamp.nowMillis()) + 89 * 86_400_000) == 0)
        #expect(try await job.purgeClips(now: Int64(Timestamp.nowMillis()) + 91 * 86_400_000) == 1)
        #expect(try await server.get("/v1/clips", token: token).json()["clips"]!.arrayValue!.map { $0["id"]!.stringValue! } == [kept])
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/clips/\(kept)", token: token).status == .noContent)
        #expect(try await server.get("/v1/clips/\(kept)", token: token).status == .notFound)
        await server.stop()
    }

    @Test func aTranslationChatSpeaksAClonesWordsWhereTheServiceHasTheLanguage() async throws {
        // The speech service speaks English: the clone's English reply is voiced, its French
        // translation is text only.
        let speech = ScriptedSpeech()
        let server = try await server(.sqlite, speech: speech, replyTokens: 20) { $0.speechLanguages = ["en"] }
        let alice = try await server.token("alice")
        let clone = try await server.createClone(token: alice, name: "Ada")["id"]!
        let body = JSONValue.object([
            ("kind", .string("translation")), ("members", .array([.string("bea")])),
            ("languages", .object([("alice", .string("en")), ("bea", .string("fr"))])),
            ("clones", .array([.object([("clone", clone), ("language", .string("en"))])])), ("voice", .bool(true)),
        ])
        let created = try await TestHTTPClient.json(port: server.port, .POST, "/v1/rooms", token: alice, json: body)
        #expect(created.status == .created)
        let room = try created.json()["id"]!.stringValue!
        let bea = try await server.connect(token: try await server.token("bea"))
        _ = try await bea.joinChat(room, language: "fr")
        let socket = try await server.connect(token: alice)
        _ = try await socket.joinChat(room, language: "en")
        try await socket.say(room, "Hello, what do you think of the sea?")

        // Each reader gets the clone's words in their language: Alice with audio, Bea without.
        func cloneStream(_ socket: TestWebSocket) async throws -> VoicedStream {
            while true {
                let frame = try await socket.next(type: "stream.start").frame
                guard frame["clone"] == clone else { continue }
                var voiced = try await socket.readVoiced()
                voiced.reply.start = frame
                return voiced
            }
        }
        let english = try await cloneStream(socket)
        #expect(english.reply.start["lang"] == .string("en") && english.audio["reason"] == .string("complete") && !english.chunks.isEmpty)
        let french = try await cloneStream(bea)
        #expect(french.reply.start["lang"] == .string("fr") && french.reply.end["audio"] == nil && french.chunks.isEmpty)
        #expect(speech.requests.allSatisfy { $0.voice == "house" })
        await server.stop()
    }
}
