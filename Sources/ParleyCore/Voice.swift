/// How a clone sounds (#29): a voice of the speech service and how fast it speaks.
public struct CloneVoice: Sendable, Equatable {
    /// A voice name the speech service knows (`joe` for the local voice; OpenAI's `alloy`…).
    public var name: String
    /// 0.25…4.0, 1 is the voice's own pace (OpenAI's range).
    public var speed: Double

    public init(name: String, speed: Double = 1) {
        self.name = name
        self.speed = speed
    }

    public var json: JSONValue { .object([("name", .string(name)), ("speed", .double(speed))]) }

    /// `{"name": "joe", "speed": 1.1}` (speed optional).
    public static func parse(_ value: JSONValue) throws(ValidationError) -> CloneVoice {
        var reader = try JSONObjectReader(value, what: "'voice'", prefix: "voice.")
        let name = try reader.requiredString("name")
        guard (1...64).contains(name.utf8.count), name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw ValidationError("'voice.name' must be 1-64 printable ASCII characters")
        }
        var speed = 1.0
        switch try reader.value("speed") {
        case nil, .null?: break
        case .int(let value)?: speed = Double(value)
        case .double(let value)?: speed = value
        default: throw ValidationError("'voice.speed' must be a number")
        }
        guard (0.25...4).contains(speed) else { throw ValidationError("'voice.speed' must be from 0.25 to 4") }
        try reader.rejectUnknown()
        return CloneVoice(name: name, speed: speed)
    }
}

/// Cuts a reply's text, as it streams, into sentences to voice one by one: each is spoken as
/// soon as it is complete, so the first audio does not wait for the whole reply.
///
/// A sentence ends at `.`, `!`, `?` or `…` (with closing quotes or brackets) followed by
/// whitespace, or at a line break; a piece shorter than `minimumLength` waits for more ("Mr.",
/// "1." are not sentences alone), one longer than `maximumLength` is cut at its last space.
public struct SentenceSplitter: Sendable {
    public var minimumLength = 12
    public var maximumLength = 400
    private var pending = ""

    public init() {}

    /// Adds streamed text; returns the sentences it completed, in order.
    public mutating func feed(_ text: Substring) -> [String] {
        pending += text
        var sentences: [String] = []
        while let end = nextEnd() {
            let sentence = String(pending[..<end]).trimmedWhitespace
            pending = String(pending[end...])
            if !sentence.isEmpty { sentences.append(sentence) }
        }
        return sentences
    }

    /// What is left at the end of the reply (nil when nothing is).
    public mutating func finish() -> String? {
        let rest = pending.trimmedWhitespace
        pending = ""
        return rest.isEmpty ? nil : rest
    }

    /// Where the first complete sentence of `pending` ends (past its whitespace), if one does.
    private func nextEnd() -> String.Index? {
        var index = pending.startIndex
        var length = 0
        var lastSpace: String.Index?
        while index < pending.endIndex {
            let character = pending[index]
            let next = pending.index(after: index)
            length += 1
            if character.isNewline, length > 1 { return next }
            if character.isWhitespace { lastSpace = index }
            if Self.terminators.contains(character), length >= minimumLength {
                var after = next
                while after < pending.endIndex, Self.closers.contains(pending[after]) { after = pending.index(after: after) }
                if after < pending.endIndex, pending[after].isWhitespace { return pending.index(after: after) }
            }
            if length >= maximumLength, let lastSpace { return pending.index(after: lastSpace) }
            index = next
        }
        return nil
    }

    private static let terminators: Set<Character> = [".", "!", "?", "…", "。", "！", "？"]
    private static let closers: Set<Character> = ["\"", "'", "”", "’", ")", "]", "»"]
}

/// The binary WebSocket frame that carries a piece of a voiced reply's audio (#29).
///
/// Layout: one byte `0x01` (a text frame of this protocol always starts with `{`, so the first
/// byte tells a writer which opcode a frame needs), a big-endian UInt16 header length, the
/// header (UTF-8 JSON: `type` "audio", `stream`, `chunk` numbered from 1 per stream, `sentence`,
/// `format`, `sample_rate`, `channels`), then the audio bytes.
public enum AudioFrame {
    public static let marker: UInt8 = 0x01

