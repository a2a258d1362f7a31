import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import ParleyCore
import ParleyLLM

/// Where an OpenAI-compatible audio service is (#29): OpenAI itself, or Parley's local voice
/// (`parley serve --local-voice`).
public struct AudioServiceOptions: Sendable {
    /// e.g. `http://127.0.0.1:8092/v1`; `/audio/speech` or `/audio/transcriptions` is appended.
    public var baseURL: String
    public var apiKey: String?
    public var model: String
    /// How long a request may take, to the last byte of its answer.
    public var timeout: Duration = .seconds(30)

    public init(baseURL: String, apiKey: String? = nil, model: String) {
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.apiKey = apiKey
        self.model = model
    }

    var headers: HTTPHeaders {
        var headers = HTTPHeaders()
        if let apiKey { headers.add(name: "authorization", value: "Bearer \(apiKey)") }
        return headers
    }
}

/// OpenAI's `POST /audio/speech` with `response_format: pcm`, read as it streams.
public struct OpenAISpeech: SpeechSynthesizer {
    public let options: AudioServiceOptions
    let client: HTTPClient

    public init(options: AudioServiceOptions, client: HTTPClient) {
        self.options = options
        self.client = client
    }

    public var model: String { options.model }

    public func synthesize(_ speech: SpeechRequest) -> AsyncThrowingStream<ByteBuffer, any Error> {
        let (options, client) = (self.options, self.client)
        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    try await AudioService.within(options.timeout, what: "speech") {
                        try await Self.stream(speech, options: options, client: client, to: continuation)
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: AudioService.userFacing(error, what: "speech"))
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Asks for `speech` and yields its audio as it comes.
    private static func stream(
        _ speech: SpeechRequest, options: AudioServiceOptions, client: HTTPClient,
        to continuation: AsyncThrowingStream<ByteBuffer, any Error>.Continuation
    ) async throws {
        var request = HTTPClientRequest(url: options.baseURL + "/audio/speech")
        request.method = .POST
        request.headers = options.headers
        request.headers.add(name: "content-type", value: "application/json")
        let body = JSONValue.object([
            ("model", .string(options.model)), ("input", .string(speech.text)), ("voice", .string(speech.voice)),
            ("response_format", .string("pcm")), ("speed", .double(speech.speed)),
        ])
        request.body = .bytes(ByteBuffer(bytes: body.serialized()))
        let response = try await client.execute(request, deadline: .distantFuture)  // `within` is the limit
        try await AudioService.check(response, what: "speech")
        // Whole 16-bit samples only: a chunk may end half-way through one.
        var carry: UInt8?
        for try await var part in response.body {
            if carry == nil, part.readableBytes % 2 == 0 {
                if part.readableBytes > 0 { continuation.yield(part) }  // whole samples: passed on as they came
                continue
            }
            var out = ByteBuffer()
            out.reserveCapacity(part.readableBytes + 1)
            if let byte = carry { out.writeInteger(byte) }
            out.writeBuffer(&part)
            carry = out.readableBytes % 2 == 1 ? out.getInteger(at: out.writerIndex - 1, as: UInt8.self) : nil
            if carry != nil { out.moveWriterIndex(to: out.writerIndex - 1) }
            if out.readableBytes > 0 { continuation.yield(out) }
        }
    }
}

/// OpenAI's `POST /audio/transcriptions` (multipart), asking for `verbose_json` to learn the
/// audio's duration, which transcription is priced by.
public struct OpenAITranscriber: SpeechTranscriber {
    public let options: AudioServiceOptions
    let client: HTTPClient

    public init(options: AudioServiceOptions, client: HTTPClient) {
        self.options = options
        self.client = client
    }

    public var model: String { options.model }

    public func transcribe(_ audio: ByteBuffer, contentType: String, filename: String) async throws -> Transcript {
        let (options, client) = (self.options, self.client)
        do {
            return try await AudioService.within(options.timeout, what: "transcription") {
                try await Self.transcript(of: audio, contentType: contentType, filename: filename, options: options, client: client)
            }
        } catch {
            throw AudioService.userFacing(error, what: "transcription")
        }
    }

    private static func transcript(
        of audio: ByteBuffer, contentType: String, filename: String, options: AudioServiceOptions, client: HTTPClient
    ) async throws -> Transcript {
        let boundary = "parley-\(UInt64.random(in: .min ... .max))"
        var body = ByteBuffer()
        for (name, value) in [("model", options.model), ("response_format", "verbose_json")] {
            body.writeString("--\(boundary)\r\nContent-Disposition: form-data; name=\"\(name)\"\r\n\r\n\(value)\r\n")
        }
        body.writeString(
            "--\(boundary)\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\(filename)\"\r\nContent-Type: \(contentType)\r\n\r\n")
        body.writeImmutableBuffer(audio)
        body.writeString("\r\n--\(boundary)--\r\n")
        var request = HTTPClientRequest(url: options.baseURL + "/audio/transcriptions")
        request.method = .POST
        request.headers = options.headers
        request.headers.add(name: "content-type", value: "multipart/form-data; boundary=\(boundary)")
        request.body = .bytes(body)
        let response = try await client.execute(request, deadline: .distantFuture)  // `within` is the limit
        try await AudioService.check(response, what: "transcription")
        let answer = try await response.body.collect(upTo: 1 << 20)
        guard let json = try? JSONValue.parse(answer.readableBytesView), let text = json["text"]?.stringValue else {
            throw SpeechServiceError("the transcription service answered something that is not a transcript")
        }
        var duration: Double?
        switch json["duration"] {
        case .double(let value)?: duration = value
        case .int(let value)?: duration = Double(value)
        default: break
        }
        return Transcript(text: text, duration: duration)
    }
}

enum AudioService {
    /// A non-200 answer becomes an error carrying the service's own message (OpenAI's
    /// `{"error":{"message"}}`), so a client learns why its audio was refused.
    static func check(_ response: HTTPClientResponse, what: String) async throws {
        guard response.status != .ok else { return }
        let body = (try? await response.body.collect(upTo: 16 * 1024)) ?? ByteBuffer()
        let reason = (try? JSONValue.parse(body.readableBytesView))?["error"]?["message"]?.stringValue
        throw SpeechServiceError(
            "the \(what) service answered HTTP \(response.status.code)" + (reason.map { ": \($0)" } ?? ""),
            isClientError: (400..<500).contains(response.status.code))
    }

    /// Runs `body` (a request and the reading of its answer) for at most `limit`, the request's only
    /// limit: AsyncHTTPClient's own deadline ends at the answer's head, and the provider client has
    /// no read timeout (each reply's watchdog times the model's streams). A head that never comes
    /// and an answer that stalls half-way are cut alike.
    static func within<T: Sendable>(_ limit: Duration, what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await body() }
            group.addTask {
                try await Task.sleep(for: limit)
                return nil
            }
            defer { group.cancelAll() }
            guard case let value?? = try await group.next() else {
                throw SpeechServiceError("the \(what) service took longer than \(limit)")
            }
            return value
        }
    }

    static func userFacing(_ error: any Error, what: String) -> any Error {
        if error is SpeechServiceError || error is CancellationError { return error }
        return SpeechServiceError("the \(what) service could not be reached (\(error))")
    }
}
