import Foundation
import ParleyCore
import ParleyMongoStore
import ParleyStore
import ParleyTestSupport
import Testing

/// A store backend under test: how to open a fresh, empty instance.
struct Backend: Sendable, CustomTestStringConvertible {
    var name: String
    var open: @Sendable () async throws -> any Store

    var testDescription: String { name }

    /// Every backend the conformance suite runs against.
    static let all: [Backend] = [
        Backend(name: "sqlite") {
            try await SQLiteStore.open(path: temporaryPath("conformance") + "/parley.sqlite")
        },
        Backend(name: MongoFixture.isRealServer ? "mongodb" : "mongodb (wire test server)") {
            try await MongoStore.open(uri: MongoFixture.uri())
        },
    ]
}

func temporaryPath(_ label: String) -> String {
    Scratch.directory(label)
}

/// Opens a fresh store, runs `body`, and closes the store whatever happens.
func withStore(_ backend: Backend, _ body: (any Store) async throws -> Void) async throws {
    let store = try await backend.open()
    do {
        try await body(store)
    } catch {
        try? await store.close()
        throw error
    }
    try await store.close()
}

let ids = IDGenerator()

func makeClone(owner: String, name: String = "Ada", at time: Int64 = 1_000) -> Clone {
    Clone(
        id: ids.make(.clone), owner: owner, name: name, traits: ["curious", "warm"], systemPrompt: "Be kind.",
        sliders: ["warmth": 80, "humor": 5], memory: ["Likes tea"], createdAt: time, updatedAt: time)
}

func makeConversation(owner: String, clone: String, at time: Int64 = 1_000) -> Conversation {
    Conversation(id: ids.make(.conversation), owner: owner, clone: clone, title: "Hello", createdAt: time, updatedAt: time)
}

func makeMessage(_ conversation: String, _ text: String, role: Role = .user, at time: Int64 = 2_000) -> Message {
    Message(id: ids.make(.message), conversation: conversation, role: role, text: text, createdAt: time)
}

/// `messages` as appended one after another: each one's parent is the one before it.
func chained(_ messages: [Message]) -> [Message] {
    var out = messages
    for i in out.indices.dropFirst() { out[i].parent = out[i - 1].id }
    return out
}

