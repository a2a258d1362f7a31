import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import Synchronization

/// A reply spoken as it streams (#29): its released text is cut into sentences, and each
/// complete sentence is paid for, synthesised and sent as binary audio frames on the stream,
/// one sentence after another, while the text goes on streaming. So the first audio follows
/// the first sentence, not the whole reply.
///
/// A sentence is charged before it is synthesised (ledger entry `<stream>:voice:<n>`, feature
/// `voice`), and given back (`<stream>:voice:<n>:back`) when the speech service sent none of its
/// audio. When the balance or a spending limit does not cover a sentence, the voice stops
/// there; the text is not affected (it was paid for on its own).
final class VoicedReply: Sendable {
    /// What the voice did, for `stream.end`'s `audio`.
    struct Summary: Sendable, Equatable {
        var sentences = 0
        var characters = 0
        var chunks: Int64 = 0
        var cost: Int64 = 0
        /// complete, cancelled, insufficient_credits, spend_limit or error.
        var reason = "complete"
        var failure: String?
        /// The audio sent, kept for the owner's clip (up to `VoiceClip.maxBytes`).
        var audio: [UInt8] = []
        var truncated = false
        /// The clip it was stored as.
        var clip: String?

        /// Without `cost` for the readers who do not pay for it (a room's other members).
        func json(withCost: Bool = true) -> JSONValue {
            var pairs: [(String, JSONValue)] = [
                ("reason", .string(reason)), ("sentences", .int(Int64(sentences))), ("characters", .int(Int64(characters))),
                ("chunks", .int(chunks)),
            ]
            if withCost { pairs.append(("cost", .int(cost))) }
            if let clip { pairs.append(("clip", .string(clip))) }
            if let failure { pairs.append(("error", .string(failure))) }
            return .object(pairs)
        }
    }

    /// The splitter, and the seq of the last token it was given.
    private let splitter = Mutex((SentenceSplitter(), Int64(0)))
    /// Each complete sentence with the seq of the token that completed it.
    private let sentences: AsyncStream<(text: String, seq: Int64)>.Continuation
    private let worker: Task<Summary, Never>

    init(live: LiveStream, voice: CloneVoice, synthesizer: any SpeechSynthesizer, meter: SpeechMeter, logger: Logger) {
        let (stream, continuation) = AsyncStream<(text: String, seq: Int64)>.makeStream()
        sentences = continuation
        worker = Task {
            await Self.speak(stream, live: live, voice: voice, synthesizer: synthesizer, meter: meter, logger: logger)
        }
    }

    /// Token `seq`'s text, just released to the readers (on the token path: a lock and a scan, no await).
    func take(_ text: String, seq: Int64) {
        let complete = splitter.withLock {
            $0.1 = seq
            return $0.0.feed(text[...])
        }
        for sentence in complete { sentences.yield((sentence, seq)) }
    }

    /// The reply is over: voices what is left and returns once the last audio went out. A stop
    /// meanwhile (the stream's task cancelled) cuts the audio short.
    func finish() async -> Summary {
        if let (rest, seq) = splitter.withLock({ s in s.0.finish().map { ($0, s.1) } }) { sentences.yield((rest, seq)) }
        sentences.finish()
        let worker = self.worker
        return await withTaskCancellationHandler {
            await worker.value
        } onCancel: {
            worker.cancel()
        }
    }

    /// Stops the voice where it is (the reply was cancelled).
    func cancel() {
        sentences.finish()
        worker.cancel()
    }

    private static func speak(
        _ sentences: AsyncStream<(text: String, seq: Int64)>, live: LiveStream, voice: CloneVoice, synthesizer: any SpeechSynthesizer,
        meter: SpeechMeter,
        logger: Logger
    ) async -> Summary {
        var summary = Summary()
        var chunk: Int64 = 0
        let allocator = ByteBufferAllocator()
        for await (sentence, seq) in sentences {
            guard !Task.isCancelled else { break }
            let number = summary.sentences + 1
            let characters = sentence.count
            let cost: Int64
            do {
                switch try await meter.charge(sentence: number, characters: characters) {
                case .paid(let paid): cost = paid
                case .refused(let bySpendLimit):
                    summary.reason = bySpendLimit ? StreamEndReason.spendLimit.rawValue : StreamEndReason.insufficientCredits.rawValue
                    summary.chunks = chunk
                    return summary
                }
            } catch {
                logger.error("charging for speech failed; the voice stops", metadata: ["stream": "\(live.id)", "error": "\(error)"])
                summary.reason = "error"
                summary.failure = "credits could not be charged for the voice"
                break
            }
            summary.sentences = number
            var sent = 0
            do {
                for try await audio in synthesizer.synthesize(SpeechRequest(text: sentence, voice: voice.name, speed: voice.speed)) {
                    chunk += 1
                    sent += 1
                    if summary.audio.count + audio.readableBytes <= VoiceClip.maxBytes {
                        summary.audio += audio.readableBytesView
                    } else {
                        summary.truncated = true
                    }
                    let header = AudioFrame.Header(stream: live.id, chunk: chunk, sentence: number, seq: seq)
                    // The header, then the service's bytes as they came: one copy into the frame.
                    let prefix = AudioFrame.prefix(header)
                    var frame = allocator.buffer(capacity: prefix.count + audio.readableBytes)
                    frame.writeBytes(prefix)
                    frame.writeImmutableBuffer(audio)
                    live.publishAudio(chunk: chunk, frame: frame)
                }
            } catch {
                if sent == 0 { await meter.giveBack(sentence: number, credits: cost) } else { summary.cost += cost }
                if !Task.isCancelled {
                    logger.warning("speech failed; the voice stops", metadata: ["stream": "\(live.id)", "error": "\(error)"])
                    summary.reason = "error"
                    summary.failure = (error as? SpeechServiceError)?.message ?? "the speech service failed"
                }
                break
            }
            if sent == 0, Task.isCancelled {
                // Stopped before any of its audio went out: nothing of it was heard.
                await meter.giveBack(sentence: number, credits: cost)
                break
            }
            summary.characters += characters
            summary.cost += cost
        }
        if Task.isCancelled, summary.reason == "complete" { summary.reason = StreamEndReason.cancelled.rawValue }
        summary.chunks = chunk
        return summary
    }
}

