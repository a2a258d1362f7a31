import NIOConcurrencyHelpers
import ParleyCore
import ParleyTestSupport
import Testing

@testable import ParleyServer

/// One socket's requests take effect in the order they arrived (`RequestOrder`).
@Suite struct RequestOrderTests {
    @Test func aRequestStartsOnceTheOneBeforeItWasAdmittedNotWhenItEnds() async {
        let order = RequestOrder()
        let first = order.next(), second = order.next()
        #expect(first.isReady && !second.isReady)
        let log = NIOLockedValueBox<[String]>([])
        let tail = Admission()  // holds the first request after its admission, like a reply streaming
        let running = Task {
            await first.run {
                log.withLockedValue { $0.append("first admitted") }
                Admission.admitCurrent()
                await tail.wait()
                log.withLockedValue { $0.append("first ended") }
            }
        }
        await second.run { log.withLockedValue { $0.append("second") } }
        #expect(log.withLockedValue { $0 } == ["first admitted", "second"])
        tail.open()
        await running.value
        #expect(log.withLockedValue { $0 } == ["first admitted", "second", "first ended"])
    }

    @Test func aRequestThatNeverAdmitsItselfIsAdmittedWhenItEnds() async {
        let order = RequestOrder()
        let first = order.next(), second = order.next()
        let gate = Admission()
        let running = Task { await first.run { await gate.wait() } }
        #expect(!second.isReady)
        gate.open()
        await running.value
        #expect(second.isReady)
        await second.run {}
        #expect(order.next().isReady)
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aJoinAndAStartSentTogetherAreHandledInOrder(_ store: TestServer.StoreKind) async throws {
        let f = try await DebateFixture.make(store: store)
        let mod = try await f.server.connect(token: f.modToken)
        // No wait for room.state before the control: a pipelining client.
        try await mod.room("room.join", id: "j1", room: f.room)
        try await mod.control(f.room, "start", id: "c1")
        let state = try await mod.nextJSON()
        #expect(state["type"] == .string("room.state") && state["ref"] == .string("j1"), "\(state)")
        let started = try await mod.nextJSON()
        #expect(started["type"] == .string("room.event") && started["event"] == .string("started"), "\(started)")
        await f.server.stop()
    }

    @Test func aChatSendIsAnsweredBeforeTheRequestsSentAfterIt() async throws {
        let f = try await DebateFixture.make()
        let mod = try await f.server.connect(token: f.modToken)
        try await mod.chatSend(id: "c1", clone: f.clones[0], text: "Hello")
        try await mod.room("room.join", id: "j1", room: f.room)
        let first = try await mod.nextJSON()
        #expect(first["type"] == .string("stream.start") && first["ref"] == .string("c1"), "\(first)")
        let (state, _) = try await mod.next(type: "room.state")
        #expect(state["ref"] == .string("j1"))
        await f.server.stop()
    }
}