@Suite("Store conformance") struct StoreConformanceTests {
    @Test(arguments: Backend.all)
    func usersAreRecordedOnce(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let first = try await store.ensureUser("alice", now: 10)
            let again = try await store.ensureUser("alice", now: 99)
            #expect(first == User(id: "alice", createdAt: 10))
            #expect(again == first)
        }
    }

    @Test(arguments: Backend.all)
    func concurrentFirstSightsOfAUserRecordItOnce(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let users = try await withThrowingTaskGroup(of: User.self) { group in
                for i in 0..<50 {
                    group.addTask { try await store.ensureUser("zed", now: 1_000 + Int64(i)) }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(Set(users.map(\.createdAt)).count == 1)
            #expect(try await store.ensureUser("zed", now: 5) == users[0])
        }
    }

    @Test(arguments: Backend.all)
    func clonesRoundTripAndBelongToTheirOwner(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            #expect(try await store.clone(id: clone.id, owner: "alice") == clone)
            #expect(try await store.clone(id: clone.id, owner: "bob") == nil)
            #expect(try await store.clone(id: "cl_missing", owner: "alice") == nil)
        }
    }

    /// Text is stored whole, a NUL character included: JSON and the wire allow it (`"\u0000"`),
    /// and a store that cut it there kept "A" of a clone the API had answered as "A\u{0}B".
    @Test(arguments: Backend.all)
    func textWithANulCharacterIsStoredWhole(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var clone = makeClone(owner: "alice", name: "A\u{0}B")
            clone.memory = ["\u{0}", "tea\u{0}"]
            try await store.createClone(clone)
            #expect(try await store.clone(id: clone.id, owner: "alice") == clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            let message = makeMessage(conversation.id, "before\u{0}after 🌊")
            try await store.createConversation(conversation, messages: [message])
            #expect(try await store.message(id: message.id, conversation: conversation.id)?.text == "before\u{0}after 🌊")
        }
    }

    @Test(arguments: Backend.all)
    func listsOnlyTheOwnersClonesOldestFirst(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let a = makeClone(owner: "alice", name: "A")
            let b = makeClone(owner: "alice", name: "B")
            let c = makeClone(owner: "bob", name: "C")
            for clone in [b, c, a].sorted(by: { $0.id > $1.id }) { try await store.createClone(clone) }
            #expect(try await store.clones(owner: "alice", limit: 100, after: nil).map(\.name) == ["A", "B"])
            #expect(try await store.clones(owner: "bob", limit: 100, after: nil).map(\.name) == ["C"])
            #expect(try await store.clones(owner: "carol", limit: 100, after: nil).isEmpty)
        }
    }

    /// A page at a time (clones may carry megabytes each), and counted without being read.
    @Test(arguments: Backend.all)
    func clonesPageOldestFirstAndAreCounted(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let alices = (0..<5).map { makeClone(owner: "alice", name: "A\($0)") }
            for clone in alices.reversed() + [makeClone(owner: "bob", name: "B")] { try await store.createClone(clone) }
            var seen: [String] = []
            var after: String?
            var pages = 0
            repeat {
                let page = try await store.clones(owner: "alice", limit: 2, after: after)
                #expect(page.count <= 2)
                seen += page.map(\.name)
                after = page.count == 2 ? page.last?.id : nil
                pages += 1
            } while after != nil && pages < 10
            #expect(seen == ["A0", "A1", "A2", "A3", "A4"] && pages == 3)
            #expect(try await store.clones(owner: "alice", limit: 2, after: alices[3].id).map(\.name) == ["A4"])
            #expect(try await store.cloneCount(owner: "alice") == 5)
            #expect(try await store.cloneCount(owner: "bob") == 1)
            #expect(try await store.cloneCount(owner: "carol") == 0)
            _ = try await store.deleteClone(id: alices[0].id, owner: "alice")
            #expect(try await store.cloneCount(owner: "alice") == 4)
        }
    }

    @Test(arguments: Backend.all)
    func updatesApplyOnlyForTheOwner(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            clone.name = "Ada Lovelace"
            clone.sliders = ["focus": 100]
            clone.model = "big-model"
            clone.updatedAt = 5_000
            #expect(try await store.updateClone(clone))
            #expect(try await store.clone(id: clone.id, owner: "alice") == clone)
            clone.model = nil
            #expect(try await store.updateClone(clone))
            #expect(try await store.clone(id: clone.id, owner: "alice") == clone)
            var stolen = clone
            stolen.owner = "bob"
            stolen.name = "Mine now"
            #expect(try await store.updateClone(stolen) == false)
            #expect(try await store.clone(id: clone.id, owner: "alice")?.name == "Ada Lovelace")
        }
    }

    @Test(arguments: Backend.all)
    func deletingACloneDeletesItsTranscripts(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            let other = makeClone(owner: "alice", name: "Other")
            try await store.createClone(clone)
            try await store.createClone(other)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            let kept = makeConversation(owner: "alice", clone: other.id)
            try await store.createConversation(conversation)
            try await store.createConversation(kept)
            try await store.appendMessage(makeMessage(conversation.id, "gone"))
            try await store.appendMessage(makeMessage(kept.id, "kept"))

            #expect(try await store.deleteClone(id: clone.id, owner: "bob") == false)
            #expect(try await store.deleteClone(id: clone.id, owner: "alice"))
            #expect(try await store.deleteClone(id: clone.id, owner: "alice") == false)
            #expect(try await store.clone(id: clone.id, owner: "alice") == nil)
            #expect(try await store.conversation(id: conversation.id, owner: "alice") == nil)
            #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil).isEmpty)
            #expect(try await store.messages(conversation: kept.id, limit: 10, before: nil).map(\.text) == ["kept"])
        }
    }

    @Test(arguments: Backend.all)
    func conversationsPageNewestFirst(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            var created: [Conversation] = []
            for _ in 0..<7 {
                let c = makeConversation(owner: "alice", clone: clone.id)
                try await store.createConversation(c)
                created.append(c)
            }
            let bobs = makeClone(owner: "bob")
            try await store.createClone(bobs)
            try await store.createConversation(makeConversation(owner: "bob", clone: bobs.id))

            let newestFirst = created.reversed().map(\.id)
            let page1 = try await store.conversations(owner: "alice", limit: 3, before: nil)
            #expect(page1.map(\.id) == Array(newestFirst[0..<3]))
            let page2 = try await store.conversations(owner: "alice", limit: 3, before: page1.last!.id)
            #expect(page2.map(\.id) == Array(newestFirst[3..<6]))
            let page3 = try await store.conversations(owner: "alice", limit: 3, before: page2.last!.id)
            #expect(page3.map(\.id) == [newestFirst[6]])
            #expect(try await store.conversation(id: created[0].id, owner: "bob") == nil)
            #expect(try await store.conversation(id: created[0].id, owner: "alice") == created[0])
        }
    }

    @Test(arguments: Backend.all)
    func messagesPageBackwardsInChronologicalPages(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            for i in 0..<10 {
                try await store.appendMessage(makeMessage(conversation.id, "m\(i)", role: i % 2 == 0 ? .user : .assistant, at: 2_000 + Int64(i)))
            }
            let newest = try await store.messages(conversation: conversation.id, limit: 4, before: nil)
            #expect(newest.map(\.text) == ["m6", "m7", "m8", "m9"])
            let older = try await store.messages(conversation: conversation.id, limit: 4, before: newest.first!.id)
            #expect(older.map(\.text) == ["m2", "m3", "m4", "m5"])
            let oldest = try await store.messages(conversation: conversation.id, limit: 4, before: older.first!.id)
            #expect(oldest.map(\.text) == ["m0", "m1"])
        }
    }

    @Test(arguments: Backend.all)
    func aConversationIsCreatedWithItsFirstMessagesWholeOrNotAtAll(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id, at: 1_000)
            let opening = [makeMessage(conversation.id, "Welcome", role: .assistant, at: 2_000), makeMessage(conversation.id, "Hello", at: 2_001)]
            try await store.createConversation(conversation, messages: opening)
            #expect(try await store.messages(conversation: conversation.id, limit: 5, before: nil) == chained(opening))
            #expect(try await store.conversation(id: conversation.id, owner: "alice")?.updatedAt == 2_001)

            // A message that cannot be stored (its id is taken) leaves neither the conversation
            // nor the messages before it.
            let other = makeConversation(owner: "alice", clone: clone.id)
            var taken = opening[1]
            taken.conversation = other.id
            await #expect {
                try await store.createConversation(other, messages: [makeMessage(other.id, "first"), taken])
            } throws: { error in
                if case StoreError.duplicateKey = error { true } else { false }
            }
            #expect(try await store.conversation(id: other.id, owner: "alice") == nil)
            #expect(try await store.messages(conversation: other.id, limit: 5, before: nil).isEmpty)
            #expect(try await store.conversations(owner: "alice", limit: 5, before: nil).map(\.id) == [conversation.id])
        }
    }

    @Test(arguments: Backend.all)
    func assistantMessagesKeepReasonUsageAndStream(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id, at: 1_000)
            try await store.createConversation(conversation)
            var reply = makeMessage(conversation.id, "partial rep", role: .assistant, at: 9_000)
            reply.reason = .cancelled
            reply.usage = Usage(inputTokens: 12, outputTokens: 3)
            reply.stream = "st_1"
            try await store.appendMessage(reply)
            #expect(try await store.messages(conversation: conversation.id, limit: 5, before: nil) == [reply])
            // Appending moves the conversation's last activity.
            #expect(try await store.conversation(id: conversation.id, owner: "alice")?.updatedAt == 9_000)
        }
    }

    @Test(arguments: Backend.all)
    func duplicateIdsAreTypedErrors(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            await #expect {
                try await store.createClone(clone)
            } throws: { error in
                if case StoreError.duplicateKey = error { true } else { false }
            }
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            let message = makeMessage(conversation.id, "once")
            try await store.appendMessage(message)
            await #expect {
                try await store.appendMessage(message)
            } throws: { error in
                if case StoreError.duplicateKey = error { true } else { false }
            }
            #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil).count == 1)
        }
    }

    @Test(arguments: Backend.all)
    func largeAndUnicodeDocumentsRoundTrip(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var clone = makeClone(owner: "alice", name: "Zoë 🤖 \"quoted\" \\ back")
            clone.systemPrompt = String(repeating: "Long prompt with ünïcödé and emoji 🎭. ", count: 400)
            clone.memory = (0..<256).map { "memory \($0): " + String(repeating: "x", count: 1_900) }
            clone.traits = (0..<32).map { "trait-\($0)-\u{1F600}" }
            clone.sliders = Dictionary(uniqueKeysWithValues: (0..<32).map { ("s\($0)", $0 * 3) })
            try await store.createClone(clone)
            #expect(try await store.clone(id: clone.id, owner: "alice") == clone)

            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            let big = makeMessage(conversation.id, String(repeating: "日本語のテキスト\n\t\"", count: 20_000))
            try await store.appendMessage(big)
            #expect(try await store.messages(conversation: conversation.id, limit: 1, before: nil) == [big])
        }
    }

    @Test(arguments: Backend.all)
    func concurrentWritersLoseNothing(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<200 {
                    group.addTask { try await store.appendMessage(makeMessage(conversation.id, "m\(i)")) }
                }
                try await group.waitForAll()
            }
            let all = try await store.messages(conversation: conversation.id, limit: 500, before: nil)
            #expect(Set(all.map(\.text)) == Set((0..<200).map { "m\($0)" }))
        }
    }

    @Test(arguments: Backend.all)
    func aClosedStoreRefusesCalls(_ backend: Backend) async throws {
        let store = try await backend.open()
        try await store.close()
        await #expect(throws: StoreError.closed) {
            _ = try await store.clones(owner: "alice", limit: 100, after: nil)
        }
    }
}
