import Foundation
import MetricsTestKit
import NIOHTTP1
import ParleyCore
import ParleyStore
import ParleyTestSupport
import Testing

@testable import ParleyServer

extension TestWebSocket {
    func scheduleCreate(
        id: String, clone: String, conversation: String? = nil, delayMS: Int64? = nil, at: String? = nil,
        prompt: String? = nil, text: String? = nil
    ) async throws {
        var pairs: [(String, JSONValue)] = [("type", .string("schedule.create")), ("id", .string(id)), ("clone", .string(clone))]
        if let conversation { pairs.append(("conversation", .string(conversation))) }
        if let delayMS { pairs.append(("delay_ms", .int(delayMS))) }
        if let at { pairs.append(("at", .string(at))) }
        if let prompt { pairs.append(("prompt", .string(prompt))) }
        if let text { pairs.append(("text", .string(text))) }
        try await send(.object(pairs))
    }
}

extension TestServer {
    /// The schedule as GET /v1/schedules/{id} shows it.
    func schedule(_ id: String, token: String) async throws -> JSONValue {
        try await get("/v1/schedules/\(id)", token: token).json()
    }

    /// POST /v1/schedules; returns the created schedule's id.
    func createSchedule(token: String, _ fields: [(String, JSONValue)]) async throws -> String {
        let response = try await TestHTTPClient.json(port: port, .POST, "/v1/schedules", token: token, json: .object(fields))
        guard response.status == .created else { throw TestTimeout(description: "POST /v1/schedules answered \(response.status): \(response.text)") }
        return try response.json()["id"]!.stringValue!
    }

    /// Polls until the schedule reaches `status` (a status change that has no frame of its own).
    func awaitSchedule(_ id: String, token: String, status: String, timeout: Duration = .seconds(10)) async throws -> JSONValue {
        let deadline = ContinuousClock.now + timeout
        while true {
            let current = try await schedule(id, token: token)
            if current["status"] == .string(status) { return current }
            guard ContinuousClock.now < deadline else {
                throw TestTimeout(description: "schedule \(id) stayed \(current["status"] ?? .null), never \(status)")
            }
            try await Task.sleep(for: .milliseconds(20))  // poll interval
        }
    }
}

/// Writes a schedule straight into the store, as an earlier run of the server would have left it.
func seedSchedule(
    _ store: any Store, owner: String, clone: String, conversation: String? = nil, at: Int64,
    content: Schedule.Content, status: Schedule.Status = .pending, message: String? = nil
) async throws -> Schedule {
    let now = Int64(Timestamp.nowMillis())
    let schedule = Schedule(
        id: IDGenerator().make(.schedule), owner: owner, clone: clone, conversation: conversation, at: at,
        content: content, status: status, createdAt: now, updatedAt: now, message: message)
    try await store.createSchedule(schedule)
    return schedule
}

