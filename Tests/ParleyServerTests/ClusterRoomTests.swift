import Foundation
import MetricsTestKit
import NIOPosix
import ParleyNATS
import ParleyCore
import ParleyMongoStore
import ParleyStore
import ParleyTestSupport
import Testing

@testable import ParleyServer

/// Debate rooms on a cluster (#22): one node runs a room (the first asked takes its lease);
/// members on any node see every frame in order, a member joining on another node mid-turn gets
/// the room's state and then the turn from its start, with nothing missed or doubled; words
/// and moderation from any node reach the room's node; a kick reaches every node.
private struct RoomCluster {
    var nats: NATSServer
    var uri: String
    var a: TestServer
    var b: TestServer
    var modToken: String
    var room: String
    var secret: String

    /// Turns of 3 s: long enough for a member to join in the middle of one on a loaded machine.
    static func start(tokensPerSecond: Double = 20, replyTokens: Int = 60, metricsA: TestMetrics? = nil) async throws -> RoomCluster {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let configure: @Sendable (inout ServerConfiguration) -> Void = {
            $0.simulated.tokensPerSecond = tokensPerSecond
            $0.simulated.replyTokens = replyTokens
        }
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri, secret: secret) {
            configure(&$0)
            if let metricsA { $0.metrics = metricsA }
        }
        let b = try await TestServer.clusterNode("node-b", nats: nats, uri: uri, secret: secret, configure)
        let mod = try await a.token("mod")
        var clones: [String] = []
        for name in ["Ada", "Bob"] { clones.append(try await a.createClone(token: mod, name: name)["id"]!.stringValue!) }
        let body = JSONValue.object([
            ("kind", .string("debate")), ("topic", .string("Is cheese a dessert?")),
            ("clones", .array(clones.map { .object([("clone", .string($0)), ("stance", .string("yes"))]) })),
            ("rounds", .int(1)), ("visibility", .string("link")),
        ])
        let created = try await TestHTTPClient.json(port: b.port, .POST, "/v1/rooms", token: mod, json: body)
        guard created.status == .created else { throw TestTimeout(description: "room creation answered \(created.status): \(created.text)") }
        return RoomCluster(nats: nats, uri: uri, a: a, b: b, modToken: mod, room: try created.json()["id"]!.stringValue!, secret: secret)
    }

    func stop() async {
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}

extension TestWebSocket {
    /// The texts of a stream's tokens after its start, and its end.
    fileprivate func tokens(of stream: String) async throws -> [String] {
        var texts: [String] = []
        while true {
            let frame = try await nextJSON()
            guard frame["stream"] == .string(stream) else { continue }
            switch frame["type"]?.stringValue {
            case "token":
                #expect(frame["seq"] == .int(Int64(texts.count + 1)), "in order, none missed or doubled")
                texts.append(frame["text"]!.stringValue!)
            case "stream.end": return texts
            default: continue
            }
        }
    }
}

@Suite(.serialized) struct ClusterRoomTests {
    @Test func aDebateRunsOnOneNodeAndItsMembersOnEveryNodeSeeAllOfIt() async throws {
        let cluster = try await RoomCluster.start()
        let room = cluster.room
        // The moderator joins on A first: A runs the room. Then on B.
        let modA = try await cluster.a.connect(token: cluster.modToken)
        _ = try await modA.join(room)
        let modB = try await cluster.b.connect(token: cluster.modToken)
        let stateB = try await modB.join(room)
        #expect(stateB["room"]?["status"] == .string("open"))
        #expect(stateB["members"] == .array([.string("mod")]))

        // Started from B: A runs it, both sockets see it.
        try await modB.control(room, "start")
        for socket in [modA, modB] { _ = try await socket.roomEvent("started") }
        let turn = try await modA.roomEvent("turn")
        let stream = turn["stream"]!.stringValue!
        _ = try await modA.next(type: "stream.start")
        for _ in 0..<5 { _ = try await modA.readUntilToken() }

        // Vic joins on B in the middle of the first turn: the state names the turn, which
        // follows from its first token.
        let vic = try await cluster.b.connect(token: try await cluster.b.token("vic"))
        let stateVic = try await vic.join(room)
        #expect(stateVic["stream"] == .string(stream))
        #expect(stateVic["members"] == .array([.string("mod"), .string("vic")]) && stateVic["member_count"] == .int(2))
        #expect(try await modA.roomEvent("joined")["user"] == .string("vic"))
        let vicTokens = try await vic.tokens(of: stream)
        let modBTokens = try await modB.tokens(of: stream)
        #expect(vicTokens.count == 60)
        #expect(modBTokens == vicTokens)

        // Vic's words, said on B, reach A's socket.
        try await vic.room("room.say", id: "s1", room: room, [("text", .string("cheese is a course"))])
        let said = try await modA.roomEvent("said")
        #expect(said["entry"]?["text"] == .string("cheese is a course"))
        #expect(said["entry"]?["user"] == .string("vic"))

        // The moderator on A removes Vic: B stops sending him the room, and he may not speak.
        try await modA.control(room, "kick", target: "vic")
        #expect(try await vic.roomEvent("kicked")["user"] == .string("vic"))
        try await vic.room("room.say", id: "s2", room: room, [("text", .string("hey"))])
        let refused = try await vic.next(type: "error").frame
        #expect(refused["ref"] == .string("s2"))
        #expect(refused["code"] == .string("not_found"))

        // The debate runs to its end on every node.
        for socket in [modA, modB] { _ = try await socket.roomEvent("ended") }
        await cluster.stop()
    }

