import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore

/// A reply as far as it was released to its readers, and how its generation ended: a
/// `TokenPump` builds it, the settlement reads it.
struct ReleasedReply {
    private(set) var text = ""
    private(set) var seq: Int64 = 0
    var reported: Usage?
    private(set) var failure: String?
    private(set) var failureCode = ErrorCode.providerError
    var outOfCredits = false

    private let live: LiveStream
    private let journal: StreamJournalWriter
    private let allocator: ByteBufferAllocator
    /// A voiced reply's voice, which reads the text as it is released (#29).
    let voice: VoicedReply?
    private var journaledAt = NIODeadline.now().uptimeNanoseconds
    private var scratch: [UInt8] = []  // one token frame's bytes, reused: no allocation per token

    init(live: LiveStream, journal: StreamJournalWriter, allocator: ByteBufferAllocator, voice: VoicedReply? = nil) {
        self.voice = voice
        self.live = live
        self.journal = journal
        self.allocator = allocator
    }

    /// The 1-based index of the next token, the one that must be paid for before it is released.
    var nextToken: Int { Int(seq) + 1 }

    /// Sends a paid token to the readers and keeps it for resumes; journals the text when a new
    /// batch was just bought or the last snapshot is old enough.
    mutating func release(_ token: String, boughtBatch: Bool) {
        seq += 1
        text += token
        ServerFrame.token(stream: live.id, seq: seq, text: token[...], into: &scratch)
        live.publish(seq: seq, frame: allocator.buffer(bytes: scratch))
        voice?.take(token, seq: seq)
        let now = NIODeadline.now().uptimeNanoseconds
        if boughtBatch || now &- journaledAt >= StreamJournals.interval {
            journaledAt = now
            journal.offer(text: text, outputTokens: Int(seq))
        }
    }

    /// Records why generation stopped early, in words the client may see.
    mutating func fail(_ error: any Error, metrics: StreamMetrics, logger: Logger) {
        switch error {
        case is CancellationError:
            return
        case let error as ProviderError:
            metrics.providerFailed.increment()
            logger.warning("provider failed", metadata: ["stream": "\(live.id)", "error": "\(error.message)"])
            failure = error.message
        case is ProviderBusy:
            metrics.providerBusy.increment()
            failure = "the model is busy: too many replies are waiting for it; try again shortly"
            failureCode = .rateLimited
        case let error as StoreError:
            logger.error("metering failed; stopping the stream", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            if let unavailable = FrameError.storeUnavailable(error) {
                (failure, failureCode) = (unavailable.message, unavailable.code)
            } else {
                (failure, failureCode) = ("credits could not be charged; try again", .internal)
            }
        default:
            metrics.providerFailed.increment()
            logger.error("provider failed", metadata: ["stream": "\(live.id)", "error": "\(error)"])
            failure = "the model provider failed"
        }
    }
}

/// A reply's token path on one event loop: each token the provider hands over there (itself, as
/// a `PushingLLMProvider` does, or read from its stream by `startPushing`) is checked against the
/// prepaid batch, released and written to the sockets of that loop without a task, a stream
/// buffer or a thread hop. Buying the next batch is the one asynchronous step, started ahead:
/// the first batch as generation starts (beside the model's time to first token), each next one
/// while the last `purchaseLead` paid tokens go out, so tokens rarely wait for the store. Tokens
/// that do arrive unpaid wait here, in order, and go out once paid (or are dropped when they
/// cannot be). Touched only on `loop`, hence unchecked Sendable.
final class TokenPump: LLMEventSink, @unchecked Sendable {
    private let loop: any EventLoop
    private let meter: CreditMeter
    private let metrics: StreamMetrics
    private let logger: Logger
    private var reply: ReleasedReply
    private var run: (any LLMRun)?
    private var done: CheckedContinuation<ReleasedReply, Never>?
    /// Tokens received while a batch is being bought, oldest first.
    private var waiting = CircularBuffer<String>()
    private var buying = false
    private var boughtBatch = false
    /// A purchase made ahead bought nothing: none is made ahead again (one for a token that
    /// needs it still is, and its refusal ends the reply).
    private var cannotBuyAhead = false
    private var providerFinished = false
    private var providerError: (any Error)?
    /// No more events are taken (a stop, or no credits left).
    private var stopping = false
    /// The caller has its reply.
    private var completed = false

    init(loop: any EventLoop, meter: CreditMeter, reply: ReleasedReply, metrics: StreamMetrics, logger: Logger) {
        self.loop = loop
        self.meter = meter
        self.reply = reply
        self.metrics = metrics
        self.logger = logger
    }

