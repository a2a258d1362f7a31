import NIOCore
import NIOHTTP1
import ParleyCore
import ParleyLLM

extension RESTAPI {
    /// `POST /v1/voice/transcriptions`, the body an audio recording (`Content-Type: audio/…`,
    /// e.g. Chromium's `audio/webm;codecs=opus`): what was said, for the client to send as its
    /// message (#29). Charged by the audio's length (ledger `stt:<id>`, feature `voice`) once
    /// the transcript is known and before it is answered; nothing is charged for audio that could
    /// not be read, held no speech, or was longer than allowed.
    func transcribeVoice(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        guard let transcriber = configuration.transcriber else {
            throw APIError(.notImplemented, .badRequest, "voice messages are not available: this server has no transcription service")
        }
        try await credits.plans?.require(.voice, user: identity.user, ref: nil, what: "voice messages")
        let type = (request.headers.first(name: "content-type") ?? "").lowercased()
        guard type.hasPrefix("audio/") || type.hasPrefix("video/webm") || type.hasPrefix("video/mp4") else {
            throw APIError(.unsupportedMediaType, .badRequest, "the body must be audio, with a Content-Type such as audio/webm or audio/wav")
        }
        guard let audio = request.body, audio.readableBytes > 0 else { throw APIError(.badRequest, .badRequest, "the body must hold the audio") }
        let price = credits.configuration.pricing.voice
        try await credits.ensureGrants(identity.user)
        let least = price.transcriptionCost(seconds: 1)
        let balance = try await store.balance(user: identity.user)
        guard balance >= least else {
            throw FrameError(
                ref: nil, code: .insufficientCredits, message: "a voice message needs at least \(least) credits; the balance is \(balance)")
        }

        let transcript: Transcript
        do {
            let subtype = type.split(separator: ";")[0].split(separator: "/").last.map(String.init) ?? "bin"
            transcript = try await transcriber.transcribe(audio, contentType: type, filename: "voice.\(subtype)")
        } catch let error as SpeechServiceError {
            throw error.isClientError
                ? APIError(.badRequest, .badRequest, "the audio could not be transcribed: \(error.message)")
                : APIError(.badGateway, .providerError, error.message)
        }
        // A service that does not say how long the audio was: its size at 32 kbit/s (Opus speech).
        let seconds = transcript.duration ?? Double(audio.readableBytes) / 4_000
        guard seconds <= configuration.maxVoiceMessageSeconds else {
            throw FrameError(
                ref: nil, code: .tooLarge,
                message: "the audio is \(Int(seconds.rounded(.up))) s long; a voice message may be \(Int(configuration.maxVoiceMessageSeconds)) s")
        }
        let text = transcript.text.trimmedWhitespace
        guard !text.isEmpty else { throw APIError(.badRequest, .badRequest, "no speech was heard in the audio") }

        let id = ids.make(.transcription)
        let cost = price.transcriptionCost(seconds: seconds)
        let entry = LedgerEntry(
            id: "stt:" + id, user: identity.user, kind: .debit, credits: -cost, tokens: Int(seconds.rounded(.up)), model: transcriber.model,
            feature: "voice", note: "voice message transcribed", createdAt: Int64(Timestamp.nowMillis()))
        let outcome = try await credits.debit(entry)
        switch outcome {
        case .applied, .alreadyApplied:
            break
        case .insufficient(let balance):
            credits.metrics.refusals.increment()
            throw FrameError(ref: nil, code: .insufficientCredits, message: "this voice message needs \(cost) credits; the balance is \(balance)")
        case .overLimit(_, let available):
            credits.metrics.spendLimitHits.increment()
            throw FrameError(
                ref: nil, code: .spendLimit, message: "this voice message needs \(cost) credits; your spending limits allow \(available) more for now"
            )
        }
        // The user's own voice is kept, as the policies promise, until they delete it or the account.
        let recording = VoiceClip(
            id: ids.make(.voiceClip), kind: .recording, contentType: type, owner: identity.user, stream: id, conversation: nil, room: nil,
            message: nil, audio: Array(audio.readableBytesView), saved: true, createdAt: Int64(Timestamp.nowMillis()))
        var clip: String? = recording.id
        do {
            try await store.saveClip(recording)
        } catch {
            logger.error("keeping a voice message's recording failed", metadata: ["transcription": "\(id)", "error": "\(error)"])
            clip = nil
        }
        return HTTPResponse(
            .ok,
            json: .object([
                ("id", .string(id)), ("text", .string(text)), ("duration", .double(seconds)), ("cost", .int(cost)),
                ("balance", .int(outcome.balance)), ("clip", clip.map(JSONValue.string) ?? .null),
            ]))
    }

    // MARK: Clips: voiced replies' audio, kept for their owner

    /// When the retention job deletes `clip` (nil: saved, kept until deleted).
    func expiry(of clip: VoiceClip) -> Int64? {
        clip.saved || clip.kind == .recording ? nil : clip.createdAt + Timestamp.millis(configuration.mediaRetention)
    }

    /// `GET /v1/clips?limit&before`: the caller's clips, newest first, without their audio.
    func listClips(_ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        let limit = try Self.limit(request)
        let page = try await store.clips(owner: identity.user, limit: limit + 1, before: request.query["before"])
        return HTTPResponse(.ok, json: .object(Self.page(page, limit: limit, as: "clips", id: \.id) { $0.json(expiresAt: expiry(of: $0)) }))
    }

    private func ownClip(_ id: String, _ identity: Identity, withAudio: Bool = false) async throws -> VoiceClip {
        guard let clip = try await store.clip(id: id, owner: identity.user, withAudio: withAudio) else {
            throw APIError(.notFound, .notFound, "no clip \(id)")
        }
        return clip
    }

    /// `GET /v1/clips/{id}`.
    func showClip(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        let clip = try await ownClip(id, identity)
        return HTTPResponse(.ok, json: clip.json(expiresAt: expiry(of: clip)))
    }

    /// `GET /v1/clips/{id}/audio`: the clip as a WAV file.
    func clipAudio(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        let clip = try await ownClip(id, identity, withAudio: true)
        return HTTPResponse(.ok, body: clip.file, headers: ["content-type": clip.served])
    }

    /// `PATCH /v1/clips/{id} {"saved": true|false}`: a saved clip is kept past the media retention.
    func saveClip(_ id: String, _ request: HTTPRequest, _ identity: Identity) async throws -> HTTPResponse {
        var reader = try JSONObjectReader(try request.json())
        guard let saved = try reader.bool("saved") else { throw ValidationError("missing field 'saved' (true or false)") }
        try reader.rejectUnknown()
        guard try await store.setClipSaved(id: id, owner: identity.user, saved: saved) else {
            throw APIError(.notFound, .notFound, "no clip \(id)")
        }
        return try await showClip(id, identity)
    }

    /// `DELETE /v1/clips/{id}`.
    func deleteClip(_ id: String, _ identity: Identity) async throws -> HTTPResponse {
        guard try await store.deleteClip(id: id, owner: identity.user) else { throw APIError(.notFound, .notFound, "no clip \(id)") }
        return HTTPResponse(.noContent)
    }
}
