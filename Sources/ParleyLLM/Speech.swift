import NIOCore

/// A piece of text to speak, and how (#29).
public struct SpeechRequest: Sendable, Equatable {
    public var text: String
    public var voice: String
    public var speed: Double

    public init(text: String, voice: String, speed: Double = 1) {
        self.text = text
        self.voice = voice
        self.speed = speed
    }
}

/// A text-to-speech service. Audio is OpenAI's `pcm`: 24 kHz, 16-bit signed little-endian,
/// mono, handed over as it arrives in chunks of whole samples.
public protocol SpeechSynthesizer: Sendable {
    /// The model asked for, which the price list and the ledger name.
    var model: String { get }
    func synthesize(_ request: SpeechRequest) -> AsyncThrowingStream<ByteBuffer, any Error>
}

/// What a speech-to-text service heard.
public struct Transcript: Sendable, Equatable {
    public var text: String
    /// The audio's length in seconds, when the service reports it.
    public var duration: Double?

    public init(text: String, duration: Double?) {
        self.text = text
        self.duration = duration
    }
}

/// A speech-to-text service.
public protocol SpeechTranscriber: Sendable {
    var model: String { get }
    /// `contentType` and `filename` tell the service the audio's format (`audio/webm`, `voice.webm`).
    func transcribe(_ audio: ByteBuffer, contentType: String, filename: String) async throws -> Transcript
}

/// A speech or transcription service failed; `message` is fit for the user.
public struct SpeechServiceError: Error, CustomStringConvertible, Equatable {
    public var message: String
    /// The service refused what it was sent (HTTP 4xx): retrying the same will not help.
    public var isClientError: Bool

    public init(_ message: String, isClientError: Bool = false) {
        self.message = message
        self.isClientError = isClientError
    }

    public var description: String { message }
}
