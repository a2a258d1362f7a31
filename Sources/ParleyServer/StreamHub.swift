import CoreMetrics
import NIOCore
import ParleyCore
import Synchronization

/// Who is connected and which streams exist: the sockets of each user, the live and recently
/// ended streams (for resume), and which conversations are busy. It owns no I/O of its own.
final class StreamHub: Sendable {
    enum Reservation: Equatable {
        case reserved
        case conversationBusy
        case tooManyStreams
    }

    private struct State {
        var connections: [String: [String: ClientConnection]] = [:]
        var streams: [String: LiveStream] = [:]
        /// Ended streams in the order they ended, for expiry.
        var ended = CircularBuffer<(id: String, at: ContinuousClock.Instant)>()
        var busyConversations: Set<String> = []
        var activeStreamsPerUser: [String: Int] = [:]
    }

    private let state = Mutex(State())
    private let retention: Duration
    private let maxStreamsPerUser: Int
    private let maxSocketsPerUser: Int
    /// `parley_sockets_open`: authenticated WebSockets the hub holds.
    private let socketsOpen: Meter?

    init(retention: Duration, maxStreamsPerUser: Int, maxSocketsPerUser: Int = .max, metrics: (any MetricsFactory)? = nil) {
        socketsOpen = metrics.map { Meter(label: "parley_sockets_open", factory: $0) }
        self.retention = retention
        self.maxStreamsPerUser = maxStreamsPerUser
        self.maxSocketsPerUser = maxSocketsPerUser
    }

    // MARK: Connections

    /// Adds a socket unless its user already has `maxSocketsPerUser` (checked and added under one lock).
    func add(_ connection: ClientConnection) -> Bool {
        state.withLock { s in
            let user = connection.identity.user
            guard (s.connections[user]?.count ?? 0) < maxSocketsPerUser else { return false }
            s.connections[user, default: [:]][connection.id] = connection
            socketsOpen?.increment()
            return true
        }
    }

    func remove(_ connection: ClientConnection) {
        state.withLock { s in
            if s.connections[connection.identity.user]?.removeValue(forKey: connection.id) != nil { socketsOpen?.decrement() }
            if s.connections[connection.identity.user]?.isEmpty == true {
                s.connections.removeValue(forKey: connection.identity.user)
            }
        }
    }

    func connections(of user: String) -> [ClientConnection] {
        state.withLock { Array(($0.connections[user] ?? [:]).values) }
    }

    var allConnections: [ClientConnection] {
        state.withLock { $0.connections.values.flatMap { Array($0.values) } }
    }

    var connectionCount: Int {
        state.withLock { $0.connections.values.reduce(0) { $0 + $1.count } }
    }

    // MARK: Reservations

    /// Claims a conversation for one stream, within the user's concurrent-stream limit.
    func reserve(user: String, conversation: String) -> Reservation {
        state.withLock { s in
            if s.busyConversations.contains(conversation) { return .conversationBusy }
            if s.activeStreamsPerUser[user, default: 0] >= maxStreamsPerUser { return .tooManyStreams }
            s.busyConversations.insert(conversation)
            s.activeStreamsPerUser[user, default: 0] += 1
            return .reserved
        }
    }

    func release(user: String, conversation: String) {
        state.withLock { s in
            guard s.busyConversations.remove(conversation) != nil else { return }
            let remaining = s.activeStreamsPerUser[user, default: 1] - 1
            s.activeStreamsPerUser[user] = remaining > 0 ? remaining : nil
        }
    }

    // MARK: Streams

    func register(_ stream: LiveStream) {
        state.withLock { s in
            expire(&s)
            s.streams[stream.id] = stream
        }
    }

    /// Records that a stream ended; it stays resumable for the retention period.
    func ended(_ stream: LiveStream) {
        state.withLock { s in
            s.ended.append((stream.id, .now))
            expire(&s)
        }
    }

    /// The stream with that id if `owner` owns it; someone else's stream is as unknown as a missing one.
    func stream(id: String, owner: String) -> LiveStream? {
        state.withLock { s in
            expire(&s)
            guard let stream = s.streams[id], stream.owner == owner else { return nil }
            return stream
        }
    }

    var liveStreams: [LiveStream] {
        state.withLock { $0.streams.values.filter { !$0.isEnded } }
    }

    var retainedStreamCount: Int { state.withLock { $0.streams.count } }

    private func expire(_ s: inout State) {
        let horizon = ContinuousClock.now - retention
        while let first = s.ended.first, first.at <= horizon {
            s.ended.removeFirst()
            s.streams.removeValue(forKey: first.id)
        }
    }
}
