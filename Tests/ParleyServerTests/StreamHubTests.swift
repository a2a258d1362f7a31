import NIOCore
import ParleyLLM
@testable import ParleyServer
import Testing

/// Which streams a user has: found from the user's own, the ended ones left out, and forgotten
/// with them once their retention is over.
@Suite struct StreamHubTests {
    func stream(_ id: String, of owner: String, hub: StreamHub) -> LiveStream {
        let live = LiveStream(
            id: id, owner: owner, model: SimulatedProvider.modelName, kind: .reply(conversation: "cv_\(id)", clone: "cl1", schedule: nil),
            bufferCapacity: 10, readers: [], broker: TokenPumpTests.RecordingBroker(), hub: SocketHub())
        hub.register(live)
        return live
    }

    @Test func aUsersLiveStreamsAreTheirsAndNotEnded() {
        let hub = StreamHub(retention: .zero, maxStreamsPerUser: 10)
        let (a1, a2) = (stream("st_a1", of: "alice", hub: hub), stream("st_a2", of: "alice", hub: hub))
        _ = stream("st_b1", of: "bob", hub: hub)
        #expect(Set(hub.liveStreams(of: "alice").map(\.id)) == ["st_a1", "st_a2"])
        #expect(hub.liveStreams(of: "bob").map(\.id) == ["st_b1"] && hub.liveStreams(of: "cy").isEmpty)
        a1.finish(ByteBuffer(string: "{}"), reason: .complete)
        hub.ended(a1)  // with no retention it goes at once
        #expect(hub.liveStreams(of: "alice").map(\.id) == ["st_a2"] && hub.retainedStreamCount == 2)
        a2.finish(ByteBuffer(string: "{}"), reason: .complete)
        hub.ended(a2)
        #expect(hub.liveStreams(of: "alice").isEmpty && hub.retainedStreamCount == 1 && hub.ownersWithStreams == 1)
    }
}