    public struct Header: Sendable, Equatable {
        public var stream: String
        /// 1, 2, 3… per stream: what `stream.resume`'s `audio_after` counts.
        public var chunk: Int64
        /// The sentence of the reply it speaks, from 1.
        public var sentence: Int
        /// The token whose text completed that sentence: the audio speaks the text through it.
        public var seq: Int64
        public var format: String
        public var sampleRate: Int
        public var channels: Int

        public init(
            stream: String, chunk: Int64, sentence: Int, seq: Int64 = 0, format: String = "pcm", sampleRate: Int = 24_000, channels: Int = 1
        ) {
            self.stream = stream
            self.chunk = chunk
            self.sentence = sentence
            self.seq = seq
            self.format = format
            self.sampleRate = sampleRate
            self.channels = channels
        }

        var json: JSONValue {
            .object([
                ("type", .string("audio")), ("stream", .string(stream)), ("chunk", .int(chunk)), ("sentence", .int(Int64(sentence))),
                ("seq", .int(seq)),
                ("format", .string(format)), ("sample_rate", .int(Int64(sampleRate))), ("channels", .int(Int64(channels))),
            ])
        }
    }

    public static func encode(_ header: Header, audio: some Collection<UInt8>) -> [UInt8] {
        prefix(header, reserving: audio.count) + audio
    }

    /// The frame's bytes before its audio: the marker, the header's length and the header.
    public static func prefix(_ header: Header, reserving audioBytes: Int = 0) -> [UInt8] {
        let head = header.json.serialized()
        var out = [UInt8]()
        out.reserveCapacity(3 + head.count + audioBytes)
        out.append(marker)
        out.append(UInt8(head.count >> 8))
        out.append(UInt8(head.count & 0xFF))
        out += head
        return out
    }

    /// A binary frame's header and where its payload starts; nil when it is not one of these.
    public static func decode(_ bytes: [UInt8]) -> (header: JSONValue, payload: ArraySlice<UInt8>)? {
        guard bytes.count >= 3, bytes[0] == marker else { return nil }
        let length = Int(bytes[1]) << 8 | Int(bytes[2])
        guard bytes.count >= 3 + length, let header = try? JSONValue.parse(bytes[3..<(3 + length)]), case .object = header else { return nil }
        return (header, bytes[(3 + length)...])
    }

    /// Whether a frame's bytes go out as a binary WebSocket frame.
    @inlinable public static func isBinary(firstByte: UInt8?) -> Bool { firstByte.map { $0 != UInt8(ascii: "{") } ?? false }
}

/// What speech and transcription cost (#29), in credits; charged before the audio is made or
/// the transcript used, like tokens.
public struct VoicePrice: Sendable, Equatable {
    /// Speech: per 1000 characters of text voiced (rounded up per sentence).
    public var speechPer1KCharacters: Int64
    /// Transcription: per minute of audio (rounded up per second).
    public var transcriptionPerMinute: Int64

    public init(speechPer1KCharacters: Int64, transcriptionPerMinute: Int64) {
        self.speechPer1KCharacters = speechPer1KCharacters
        self.transcriptionPerMinute = transcriptionPerMinute
    }

    public static let standard = VoicePrice(speechPer1KCharacters: 1_000, transcriptionPerMinute: 600)

    /// The cost of voicing `characters` characters.
    public func speechCost(characters: Int) -> Int64 { (Int64(characters) * speechPer1KCharacters + 999) / 1_000 }

    /// The cost of transcribing `seconds` of audio (any part of a second counts whole).
    public func transcriptionCost(seconds: Double) -> Int64 {
        let whole = Int64(seconds.rounded(.up))
        return (max(1, whole) * transcriptionPerMinute + 59) / 60
    }

    public var json: JSONValue {
        .object([
            ("speech_per_1k_characters", .int(speechPer1KCharacters)), ("transcription_per_minute", .int(transcriptionPerMinute)),
        ])
    }

    public static func parse(_ value: JSONValue) throws(ValidationError) -> VoicePrice {
        var reader = try JSONObjectReader(value, what: "'voice'", prefix: "voice.")
        guard let speech = try reader.int("speech_per_1k_characters"), let transcription = try reader.int("transcription_per_minute"),
            speech >= 0, transcription >= 0
        else {
            throw ValidationError("'voice' needs non-negative integers 'speech_per_1k_characters' and 'transcription_per_minute'")
        }
        try reader.rejectUnknown()
        return VoicePrice(speechPer1KCharacters: speech, transcriptionPerMinute: transcription)
    }
}

