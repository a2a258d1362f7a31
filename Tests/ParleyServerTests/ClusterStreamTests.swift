import Foundation
import MetricsTestKit
import NIOHTTP1
import NIOPosix
import ParleyMongoStore
import ParleyNATS
import ParleyCore
import ParleyTestSupport
import Testing

@testable import ParleyServer

/// Two nodes sharing a real nats-server (#22): a reply generated on one node reaches the user's
/// tabs on the other, resumes there, and is cancelled from there. Each node has its own SQLite
/// store here: these tests are about the frames between nodes, not shared state.
private struct TwoNodes {
    var nats: NATSServer
    var a: TestServer
    var b: TestServer

    static func start(_ configure: @escaping @Sendable (inout ServerConfiguration) -> Void = { _ in }) async throws -> TwoNodes {
        let nats = try NATSServer()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let node: @Sendable (inout ServerConfiguration) -> Void = {
            $0.brokerURL = nats.url
            $0.jwtSecret = secret
            configure(&$0)
        }
        let a = try await TestServer.start(node)
        let b = try await TestServer.start(node)
        return TwoNodes(nats: nats, a: a, b: b)
    }

    /// Connects on `server` and waits until the broker has the new socket's subscriptions.
    func connect(_ server: TestServer, token: String) async throws -> TestWebSocket {
        let socket = try await server.connect(token: token)
        try await server.server.brokerRoundTrip()
        return socket
    }

    /// Alice's token (good on both nodes) and a clone of hers in node A's store.
    func aliceWithAClone() async throws -> (token: String, clone: String) {
        let token = try await a.token("alice")
        return (token, try await a.createClone(token: token)["id"]!.stringValue!)
    }

    func stop() async {
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}

extension TestWebSocket {
    fileprivate func resume(_ id: String, stream: String, after: Int64) async throws {
        try await send(.object([("type", .string("stream.resume")), ("id", .string(id)), ("stream", .string(stream)), ("after", .int(after))]))
    }

    /// Tokens and the end of a stream after its start was read.
    fileprivate func readRest() async throws -> (tokens: [JSONValue], end: JSONValue) {
        var tokens: [JSONValue] = []
        while true {
            let frame = try await nextJSON()
            switch frame["type"]?.stringValue {
            case "token": tokens.append(frame)
            case "stream.end": return (tokens, frame)
            default: throw TestTimeout(description: "unexpected frame in a stream: \(frame)")
            }
        }
    }
}

@Suite(.serialized) struct ClusterStreamTests {
    @Test func aReplyReachesTheUsersTabsOnTheOtherNodeAndResumesThereFromItsMirror() async throws {
        let nodes = try await TwoNodes.start {
            $0.simulated.tokensPerSecond = 200
            $0.simulated.replyTokens = 40
        }
        let (token, clone) = try await nodes.aliceWithAClone()
        let onA = try await nodes.connect(nodes.a, token: token)
        let onB = try await nodes.connect(nodes.b, token: token)
        let bystander = try await nodes.connect(nodes.b, token: try await nodes.a.token("bob"))

        try await onA.chatSend(id: "c1", clone: clone, text: "Hello from node A")
        let here = try await onA.readReply()
        let there = try await onB.readReply()
        #expect(there.stream == here.stream)
        #expect(there.seqs == Array(1...40))
        #expect(there.text == here.text)
        #expect(there.end == here.end)
        #expect(there.start["conversation"] == here.start["conversation"])

        // A second tab on B resumes the ended stream from B's own copy of it.
        #expect((nodes.b.server.chat.streams.broker as? NATSBroker)?.mirrorCount == 1)
        let late = try await nodes.b.connect(token: token)
        try await late.resume("r1", stream: here.stream, after: 25)
        let ack = try await late.nextJSON()
        #expect(ack["type"] == .string("stream.start"))
        #expect(ack["ref"] == .string("r1"))
        let rest = try await late.readRest()
        #expect(rest.tokens.map { $0["seq"]!.intValue! } == Array(26...40))
        #expect(rest.tokens == Array(here.tokens[25...]))
        #expect(rest.end == here.end)

        // Bob, on B, got nothing of Alice's: his next frame is the answer to his own request.
        try await bystander.resume("x", stream: here.stream, after: 0)
        let answer = try await bystander.nextJSON()
        #expect(answer["type"] == .string("error"))
        #expect(answer["code"] == .string("stream_gone"))
        await nodes.stop()
    }

