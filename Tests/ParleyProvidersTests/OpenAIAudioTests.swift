import AsyncHTTPClient
import NIOCore
import NIOPosix
import ParleyCore
import ParleyLLM
import ParleyProviders
import Testing

@Suite struct OpenAIAudioTests {
    private func client() -> HTTPClient { HTTPClient.forProvider(connections: 4) }

    @Test func speechArrivesInWholeSamplesHoweverTheServiceCutsIt() async throws {
        let audio = (0..<40).map { UInt8($0) }
        // Odd cuts: a sample split across two reads must come out whole, never half.
        let upstream = try await FakeUpstream([.stream([Array(audio[0..<3]), Array(audio[3..<4]), Array(audio[4..<11]), Array(audio[11...])])])
        let http = client()
        let speech = OpenAISpeech(options: AudioServiceOptions(baseURL: "http://127.0.0.1:\(upstream.port)/v1", model: "tts-1"), client: http)
        var chunks: [[UInt8]] = []
        for try await chunk in speech.synthesize(SpeechRequest(text: "Hello there.", voice: "joe", speed: 1.25)) {
            chunks.append(Array(chunk.readableBytesView))
        }
        #expect(chunks.allSatisfy { $0.count % 2 == 0 && !$0.isEmpty })
        #expect(chunks.flatMap { $0 } == audio)
        let sent = try JSONValue.parse(Array(try #require(upstream.requests.first).body.utf8))
        #expect(upstream.requests.first?.head.uri == "/v1/audio/speech")
        #expect(sent["input"] == .string("Hello there.") && sent["voice"] == .string("joe") && sent["response_format"] == .string("pcm"))
        #expect(sent["speed"] == .double(1.25) && sent["model"] == .string("tts-1"))
        try await http.shutdown()
        await upstream.stop()
    }

    /// A service that stops in the middle of its answer is cut at the timeout: the provider client
    /// has no read timeout, and AsyncHTTPClient's deadline ends at the answer's head. The timeout
    /// counts from the request: 10 s, because under a full test run's load on a slow machine the
    /// first bytes alone took over a second, and once over five.
    @Test func aSpeechAnswerThatStallsEndsAtTheTimeout() async throws {
        let upstream = try await FakeUpstream([.hang([[0, 1, 2, 3]])])
        let http = client()
        var options = AudioServiceOptions(baseURL: "http://127.0.0.1:\(upstream.port)/v1", model: "tts-1")
        options.timeout = .seconds(10)
        var heard: [UInt8] = []
        await #expect(throws: SpeechServiceError("the speech service took longer than 10.0 seconds")) {
            for try await chunk in OpenAISpeech(options: options, client: http).synthesize(SpeechRequest(text: "Hi.", voice: "joe")) {
                heard += Array(chunk.readableBytesView)
            }
        }
        #expect(heard == [0, 1, 2, 3], "what came before the stall was passed on")
        try await http.shutdown()
        await upstream.stop()
    }

    @Test func aTranscriptionThatStallsEndsAtTheTimeout() async throws {
        let upstream = try await FakeUpstream([.hang([Array(#"{"text":"Wha"#.utf8)])])
        let http = client()
        var options = AudioServiceOptions(baseURL: "http://127.0.0.1:\(upstream.port)/v1", model: "whisper-1")
        options.timeout = .seconds(1)
        await #expect(throws: SpeechServiceError("the transcription service took longer than 1.0 seconds")) {
            let transcriber = OpenAITranscriber(options: options, client: http)
            _ = try await transcriber.transcribe(ByteBuffer(string: "RIFF"), contentType: "audio/wav", filename: "a.wav")
        }
        try await http.shutdown()
        await upstream.stop()
    }

    /// A service that never answers ends at the same limit, with the same words.
    @Test func aSpeechServiceThatNeverAnswersEndsAtTheTimeout() async throws {
        let upstream = try await FakeUpstream([.silent])
        let http = client()
        var options = AudioServiceOptions(baseURL: "http://127.0.0.1:\(upstream.port)/v1", model: "tts-1")
        options.timeout = .seconds(1)
        await #expect(throws: SpeechServiceError("the speech service took longer than 1.0 seconds")) {
            for try await _ in OpenAISpeech(options: options, client: http).synthesize(SpeechRequest(text: "Hi.", voice: "joe")) {}
        }
        try await http.shutdown()
        await upstream.stop()
    }

    @Test func aRefusalCarriesTheServicesReason() async throws {
        let upstream = try await FakeUpstream([.status(400, #"{"error":{"message":"unknown voice 'zed'"}}"#)])
        let http = client()
        let speech = OpenAISpeech(options: AudioServiceOptions(baseURL: "http://127.0.0.1:\(upstream.port)/v1", model: "tts-1"), client: http)
        do {
            for try await _ in speech.synthesize(SpeechRequest(text: "Hi.", voice: "zed")) {}
            Issue.record("no error")
        } catch let error as SpeechServiceError {
            #expect(error.isClientError && error.message == "the speech service answered HTTP 400: unknown voice 'zed'")
        }
        try await http.shutdown()
        await upstream.stop()
    }

    @Test func aTranscriptionSendsTheAudioAsMultipartAndReadsItsDuration() async throws {
        let upstream = try await FakeUpstream([.status(200, #"{"text":"What is tea?","duration":2.5,"language":"en"}"#)])
        let http = client()
        let transcriber = OpenAITranscriber(
            options: AudioServiceOptions(baseURL: "http://127.0.0.1:\(upstream.port)/v1", apiKey: "k", model: "whisper-1"), client: http)
        let heard = try await transcriber.transcribe(ByteBuffer(string: "RIFFdata"), contentType: "audio/wav", filename: "voice.wav")
        #expect(heard == Transcript(text: "What is tea?", duration: 2.5))
        let request = try #require(upstream.requests.first)
        #expect(request.head.uri == "/v1/audio/transcriptions" && request.head.headers.first(name: "authorization") == "Bearer k")
        #expect(request.head.headers.first(name: "content-type")?.hasPrefix("multipart/form-data; boundary=") == true)
        for part in ["name=\"model\"\r\n\r\nwhisper-1", "name=\"response_format\"\r\n\r\nverbose_json", "filename=\"voice.wav\"", "RIFFdata"] {
            #expect(request.body.contains(part), "\(part)")
        }
        try await http.shutdown()
        await upstream.stop()
    }
}