/// Charges a voiced reply's sentences, one ledger entry each, before they are synthesised.
struct SpeechMeter: Sendable {
    enum Outcome: Equatable {
        case paid(Int64)
        case refused(bySpendLimit: Bool)
    }

    private let credits: Credits
    private let user: String
    private let stream: String
    private let conversation: String?
    private let room: String?
    private let model: String

    init(credits: Credits, user: String, stream: String, conversation: String?, room: String?, model: String) {
        self.credits = credits
        self.user = user
        self.stream = stream
        self.conversation = conversation
        self.room = room
        self.model = model
    }

    func charge(sentence: Int, characters: Int) async throws -> Outcome {
        let cost = credits.configuration.pricing.voice.speechCost(characters: characters)
        switch try await credits.debit(entry("voice:\(sentence)", -cost, characters: characters, kind: .debit)) {
        case .applied, .alreadyApplied:
            return .paid(cost)
        case .insufficient:
            credits.metrics.paywallHits.increment()
            return .refused(bySpendLimit: false)
        case .overLimit(let balance, let available):
            let bySpendLimit = available < balance
            if bySpendLimit { credits.metrics.spendLimitHits.increment() } else { credits.metrics.paywallHits.increment() }
            return .refused(bySpendLimit: bySpendLimit)
        }
    }

    /// Returns a sentence's charge when none of its audio was sent.
    func giveBack(sentence: Int, credits amount: Int64) async {
        guard amount > 0 else { return }
        do {
            let outcome = try await credits.store.apply(
                entry("voice:\(sentence):back", amount, characters: 0, kind: .settlement), allowOverdraft: false, caps: [])
            if outcome.isApplied { credits.metrics.refunded.increment(by: amount) }
        } catch {
            credits.logger.error("giving back an unvoiced sentence's charge failed", metadata: ["stream": "\(stream)", "error": "\(error)"])
        }
    }

    private func entry(_ suffix: String, _ amount: Int64, characters: Int, kind: LedgerEntry.Kind) -> LedgerEntry {
        LedgerEntry(
            id: "\(stream):\(suffix)", user: user, kind: kind, credits: amount, tokens: characters, stream: stream,
            conversation: conversation, room: room, model: model, feature: "voice", createdAt: Int64(Timestamp.nowMillis()))
    }
}

/// A voiced reply's audio chunks kept for `stream.resume` (`audio_after`), bounded in bytes:
/// the oldest go first (the newest is always kept).
struct AudioHistory {
    private let capacityBytes: Int
    private var frames = CircularBuffer<ByteBuffer>()
    private var bytes = 0
    private var firstChunk: Int64 = 1
    private(set) var lastChunk: Int64 = 0

    init(capacityBytes: Int) {
        self.capacityBytes = max(1, capacityBytes)
    }

    /// Keeps chunk `chunk`, which follows the last; after a gap (a node's mirror that lost a
    /// frame) only what follows the gap is kept, so a resume from before it is `stream_gone`.
    mutating func append(chunk: Int64, frame: ByteBuffer) {
        if chunk != lastChunk + 1 {
            frames.removeAll()
            bytes = 0
            firstChunk = chunk
        }
        lastChunk = chunk
        frames.append(frame)
        bytes += frame.readableBytes
        while bytes > capacityBytes, frames.count > 1 {
            bytes -= frames.removeFirst().readableBytes
            firstChunk += 1
        }
    }

    /// The chunks after `after`, or gone when some of them were evicted.
    func replay(after: Int64) -> StreamHistory.Replay {
        if after + 1 < firstChunk { return .gone }
        guard after < lastChunk else { return .frames([]) }
        return .frames(Array(frames)[Int(after + 1 - firstChunk)...])
    }
}
