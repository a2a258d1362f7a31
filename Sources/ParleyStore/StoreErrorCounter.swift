import CoreMetrics

/// `parley_store_errors_total{store, kind}`: store calls that failed, by what failed, so an
/// operator can alert on a full disk (`full`) or a database out of reach (`unreachable`) rather
/// than read it from the requests answered `unavailable`. A duplicate key is an answer, not a
/// failure, and a closed store is a shutdown: neither is counted.
public struct StoreErrorCounter: Sendable {
    private let full: Counter
    private let unreachable: Counter
    private let failed: Counter

    public init(store: String, factory: any MetricsFactory) {
        func counter(_ kind: String) -> Counter {
            Counter(label: "parley_store_errors_total", dimensions: [("store", store), ("kind", kind)], factory: factory)
        }
        (full, unreachable, failed) = (counter("full"), counter("unreachable"), counter("failed"))
    }

    /// Counts `error` when a store call failed with it.
    public func count(_ error: any Error) {
        switch error {
        case StoreError.full: full.increment()
        case StoreError.unreachable: unreachable.increment()
        case StoreError.backend: failed.increment()
        default: break
        }
    }
}
