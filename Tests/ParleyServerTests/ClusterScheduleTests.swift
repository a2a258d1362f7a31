import Foundation
import MetricsTestKit
import ParleyCore
import ParleyMongoStore
import ParleyStore
import ParleyTestSupport
import Testing

@testable import ParleyServer

/// Scheduled messages on a cluster (#22): two nodes on one MongoDB and one nats-server split
/// the schedule shards, each schedule fires once on the node holding its shard, its message
/// reaches the owner's sockets on every node, and a stopped node's shards and firings are
/// taken over.
private struct ScheduleCluster {
    var nats: NATSServer
    var uri: String
    var secret: String
    var a: TestServer
    var b: TestServer

    static func start(_ configure: @escaping @Sendable (inout ServerConfiguration) -> Void = { _ in }) async throws -> ScheduleCluster {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let a = try await node("node-a", nats: nats, uri: uri, secret: secret, configure)
        let b = try await node("node-b", nats: nats, uri: uri, secret: secret, configure)
        return ScheduleCluster(nats: nats, uri: uri, secret: secret, a: a, b: b)
    }

    static func node(
        _ id: String, nats: NATSServer, uri: String, secret: String, _ configure: @escaping @Sendable (inout ServerConfiguration) -> Void = { _ in }
    ) async throws -> TestServer {
        try await TestServer.clusterNode(id, nats: nats, uri: uri, secret: secret) {
            // Renewals (a third of it) do not move shards while a test looks at them.
            $0.nodeLeasePeriod = .seconds(60)
            configure(&$0)
        }
    }

    /// A started first and took every shard; B joined: A lets half go, B takes them.
    func split() async -> (a: Set<Int>, b: Set<Int>) {
        let a = await self.a.server.balanceScheduleShards()
        let b = await self.b.server.balanceScheduleShards()
        return (a, b)
    }

    func stop() async {
        await a.stop()
        await b.stop()
        await nats.stop()
    }
}

@Suite(.serialized) struct ClusterScheduleTests {
    @Test func twoNodesSplitTheShardsAndAStoppedNodesShardsAreTakenOver() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let metrics = TestMetrics()
        let a = try await ScheduleCluster.node("node-a", nats: nats, uri: uri, secret: secret) { $0.metrics = metrics }
        // Alone, a node fires every shard.
        #expect(await a.server.balanceScheduleShards() == Set(0..<ScheduleShards.count))
        #expect(try metrics.expectMeter("parley_schedule_shards_held").lastValue == Double(ScheduleShards.count))
        let b = try await ScheduleCluster.node("node-b", nats: nats, uri: uri, secret: secret)
        // B finds them all held; A, at its next renewal, keeps its half; B takes the rest.
        #expect(await b.server.balanceScheduleShards().isEmpty)
        let kept = await a.server.balanceScheduleShards()
        let taken = await b.server.balanceScheduleShards()
        #expect(kept.count == ScheduleShards.count / 2)
        #expect(try metrics.expectMeter("parley_schedule_shards_held").lastValue == Double(ScheduleShards.count / 2))
        #expect(taken == Set(0..<ScheduleShards.count).subtracting(kept))
        // Balanced: nothing moves.
        #expect(await a.server.balanceScheduleShards() == kept)
        #expect(await b.server.balanceScheduleShards() == taken)
        // B stops cleanly and lets its shards go: A takes them all at its next renewal.
        await b.stop()
        #expect(await a.server.balanceScheduleShards() == Set(0..<ScheduleShards.count))
        await a.stop()
        await nats.stop()
    }

    @Test func aScheduleFiresOnceOnTheNodeOfItsShardAndReachesTheOwnersSocketsOnTheOther() async throws {
        let cluster = try await ScheduleCluster.start()
        let (onA, _) = await cluster.split()
        let token = try await cluster.a.token("alice")
        let clone = try await cluster.a.createClone(token: token)["id"]!.stringValue!
        // Created on B, due in a moment; Alice's only socket is on the node that does not fire it.
        let id = try await cluster.b.createSchedule(
            token: token, [("clone", .string(clone)), ("delay_ms", .int(1_500)), ("text", .string("Good morning"))])
        let firesOnA = onA.contains(ScheduleShards.shard(of: id))
        let reader = firesOnA ? cluster.b : cluster.a
        let socket = try await reader.connect(token: token)
        try await reader.server.brokerRoundTrip()
        let delivery = try await socket.next(type: "delivery").frame
        #expect(delivery["schedule"] == .string(id))
        #expect(delivery["message"]?["text"] == .string("Good morning"))
        let delivered = try await reader.awaitSchedule(id, token: token, status: "delivered")
        // Stored once, in one new conversation.
        let conversation = delivered["conversation"]!.stringValue!
        let messages = try await cluster.a.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.count == 1)
        await cluster.stop()
    }

    @Test func aUsersPendingLimitHoldsAcrossNodes() async throws {
        let cluster = try await ScheduleCluster.start { $0.frameLimits.schedule.maxPendingPerUser = 2 }
        _ = await cluster.split()
        let token = try await cluster.a.token("alice")
        let clone = try await cluster.a.createClone(token: token)["id"]!.stringValue!
        let later: [(String, JSONValue)] = [("clone", .string(clone)), ("delay_ms", .int(3_600_000)), ("text", .string("later"))]
        _ = try await cluster.a.createSchedule(token: token, later)
        _ = try await cluster.b.createSchedule(token: token, later)
        for node in [cluster.a, cluster.b] {
            let refused = try await TestHTTPClient.json(port: node.port, .POST, "/v1/schedules", token: token, json: .object(later))
            #expect(refused.status == .tooManyRequests)
            #expect(try refused.json()["error"]?["code"] == .string("limit_exceeded"))
        }
        let listed = try await cluster.b.get("/v1/schedules", token: token).json()["schedules"]!.arrayValue!
        #expect(listed.count == 2)
        await cluster.stop()
    }

    @Test func aStoppedNodesFiringIsFinishedOnceByTheNodeThatTakesItOver() async throws {
        let nats = try NATSServer()
        let uri = MongoFixture.uri()
        let secret = "cluster-test-secret-" + UUID().uuidString
        let a = try await ScheduleCluster.node("node-a", nats: nats, uri: uri, secret: secret)
        let token = try await a.token("alice")
        let clone = try await a.createClone(token: token)["id"]!.stringValue!
        let socket = try await a.connect(token: token)

        // What a node killed while firing a text schedule leaves: the schedule `firing` under
        // its name (its message id fixed), and its lease, expired. (Due in an hour as seeded,
        // so A's catch-up cannot arm it while it is still pending.)
        var options = MongoStore.Options()
        options.node = "node-dead"
        let dead = try await MongoStore.open(uri: uri, options: options)
        let now = Int64(Timestamp.nowMillis())
        let schedule = try await seedSchedule(dead, owner: "alice", clone: clone, at: now + 3_600_000, content: .text("Still here"))
        let message = IDGenerator().make(.message)
        let claim = ScheduleChange(
            status: .firing, updatedAt: now, conversation: ScheduleService.conversationID(forMessage: message), message: message)
        #expect(try await dead.transitionSchedule(id: schedule.id, from: .pending, to: claim) != nil)
        #expect(try await dead.firingSchedules(node: "node-dead").map(\.id) == [schedule.id])
        #expect(
            try await dead.claimNodeLease(NodeLease(node: "node-dead", host: "gone", pid: 1, expires: now - 1), now: now - 1, key: "node-dead") == nil
        )
        // A's shards do not make it A's to fire: it is left to its node until that one is taken over.
        _ = await a.server.balanceScheduleShards()
        #expect(try await dead.schedule(id: schedule.id, owner: "alice")?.status == .firing)

        #expect(await a.server.takeOverStoppedNodes() == ["node-dead"])
        let delivery = try await socket.next(type: "delivery").frame
        #expect(delivery["schedule"] == .string(schedule.id))
        #expect(delivery["message"]?["id"] == .string(message))
        let delivered = try await a.awaitSchedule(schedule.id, token: token, status: "delivered")
        let messages = try await a.get("/v1/conversations/\(delivered["conversation"]!.stringValue!)/messages", token: token)
            .json()["messages"]!.arrayValue!
        #expect(messages.map { $0["id"] } == [.string(message)])
        try await dead.close()
        await a.stop()
        await nats.stop()
    }
}

