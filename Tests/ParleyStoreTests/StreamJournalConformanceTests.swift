import ParleyCore
import ParleyStore
import Testing

@Suite("Stream journal conformance") struct StreamJournalConformanceTests {
    private func journal(_ stream: String, user: String = "alice", target: StreamJournal.Target, at time: Int64) -> StreamJournal {
        StreamJournal(
            stream: stream, user: user, model: "simulated", feature: "chat", inputTokens: 42, target: target,
            messageID: ids.make(.message), createdAt: time)
    }

    @Test(arguments: Backend.all)
    func journalsAreReplacedListedOldestFirstAndDeleted(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var chat = journal("st_chat", target: .conversation("cv_1", parent: "msg_q"), at: 2_000)
            let first = journal("st_first", target: .conversation("cv_4"), at: 7_000)
            let turn = journal("st_turn", user: "bob", target: .roomTurn(room: "rm_1", speaker: "cl_1"), at: 1_000)
            let scheduled = journal("st_sched", target: .settleOnly(conversation: "cv_3"), at: 3_000)
            let regenerated = journal("st_regen", user: "bob", target: .alternative(conversation: "cv_2", replacing: "msg_1"), at: 4_000)
            // Settle-only streams keep what their entries are linked to, or nothing.
            let translation = journal("st_trans", user: "bob", target: .settleOnly(room: "rm_2"), at: 5_000)
            let unlinked = journal("st_unlinked", user: "bob", target: .settleOnly(), at: 6_000)
            for j in [chat, turn, scheduled, regenerated, translation, unlinked, first] { try await store.saveStreamJournal(j) }
            #expect(try await store.streamJournals(limit: 10) == [turn, chat, scheduled, regenerated, translation, unlinked, first])
            for stream in ["st_regen", "st_trans", "st_unlinked", "st_first"] { try await store.deleteStreamJournal(stream: stream) }
            #expect(try await store.streamJournals(limit: 1) == [turn])

            // Saving again replaces the text as it grows; it never adds a row.
            chat.text = "Hello, wor"
            chat.outputTokens = 4
            chat.updatedAt = 2_500
            try await store.saveStreamJournal(chat)
            chat.text = "Hello, world — ünïcode 🙂"
            chat.outputTokens = 9
            try await store.saveStreamJournal(chat)
            #expect(try await store.streamJournals(limit: 10) == [turn, chat, scheduled])
            // A reply that ended but could not be stored keeps how it ended.
            chat.text += " The end."
            chat.outputTokens = 12
            chat.ended = .complete
            try await store.saveStreamJournal(chat)
            #expect(try await store.streamJournals(limit: 10) == [turn, chat, scheduled])

            try await store.deleteStreamJournal(stream: "st_turn")
            try await store.deleteStreamJournal(stream: "st_none")  // absent: nothing happens
            #expect(try await store.streamJournals(limit: 10) == [chat, scheduled])
            // An account's deletion takes its journals (they hold its words).
            _ = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
            #expect(try await store.streamJournals(limit: 10).isEmpty)
        }
    }

    /// The node's journal writer hands every waiting snapshot over in one call: each replaces its
    /// stream's row or adds one, and a batch past the backend's per-command size is split whole.
    @Test(arguments: Backend.all)
    func manyJournalsAreSavedInOneCall(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var first = journal("st_0", target: .conversation("cv_0"), at: 1)
            try await store.saveStreamJournal(first)
            first.text = "grown"
            first.outputTokens = 2
            var batch = [first]
            for n in 1..<250 {
                var j = journal("st_\(n)", target: .conversation("cv_\(n)"), at: Int64(1 + n))
                j.text = "reply \(n) so far"
                j.outputTokens = n
                batch.append(j)
            }
            try await store.saveStreamJournals(batch.shuffled())
            #expect(try await store.streamJournals(limit: 1_000) == batch)
            try await store.saveStreamJournals([])
            #expect(try await store.streamJournals(limit: 1_000).count == 250)
            // Finished replies' journals go in the same call (one never stored is no error).
            var grown = batch[1]
            grown.text += " and more"
            try await store.saveStreamJournals([grown], deleting: ["st_0", "st_2", "st_never"])
            #expect(try await store.streamJournals(limit: 1_000) == [grown] + batch.dropFirst(3))
        }
    }
}