    @Test func aVoicedRepliesAudioReachesTheUsersTabOnTheOtherNodeWhole() async throws {
        let speech = ScriptedSpeech()
        let nodes = try await TwoNodes.start {
            $0.simulated.tokensPerSecond = 200
            $0.simulated.replyTokens = 40
            $0.speech = speech
        }
        let (token, clone) = try await nodes.aliceWithAClone()
        let onA = try await nodes.connect(nodes.a, token: token)
        let onB = try await nodes.connect(nodes.b, token: token)
        try await onA.chatSendVoiced(id: "v1", clone: clone)
        let here = try await onA.readVoiced()
        let there = try await onB.readVoiced()
        #expect(here.audio["reason"] == .string("complete") && !here.chunks.isEmpty)
        #expect(there.reply.text == here.reply.text && there.reply.end == here.reply.end)
        #expect(there.chunks.map { $0.header["chunk"]! } == here.chunks.map { $0.header["chunk"]! })
        #expect(there.chunks.flatMap(\.audio) == here.chunks.flatMap(\.audio), "the same audio, binary frames through NATS")

        // A tab on B that lost the end resumes from B's copy, audio included, nothing twice.
        let late = try await nodes.b.connect(token: token)
        try await late.send(
            .object([
                ("type", .string("stream.resume")), ("id", .string("r1")), ("stream", .string(here.reply.stream)), ("after", .int(30)),
                ("audio_after", .int(1)),
            ]))
        let resumed = try await late.readVoiced()
        #expect(resumed.reply.start["ref"] == .string("r1") && resumed.reply.seqs == Array(31...40))
        #expect(resumed.chunks.map { $0.header["chunk"]! } == Array(here.chunks.dropFirst()).map { $0.header["chunk"]! })
        #expect(resumed.reply.end == here.reply.end)
        await nodes.stop()
    }

    @Test func aStreamResumesOnANodeThatNeverSawItWithNoGapAndNoRepeat() async throws {
        let nodes = try await TwoNodes.start {
            $0.simulated.tokensPerSecond = 50
            $0.simulated.replyTokens = 60
        }
        let (token, clone) = try await nodes.aliceWithAClone()
        let onA = try await nodes.connect(nodes.a, token: token)
        try await onA.chatSend(id: "c1", clone: clone, text: "Talk while I switch nodes")
        let start = try await onA.nextJSON()
        let stream = start["stream"]!.stringValue!
        var seen: [JSONValue] = []
        while seen.count < 5 { seen.append(try await onA.readUntilToken()) }
        await onA.drop()

        // The balancer sends the reconnect to B, which has no copy: JetStream replays the rest
        // and B follows the stream live to its end.
        let onB = try await nodes.b.connect(token: token)
        #expect((nodes.b.server.chat.streams.broker as? NATSBroker)?.mirrorCount == 0)
        try await onB.resume("r1", stream: stream, after: 5)
        let ack = try await onB.nextJSON()
        #expect(ack["type"] == .string("stream.start"))
        #expect(ack["ref"] == .string("r1"))
        #expect(ack["stream"] == start["stream"])
        #expect(ack["conversation"] == start["conversation"])
        #expect(ack["clone"] == start["clone"])
        let rest = try await onB.readRest()
        #expect(rest.tokens.map { $0["seq"]!.intValue! } == Array(6...60))
        #expect(rest.end["reason"] == .string("complete"))

        // What the two sockets saw together is the stored reply, word for word.
        let conversation = start["conversation"]!.stringValue!
        let messages = try await nodes.a.get("/v1/conversations/\(conversation)/messages", token: token).json()
        let stored = messages["messages"]!.arrayValue!.last!["text"]!.stringValue!
        #expect((seen + rest.tokens).map { $0["text"]!.stringValue! }.joined() == stored)

        // Ended, it still resumes from the start on B (and on A, from A's own history).
        try await onB.resume("r2", stream: stream, after: 0)
        #expect(try await onB.nextJSON()["ref"] == .string("r2"))
        let again = try await onB.readRest()
        #expect(again.tokens.map { $0["text"]!.stringValue! }.joined() == stored)
        await nodes.stop()
    }