/// Audio kept for its owner (#29): a voiced reply's (generated voice: kept 90 days unless the
/// user saves it, `--media-retention-days`, then purged by the retention job) or a voice
/// message's recording (the user's own voice: kept until they delete it or the account).
/// Deleted with its conversation, its room, or the account.
public struct VoiceClip: Sendable, Equatable {
    public enum Kind: String, Sendable, Equatable {
        /// A voiced reply's audio: 16-bit PCM, served as WAV.
        case reply
        /// A voice message as the user recorded it, in its own format (`contentType`).
        case recording
    }

    public var id: String
    public var kind: Kind
    /// What `audio` is: `audio/pcm` for a reply (served as WAV), the upload's type for a recording.
    public var contentType: String
    public var owner: String
    public var stream: String
    /// Where it was said: a conversation's reply, or a room's turn.
    public var conversation: String?
    public var room: String?
    /// The stored message (or room entry) it speaks.
    public var message: String?
    public var sampleRate: Int
    /// 16-bit signed little-endian PCM, mono; empty when listed without it.
    public var audio: [UInt8]
    /// The audio's size (also when listed without it).
    public var bytes: Int
    /// The reply spoke longer than a clip keeps (`maxBytes`): only its start is kept.
    public var truncated: Bool
    public var saved: Bool
    public var createdAt: Int64

    /// About 3 minutes of 24 kHz speech; a MongoDB document stays well under its 16 MB.
    public static let maxBytes = 8 << 20

    public init(
        id: String, kind: Kind = .reply, contentType: String = "audio/pcm", owner: String, stream: String, conversation: String?, room: String?,
        message: String?, sampleRate: Int = 24_000, audio: [UInt8], bytes: Int? = nil, truncated: Bool = false, saved: Bool = false,
        createdAt: Int64
    ) {
        self.id = id
        self.kind = kind
        self.contentType = contentType
        self.owner = owner
        self.stream = stream
        self.conversation = conversation
        self.room = room
        self.message = message
        self.sampleRate = sampleRate
        self.audio = audio
        self.bytes = bytes ?? audio.count
        self.truncated = truncated
        self.saved = saved
        self.createdAt = createdAt
    }

    /// A reply's length (a recording's is its transcription's business: nil).
    public var seconds: Double? { kind == .reply ? Double(bytes) / Double(2 * max(1, sampleRate)) : nil }

    /// As the API lists it; `expiresAt`: when the retention job deletes it (nil: kept).
    public func json(expiresAt: Int64?) -> JSONValue {
        .object([
            ("id", .string(id)), ("kind", .string(kind.rawValue)), ("stream", .string(stream)),
            ("conversation", conversation.map(JSONValue.string) ?? .null), ("room", room.map(JSONValue.string) ?? .null),
            ("message", message.map(JSONValue.string) ?? .null), ("content_type", .string(served)), ("sample_rate", .int(Int64(sampleRate))),
            ("bytes", .int(Int64(bytes))), ("seconds", seconds.map { .double(($0 * 1000).rounded() / 1000) } ?? .null),
            ("truncated", .bool(truncated)), ("saved", .bool(saved)),
            ("created_at", .string(Timestamp.rfc3339(millis: createdAt))),
            ("expires_at", expiresAt.map { .string(Timestamp.rfc3339(millis: $0)) } ?? .null),
            ("url", .string("/v1/clips/\(id)/audio")),
        ])
    }

    /// What `GET /v1/clips/{id}/audio` answers with: a reply's PCM as WAV, a recording as it came.
    public var served: String { kind == .reply ? "audio/wav" : contentType }
    public var file: [UInt8] { kind == .reply ? wav : audio }

    /// The audio as a WAV file.
    public var wav: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(44 + audio.count)
        func le32(_ value: Int) { out += withUnsafeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, Array.init) }
        func le16(_ value: Int) { out += withUnsafeBytes(of: UInt16(truncatingIfNeeded: value).littleEndian, Array.init) }
        out += Array("RIFF".utf8)
        le32(36 + audio.count)
        out += Array("WAVEfmt ".utf8)
        le32(16)
        le16(1)  // PCM
        le16(1)  // mono
        le32(sampleRate)
        le32(sampleRate * 2)
        le16(2)
        le16(16)
        out += Array("data".utf8)
        le32(audio.count)
        out += audio
        return out
    }
}
