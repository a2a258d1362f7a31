import CoreMetrics
import NIOCore
import ParleyCore

/// What every stream reports through swift-metrics (scraped at `GET /metrics` when the parley
/// executable runs its Prometheus backend). One value per service; the handles are shared.
struct StreamMetrics: Sendable {
    /// Streams started and not yet ended (chat, scheduled, debate turns, translations).
    let active: Meter
    let tokens: Counter
    /// From `stream.start` to the first token: what the provider (and the prompt's store reads
    /// before it) made the reader wait.
    let firstToken: Timer
    let interToken: Timer
    private let ended: [StreamEndReason: Counter]
    /// `parley_provider_errors_total{kind="failed"}`: replies the provider failed (an error or a
    /// timeout, after its retries).
    let providerFailed: Counter
    /// `parley_provider_errors_total{kind="busy"}`: replies it could not take (its queue was full).
    let providerBusy: Counter
    /// Streams whose message, settlement or refund the store refused and that no retry has
    /// finished (`KeptReplies`): their journals wait for the next start-up's recovery.
    let awaitingRecovery: Meter

    init(factory: any MetricsFactory) {
        active = Meter(label: "parley_streams_active", factory: factory)
        tokens = Counter(label: "parley_tokens_total", factory: factory)
        firstToken = Timer(label: "parley_time_to_first_token_seconds", preferredDisplayUnit: .seconds, factory: factory)
        interToken = Timer(label: "parley_inter_token_seconds", preferredDisplayUnit: .seconds, factory: factory)
        var ended: [StreamEndReason: Counter] = [:]
        for reason in StreamEndReason.allCases {
            ended[reason] = Counter(label: "parley_streams_ended_total", dimensions: [("reason", reason.rawValue)], factory: factory)
        }
        self.ended = ended
        providerFailed = Counter(label: "parley_provider_errors_total", dimensions: [("kind", "failed")], factory: factory)
        providerBusy = Counter(label: "parley_provider_errors_total", dimensions: [("kind", "busy")], factory: factory)
        awaitingRecovery = Meter(label: "parley_streams_awaiting_recovery", factory: factory)
    }

    /// A stream ended; `reason` `error` is a provider that failed mid-reply or before it.
    func end(_ reason: StreamEndReason) {
        active.decrement()
        ended[reason]?.increment()
    }
}
