import ParleyCore
import ParleyStore
import Testing

/// Search over a user's messages and titles (#24): whole terms, all of them, newest first, the
/// owner's only, and nothing that was deleted. Every backend answers the same.
@Suite("Search conformance") struct SearchConformanceTests {
    func query(_ text: String) throws -> SearchQuery { try #require(try SearchQuery.parse(text)) }

    /// A clone and a conversation of `owner` titled `title` holding `texts`, in turn.
    @discardableResult
    func conversation(
        _ store: any Store, owner: String, title: String = "Hello", _ texts: [String]
    ) async throws -> (
        conversation: Conversation, messages: [Message]
    ) {
        let clone = makeClone(owner: owner)
        try await store.createClone(clone)
        var conversation = makeConversation(owner: owner, clone: clone.id)
        conversation.title = title
        try await store.createConversation(conversation)
        var messages: [Message] = []
        for (i, text) in texts.enumerated() {
            let message = makeMessage(conversation.id, text, role: i % 2 == 0 ? .user : .assistant, at: 2_000 + Int64(i))
            try await store.appendMessage(message)
            messages.append(message)
        }
        return (conversation, messages)
    }

    func ids(_ store: any Store, _ owner: String, _ text: String, limit: Int = 50, before: String? = nil) async throws -> [String] {
        try await store.search(owner: owner, query: query(text), limit: limit, before: before).map(\.id)
    }

    @Test(arguments: Backend.all)
    func findsEveryTermCaseInsensitivelyNewestFirstAndOnlyTheOwners(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (talk, said) = try await conversation(
                store, owner: "alice", title: "Zebras and tea",
                ["I saw a Zebra today", "A zebra? Where?", "At the zoo, drinking tea", "zebras are not zebra"])
            // Bob's words hold the same terms: never in Alice's results, and Alice's never in his.
            let (bobs, bobSaid) = try await conversation(store, owner: "bob", title: "zebra zoo", ["zebra zoo tea"])
            #expect(try await ids(store, "alice", "zebra") == [said[3].id, said[1].id, said[0].id])
            #expect(try await ids(store, "alice", "ZEBRA zoo") == [])
            #expect(try await ids(store, "alice", "zoo tea") == [said[2].id])
            #expect(try await ids(store, "alice", "zebras") == [said[3].id, talk.id], "the title is a hit of its own, at its creation")
            #expect(try await ids(store, "bob", "zebra zoo") == [bobSaid[0].id, bobs.id])
            #expect(try await ids(store, "carol", "zebra") == [])
            #expect(try await ids(store, "alice", "zeb") == [], "whole terms only")

            let hits = try await store.search(owner: "alice", query: query("zoo"), limit: 10, before: nil)
            let hit = try #require(hits.first)
            #expect(hits.count == 1 && hit.kind == .message)
            #expect(hit.message?.id == said[2].id && hit.message?.text == said[2].text && hit.message?.parent == said[1].id)
            #expect(hit.conversation.id == talk.id && hit.conversation.title == talk.title && hit.conversation.clone == talk.clone)
        }
    }

    @Test(arguments: Backend.all)
    func pagesAcrossMessagesAndTitles(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let first = try await conversation(store, owner: "alice", title: "kiwi talk", ["kiwi one", "kiwi two"])
            let second = try await conversation(store, owner: "alice", title: "more kiwi", ["kiwi three"])
            let all = [second.messages[0].id, second.conversation.id, first.messages[1].id, first.messages[0].id, first.conversation.id]
            #expect(try await ids(store, "alice", "kiwi") == all)
            var pages: [String] = []
            var before: String?
            while true {
                let page = try await ids(store, "alice", "kiwi", limit: 2, before: before)
                pages += page
                guard page.count == 2 else { break }
                before = page.last
            }
            #expect(pages == all)
        }
    }

    @Test(arguments: Backend.all)
    func findsAlternativesOffThePathAndFollowsRenames(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (talk, said) = try await conversation(store, owner: "alice", ["hi", "hello walrus"])
            let again = try #require(try await store.appendAlternative(makeMessage(talk.id, "hello otter", role: .assistant), replacing: said[1].id))
            let found = try await store.search(owner: "alice", query: query("walrus"), limit: 5, before: nil)
            #expect(found.map(\.id) == [said[1].id] && found.first?.message?.onPath == false)
            #expect(try await ids(store, "alice", "otter") == [again.id])

            _ = try await store.renameConversation(id: talk.id, owner: "alice", title: "Otters")
            #expect(try await ids(store, "alice", "hello") == [again.id, said[1].id])
            #expect(try await ids(store, "alice", "otters") == [talk.id])
        }
    }

    /// Deleted words are gone from search, also when a later row takes the deleted one's place
    /// in the store (SQLite reuses the largest rowid), which a stale index entry would match.
    @Test(arguments: Backend.all)
    func deletedWordsAreNeverFound(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let (talk, said) = try await conversation(store, owner: "alice", ["keep this", "gnu one", "gnu two"])
            #expect(try await store.deleteMessage(id: said[2].id, conversation: talk.id) == 1)
            try await store.appendMessage(makeMessage(talk.id, "plain words"))
            #expect(try await ids(store, "alice", "gnu") == [said[1].id])

            let (gone, _) = try await conversation(store, owner: "alice", title: "yak title", ["yak chat"])
            #expect(try await store.deleteConversation(id: gone.id, owner: "alice"))
            let (_, other) = try await conversation(store, owner: "alice", title: "Other", ["plain again"])
            #expect(try await ids(store, "alice", "yak") == [])
            let plain = try #require(try await store.messages(conversation: talk.id, limit: 9, before: nil).last)
            #expect(try await ids(store, "alice", "plain") == [other[0].id, plain.id])

            let (byClone, _) = try await conversation(store, owner: "alice", ["emu words"])
            #expect(try await store.deleteClone(id: byClone.clone, owner: "alice"))
            try await conversation(store, owner: "alice", ["unrelated"])
            #expect(try await ids(store, "alice", "emu") == [])

            try await conversation(store, owner: "bob", title: "ibis", ["ibis here"])
            _ = try await store.deleteUser("bob", pseudonym: "deleted:0b0b")
            try await conversation(store, owner: "alice", ["last"])
            #expect(try await ids(store, "bob", "ibis") == [])
            #expect(try await ids(store, "alice", "ibis") == [])

            #expect(try await store.purge(createdBefore: 10_000, limit: 100).messages > 0)
            #expect(try await ids(store, "alice", "gnu") == [])
            #expect(try await ids(store, "alice", "keep") == [])
        }
    }
}
