import NIOCore
import ParleyCore
import Synchronization

/// Which streams exist: the live and recently ended ones (for resume, cancel and the drain), and
/// which conversations are busy. Who is connected is the `SocketHub`'s. It owns no I/O.
final class StreamHub: Sendable {
    enum Reservation: Equatable {
        case reserved
        case conversationBusy
        case tooManyStreams
        /// The user's plan allows fewer streams at once than the server does (#27).
        case overPlan
    }

    private struct State {
        var streams: [String: LiveStream] = [:]
        /// Ended streams in the order they ended, for expiry.
        var ended = CircularBuffer<(id: String, at: ContinuousClock.Instant)>()
        var busyConversations: Set<String> = []
        var activeStreamsPerUser: [String: Int] = [:]
        /// The ids in `streams` by owner: a user's streams are found without going through
        /// everyone's (a conversation's page asked for every stream on the node, #26).
        var byOwner: [String: Set<String>] = [:]
    }

    private let state = Mutex(State())
    private let retention: Duration
    private let maxStreamsPerUser: Int

    init(retention: Duration, maxStreamsPerUser: Int) {
        self.retention = retention
        self.maxStreamsPerUser = maxStreamsPerUser
    }

    // MARK: Reservations

    /// Claims a conversation for one stream, within the user's concurrent-stream limit.
    /// `planLimit`: how many streams the user's plan allows at once, when it sets a limit.
    func reserve(user: String, conversation: String, planLimit: Int? = nil) -> Reservation {
        state.withLock { s in
            if s.busyConversations.contains(conversation) { return .conversationBusy }
            let active = s.activeStreamsPerUser[user, default: 0]
            if let planLimit, planLimit < maxStreamsPerUser, active >= planLimit { return .overPlan }
            if active >= maxStreamsPerUser { return .tooManyStreams }
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
            s.byOwner[stream.owner, default: []].insert(stream.id)
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

    /// `owner`'s streams that have not ended.
    func liveStreams(of owner: String) -> [LiveStream] {
        state.withLock { s in (s.byOwner[owner] ?? []).compactMap { s.streams[$0] }.filter { !$0.isEnded } }
    }

    var retainedStreamCount: Int { state.withLock { $0.streams.count } }
    /// Users with streams retained (for tests: the index forgets a user with their streams).
    var ownersWithStreams: Int { state.withLock { $0.byOwner.count } }

    private func expire(_ s: inout State) {
        let horizon = ContinuousClock.now - retention
        while let first = s.ended.first, first.at <= horizon {
            s.ended.removeFirst()
            guard let stream = s.streams.removeValue(forKey: first.id) else { continue }
            s.byOwner[stream.owner]?.remove(first.id)
            if s.byOwner[stream.owner]?.isEmpty == true { s.byOwner[stream.owner] = nil }
        }
    }
}