    /// Generates `request` with `provider` on this pump's loop until it finishes, runs out of
    /// credits or the calling task is cancelled (a stop); returns what was released.
    static func pump(
        _ request: CompletionRequest, with provider: any LLMProvider, on loop: any EventLoop, meter: CreditMeter, reply: ReleasedReply,
        metrics: StreamMetrics, logger: Logger
    ) async -> ReleasedReply {
        let pump = TokenPump(loop: loop, meter: meter, reply: reply, metrics: metrics, logger: logger)
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                loop.execute { pump.start(request, with: provider, then: continuation) }
            }
        } onCancel: {
            loop.execute { pump.stop() }
        }
    }

    private func start(_ request: CompletionRequest, with provider: any LLMProvider, then done: CheckedContinuation<ReleasedReply, Never>) {
        loop.assertInEventLoop()
        guard !stopping else {
            completed = true
            done.resume(returning: reply)
            return
        }
        self.done = done
        run = startPushing(provider, request, on: loop, sink: self)
        buyAhead()
    }

    /// Paid tokens still to go out when the next batch is bought. A debit is one group commit
    /// (a few ms; more on a remote store): at 100 tokens/s four tokens give it 40 ms, and a
    /// reply that ends just after seldom bought a batch it did not need (the settlement
    /// refunds what was not sent either way).
    static let purchaseLead = 4

    /// Buys the next batch when few paid tokens are left and no purchase is under way.
    private func buyAhead() {
        guard !buying, !stopping, !providerFinished, !cannotBuyAhead else { return }
        let paidThrough = meter.paidThrough
        guard paidThrough - Int(reply.seq) <= Self.purchaseLead else { return }
        buy(token: paidThrough + 1)
    }

    func received(_ event: LLMEvent) {
        loop.assertInEventLoop()
        guard !stopping else { return }
        switch event {
        case .token(let token):
            if waiting.isEmpty, meter.isPaid(token: reply.nextToken) {
                send(token)
                buyAhead()
            } else {
                waiting.append(token)
                releaseWaiting()
            }
        case .usage(let usage):
            reply.reported = usage
        }
    }

    func finished(_ error: (any Error)?) {
        loop.assertInEventLoop()
        guard !stopping else { return }
        providerFinished = true
        providerError = error
        run = nil
        releaseWaiting()
    }

    /// Releases a paid token (journaling the text after a batch was just bought).
    private func send(_ token: String) {
        reply.release(token, boughtBatch: boughtBatch)
        boughtBatch = false
    }

    /// Releases waiting tokens while they are paid for; buys the next batch when one is not (or
    /// waits for the purchase under way).
    private func releaseWaiting() {
        while !stopping, let token = waiting.first {
            guard meter.isPaid(token: reply.nextToken) else {
                if !buying { buy(token: reply.nextToken) }
                return
            }
            waiting.removeFirst()
            send(token)
        }
        buyAhead()
        if providerFinished, waiting.isEmpty, !buying { complete() }
    }

    private func buy(token index: Int) {
        buying = true
        let meter = self.meter
        Task {
            let paid: Result<Bool, any Error>
            do { paid = .success(try await meter.authorize(token: index)) } catch { paid = .failure(error) }
            self.loop.execute { self.bought(paid) }
        }
    }

    private func bought(_ paid: Result<Bool, any Error>) {
        buying = false
        guard !stopping else {
            complete()
            return
        }
        switch paid {
        case .success(true):
            boughtBatch = true
            cannotBuyAhead = false
            releaseWaiting()
        case .success(false) where waiting.isEmpty:
            // Bought ahead, and nothing: the paid tokens left still go out; the first unpaid one
            // tries once more (credits may have come meanwhile) and stops the reply if it fails.
            cannotBuyAhead = true
            releaseWaiting()
        case .success(false):
            reply.outOfCredits = true
            stop()
        case .failure(let error):
            reply.fail(error, metrics: metrics, logger: logger)
            stop()
        }
    }

    /// Ends generation now (a stop, or no credits left): tokens still waiting are not sent. A
    /// batch being bought is waited for, so the settlement never runs beside a debit.
    func stop() {
        loop.assertInEventLoop()
        stopping = true
        run?.cancel()
        run = nil
        waiting.removeAll()
        if !buying { complete() }
    }

    private func complete() {
        guard !completed else { return }
        stopping = true
        completed = true
        if let providerError, !reply.outOfCredits { reply.fail(providerError, metrics: metrics, logger: logger) }
        // Nil before `start` (a stop that came first): `start` answers then.
        done?.resume(returning: reply)
        done = nil
    }
}
