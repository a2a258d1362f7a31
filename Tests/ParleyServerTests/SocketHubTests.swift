import Foundation
import NIOCore
import NIOEmbedded
import NIOWebSocket
import ParleyCore
@testable import ParleyServer
import Testing

/// The hub and the local broker on EmbeddedChannels: who receives a published frame, and what
/// a closed socket or an ended topic leaves behind.
@Suite struct SocketHubTests {
    final class Socket {
        let loop = EmbeddedEventLoop()
        let channel: EmbeddedChannel
        let connection: ClientConnection

        init(_ id: String, user: String) throws {
            channel = EmbeddedChannel(loop: loop)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            connection = ClientConnection(id: id, identity: Identity(user: user, role: nil), channel: channel)
        }

        /// The text frames written to it so far.
        func received() throws -> [String] {
            loop.run()
            var out: [String] = []
            while let frame = try channel.readOutbound(as: WebSocketFrame.self) { out.append(String(buffer: frame.unmaskedData)) }
            return out
        }
    }

    func frame(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

    @Test func aPublishReachesTheTopicsSubscribersThatItsAudienceAdmits() throws {
        let hub = SocketHub()
        let broker = LocalBroker(hub: hub)
        let (ann1, ann2, bob) = (try Socket("c1", user: "ann"), try Socket("c2", user: "ann"), try Socket("c3", user: "bob"))
        for socket in [ann1, ann2, bob] {
            #expect(hub.add(socket.connection))
            hub.subscribe(socket.connection, to: .room("rm_1"))
        }
        broker.publish(frame("all"), to: .room("rm_1"))
        broker.publish(frame("ann"), to: .room("rm_1"), audience: .only(user: "ann"))
        broker.publish(frame("not c1"), to: .room("rm_1"), audience: .except(connection: "c1"))
        broker.publish(frame("not ann"), to: .room("rm_1"), audience: .except(user: "ann"))
        broker.publish(frame("ann's"), to: .user("ann"))
        broker.publish(frame("nobody"), to: .room("rm_2"))
        #expect(try ann1.received() == ["all", "ann", "ann's"])
        #expect(try ann2.received() == ["all", "ann", "not c1", "ann's"])
        #expect(try bob.received() == ["all", "not c1", "not ann"])
    }

    @Test func aMemberJoiningARoomRunElsewhereGetsItsFramesAfterTheStateInOrderAndTheStreamsStartedSince() throws {
        let hub = SocketHub()
        let (ann, bob) = (try Socket("c1", user: "ann"), try Socket("c2", user: "bob"))
        for socket in [ann, bob] { _ = hub.add(socket.connection) }
        let (room, pt, zh) = (Topic.room("rm_1"), Topic.room("rm_1", readers: LanguageTag("pt")), Topic.room("rm_1", readers: LanguageTag("zh")))
        // Frames of the room and of two languages, numbered by the room, as another node sent them.
        hub.deliver(frame("joined"), to: room, audience: .everyone, seq: 10)
        hub.deliver(frame("said pt"), to: pt, audience: .everyone, seq: 11)
        hub.noteStream("st_zh", started: 12, on: zh)
        hub.noteStream("st_pt", started: 13, on: pt)
        hub.deliver(frame("not ann"), to: room, audience: .except(user: "ann"), seq: 14)
        hub.deliver(frame("said zh"), to: zh, audience: .everyone, seq: 15)
        hub.deliver(frame("left"), to: room, audience: .everyone, seq: 16)
        // Ann's state is as of frame 10: she gets what followed in her topics, in order, and
        // follows the Portuguese stream that started after it.
        #expect(hub.join(ann.connection, to: [room, pt], after: 10, first: frame("state")) == ["st_pt"])
        #expect(try ann.received() == ["state", "said pt", "left"])
        hub.deliver(frame("live"), to: pt, audience: .everyone, seq: 17)
        #expect(try ann.received() == ["live"])
        // Bob's state is as of frame 16: nothing more.
        #expect(hub.join(bob.connection, to: [room, zh], after: 16, first: frame("state")) == [])
        #expect(try bob.received() == ["state"])
        // Frames a join needs that were dropped: no join (ask for a newer state).
        for seq in 20..<(20 + Int64(SocketHub.ringCapacity)) { hub.deliver(frame("x"), to: zh, audience: .everyone, seq: seq) }
        let cy = try Socket("c3", user: "cy")
        _ = hub.add(cy.connection)
        #expect(hub.join(cy.connection, to: [room, zh], after: 17, first: frame("state")) == nil)
        #expect(try cy.received() == [])
    }

    @Test func aStreamsReadersAreTheSubscribersOfItsSourcesAtItsStart() throws {
        let hub = SocketHub()
        let (ann, bob, cy) = (try Socket("c1", user: "ann"), try Socket("c2", user: "bob"), try Socket("c3", user: "cy"))
        for socket in [ann, bob, cy] { _ = hub.add(socket.connection) }
        hub.subscribe(ann.connection, to: .room("rm_1", readers: LanguageTag("pt")))
        hub.subscribe(bob.connection, to: .room("rm_1", readers: nil))
        hub.subscribe(subscribersOf: [.room("rm_1", readers: LanguageTag("pt")), .room("rm_1", readers: nil)], to: .stream("st_1"))
        hub.subscribe(cy.connection, to: .room("rm_1", readers: nil))  // joined after the start: not a reader
        LocalBroker(hub: hub).publish(frame("token"), to: .stream("st_1"))
        #expect(try ann.received() == ["token"] && bob.received() == ["token"] && cy.received().isEmpty)
        #expect(hub.users(in: .stream("st_1")) == ["ann", "bob"])
    }

    /// A token published on a socket's own loop (a `TokenPump`) goes behind the frames another
    /// thread handed to that socket just before (a resume's replay), for one reader or many.
    @Test(arguments: [1, 3]) func aFramePublishedOnTheLoopGoesBehindWhatIsQueuedForIt(readers: Int) throws {
        let hub = SocketHub()
        let sockets = try (0..<readers).map { try Socket("c\($0)", user: "ann") }
        for socket in sockets {
            _ = hub.add(socket.connection)
            hub.subscribe(socket.connection, to: .stream("st_1"))
        }
        // What `send` does off the loop: queued for the loop.
        sockets[0].connection.sendBehindQueued(frame("replayed 1"))
        LocalBroker(hub: hub).publish(frame("token 2"), to: .stream("st_1"))
        #expect(try sockets[0].received() == ["replayed 1", "token 2"])
    }

    @Test func aClosedSocketAndAnEndedTopicLeaveNothingBehind() throws {
        let hub = SocketHub(maxSocketsPerUser: 1)
        let (ann, again) = (try Socket("c1", user: "ann"), try Socket("c2", user: "ann"))
        #expect(hub.add(ann.connection))
        #expect(!hub.add(again.connection), "one socket per user here")
        hub.subscribe(ann.connection, to: .room("rm_1"))
        hub.subscribe(ann.connection, to: .stream("st_1"))
        hub.subscribe(ann.connection, to: .stream("st_2"))
        hub.close(.stream("st_2"))
        #expect(hub.topicCount == 3)  // user, room, stream
        #expect(hub.hasSubscribers(.stream("st_1")))
        hub.close(.stream("st_1"))
        #expect(hub.topicCount == 2 && !hub.isSubscribed("c1", to: .stream("st_1")) && !hub.hasSubscribers(.stream("st_1")))
        #expect(hub.remove(ann.connection) == [.user("ann"), .room("rm_1")], "the topics it still followed")
        #expect(hub.topicCount == 0 && hub.connectionCount == 0 && !hub.hasSubscribers(.room("rm_1")))
        hub.subscribe(ann.connection, to: .stream("st_2"))  // a resume racing the close
        #expect(hub.topicCount == 0, "a closed socket is not subscribed again")
        #expect(hub.add(again.connection), "its place is free again")
    }

    /// A sign-out returns the sockets it ends, and refuses one whose token it ends that registers
    /// after it (its token checked before the sign-out): a connect racing a sign-out keeps no
    /// socket. Other sessions, and tokens issued after a sign-out everywhere, are not refused.
    @Test func aSignOutEndsTheSocketsOfItsSessionsAndRefusesTheLateOnes() throws {
        let hub = SocketHub()
        func socket(_ id: String, session: String?, issuedAt: Double? = nil) throws -> ClientConnection {
            let channel = EmbeddedChannel()
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            return ClientConnection(
                id: id, identity: Identity(user: "ann", session: session, issuedAt: issuedAt.map(Date.init(timeIntervalSince1970:))),
                channel: channel)
        }
        let (one, two) = (try socket("c1", session: "ses_1"), try socket("c2", session: "ses_2"))
        #expect(hub.add(one) && hub.add(two))
        #expect(hub.signOut(SignOut(user: "ann", session: "ses_1", at: 1_000)).map(\.id) == ["c1"])
        #expect(hub.register(try socket("c3", session: "ses_1")) == .signedOut)
        #expect(hub.register(try socket("c4", session: "ses_2")) == nil)
        // Everywhere: every token issued at or before it, not one issued after.
        #expect(Set(hub.signOut(SignOut(user: "ann", session: nil, at: 2_000_000)).map(\.id)) == ["c1", "c2", "c4"])
        #expect(hub.register(try socket("c5", session: "ses_5", issuedAt: 1_999)) == .signedOut)
        #expect(hub.register(try socket("c6", session: "ses_6", issuedAt: 2_001)) == nil)
    }

    /// A topic's recipients are kept between frames: every change of its subscribers must show in
    /// the next frame.
    @Test func aTopicsRecipientsFollowItsSubscriptionsBetweenFrames() throws {
        let hub = SocketHub()
        let broker = LocalBroker(hub: hub)
        let (ann, bob, cy) = (try Socket("c1", user: "ann"), try Socket("c2", user: "bob"), try Socket("c3", user: "cy"))
        for socket in [ann, bob, cy] { _ = hub.add(socket.connection) }
        hub.subscribe(ann.connection, to: .room("rm_1"))
        broker.publish(frame("1"), to: .room("rm_1"))
        hub.subscribe(bob.connection, to: .room("rm_1"))
        broker.publish(frame("2"), to: .room("rm_1"))
        hub.subscribe(subscribersOf: [.user("cy")], to: .room("rm_1"))
        broker.publish(frame("3"), to: .room("rm_1"))
        hub.unsubscribe("c1", from: .room("rm_1"))
        broker.publish(frame("4"), to: .room("rm_1"))
        hub.remove(bob.connection)
        broker.publish(frame("5"), to: .room("rm_1"))
        hub.close(.room("rm_1"))
        broker.publish(frame("6"), to: .room("rm_1"))
        hub.subscribe(ann.connection, to: .room("rm_1"))
        broker.publish(frame("7"), to: .room("rm_1"))
        #expect(try ann.received() == ["1", "2", "3", "7"])
        #expect(try bob.received() == ["2", "3", "4"])
        #expect(try cy.received() == ["3", "4", "5"])
    }

    /// A big room's joins and leaves are told to its moderator only: such a frame is found from
    /// the moderator's sockets, so members coming and going never rebuild the room's groups
    /// (#26: a join in a room of 3,000 cost milliseconds, most of it that rebuild), and it
    /// still goes in order with the frames to everyone.
    @Test func aFrameForOneUserDoesNotGroupTheWholeTopic() throws {
        let hub = SocketHub()
        let broker = LocalBroker(hub: hub)
        let (mod, modElsewhere) = (try Socket("c0", user: "mod"), try Socket("c1", user: "mod"))
        let members = try (2..<12).map { try Socket("c\($0)", user: "u\($0)") }
        for socket in [mod, modElsewhere] + members { _ = hub.add(socket.connection) }
        hub.subscribe(mod.connection, to: .room("rm_1"))
        for member in members { hub.subscribe(member.connection, to: .room("rm_1")) }
        broker.publish(frame("token 1"), to: .room("rm_1"))
        let builds = hub.groupBuilds
        for (index, member) in members.enumerated() {
            hub.unsubscribe(member.connection.id, from: .room("rm_1"))
            broker.publish(frame("left \(index)"), to: .room("rm_1"), audience: .only(user: "mod"))
        }
        #expect(hub.groupBuilds == builds, "a frame for the moderator rebuilt the room's groups")
        broker.publish(frame("token 2"), to: .room("rm_1"))
        #expect(hub.groupBuilds == builds + 1)
        #expect(try mod.received() == ["token 1"] + (0..<members.count).map { "left \($0)" } + ["token 2"])
        #expect(try modElsewhere.received() == [], "the moderator's socket outside the room")
        #expect(try members.allSatisfy { try $0.received() == ["token 1"] })
    }

    @Test func aRoomsTopicsNameTheRoom() {
        #expect(Topic.room("rm_1").room == "rm_1")
        #expect(Topic.room("rm_1", readers: LanguageTag("pt-BR")).room == "rm_1")
        #expect(Topic.room("rm_1", readers: nil).room == "rm_1")
        #expect(Topic.user("rm_1").room == nil && Topic.stream("st_1").room == nil)
    }

    @Test func historyReplaysWhatFollowsASeqUntilItWasEvicted() {
        var history = StreamHistory(capacity: 3, stream: "st_1")
        for seq in 1...5 { history.append(seq: Int64(seq), frame: frame("t\(seq)")) }
        func texts(after: Int64) -> [String]? {
            guard case .frames(let frames) = history.replay(after: after) else { return nil }
            return frames.map { String(buffer: $0) }
        }
        #expect(texts(after: 2) == ["t3", "t4", "t5"])
        #expect(texts(after: 4) == ["t5"])
        #expect(texts(after: 5) == [])
        #expect(texts(after: 1) == nil, "t2 was evicted")
        #expect(history.lastSeq == 5)
        // What a broker sends again: what it keeps after a seq, from where it starts.
        func kept(after: Int64) -> (Int64, [String]) {
            let kept = history.kept(after: after)
            return (kept.first, kept.frames.map { String(buffer: $0) })
        }
        #expect(kept(after: 3) == (4, ["t4", "t5"]))
        #expect(kept(after: 0) == (3, ["t3", "t4", "t5"]), "the evicted ones are skipped")
        #expect(kept(after: 5) == (6, []))
    }

    /// A stream's token frames are kept as their text (and what follows it) in one array and
    /// replayed byte for byte as they were sent; other frames are kept whole, and eviction
    /// reclaims the bytes of the evicted (#26).
    @Test func historyKeepsTokenFramesAsTheirTextAndReplaysThemExactly() {
        let capacity = 100
        var history = StreamHistory(capacity: capacity, stream: "st_01JD3V6Q2M0000000000000ABC")
        var sent: [String] = []
        for seq in 1...1_000 {
            let text = seq % 7 == 0 ? "\"quoted\"\n, \"seq\":1 é 🙂" : " word\(seq)"
            var bytes = ServerFrame.token(stream: "st_01JD3V6Q2M0000000000000ABC", seq: Int64(seq), text: text[...])
            // Another stream's frame, and one whose seq is not this one: kept whole.
            if seq == 995 { bytes = ServerFrame.token(stream: "st_other", seq: 995, text: "x") }
            if seq == 996 { bytes = ServerFrame.token(stream: "st_01JD3V6Q2M0000000000000ABC", seq: 9_960, text: "y") }
            sent.append(String(decoding: bytes, as: UTF8.self))
            history.append(seq: Int64(seq), frame: ByteBuffer(bytes: bytes))
        }
        guard case .frames(let frames) = history.replay(after: 900) else {
            Issue.record("the last 100 tokens are kept")
            return
        }
        #expect(frames.map { String(buffer: $0) } == Array(sent[900...]))
        let kept = history.kept(after: 0)
        #expect(kept.first == 901)
        #expect(kept.frames.map { String(buffer: $0) } == Array(sent[900...]))
        guard case .gone = history.replay(after: 899) else {
            Issue.record("token 900 was evicted")
            return
        }
        // The frames of the kept tokens are about 80 bytes each; their texts under 40.
        let whole = sent[900...].reduce(0) { $0 + $1.utf8.count }
        #expect(history.keptBytes < whole / 2, "\(history.keptBytes) bytes kept for \(whole) bytes of frames")
    }
}