    @Test func aNodeThatLostARoomWhileStalledCannotWriteItAndHandsItsRequestsToTheNewNode() async throws {
        let cluster = try await RoomCluster.start()
        let room = cluster.room
        let modA = try await cluster.a.connect(token: cluster.modToken)
        _ = try await modA.join(room)  // A runs the room
        // B takes the room as it would from a node that stopped (A stalled past its lease):
        // the lease's epoch grows and the room is fenced with it.
        let owners = try #require(cluster.b.server.rooms.owners)
        let observer = try await MongoStore.open(uri: cluster.uri)
        let epochA = try #require(try await observer.lease(room, in: RoomOwners.leases)?.epoch)
        #expect(try await owners.takeOver(room, from: "node-a"))
        #expect(try await observer.lease(room, in: RoomOwners.leases)?.epoch == epochA + 1)

        // A, still thinking it runs the room, cannot store a start (its sockets saw it announced,
        // as a change is announced before it is stored): the moderator is told `unavailable`,
        // and A lets the room go.
        try await modA.control(room, "start", id: "c1")
        let refused = try await modA.next(type: "error").frame
        #expect(refused["ref"] == .string("c1"))
        #expect(refused["code"] == .string("unavailable"))
        #expect(try await observer.room(id: room)?.status == .open)

        // Asked again, A sends it to B, which runs it now; A's socket follows the room still.
        try await modA.control(room, "start", id: "c2")
        _ = try await modA.roomEvent("started")
        // A change is announced before it is stored, and nothing is sent once it is: the store
        // is read until it shows the start (CI once read it between the two).
        let deadline = ContinuousClock.now + .seconds(10)
        var status = try await observer.room(id: room)?.status
        while status != .running, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
            status = try await observer.room(id: room)?.status
        }
        #expect(status == .running)
        try await observer.close()
        await cluster.stop()
    }

    @Test func aNodeRenewingItsRoomLeasesFindsTheOnesTakenFromItAndStopsRunningThem() async throws {
        let metrics = TestMetrics()
        let cluster = try await RoomCluster.start(metricsA: metrics)
        let room = cluster.room
        let modA = try await cluster.a.connect(token: cluster.modToken)
        _ = try await modA.join(room)  // A runs the room
        #expect(try metrics.expectMeter("parley_rooms_run").lastValue == 1)
        #expect(try await cluster.b.server.rooms.owners!.takeOver(room, from: "node-a"))
        // A's next renewal finds the lease gone: it stops running the room, and the next
        // request goes to B.
        let ownersA = try #require(cluster.a.server.rooms.owners)
        #expect(ownersA.runs(room))
        await ownersA.renew()
        #expect(!ownersA.runs(room))
        #expect(try metrics.expectMeter("parley_rooms_run").lastValue == 0)
        try await modA.control(room, "start", id: "c1")
        let answer = try await modA.nextJSON()
        #expect(answer["type"] == .string("room.event") && answer["event"] == .string("started"), "\(answer)")
        await cluster.stop()
    }

    @Test func aNodeThatTakesARoomOverLearnsItsMembersOnTheOtherNodes() async throws {
        let cluster = try await RoomCluster.start()
        let room = cluster.room
        let modA = try await cluster.a.connect(token: cluster.modToken)
        _ = try await modA.join(room)  // A runs the room
        let vic = try await cluster.b.connect(token: try await cluster.b.token("vic"))
        _ = try await vic.join(room)
        // C takes the room over (as from a node that stopped); A, its lease gone, lets it go.
        let c = try await TestServer.clusterNode("node-c", nats: cluster.nats, uri: cluster.uri, secret: cluster.secret)
        #expect(try await c.server.rooms.owners!.takeOver(room, from: "node-a"))
        await cluster.a.server.rooms.owners!.renew()
        try await c.server.rooms.continueAfterTakeover(room)
        // C knows the members on A and B: a joiner on C sees them, and hears when one leaves.
        let zed = try await c.connect(token: try await c.token("zed"))
        #expect(try await zed.join(room)["members"] == .array([.string("mod"), .string("vic"), .string("zed")]))
        try await vic.room("room.leave", id: "l1", room: room, [])
        #expect(try await zed.roomEvent("left")["user"] == .string("vic"))
        await c.stop()
        await cluster.stop()
    }

    /// A socket that closes while its join is on its way to the room's node: the join lands
    /// after the socket's close was handled, and must leave again rather than stay a member
    /// nobody can remove (in everyone's members list, and keeping the room in memory).
    @Test func aSocketThatClosesWhileItsJoinTravelsLeavesTheRoomAgain() async throws {
        let cluster = try await RoomCluster.start()
        let modA = try await cluster.a.connect(token: cluster.modToken)
        _ = try await modA.join(cluster.room)  // A runs the room
        let vic = try await cluster.b.connect(token: try await cluster.b.token("vic"))
        try await vic.room("room.join", id: "j1", room: cluster.room)
        await vic.drop()
        #expect(try await modA.roomEvent("joined")["user"] == .string("vic"))
        #expect(try await modA.roomEvent("left")["user"] == .string("vic"))
        let zed = try await cluster.b.connect(token: try await cluster.b.token("zed"))
        #expect(try await zed.join(cluster.room)["members"] == .array([.string("mod"), .string("zed")]))
        await cluster.stop()
    }

    @Test func aStoppedNodesMembersLeaveTheRoomsOfTheOthers() async throws {
        let cluster = try await RoomCluster.start()
        let modA = try await cluster.a.connect(token: cluster.modToken)
        _ = try await modA.join(cluster.room)
        // A socket of "node-gone" joined (as that node would ask), then the node stopped.
        let threads = NIOThreadPool(numberOfThreads: 1)
        threads.start()
        let raw = try await NATSConnection.connect(url: cluster.nats.url, threads: threads)
        var join = RemoteRoomRequest(.join, user: "ghost", connection: "cn_ghost", ref: "j")
        join.node = "node-gone"
        let answer = try RemoteRoomRequest.Answer(decoding: try await raw.request(BrokerSubjects.roomRequests(cluster.room), join.encoded()))
        #expect(try JSONValue.parse(answer.state)["members"] == .array([.string("ghost"), .string("mod")]))
        #expect(try await modA.roomEvent("joined")["user"] == .string("ghost"))
        cluster.a.server.rooms.owners?.gone("node-gone")
        #expect(try await modA.roomEvent("left")["user"] == .string("ghost"))
        let vic = try await cluster.b.connect(token: try await cluster.b.token("vic"))
        #expect(try await vic.join(cluster.room)["members"] == .array([.string("mod"), .string("vic")]))
        raw.close()
        try await threads.shutdownGracefully()
        await cluster.stop()
    }
}