    @Test func aResumeOfEvictedTokensOrOfSomeoneElsesOrAnUnknownStreamIsGoneOnTheOtherNode() async throws {
        let nodes = try await TwoNodes.start {
            $0.simulated.replyTokens = 30
            $0.resumeBufferTokens = 8
        }
        let (token, clone) = try await nodes.aliceWithAClone()
        let onA = try await nodes.connect(nodes.a, token: token)
        try await onA.chatSend(id: "c1", clone: clone, text: "A long answer please")
        let reply = try await onA.readReply()
        #expect(reply.tokens.count == 30)
        try await nodes.a.server.brokerRoundTrip()  // JetStream has every frame A published

        let onB = try await nodes.b.connect(token: token)
        // JetStream keeps the last 8 tokens and the end: 22 and later resume, 2 does not.
        try await onB.resume("late", stream: reply.stream, after: 22)
        #expect(try await onB.nextJSON()["ref"] == .string("late"))
        #expect(try await onB.readRest().tokens.map { $0["seq"]!.intValue! } == Array(23...30))
        try await onB.resume("early", stream: reply.stream, after: 2)
        let early = try await onB.nextJSON()
        #expect(early["type"] == .string("error"))
        #expect(early["code"] == .string("stream_gone"))
        #expect(early["ref"] == .string("early"))

        let bob = try await nodes.b.connect(token: try await nodes.a.token("bob"))
        try await bob.resume("theirs", stream: reply.stream, after: 22)
        let theirs = try await bob.nextJSON()
        #expect(theirs["code"] == .string("stream_gone"))
        #expect(theirs["ref"] == .string("theirs"))
        try await onB.resume("none", stream: "st_nosuchstream", after: 0)
        #expect(try await onB.nextJSON()["code"] == .string("stream_gone"))
        await nodes.stop()
    }

    @Test func aCancelSentToTheOtherNodeStopsTheStreamForEveryReader() async throws {
        let nodes = try await TwoNodes.start {
            $0.simulated.tokensPerSecond = 20
            $0.simulated.replyTokens = 1000
        }
        let (token, clone) = try await nodes.aliceWithAClone()
        let onA = try await nodes.connect(nodes.a, token: token)
        let onB = try await nodes.connect(nodes.b, token: token)
        try await onA.chatSend(id: "c1", clone: clone, text: "Talk for a long time")
        let start = try await onA.nextJSON()
        let stream = start["stream"]!.stringValue!
        _ = try await onB.readUntilToken()

        // Bob cannot stop Alice's stream from B; an unknown stream is not found.
        let bob = try await nodes.connect(nodes.b, token: try await nodes.a.token("bob"))
        try await bob.chatCancel(id: "x1", stream: stream)
        let refused = try await bob.nextJSON()
        #expect(refused["code"] == .string("not_found"))
        #expect(refused["ref"] == .string("x1"))
        try await onB.chatCancel(id: "x2", stream: "st_nosuchstream")
        let unknown = try await onB.next(type: "error").frame
        #expect(unknown["code"] == .string("not_found"))

        try await onB.chatCancel(id: "x3", stream: stream)
        let endOnB = try await onB.next(type: "stream.end").frame
        let endOnA = try await onA.next(type: "stream.end").frame
        #expect(endOnA["reason"] == .string("cancelled"))
        #expect(endOnB == endOnA)
        #expect(endOnA["usage"]!["output_tokens"]!.intValue! < 1000)
        await nodes.stop()
    }
}

@Suite struct BrokerEnvelopeTests {
    @Test func subjectsCarryAnyTopicNameAndGiveItBack() {
        for name in ["user.usr_1", "room.rm_2.lang.pt-BR", "user.alice@example.com", "user.a b*>", "user.ünï"] {
            let topic = Topic(name: name)
            let parsed = BrokerSubjects.parse(BrokerSubjects.topic(topic))
            #expect(parsed?.topic == topic)
            #expect(parsed?.stream == nil)
            let stream = BrokerSubjects.parse(BrokerSubjects.stream("st_9", readers: topic))
            #expect(stream?.topic == topic)
            #expect(stream?.stream == "st_9")
            // One subject token: no dot, space or wildcard can split or widen it.
            let token = BrokerSubjects.token(name)
            #expect(!token.contains(".") && !token.contains(" ") && !token.contains("*") && !token.contains(">"))
        }
        #expect(BrokerSubjects.parse("p.~zz.t") == nil)
        #expect(BrokerSubjects.parse("q.user:a.t") == nil)
    }