/// A user's replies across a cluster's nodes (#22): one at a time in a conversation, and at most
/// the per-user limit at once, wherever they were asked for.
@Suite(.serialized) struct ClusterReplyLimitTests {
    @Test func aConversationStreamsOneReplyAndAUserAtMostTheLimitAcrossNodes() async throws {
        let cluster = try await ScheduleCluster.start {
            $0.maxConcurrentStreamsPerUser = 1
            $0.simulated.tokensPerSecond = 20
            $0.simulated.replyTokens = 1_000
        }
        let token = try await cluster.a.token("alice")
        let clone = try await cluster.a.createClone(token: token)["id"]!.stringValue!
        let onA = try await cluster.a.connect(token: token)
        let onB = try await cluster.b.connect(token: token)
        func send(_ socket: TestWebSocket, _ id: String, conversation: String? = nil) async throws {
            var fields: [(String, JSONValue)] = [
                ("type", .string("chat.send")), ("id", .string(id)), ("clone", .string(clone)), ("text", .string("hello")),
            ]
            if let conversation { fields.append(("conversation", .string(conversation))) }
            try await socket.send(.object(fields))
        }
        try await send(onA, "c1")
        let start = try await onA.next(type: "stream.start").frame
        let conversation = start["conversation"]!.stringValue!
        // The same conversation from the other node: busy.
        try await send(onB, "c2", conversation: conversation)
        let busy = try await onB.next(type: "error").frame
        #expect(busy["ref"] == .string("c2"))
        #expect(busy["message"] == .string("a reply in conversation \(conversation) is still streaming or waiting to be stored; try again shortly"))
        // Another conversation from the other node: over Alice's limit of one.
        try await send(onB, "c3")
        let over = try await onB.next(type: "error").frame
        #expect(over["ref"] == .string("c3"))
        #expect(over["message"] == .string("at most 1 reply may stream at once"))
        // Once the first reply ended, the other node may stream in that conversation: its hold
        // across the nodes is gone before stream.end goes out (as a third node sees it at once).
        var options = MongoStore.Options()
        options.node = "node-probe"
        let probe = try await MongoStore.open(uri: cluster.uri, options: options)
        try await onA.chatCancel(id: "x1", stream: start["stream"]!.stringValue!)
        _ = try await onA.next(type: "stream.end")
        let now = Int64(Timestamp.nowMillis())
        #expect(try await probe.claimReplySlot(conversation: conversation, user: "alice", node: "node-probe", limit: 1, now: now) == .claimed)
        try await probe.releaseReplySlot(conversation: conversation, node: "node-probe")
        try await probe.close()
        try await send(onB, "c4", conversation: conversation)
        // (Alice's tab on B also reads the first reply's frames, in whatever order they came.)
        var second = try await onB.next(type: "stream.start").frame
        while second["ref"] != .string("c4") { second = try await onB.next(type: "stream.start").frame }
        #expect(second["conversation"] == .string(conversation))
        await cluster.stop()
    }
}