/// Translation chats on a cluster (#22): one node runs the chat; a member on any node reads
/// every message once, in their language, streamed; joins mid-stream and words from any node
/// work as on one node; a language set on one node moves the user's sockets on the others.
@Suite(.serialized) struct ClusterTranslationTests {
    @Test func aTranslationChatRunsOnOneNodeAndItsMembersOnEveryNodeReadItInTheirLanguage() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        // Paced: the long message's translations (about 170 tokens) stream for seconds.
        let configure: @Sendable (inout ServerConfiguration) -> Void = { $0.simulated.tokensPerSecond = 30 }
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri, secret: secret, configure)
        let b = try await TestServer.clusterNode("node-b", nats: nats, uri: uri, secret: secret, configure)
        var tokens: [String: String] = [:]
        for user in ["alice", "bruno", "chen", "dave"] { tokens[user] = try await a.token(user) }
        let body = JSONValue.object([
            ("kind", .string("translation")), ("members", .array(["bruno", "chen", "dave"].map(JSONValue.string))),
            ("languages", .object([("alice", .string("en")), ("bruno", .string("pt")), ("chen", .string("zh"))])),
        ])
        let created = try await TestHTTPClient.json(port: b.port, .POST, "/v1/rooms", token: tokens["alice"]!, json: body)
        #expect(created.status == .created)
        let room = try created.json()["id"]!.stringValue!

        // Alice joins on A first: A runs the chat. Bruno joins on B, his language known from the
        // chat's creation (B learns it from A's answer).
        let alice = try await a.connect(token: tokens["alice"]!)
        _ = try await alice.joinChat(room)
        let bruno = try await b.connect(token: tokens["bruno"]!)
        let brunoState = try await bruno.joinChat(room)
        #expect(brunoState["members"] == .array([.string("alice"), .string("bruno")]))

        // Alice's long message streams to Bruno on B in Portuguese; Chen joins on B while it
        // streams and reads it in Chinese from its first token, not in the transcript.
        let long = Array(repeating: "the harbour lights were late tonight", count: 20).joined(separator: ", ")
        try await alice.say(room, long)
        var brunoChat = TranslatedChat()
        try await bruno.readChat(into: &brunoChat) { $0.texts.values.contains { $0.count > 20 } }
        let chen = try await b.connect(token: tokens["chen"]!)
        let chenState = try await chen.joinChat(room)
        #expect(chenState["transcript"] == .array([]), "the message streaming follows as its stream")
        let chenChat = try await chen.readChat(messages: 1)
        try await bruno.readChat(into: &brunoChat) { $0.order.count >= 1 && $0.open.isEmpty }
        let original = try #require(brunoChat.order.first)
        #expect(brunoChat.texts[original] == standIn(long, "pt"))
        #expect(chenChat.texts[original] == standIn(long, "zh"))
        #expect(chenChat.starts.count == 1 && brunoChat.starts.count == 1, "each stream once")
        #expect(brunoChat.ends[original]?["reason"] == .string("complete"))

        // Bruno's words, said on B, are placed by A: Alice reads them in English, Bruno as written.
        try await bruno.say(room, "olá a todos")
        let aliceChat = try await alice.readChat(messages: 2)
        #expect(aliceChat.texts[aliceChat.order[1]] == standIn("olá a todos", "en"))
        let brunoSaid = try await bruno.readChat(messages: 1)
        #expect(brunoSaid.texts.values.first == "olá a todos")
        #expect(brunoSaid.untranslated.isEmpty)

        // Dave reads in French on B, then joins on A in German: his socket on B reads German.
        let daveB = try await b.connect(token: tokens["dave"]!)
        _ = try await daveB.joinChat(room, language: "fr")
        let daveA = try await a.connect(token: tokens["dave"]!)
        _ = try await daveA.joinChat(room, language: "de")
        let german = Topic.room(room, readers: LanguageTag("de")!)
        try await within(.seconds(10), "dave's socket on B moved to German") {
            while !b.server.rooms.streams.sockets.users(in: german).contains("dave"), !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(20))
            }
        }
        try await alice.say(room, "good evening")
        let daveBChat = try await daveB.readChat(messages: 1)
        #expect(daveBChat.texts.values.first == standIn("good evening", "de"))
        let daveAChat = try await daveA.readChat(messages: 1)
        #expect(daveAChat.texts == daveBChat.texts)

        await a.stop()
        await b.stop()
        await nats.stop()
    }

    @Test func aClonesReplyInATranslationChatReachesAMemberOnAnotherNodeInTheirLanguage() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let configure: @Sendable (inout ServerConfiguration) -> Void = { $0.simulated.replyTokens = 8 }
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri, secret: secret, configure)
        let b = try await TestServer.clusterNode("node-b", nats: nats, uri: uri, secret: secret, configure)
        let (alice, bruno) = (try await a.token("alice"), try await a.token("bruno"))
        let clone = try await a.createClone(token: alice, name: "Zoé")["id"]!.stringValue!
        let body = JSONValue.object([
            ("kind", .string("translation")), ("members", .array([.string("bruno")])),
            ("languages", .object([("alice", .string("en")), ("bruno", .string("pt"))])),
            ("clones", .array([.object([("clone", .string(clone)), ("language", .string("fr"))])])),
        ])
        let created = try await TestHTTPClient.json(port: a.port, .POST, "/v1/rooms", token: alice, json: body)
        let room = try created.json()["id"]!.stringValue!
        let onA = try await a.connect(token: alice)
        _ = try await onA.joinChat(room)  // A runs the chat, and the clone's replies
        let onB = try await b.connect(token: bruno)
        _ = try await onB.joinChat(room)
        // Bruno's words, said on B: the clone answers in French on A; Bruno reads its reply in
        // Portuguese on B, Alice in English on A.
        try await onB.say(room, "olá, o mar está calmo")
        let brunoChat = try await onB.readChat(messages: 2)
        let aliceChat = try await onA.readChat(messages: 2)
        let store = try await MongoStore.open(uri: uri)
        let reply = try #require(try await store.roomEntries(room: room, limit: 100, before: nil).first { $0.kind == .turn })
        try await store.close()
        #expect(reply.speaker == clone && reply.lang?.value == "fr" && reply.reason == .complete)
        #expect(brunoChat.order == aliceChat.order)
        #expect(brunoChat.texts[reply.id] == standIn(reply.text, "pt"))
        #expect(aliceChat.texts[reply.id] == standIn(reply.text, "en"))
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}
