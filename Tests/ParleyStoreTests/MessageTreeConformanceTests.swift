import ParleyCore
import ParleyStore
import Testing

/// Messages form a tree (#24): regenerated replies and edited messages are alternatives kept off
/// the path, and any of them can be brought back onto it. Every backend behaves the same.
@Suite("Message tree conformance") struct MessageTreeConformanceTests {
    /// A conversation with `texts` appended in turn (user, assistant, …), each after the last.
    func conversation(_ store: any Store, _ texts: [String]) async throws -> (id: String, messages: [Message]) {
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        let conversation = makeConversation(owner: "alice", clone: clone.id)
        try await store.createConversation(conversation)
        var messages: [Message] = []
        for (i, text) in texts.enumerated() {
            let message = makeMessage(conversation.id, text, role: i % 2 == 0 ? .user : .assistant, at: 2_000 + Int64(i))
            try await store.appendMessage(message)
            messages.append(message)
        }
        return (conversation.id, messages)
    }

    func path(_ store: any Store, _ conversation: String) async throws -> [String] {
        try await store.messages(conversation: conversation, limit: 100, before: nil).map(\.text)
    }

    @Test(arguments: Backend.all)
    func appendedMessagesFollowThePathsLastMessage(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello", "how are you?"])
            let stored = try await store.messages(conversation: id, limit: 10, before: nil)
            #expect(stored.map(\.parent) == [nil, messages[0].id, messages[1].id])
            #expect(try await store.alternatives(of: messages.map(\.id), conversation: id).values.allSatisfy { $0.count == 1 && $0.index == 0 })
        }
    }

    @Test(arguments: Backend.all)
    func regeneratedRepliesAreAlternativesAndAnyCanBeChosenAgain(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello"])
            let (user, first) = (messages[0], messages[1])
            let second = try #require(try await store.appendAlternative(makeMessage(id, "hey", role: .assistant), replacing: first.id))
            #expect(second.parent == user.id)
            let third = try #require(try await store.appendAlternative(makeMessage(id, "good day", role: .assistant), replacing: second.id))
            #expect(try await path(store, id) == ["hi", "good day"])
            #expect(try await store.message(id: first.id)?.onPath == false)
            #expect(try await store.message(id: third.id) == third)
            #expect(try await store.message(id: "msg_none") == nil)
            let alternatives = try await store.alternatives(of: [user.id, first.id, second.id, third.id], conversation: id)
            #expect(alternatives[user.id] == .only(user.id))
            #expect(alternatives[first.id] == Alternatives(siblings: [first.id, second.id, third.id], index: 0))
            #expect(alternatives[second.id] == Alternatives(siblings: [first.id, second.id, third.id], index: 1))
            #expect(alternatives[third.id] == Alternatives(siblings: [first.id, second.id, third.id], index: 2))
            #expect(try await store.activate(message: first.id, conversation: id))
            #expect(try await path(store, id) == ["hi", "hello"])
            // Only a message on the path can be replaced; nothing is stored otherwise.
            #expect(try await store.appendAlternative(makeMessage(id, "nope", role: .assistant), replacing: third.id) == nil)
            #expect(try await store.activate(message: "msg_none", conversation: id) == false)
            #expect(try await path(store, id) == ["hi", "hello"])
        }
    }

    @Test(arguments: Backend.all)
    func anEditedMessageStartsABranchAndTheOldBranchStaysWhole(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello", "tell me a joke", "no"])
            let edited = try #require(try await store.appendAlternative(makeMessage(id, "tell me a story"), replacing: messages[2].id))
            #expect(edited.parent == messages[1].id)
            #expect(try await path(store, id) == ["hi", "hello", "tell me a story"])
            try await store.appendMessage(makeMessage(id, "once upon a time", role: .assistant))
            #expect(try await path(store, id) == ["hi", "hello", "tell me a story", "once upon a time"])
            // Back to the old branch: through the old message, with what followed it.
            #expect(try await store.activate(message: messages[2].id, conversation: id))
            #expect(try await path(store, id) == ["hi", "hello", "tell me a joke", "no"])
            // Through a message above the fork: its newest children follow.
            #expect(try await store.activate(message: messages[1].id, conversation: id))
            #expect(try await path(store, id) == ["hi", "hello", "tell me a story", "once upon a time"])
        }
    }

    @Test(arguments: Backend.all)
    func theFirstMessageCanHaveAlternativesToo(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello"])
            let edited = try #require(try await store.appendAlternative(makeMessage(id, "good morning"), replacing: messages[0].id))
            #expect(edited.parent == nil)
            #expect(try await path(store, id) == ["good morning"])
            let alternatives = try await store.alternatives(of: [messages[0].id, edited.id], conversation: id)
            #expect(alternatives[messages[0].id] == Alternatives(siblings: [messages[0].id, edited.id], index: 0))
            #expect(alternatives[edited.id] == Alternatives(siblings: [messages[0].id, edited.id], index: 1))
            #expect(try await store.activate(message: messages[0].id, conversation: id))
            #expect(try await path(store, id) == ["hi", "hello"])
        }
    }

    @Test(arguments: Backend.all)
    func deletingAMessageTakesWhatFollowsItAndThePathGoesOnFromItsParent(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello", "joke?", "no"])
            let story = try #require(try await store.appendAlternative(makeMessage(id, "story?"), replacing: messages[2].id))
            try await store.appendMessage(makeMessage(id, "once", role: .assistant))
            // Off the path: the old branch goes, the path stays.
            #expect(try await store.deleteMessage(id: messages[2].id, conversation: id) == 2)
            #expect(try await path(store, id) == ["hi", "hello", "story?", "once"])
            #expect(try await store.alternatives(of: [story.id], conversation: id)[story.id]?.count == 1)
            // On the path: it goes with what follows it, and the path ends at its parent.
            #expect(try await store.deleteMessage(id: story.id, conversation: id) == 2)
            #expect(try await path(store, id) == ["hi", "hello"])
            #expect(try await store.deleteMessage(id: story.id, conversation: id) == 0)
            #expect(try await store.deleteMessage(id: messages[0].id, conversation: "cv_other") == 0)
            // The first message: everything goes.
            #expect(try await store.deleteMessage(id: messages[0].id, conversation: id) == 2)
            #expect(try await path(store, id).isEmpty)
        }
    }

    @Test(arguments: Backend.all)
    func deletingAReplyWithAlternativesMovesThePathToTheNewestOther(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello"])
            _ = try #require(try await store.appendAlternative(makeMessage(id, "hey", role: .assistant), replacing: messages[1].id))
            #expect(try await store.activate(message: messages[1].id, conversation: id))
            #expect(try await store.deleteMessage(id: messages[1].id, conversation: id) == 1)
            #expect(try await path(store, id) == ["hi", "hey"])
        }
    }

    /// A message stored after its parent is on the path only when its parent ends the path: a
    /// reply stored late (the store refused it for a while; a crash's recovery) must not show on a
    /// path that went on without it, nor below a question edited away.
    @Test(arguments: Backend.all)
    func aMessageWhoseParentNoLongerEndsThePathIsKeptOffIt(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello"])
            let (hi, hello) = (messages[0], messages[1])
            var answer = makeMessage(id, "and you?", role: .user)
            answer.parent = hello.id
            try await store.appendMessage(answer)
            #expect(try await path(store, id) == ["hi", "hello", "and you?"], "its parent ended the path")

            // "hi" was answered and the path went on: a second answer to it is an alternative.
            var late = makeMessage(id, "hey there", role: .assistant)
            late.parent = hi.id
            try await store.appendMessage(late)
            #expect(try await path(store, id) == ["hi", "hello", "and you?"])
            #expect(try await store.message(id: late.id)?.onPath == false)
            #expect(
                try await store.alternatives(of: [hello.id], conversation: id)[hello.id] == Alternatives(siblings: [hello.id, late.id], index: 0))

            // After a message off the path: off it too, below it.
            let edited = try #require(try await store.appendAlternative(makeMessage(id, "good morning"), replacing: hi.id))
            var later = makeMessage(id, "fine, thanks", role: .assistant)
            later.parent = answer.id
            try await store.appendMessage(later)
            #expect(try await path(store, id) == ["good morning"])
            #expect(try await store.message(id: later.id)?.parent == answer.id)
            #expect(try await store.activate(message: later.id, conversation: id))
            #expect(try await path(store, id) == ["hi", "hello", "and you?", "fine, thanks"])
            #expect(try await store.message(id: edited.id)?.onPath == false)
        }
    }

    /// A regenerated reply stored late (the store refused it while the user wrote on) does not
    /// take its original's place once the path has a message newer than the reply: it is stored
    /// beside the original, off the path. One stored in time takes the place.
    @Test(arguments: Backend.all)
    func aRegeneratedReplyStoredAfterThePathWentOnStaysBesideItsOriginal(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello"])
            let late = makeMessage(id, "hey", role: .assistant)  // begun before the two below
            try await store.appendMessage(makeMessage(id, "more?"))
            try await store.appendMessage(makeMessage(id, "sure", role: .assistant))
            #expect(try await store.appendReply(late, replacing: messages[1].id) == false)
            #expect(try await path(store, id) == ["hi", "hello", "more?", "sure"])
            let stored = try #require(try await store.message(id: late.id))
            #expect(stored.parent == messages[0].id && !stored.onPath)

            #expect(try await store.appendReply(makeMessage(id, "howdy", role: .assistant), replacing: messages[1].id))
            #expect(try await path(store, id) == ["hi", "howdy"])
        }
    }

    /// A message whose parent was deleted (with everything below it) is not stored: it would
    /// answer nothing.
    @Test(arguments: Backend.all)
    func aMessageWhoseParentIsGoneIsNotStored(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello", "joke?"])
            let before = try await store.conversation(id: id, owner: "alice")
            #expect(try await store.deleteMessage(id: messages[2].id, conversation: id) == 1)
            var late = makeMessage(id, "here is one", role: .assistant, at: 9_000)
            late.parent = messages[2].id
            await #expect(throws: ParentMessageGone(id: messages[2].id)) { try await store.appendMessage(late) }
            #expect(try await store.message(id: late.id) == nil)
            #expect(try await path(store, id) == ["hi", "hello"])
            #expect(try await store.conversation(id: id, owner: "alice")?.updatedAt == before?.updatedAt, "nothing written")
            // A parent in another conversation is not this one's.
            let (other, _) = try await conversation(store, ["hi"])
            late.parent = messages[0].id
            late.conversation = other
            await #expect(throws: ParentMessageGone(id: messages[0].id)) { try await store.appendMessage(late) }
        }
    }

    @Test(arguments: Backend.all)
    func conversationsAreRenamedAndDeletedOnlyByTheirOwner(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, _) = try await conversation(store, ["hi", "hello"])
            #expect(try await store.renameConversation(id: id, owner: "bob", title: "Mine") == nil)
            let renamed = try #require(try await store.renameConversation(id: id, owner: "alice", title: "Greetings"))
            #expect(renamed.title == "Greetings" && renamed.id == id)
            #expect(try await store.conversation(id: id, owner: "alice")?.title == "Greetings")
            #expect(try await store.deleteConversation(id: id, owner: "bob") == false)
            #expect(try await store.deleteConversation(id: id, owner: "alice"))
            #expect(try await store.conversation(id: id, owner: "alice") == nil)
            #expect(try await path(store, id).isEmpty)
            #expect(try await store.deleteConversation(id: id, owner: "alice") == false)
        }
    }

    /// A conversation's rolling summary (#24) is a compare-and-set over the one it replaces, so
    /// of two folds written at once the first stays; it is the owner's only.
    @Test(arguments: Backend.all)
    func aSummaryReplacesOnlyTheOneItWasWrittenOver(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (id, messages) = try await conversation(store, ["hi", "hello", "more", "sure"])
            #expect(try await store.conversation(id: id, owner: "alice")?.summary == nil)
            let first = ConversationSummary(text: "They said hello.", through: messages[1].id)
            #expect(try await store.setSummary(first, conversation: id, owner: "bob", replacing: nil) == false)
            #expect(try await store.setSummary(first, conversation: id, owner: "alice", replacing: nil))
            #expect(try await store.conversation(id: id, owner: "alice")?.summary == first)
            let second = ConversationSummary(text: "They said hello, then more.", through: messages[2].id)
            #expect(try await store.setSummary(second, conversation: id, owner: "alice", replacing: nil) == false, "one was written meanwhile")
            #expect(try await store.setSummary(second, conversation: id, owner: "alice", replacing: messages[1].id))
            #expect(try await store.conversations(owner: "alice", limit: 5, before: nil).first?.summary == second)
        }
    }
}