    @Test func anEnvelopeDecodesToWhatWasEncodedAndATruncatedOneIsRefused() throws {
        let envelope = BrokerEnvelope(
            part: .end, seq: 1_234_567_890_123, audience: Audience(user: "u", exceptConnection: "c"), descriptor: Array("{}".utf8),
            ownerFrame: Array("owner".utf8), frame: Array("{\"type\":\"stream.end\"}".utf8))
        let bytes = envelope.encoded()
        #expect(try BrokerEnvelope(decoding: bytes) == envelope)
        #expect(throws: BrokerEnvelope.Malformed.self) { try BrokerEnvelope(decoding: Array(bytes.prefix(20))) }
        #expect(throws: BrokerEnvelope.Malformed.self) { try BrokerEnvelope(decoding: [9] + Array(bytes.dropFirst())) }
    }
}

/// A node that stops renewing its lease (killed) has its leftovers finished by another node of
/// the cluster, once: the real `kill -9` of a node is in Tests/interop/test_cluster.py.
@Suite(.serialized) struct ClusterNodeTests {
    /// The tokens of a reply cut by a kill: as far as its journal got, and as far as NATS got.
    struct CutReply: Sendable, CustomTestStringConvertible {
        var journal: [String]
        var published: [String]
        /// What is stored: the journal, then what only NATS (JetStream) kept.
        var stored: [String] { journal + Array(published.dropFirst(journal.count)) }
        var testDescription: String { "journal \(journal.count) tokens, JetStream \(published.count)" }
    }

    @Test(arguments: [
        CutReply(journal: ["Hello", ",", " wor"], published: ["Hello"]),
        CutReply(journal: ["Hello"], published: ["Hello", ",", " wor", "ld"]),
    ])
    func aNodeFinishesWhatAStoppedNodeLeftOnceAndEndsItsStreamForItsReaders(_ cut: CutReply) async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri)
        let token = try await a.token("alice")
        let clone = try await a.createClone(token: token)["id"]!.stringValue!
        _ = try await a.get("/v1/credits", token: token)  // the starting grant
        let socket = try await a.connect(token: token)
        try await a.server.brokerRoundTrip()