@Suite struct ScheduleIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func aTextMessageReachesEveryOpenSocketOnTimeAndIsStored(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let phone = try await server.connect(token: token)
        let laptop = try await server.connect(token: token)

        try await phone.scheduleCreate(id: "s1", clone: clone, delayMS: 300, text: "Good morning!")
        let ok = try await phone.nextJSON()
        #expect(ok["type"] == .string("schedule.ok"))
        #expect(ok["ref"] == .string("s1"))
        let schedule = ok["schedule"]!
        let id = schedule["id"]!.stringValue!
        #expect(schedule["status"] == .string("pending"))
        let at = RFC3339.parse(schedule["at"]!.stringValue!)!

        for socket in [phone, laptop] {
            let delivery = try await socket.next(type: "delivery").frame
            #expect(Int64(Timestamp.nowMillis()) >= at, "delivered before its time")
            #expect(delivery["schedule"] == .string(id))
            #expect(delivery["message"]?["text"] == .string("Good morning!"))
            #expect(delivery["message"]?["role"] == .string("assistant"))
        }
        let delivered = try await server.awaitSchedule(id, token: token, status: "delivered")
        let conversation = delivered["conversation"]!.stringValue!
        let messages = try await server.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["text"]! } == [.string("Good morning!")])
        #expect(messages.first?["id"] == delivered["message"])
        #expect(await server.server.schedules.timer.count() == 0)
        await server.stop()
    }

    @Test func manyTextMessagesDueAtOnceAreNotHeldBackByTheStreamLimit() async throws {
        // A retry would wait a minute: every delivery must come from the first firing.
        let server = try await TestServer.start { $0.scheduleBusyRetry = .seconds(60) }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        // Far enough ahead that all are created in time even on a loaded machine (4 s was not
        // always).
        let at = Timestamp.rfc3339(millis: Int64(Timestamp.nowMillis()) + 8_000)
        let count = server.configuration.maxConcurrentStreamsPerUser * 5
        for n in 0..<count { try await socket.scheduleCreate(id: "s\(n)", clone: clone, at: at, text: "Reminder \(n)") }
        var delivered = Set<String>()
        var created = 0
        while delivered.count < count {
            let frame = try await socket.nextJSON()
            switch frame["type"]?.stringValue {
            case "schedule.ok": created += 1
            case "delivery": delivered.insert(frame["message"]!["text"]!.stringValue!)
            default: Issue.record("unexpected \(frame)")
            }
        }
        #expect(created == count)
        #expect(delivered == Set((0..<count).map { "Reminder \($0)" }))
        await server.stop()
    }

    @Test func aPromptIsAMeteredStreamFollowedByItsDelivery() async throws {
        let server = try await creditServer(grant: 1_000)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        let chat = try await socket.readReply()

        try await socket.scheduleCreate(id: "s1", clone: clone, conversation: chat.conversation, delayMS: 50, prompt: "the weather")
        let id = try await socket.next(type: "schedule.ok").frame["schedule"]!["id"]!.stringValue!
        let reply = try await socket.readReply()
        #expect(reply.start["schedule"] == .string(id))
        #expect(reply.start["ref"] == nil)
        #expect(reply.conversation == chat.conversation)
        #expect(reply.reason == "complete")
        #expect(reply.seqs == Array(1...Int64(reply.tokens.count)))
        let delivery = try await socket.next(type: "delivery").frame
        #expect(delivery["message"]?["text"] == .string(reply.text))
        #expect(delivery["message"]?["stream"] == .string(reply.stream))
        #expect(delivery["message"]?["id"] == reply.end["message"])

        // Charged to the owner under the `scheduled` feature, with the stream's ledger ids.
        let entries = try await creditsOf(server, token: token).entries.filter { $0["feature"] == .string("scheduled") }
        #expect(!entries.isEmpty)
        #expect(entries.allSatisfy { $0["stream"] == .string(reply.stream) })
        #expect(-entries.reduce(0) { $0 + $1["credits"]!.intValue! } == reply.end["cost"]!.intValue!)
        try await expectInvariant(server, token: token)
        // The transcript: the chat, then the clone's scheduled message; the instruction is not in it.
        let messages = try await server.get("/v1/conversations/\(chat.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["role"]!.stringValue! } == ["user", "assistant", "assistant"])
        #expect(messages.last?["text"] == .string(reply.text))
        await server.stop()
    }

    @Test func aPromptTheOwnerCannotAffordFailsVisibly() async throws {
        let server = try await creditServer(grant: 2, reserve: 8)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.scheduleCreate(id: "s1", clone: clone, delayMS: 0, prompt: "anything")
        let id = try await socket.next(type: "schedule.ok").frame["schedule"]!["id"]!.stringValue!
        let failed = try await socket.next(type: "schedule.failed").frame["schedule"]!
        #expect(failed["id"] == .string(id))
        #expect(failed["status"] == .string("failed"))
        #expect(failed["failure"]?.stringValue?.hasPrefix("insufficient_credits") == true)
        #expect(try await creditsOf(server, token: token).balance == 2)
        await server.stop()
    }

    @Test func pendingTimersAndFireLatenessAreMeasured() async throws {
        let metrics = TestMetrics()
        let server = try await TestServer.start { $0.metrics = metrics }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.scheduleCreate(id: "s1", clone: clone, delayMS: 3_600_000, text: "later")
        _ = try await socket.next(type: "schedule.ok")
        #expect(await server.server.schedules.timer.count() == 1)  // runs on the wheel's loop after the add
        #expect(try metrics.expectMeter("parley_schedules_pending").lastValue == 1)

        try await socket.scheduleCreate(id: "s2", clone: clone, delayMS: 20, text: "soon")
        let at = RFC3339.parse(try await socket.next(type: "schedule.ok").frame["schedule"]!["at"]!.stringValue!)!
        _ = try await socket.next(type: "delivery")
        let lateness = try metrics.expectTimer("parley_schedule_fire_lateness_seconds").values
        #expect(lateness.count == 1)
        #expect(lateness.allSatisfy { $0 >= 0 && $0 <= (Int64(Timestamp.nowMillis()) - at) * 1_000_000 })
        #expect(try metrics.expectMeter("parley_schedules_pending").lastValue == 1)
        await server.stop()
    }

    @Test func cancellingWorksOnlyWhilePending() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.scheduleCreate(id: "s1", clone: clone, delayMS: 3_600_000, text: "later")
        let id = try await socket.next(type: "schedule.ok").frame["schedule"]!["id"]!.stringValue!
        #expect(await server.server.schedules.timer.count() == 1)

        try await socket.send(.object([("type", .string("schedule.cancel")), ("id", .string("x1")), ("schedule", .string(id))]))
        let cancelled = try await socket.nextJSON()
        #expect(cancelled["type"] == .string("schedule.cancelled"))
        #expect(cancelled["ref"] == .string("x1"))
        #expect(cancelled["schedule"]?["status"] == .string("cancelled"))
        #expect(await server.server.schedules.timer.count() == 0)

        try await socket.send(.object([("type", .string("schedule.cancel")), ("id", .string("x2")), ("schedule", .string(id))]))
        let again = try await socket.nextJSON()
        #expect(again["code"] == .string("conflict"))
        #expect(again["ref"] == .string("x2"))

        // REST: someone else's schedule is as unknown as a missing one; a fired one conflicts.
        let bob = try await server.token("bob")
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/schedules/\(id)", token: bob).status == .notFound)
        try await socket.scheduleCreate(id: "s2", clone: clone, delayMS: 0, text: "now")
        let now = try await socket.next(type: "schedule.ok").frame["schedule"]!["id"]!.stringValue!
        _ = try await socket.next(type: "delivery")
        let late = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/schedules/\(now)", token: token)
        #expect(late.status == .conflict)
        #expect(late.errorCode == "conflict")
        let list = try await server.get("/v1/schedules", token: token).json()["schedules"]!.arrayValue!
        #expect(list.map { $0["id"]!.stringValue! } == [now, id])
        await server.stop()
    }

    @Test func limitsAndBadRequestsGetClearErrors() async throws {
        let server = try await TestServer.start { $0.frameLimits.schedule.maxPendingPerUser = 2 }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        for i in 1...2 {
            try await socket.scheduleCreate(id: "s\(i)", clone: clone, delayMS: 600_000, text: "hi")
            #expect(try await socket.nextJSON()["type"] == .string("schedule.ok"))
        }
        try await socket.scheduleCreate(id: "s3", clone: clone, delayMS: 600_000, text: "hi")
        let full = try await socket.nextJSON()
        #expect(full["code"] == .string("limit_exceeded"))
        #expect(full["ref"] == .string("s3"))

        func error(_ fields: [(String, JSONValue)]) async throws -> JSONValue {
            try await socket.send(.object([("type", .string("schedule.create")), ("id", .string("e"))] + fields))
            return try await socket.nextJSON()
        }
        let far = try await error([("clone", .string(clone)), ("at", .string("2099-01-01T00:00:00Z")), ("text", .string("hi"))])
        #expect(far["code"] == .string("bad_request"))
        #expect(far["message"]?.stringValue?.contains("at most 366 days ahead") == true)
        let past = try await error([("clone", .string(clone)), ("at", .string("2001-01-01T00:00:00+02:00")), ("text", .string("hi"))])
        #expect(past["message"] == .string("'at' is in the past"))
        let both = try await error([
            ("clone", .string(clone)), ("delay_ms", .int(5)), ("at", .string("2030-01-01T00:00:00Z")), ("text", .string("x")),
        ])
        #expect(both["message"] == .string("give either 'at' or 'delay_ms', not both"))
        let neither = try await error([("clone", .string(clone)), ("delay_ms", .int(5))])
        #expect(neither["code"] == .string("bad_request"))
        let badTime = try await error([("clone", .string(clone)), ("at", .string("tomorrow at 8")), ("text", .string("x"))])
        #expect(badTime["message"]?.stringValue?.hasPrefix("'at' must be an RFC 3339 time") == true)
        let noClone = try await error([("clone", .string("cl_nope")), ("delay_ms", .int(5)), ("text", .string("x"))])
        #expect(noClone["code"] == .string("not_found"))
        let rest = try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/schedules", token: token,
            json: .object([("clone", .string(clone)), ("delay_ms", .int(1_000)), ("text", .string("hi"))]))
        #expect(rest.status == .tooManyRequests)
        #expect(rest.errorCode == "limit_exceeded")
        await server.stop()
    }

    @Test func deletingACloneCancelsItsPendingSchedules() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let id = try await server.createSchedule(token: token, [("clone", .string(clone)), ("delay_ms", .int(600_000)), ("prompt", .string("hi"))])
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/clones/\(clone)", token: token).status == .noContent)
        #expect(try await server.schedule(id, token: token)["status"] == .string("cancelled"))
        #expect(await server.server.schedules.timer.count() == 0)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aMessageThatFiredWhileOfflineArrivesOnTheNextConnectOnce(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let id = try await server.createSchedule(
            token: token, [("clone", .string(clone)), ("delay_ms", .int(0)), ("text", .string("while you were away"))])
        _ = try await server.awaitSchedule(id, token: token, status: "fired")

        let socket = try await server.connect(token: token)
        let delivery = try await socket.next(type: "delivery").frame
        #expect(delivery["schedule"] == .string(id))
        #expect(delivery["message"]?["text"] == .string("while you were away"))
        _ = try await server.awaitSchedule(id, token: token, status: "delivered")
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func pendingSchedulesSurviveARestart(_ store: TestServer.StoreKind) async throws {
        var server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.scheduleCreate(id: "s1", clone: clone, delayMS: 4_000, text: "still here")
        let id = try await socket.next(type: "schedule.ok").frame["schedule"]!["id"]!.stringValue!

        // The first server is gone before it fires: only a reload from the store can deliver it.
        server = try await server.restarted()
        let again = try await server.connect(token: token)
        let delivery = try await again.next(type: "delivery").frame
        #expect(delivery["schedule"] == .string(id))
        #expect(delivery["message"]?["text"] == .string("still here"))
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func schedulesDueWhileTheServerWasDownFireAtStartInTimeOrder(_ store: TestServer.StoreKind) async throws {
        var server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        // Stored behind the running server's back, as if its wheel had been lost in a crash;
        // created in one order, due in another.
        let now = Int64(Timestamp.nowMillis())
        var due: [(at: Int64, id: String)] = []
        for (offset, text) in [(-1_000, "third"), (-3_000, "first"), (-2_000, "second")] {
            let s = try await seedSchedule(server.server.store, owner: "alice", clone: clone, at: now + Int64(offset), content: .text(text))
            due.append((s.at, s.id))
        }
        server = try await server.restarted()
        for (_, id) in due { _ = try await server.awaitSchedule(id, token: token, status: "fired") }
        let socket = try await server.connect(token: token)
        var texts: [String] = []
        for _ in 0..<3 { texts.append(try await socket.next(type: "delivery").frame["message"]!["text"]!.stringValue!) }
        #expect(texts == ["first", "second", "third"])
        // Fired in deadline order: their messages were stored in that order too.
        let fired = try await due.sorted { $0.at < $1.at }.asyncMap { try await server.schedule($0.id, token: token)["message"]!.stringValue! }
        #expect(fired == fired.sorted())
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aFiringInterruptedAfterItsMessageWasStoredIsNotGeneratedAgain(_ store: TestServer.StoreKind) async throws {
        var server = try await creditServer(store, grant: 1_000)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c1", clone: clone, text: "Hello")
        let chat = try await socket.readReply()
        let before = try await creditsOf(server, token: token)
        // The state a crash leaves between storing the message and recording `fired` (MongoDB
        // stores them in separate steps).
        let messageID = IDGenerator().make(.message)
        try await server.server.store.appendMessage(
            Message(
                id: messageID, conversation: chat.conversation, role: .assistant, text: "generated before the crash",
                createdAt: Int64(Timestamp.nowMillis())))
        let s = try await seedSchedule(
            server.server.store, owner: "alice", clone: clone, conversation: chat.conversation,
            at: Int64(Timestamp.nowMillis()) - 10, content: .prompt("news"), status: .firing, message: messageID)

        server = try await server.restarted()
        let again = try await server.connect(token: token)
        let first = try await again.nextJSON()
        #expect(first["type"] == .string("delivery"), "no second generation (no stream.start) before the delivery")
        #expect(first["message"]?["text"] == .string("generated before the crash"))
        _ = try await server.awaitSchedule(s.id, token: token, status: "delivered")
        #expect(try await creditsOf(server, token: token).entries.count == before.entries.count, "nothing charged again")
        let messages = try await server.get("/v1/conversations/\(chat.conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.count == 3)
        await server.stop()
    }

    @Test(arguments: TestServer.StoreKind.allCases)
    func aFiringInterruptedBeforeItsMessageWasStoredIsProducedOnce(_ store: TestServer.StoreKind) async throws {
        var server = try await TestServer.start(store: store)
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let messageID = IDGenerator().make(.message)
        let conversation = ScheduleService.conversationID(forMessage: messageID)
        let s = try await seedSchedule(
            server.server.store, owner: "alice", clone: clone, conversation: conversation,
            at: Int64(Timestamp.nowMillis()) - 10, content: .prompt("news"), status: .firing, message: messageID)
        server = try await server.restarted()
        let fired = try await server.awaitSchedule(s.id, token: token, status: "fired")
        #expect(fired["message"] == .string(messageID))
        let messages = try await server.get("/v1/conversations/\(conversation)/messages", token: token).json()["messages"]!.arrayValue!
        #expect(messages.map { $0["id"]! } == [.string(messageID)])
        #expect(messages.first?["reason"] == .string("complete"))
        let socket = try await server.connect(token: token)
        #expect(try await socket.next(type: "delivery").frame["message"]?["id"] == .string(messageID))
        await server.stop()
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for element in self { out.append(try await transform(element)) }
        return out
    }
}
