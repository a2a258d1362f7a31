import ParleyCore
import ParleyStore
import Testing

func makeSchedule(owner: String, clone: String, conversation: String? = nil, at: Int64, content: Schedule.Content = .text("Good morning")) -> Schedule
{
    Schedule(
        id: ids.make(.schedule), owner: owner, clone: clone, conversation: conversation, at: at, content: content,
        status: .pending, createdAt: 1_000, updatedAt: 1_000)
}

@Suite("Schedule conformance") struct ScheduleConformanceTests {
    @Test(arguments: Backend.all)
    func schedulesRoundTripAndBelongToTheirOwner(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let prompted = makeSchedule(owner: "alice", clone: "cl_1", conversation: "cv_1", at: 5_000, content: .prompt("the weather"))
            let plain = makeSchedule(owner: "alice", clone: "cl_1", at: 4_000)
            try await store.createSchedule(prompted)
            try await store.createSchedule(plain)
            #expect(try await store.schedule(id: prompted.id, owner: "alice") == prompted)
            #expect(try await store.schedule(id: prompted.id, owner: "bob") == nil)
            #expect(try await store.schedules(owner: "alice", limit: 10, before: nil) == [plain, prompted])
            #expect(try await store.schedules(owner: "alice", limit: 1, before: plain.id) == [prompted])
            #expect(try await store.schedules(owner: "bob", limit: 10, before: nil).isEmpty)
            await #expect(throws: StoreError.self) { try await store.createSchedule(plain) }
        }
    }

    @Test(arguments: Backend.all)
    func aScheduleMovesOnlyFromTheStatusTheCallerSaw(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let s = makeSchedule(owner: "alice", clone: "cl_1", at: 5_000)
            try await store.createSchedule(s)
            let claimed = try await store.transitionSchedule(
                id: s.id, from: .pending, to: ScheduleChange(status: .firing, updatedAt: 6_000, conversation: "cv_9", message: "msg_9"))
            #expect(claimed?.status == .firing)
            #expect(claimed?.conversation == "cv_9")
            #expect(claimed?.message == "msg_9")
            #expect(claimed?.updatedAt == 6_000)
            // The second claimant (or a cancel that came too late) gets nil and changes nothing.
            #expect(try await store.transitionSchedule(id: s.id, from: .pending, to: ScheduleChange(status: .cancelled, updatedAt: 7_000)) == nil)
            #expect(try await store.schedule(id: s.id, owner: "alice") == claimed)
            #expect(try await store.transitionSchedule(id: "sch_missing", from: .pending, to: ScheduleChange(status: .firing, updatedAt: 1)) == nil)
        }
    }

    @Test(arguments: Backend.all)
    func concurrentClaimsLetExactlyOneWin(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let s = makeSchedule(owner: "alice", clone: "cl_1", at: 5_000)
            try await store.createSchedule(s)
            let wins = try await withThrowingTaskGroup(of: Bool.self) { group in
                for i in 0..<20 {
                    group.addTask {
                        try await store.transitionSchedule(id: s.id, from: .pending, to: ScheduleChange(status: .firing, updatedAt: Int64(i))) != nil
                    }
                }
                return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
            }
            #expect(wins == 1)
        }
    }

    @Test(arguments: Backend.all)
    func completingStoresTheMessageOnceAndMarksItFired(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let s = makeSchedule(owner: "alice", clone: clone.id, at: 5_000)
            try await store.createSchedule(s)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            let message = Message(id: ids.make(.message), conversation: conversation.id, role: .assistant, text: "Good morning", createdAt: 6_000)
            // Not firing yet: nothing is stored.
            #expect(try await store.completeSchedule(id: s.id, message: message, newConversation: conversation, now: 6_000) == nil)
            #expect(try await store.conversation(id: conversation.id, owner: "alice") == nil)

            _ = try await store.transitionSchedule(
                id: s.id, from: .pending, to: ScheduleChange(status: .firing, updatedAt: 6_000, message: message.id))
            let fired = try await store.completeSchedule(id: s.id, message: message, newConversation: conversation, now: 6_001)
            #expect(fired?.status == .fired)
            #expect(fired?.conversation == conversation.id)
            #expect(fired?.message == message.id)
            #expect(try await store.message(id: message.id, conversation: conversation.id) == message)
            #expect(try await store.message(id: message.id, conversation: "cv_other") == nil)
            #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil) == [message])
            // A second completion (a retry) neither stores twice nor changes the status.
            #expect(try await store.completeSchedule(id: s.id, message: message, newConversation: conversation, now: 6_002) == nil)
            #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil).count == 1)
        }
    }

    @Test(arguments: Backend.all)
    func completingKeepsAMessageAnInterruptedAttemptStored(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            let first = Message(id: ids.make(.message), conversation: conversation.id, role: .assistant, text: "first try", createdAt: 6_000)
            try await store.appendMessage(first)  // the message landed, then the process died
            let s = makeSchedule(owner: "alice", clone: clone.id, conversation: conversation.id, at: 5_000)
            try await store.createSchedule(s)
            _ = try await store.transitionSchedule(id: s.id, from: .pending, to: ScheduleChange(status: .firing, updatedAt: 6_000, message: first.id))
            var retry = first
            retry.text = "second try"
            let fired = try await store.completeSchedule(id: s.id, message: retry, newConversation: conversation, now: 7_000)
            #expect(fired?.status == .fired)
            #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil) == [first])
        }
    }

    @Test(arguments: Backend.all)
    func schedulesByStatusPageInCreationOrder(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var made: [Schedule] = []
            for i in 0..<5 {
                let s = makeSchedule(owner: i % 2 == 0 ? "alice" : "bob", clone: "cl_1", at: 9_000 - Int64(i))
                try await store.createSchedule(s)
                made.append(s)
            }
            _ = try await store.transitionSchedule(id: made[1].id, from: .pending, to: ScheduleChange(status: .firing, updatedAt: 1))
            _ = try await store.transitionSchedule(id: made[2].id, from: .pending, to: ScheduleChange(status: .cancelled, updatedAt: 1))
            let live = try await store.schedules(statuses: [.pending, .firing], owner: nil, limit: 10, after: nil)
            #expect(live.map(\.id) == [made[0].id, made[1].id, made[3].id, made[4].id])
            let page = try await store.schedules(statuses: [.pending, .firing], owner: nil, limit: 2, after: made[1].id)
            #expect(page.map(\.id) == [made[3].id, made[4].id])
            let alices = try await store.schedules(statuses: [.pending], owner: "alice", limit: 10, after: nil)
            #expect(alices.map(\.id) == [made[0].id, made[4].id])
            #expect(try await store.schedules(statuses: [], owner: nil, limit: 10, after: nil).isEmpty)
        }
    }
}