        // What a node that was killed mid-reply leaves: the user's message stored, the prompt
        // and one batch paid, a journal of what was sent, its lease (now expired), and the
        // stream's first frames on the broker, which node A followed for Alice's socket.
        var options = MongoStore.Options()
        options.node = "node-dead"
        let dead = try await MongoStore.open(uri: uri, options: options)
        let now = Int64(Timestamp.nowMillis())
        let ids = IDGenerator()
        let (question, cutID) = (ids.make(.message), ids.make(.message))
        let conversation = Conversation(id: "cv_dead", owner: "alice", clone: clone, title: "Hi", createdAt: now, updatedAt: now)
        try await dead.createConversation(conversation)
        try await dead.appendMessage(Message(id: question, conversation: "cv_dead", role: .user, text: "Hi", createdAt: now))
        for (suffix, credits, count) in [("in", Int64(-10), 10), ("1", Int64(-32), 16)] {
            _ = try await dead.apply(
                LedgerEntry(
                    id: "st_dead:\(suffix)", user: "alice", kind: .debit, credits: credits, tokens: count, stream: "st_dead", model: "simulated",
                    feature: "chat", createdAt: now), allowOverdraft: false)
        }
        let journal = StreamJournal(
            stream: "st_dead", user: "alice", model: "simulated", feature: "chat", inputTokens: 10, target: .conversation("cv_dead"),
            messageID: cutID, text: cut.journal.joined(), outputTokens: cut.journal.count, createdAt: now, updatedAt: now)
        try await dead.saveStreamJournal(journal)
        #expect(
            try await dead.claimNodeLease(NodeLease(node: "node-dead", host: "gone", pid: 1, expires: now - 1), now: now - 1, key: "node-dead") == nil
        )
        let balance = try await dead.balance(user: "alice")
        // Its reply held the conversation across the nodes.
        #expect(try await dead.claimReplySlot(conversation: "cv_dead", user: "alice", node: "node-dead", limit: 4, now: now) == .claimed)

        let threads = NIOThreadPool(numberOfThreads: 1)
        threads.start()
        let raw = try await NATSConnection.connect(url: nats.url, threads: threads)
        let kind = LiveStream.Kind.reply(conversation: "cv_dead", clone: clone, schedule: nil)
        let subject = BrokerSubjects.stream("st_dead", readers: .user("alice"))
        let described = JSONValue.object([
            ("owner", .string("alice")), ("model", .string("simulated")), ("kind", .string("reply")), ("conversation", .string("cv_dead")),
            ("clone", .string(clone)),
        ])
        try raw.publish(
            subject,
            BrokerEnvelope(
                part: .start, descriptor: described.serialized(),
                frame: LiveStream.startFrame(ref: nil, id: "st_dead", model: "simulated", kind: kind)
            ).encoded())
        for (n, text) in cut.published.enumerated() {
            let seq = Int64(n + 1)
            try raw.publish(
                subject,
                BrokerEnvelope(part: .token, seq: seq, frame: ServerFrame.token(stream: "st_dead", seq: seq, text: Substring(text))).encoded())
        }
        try await raw.flush()
        #expect(try await socket.next(type: "stream.start").frame["stream"] == .string("st_dead"))
        for n in cut.published.indices { #expect(try await socket.next(type: "token").frame["seq"] == .int(Int64(n + 1))) }

        #expect(await a.server.takeOverStoppedNodes() == ["node-dead"])
        let end = try await socket.next(type: "stream.end").frame
        #expect(end["stream"] == .string("st_dead"))
        #expect(end["reason"] == .string("interrupted"))
        #expect(end["message"] == .string(cutID))
        // Charged its prompt (10) and the tokens stored (2 each); the rest comes back.
        let cost = Int64(10 + 2 * cut.stored.count)
        #expect(end["cost"] == .int(cost))
        #expect(end["usage"]?["output_tokens"] == .int(Int64(cut.stored.count)))
        #expect(end["balance"] == .int(balance + 32 + 10 - cost))
        let messages = try await a.get("/v1/conversations/cv_dead/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["id"]! } == [.string(question), .string(cutID)])
        #expect(messages.last?["text"] == .string(cut.stored.joined()))
        #expect(messages.last?["reason"] == .string("interrupted"))

        // Nothing is left to take over, nor done twice.
        #expect(await a.server.takeOverStoppedNodes().isEmpty)
        #expect(Set(try await dead.nodeLeases().keys) == ["node-a"])
        #expect(try await dead.streamJournals(limit: 10).isEmpty)
        #expect(try await dead.balance(user: "alice") == balance + 32 + 10 - cost)
        // And the conversation is free again.
        #expect(try await dead.claimReplySlot(conversation: "cv_dead", user: "alice", node: "node-a", limit: 4, now: now) == .claimed)

        raw.close()
        try await threads.shutdownGracefully()
        try await dead.close()
        await a.stop()
        await nats.stop()
    }

    @Test func aNodeCutOffFromTheBrokerStopsRenewingItsLeaseAndIsToldToStopBeforeItExpires() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri) { $0.nodeLeasePeriod = .milliseconds(900) }
        await nats.stop()
        let server = a.server
        let reason = try await within(.seconds(10), "the lease reported lost") { await server.nodeLeaseLost() }
        #expect(reason == "the node lease could not be renewed before it expired: this node is cut off from the broker")
        let observer = try await MongoStore.open(uri: uri)
        let lease = try #require(try await observer.nodeLeases()["node-a"])
        // Not renewed since the broker went: told a sixth of a period before it runs out.
        let stopsAt = try #require(server.nodeLeaseStopsAtMillis)
        #expect(stopsAt <= lease.expires - 150)
        #expect(lease.expires <= Int64(Timestamp.nowMillis()) + 900)
        try await observer.close()
        await a.stop()
    }

    @Test func aNodeMeasuresItsRoundTripToTheBrokerAndJetStreamsLag() async throws {
        let nats = try NATSServer()
        let metrics = TestMetrics()
        let a = try await TestServer.start {
            $0.brokerURL = nats.url
            $0.metrics = metrics
        }
        try await a.server.brokerRoundTrip()
        let trips = try metrics.expectTimer("parley_broker_round_trip_seconds").values
        #expect(!trips.isEmpty && trips.allSatisfy { $0 > 0 && $0 < 5_000_000_000 }, "\(trips)")
        // And how long JetStream takes to keep what it publishes.
        try await a.server.jetStreamLag()
        let lags = try metrics.expectTimer("parley_jetstream_lag_seconds").values
        #expect(!lags.isEmpty && lags.allSatisfy { $0 > 0 && $0 < 5_000_000_000 }, "\(lags)")
        await a.stop()
        await nats.stop()
    }

    @Test func aNodeCutOffFromTheBrokerIsNotReady() async throws {
        let nats = try NATSServer()
        let a = try await TestServer.start { $0.brokerURL = nats.url }
        let ready = try await a.get("/healthz", token: nil)
        #expect(ready.status == .ok)
        #expect(try ready.json()["broker"] == .string("ok"))
        await nats.stop()
        // nats.c sees the connection drop and reconnects in the background: no event to await
        // from outside, so the balancer's way, asking again (for at most 5 s).
        var answer = try await a.get("/healthz", token: nil)
        for _ in 0..<100 where answer.status == .ok {
            try await Task.sleep(for: .milliseconds(50))
            answer = try await a.get("/healthz", token: nil)
        }
        #expect(answer.status == .serviceUnavailable)
        #expect(try answer.json()["broker"] == .string("unreachable"))
        #expect(try answer.json()["status"] == .string("unavailable"))
        await a.stop()
    }

    @Test func aNodeOfAClusterWithoutASharedStoreRefusesRooms() async throws {
        let nats = try NATSServer()
        // Without a shared store (only a test can start one so), no room at all.
        let alone = try await TestServer.start { $0.brokerURL = nats.url }
        let socket = try await alone.connect(token: try await alone.token("alice"))
        try await socket.send(.object([("type", .string("room.join")), ("id", .string("j1")), ("room", .string("rm_x"))]))
        let answer = try await socket.nextJSON()
        #expect(answer["code"] == .string("unavailable"))
        #expect(answer["ref"] == .string("j1"))
        await alone.stop()
        await nats.stop()
    }
}

/// A user's account across a cluster's nodes (#22).
@Suite(.serialized) struct ClusterAccountTests {
    @Test func deletingAnAccountOnOneNodeClosesItsSocketsAndStopsItsRepliesOnEveryNode() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        func node(_ id: String) async throws -> TestServer {
            try await TestServer.clusterNode(id, nats: nats, uri: uri, secret: secret) {
                $0.simulated.tokensPerSecond = 20
                $0.simulated.replyTokens = 1000
            }
        }
        let a = try await node("node-a")
        let b = try await node("node-b")
        let token = try await a.token("alice")
        let clone = try await b.createClone(token: token)["id"]!.stringValue!
        let onB = try await b.connect(token: token)
        try await onB.chatSend(id: "c1", clone: clone, text: "Talk for a long time")
        let start = try await onB.nextJSON()
        _ = try await onB.readUntilToken()

        let deleted = try await TestHTTPClient.request(port: a.port, .DELETE, "/v1/me", token: token)
        #expect(deleted.status == .ok)
        // By the time A answered, B had closed Alice's socket and stopped her reply.
        var closed: TestInbound?
        while closed == nil {
            let inbound = try await onB.next()
            if case .close = inbound { closed = inbound }
        }
        #expect(closed == .close(code: 1008, reason: "account deleted"))
        #expect(b.server.chat.streams.hub.liveStreams.isEmpty)
        // What B stored for the stopped reply went with the rest: nothing of hers is left.
        let fresh = try await a.token("alice")
        let conversations = try await b.get("/v1/conversations", token: fresh).json()
        #expect(conversations["conversations"]?.arrayValue?.isEmpty == true)
        let messages = try await a.get("/v1/conversations/\(start["conversation"]!.stringValue!)/messages", token: fresh)
        #expect(messages.status == .notFound)
        await a.stop()
        await b.stop()
        await nats.stop()
    }

    /// Creates sent to two nodes at once keep to the clone cap: each node takes its own one at
    /// a time, and a node that finds too many once it has written takes its clone back. No more
    /// than the cap stay, and every create answered 201 is one of them.
    @Test func clonesCreatedOnTwoNodesAtOnceKeepToTheCap() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri, secret: secret) { $0.maxClonesPerUser = 3 }
        let b = try await TestServer.clusterNode("node-b", nats: nats, uri: uri, secret: secret) { $0.maxClonesPerUser = 3 }
        let token = try await a.token("alice")
        let statuses = try await withThrowingTaskGroup(of: HTTPResponseStatus.self) { group in
            for n in 0..<24 {
                group.addTask {
                    try await TestHTTPClient.json(
                        port: (n % 2 == 0 ? a : b).port, .POST, "/v1/clones", token: token, json: .object([("name", .string("C\(n)"))])
                    ).status
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(statuses).isSubset(of: [.created, .tooManyRequests]), "\(statuses)")
        let created = statuses.filter { $0 == .created }.count
        let listed = try await b.get("/v1/clones", token: token).json()["clones"]?.arrayValue?.count
        #expect(created >= 1 && created <= 3, "\(statuses)")
        #expect(listed == created)
        await a.stop()
        await b.stop()
        await nats.stop()
    }

    /// A sign-out on one node closes the session's sockets on every node before it answers, and
    /// the other node refuses its token at once (not after its session cache's 5 s).
    @Test func signingOutOnOneNodeClosesTheSessionsSocketsOnEveryNode() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let a = try await TestServer.clusterNode("node-a", nats: nats, uri: uri, secret: secret)
        let b = try await TestServer.clusterNode("node-b", nats: nats, uri: uri, secret: secret)
        let laptop = try await a.token("alice")
        let phone = try await a.token("alice")
        // B has checked the laptop's session (and cached that it is signed in).
        #expect(try await b.get("/v1/clones", token: laptop).status == .ok)
        let laptopOnB = try await b.connect(token: laptop)
        let phoneOnB = try await b.connect(token: phone)

        let signedOut = try await TestHTTPClient.json(port: a.port, .POST, "/v1/me/sign-out", token: laptop, json: .object([]))
        #expect(signedOut.status == .noContent)
        var closed: TestInbound?
        while closed == nil {
            let inbound = try await laptopOnB.next()
            if case .close = inbound { closed = inbound }
        }
        #expect(closed == .close(code: 1008, reason: "signed out"))
        #expect(try await b.get("/v1/clones", token: laptop).status == .unauthorized)
        // The phone's session goes on, on B too.
        try await phoneOnB.chatCancel(id: "x", stream: "st_none")
        #expect(try await phoneOnB.next(type: "error").frame["ref"] == .string("x"))
        #expect(try await b.get("/v1/clones", token: phone).status == .ok)
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}
