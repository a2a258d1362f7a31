import ParleyCore
import ParleyStore
import Testing

func grant(_ user: String, _ credits: Int64, id: String? = nil, at time: Int64 = 1_000) -> LedgerEntry {
    LedgerEntry(id: id ?? ids.make(.message), user: user, kind: .grant, credits: credits, note: "test", createdAt: time)
}

func debit(_ user: String, _ credits: Int64, id: String? = nil, at time: Int64 = 2_000) -> LedgerEntry {
    LedgerEntry(
        id: id ?? ids.make(.message), user: user, kind: .debit, credits: -credits, tokens: Int(credits),
        stream: "st_x", conversation: "cv_x", model: "simulated", feature: "chat", createdAt: time)
}

/// Every applied entry of the user, following the pages to the end.
func allEntries(_ store: any Store, _ user: String) async throws -> [LedgerEntry] {
    var all: [LedgerEntry] = []
    var before: String?
    while true {
        let page = try await store.ledger(user: user, limit: 7, before: before)
        all += page
        guard page.count == 7 else { return all }
        before = page.last!.id
    }
}

/// The invariant the whole credits feature rests on: the balance is the sum of applied entries.
func expectLedgerInvariant(_ store: any Store, _ user: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let entries = try await allEntries(store, user)
    #expect(Set(entries.map(\.id)).count == entries.count, "an entry appears twice", sourceLocation: sourceLocation)
    #expect(entries.reduce(0) { $0 + $1.credits } == (try await store.balance(user: user)), sourceLocation: sourceLocation)
}

@Suite("Ledger conformance") struct LedgerConformanceTests {
    @Test(arguments: Backend.all)
    func grantsAndDebitsMoveTheBalance(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            #expect(try await store.balance(user: "alice") == 0)
            #expect(try await store.apply(grant("alice", 100), allowOverdraft: false) == .applied(balance: 100))
            #expect(try await store.apply(debit("alice", 30), allowOverdraft: false) == .applied(balance: 70))
            #expect(try await store.balance(user: "alice") == 70)
            #expect(try await store.balance(user: "bob") == 0)
            try await expectLedgerInvariant(store, "alice")
        }
    }

    @Test(arguments: Backend.all)
    func uncoveredDebitsChangeNothingUnlessOverdraftIsAllowed(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 10), allowOverdraft: false)
            let refused = debit("alice", 11)
            #expect(try await store.apply(refused, allowOverdraft: false) == .insufficient(balance: 10))
            #expect(try await store.ledger(user: "alice", limit: 10, before: nil).map(\.id).contains(refused.id) == false)
            #expect(try await store.apply(debit("nobody", 1), allowOverdraft: false) == .insufficient(balance: 0))
            // The same id may be tried again once the balance covers it.
            _ = try await store.apply(grant("alice", 5), allowOverdraft: false)
            #expect(try await store.apply(refused, allowOverdraft: false) == .applied(balance: 4))
            #expect(try await store.apply(debit("alice", 9), allowOverdraft: true) == .applied(balance: -5))
            try await expectLedgerInvariant(store, "alice")
        }
    }

    /// A reply's prompt debit keeps its first output tokens covered: refused, nothing recorded,
    /// unless the balance still holds `headroom` after it. A grant or an overdraft ignores it.
    @Test(arguments: Backend.all)
    func aDebitWithHeadroomAppliesOnlyIfTheBalanceStillCoversIt(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 100), allowOverdraft: false)
            let prompt = debit("alice", 60, id: "st_1:in")
            #expect(try await store.apply(prompt, allowOverdraft: false, headroom: 41, caps: []) == .insufficient(balance: 100))
            #expect(try await store.ledgerEntry(id: prompt.id) == nil)
            #expect(try await store.apply(prompt, allowOverdraft: false, headroom: 40, caps: []) == .applied(balance: 40))
            // A free prompt too (and for a user with no account yet).
            #expect(try await store.apply(debit("alice", 0), allowOverdraft: false, headroom: 41, caps: []) == .insufficient(balance: 40))
            #expect(try await store.apply(debit("nobody", 0), allowOverdraft: false, headroom: 1, caps: []) == .insufficient(balance: 0))
            #expect(try await store.apply(debit("alice", 0), allowOverdraft: false, headroom: 40, caps: []) == .applied(balance: 40))
            #expect(try await store.apply(grant("alice", 5), allowOverdraft: false, headroom: 1_000, caps: []) == .applied(balance: 45))
            #expect(try await store.apply(debit("alice", 50), allowOverdraft: true, headroom: 1_000, caps: []) == .applied(balance: -5))
            try await expectLedgerInvariant(store, "alice")
        }
    }

    /// A reply's prompt debit and the message its request stores, in one call: both, or
    /// (refused) neither. When the message cannot be stored nothing is charged where one
    /// transaction holds both (SQLite); elsewhere the call says the debit stands, to be given back.
    @Test(arguments: Backend.all)
    func aPromptDebitStoresItsMessageWithItOrNeither(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 100), allowOverdraft: false)
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            let hello = makeMessage(conversation.id, "Hello")
            let opening = ReplyOpening.conversation(conversation, messages: [hello])

            #expect(try await store.apply(debit("alice", 60, id: "st_1:in"), headroom: 41, caps: [], storing: opening) == .insufficient(balance: 100))
            #expect(try await store.conversation(id: conversation.id, owner: "alice") == nil)
            #expect(try await store.ledgerEntry(id: "st_1:in") == nil)

            #expect(try await store.apply(debit("alice", 60, id: "st_2:in"), headroom: 40, caps: [], storing: opening) == .applied(balance: 40))
            #expect(try await store.messages(conversation: conversation.id, limit: 5, before: nil) == [hello])

            var more = makeMessage(conversation.id, "More", at: 3_000)
            more.parent = hello.id
            #expect(
                try await store.apply(debit("alice", 10, id: "st_3:in"), headroom: 0, caps: [], storing: .messages([more], replacing: nil))
                    == .applied(balance: 30))
            var edit = makeMessage(conversation.id, "Much more", at: 4_000)
            #expect(
                try await store.apply(debit("alice", 10, id: "st_4:in"), headroom: 0, caps: [], storing: .messages([edit], replacing: more.id))
                    == .applied(balance: 20))
            edit.parent = hello.id
            #expect(try await store.messages(conversation: conversation.id, limit: 5, before: nil) == [hello, edit])

            // An edit of a message that left the path, and a message whose id is taken.
            let atomic = store is SQLiteStore
            let failing: [(String, ReplyOpening)] = [
                ("st_5:in", .messages([makeMessage(conversation.id, "Again", at: 5_000)], replacing: more.id)),
                ("st_6:in", .messages([hello], replacing: nil)),
            ]
            for (id, opening) in failing {
                do {
                    _ = try await store.apply(debit("alice", 10, id: id), headroom: 0, caps: [], storing: opening)
                    Issue.record("\(id): stored")
                } catch let notStored as OpeningNotStored {
                    #expect(!atomic && notStored.applied, "\(id)")
                    #expect(try await store.ledgerEntry(id: id) != nil)
                } catch {
                    #expect(atomic, "\(id): \(error)")
                    #expect(try await store.ledgerEntry(id: id) == nil)
                    #expect(try await store.balance(user: "alice") == 20)
                }
            }
            #expect(try await store.messages(conversation: conversation.id, limit: 5, before: nil) == [hello, edit])
            try await expectLedgerInvariant(store, "alice")
        }
    }

    @Test(arguments: Backend.all)
    func aRefusedIdRetriedForASmallerAmountRecordsTheNewAmount(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 10), allowOverdraft: false)
            #expect(try await store.apply(debit("alice", 16, id: "st_1:1"), allowOverdraft: false) == .insufficient(balance: 10))
            let smaller = debit("alice", 10, id: "st_1:1")
            #expect(try await store.apply(smaller, allowOverdraft: false) == .applied(balance: 0))
            #expect(try await store.ledger(user: "alice", limit: 10, before: nil).first { $0.id == "st_1:1" } == smaller)
            try await expectLedgerInvariant(store, "alice")
        }
    }

    @Test(arguments: Backend.all)
    func anEntryAppliesOnceHoweverOftenItIsRetried(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let order = grant("alice", 50, id: "order:1234")
            #expect(try await store.apply(order, allowOverdraft: false) == .applied(balance: 50))
            #expect(try await store.apply(order, allowOverdraft: false) == .alreadyApplied(balance: 50))
            let batch = debit("alice", 5, id: "st_1:1")
            let outcomes = try await withThrowingTaskGroup(of: LedgerOutcome.self) { group in
                for _ in 0..<20 { group.addTask { try await store.apply(batch, allowOverdraft: false) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(outcomes.filter { if case .applied = $0 { true } else { false } }.count == 1)
            #expect(try await store.balance(user: "alice") == 45)
            try await expectLedgerInvariant(store, "alice")
        }
    }

    @Test(arguments: Backend.all)
    func concurrentDebitsNeverOverdraw(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 100), allowOverdraft: false)
            let outcomes = try await withThrowingTaskGroup(of: LedgerOutcome.self) { group in
                for _ in 0..<60 { group.addTask { try await store.apply(debit("alice", 3), allowOverdraft: false) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            let applied = outcomes.filter { if case .applied = $0 { true } else { false } }
            #expect(applied.count == 33)
            #expect(applied.allSatisfy { $0.balance >= 0 })
            #expect(outcomes.allSatisfy { $0.balance >= 0 })
            #expect(try await store.balance(user: "alice") == 1)
            try await expectLedgerInvariant(store, "alice")
        }
    }

    /// `GET /v1/credits` shows a page beside the balance: read while debits land, every page
    /// (all of the user's entries fit in one) adds up to the balance read with it.
    @Test(arguments: Backend.all)
    func aPageAndItsBalanceAreReadAtOneMoment(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 10_000), allowOverdraft: false)
            let debits = 80
            let pages = try await withThrowingTaskGroup(of: [(entries: [LedgerEntry], balance: Int64)].self) { group in
                group.addTask {
                    try await withThrowingTaskGroup(of: Void.self) { writers in
                        for _ in 0..<4 {
                            writers.addTask {
                                for _ in 0..<debits / 4 {
                                    // Each applied twice at once: a retry that finds it applied marks it too.
                                    let entry = debit("alice", 1)
                                    async let retry = store.apply(entry, allowOverdraft: false)
                                    _ = try await store.apply(entry, allowOverdraft: false)
                                    _ = try await retry
                                }
                            }
                        }
                        try await writers.waitForAll()
                    }
                    return []
                }
                group.addTask {
                    var pages: [(entries: [LedgerEntry], balance: Int64)] = []
                    // Reads until the last debit shows (or far longer than the writes take).
                    while pages.last?.balance != 10_000 - Int64(debits), pages.count < 5_000 {
                        pages.append(try await store.ledgerPage(user: "alice", limit: 1_000, before: nil))
                    }
                    return pages
                }
                return try await group.reduce(into: []) { $0 += $1 }
            }
            #expect(pages.last?.balance == 10_000 - Int64(debits))
            let torn = pages.filter { $0.entries.reduce(0) { $0 + $1.credits } != $0.balance }.count
            #expect(torn == 0, "\(torn) of \(pages.count) pages disagree with their balance")
            #expect(Set(pages.map(\.balance)).count > 2, "pages were read while the debits landed")
            // A later page's balance is still the moment's, not the sum of that page.
            let first = try await store.ledgerPage(user: "alice", limit: 10, before: nil)
            let second = try await store.ledgerPage(user: "alice", limit: 10, before: first.entries.last!.id)
            #expect(second.entries.count == 10 && second.balance == first.balance)
            #expect(Set(first.entries.map(\.id)).isDisjoint(with: second.entries.map(\.id)))
        }
    }

    @Test(arguments: Backend.all)
    func theLedgerPagesNewestFirstAndKeepsEveryField(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var applied: [LedgerEntry] = []
            for i in 0..<16 {
                let entry = i == 0 ? grant("alice", 1000, at: 1_000) : debit("alice", Int64(i), at: 1_000 + Int64(i / 3))
                _ = try await store.apply(entry, allowOverdraft: false)
                applied.append(entry)
            }
            _ = try await store.apply(grant("bob", 5), allowOverdraft: false)
            let all = try await allEntries(store, "alice")
            #expect(all.count == 16)
            #expect(Set(all.map(\.id)) == Set(applied.map(\.id)))
            let order = all.map { ($0.createdAt, $0.id) }
            #expect(zip(order, order.dropFirst()).allSatisfy { $0.0 > $1.0 || ($0.0 == $1.0 && $0.1 > $1.1) })
            #expect(all.first { $0.id == applied[5].id } == applied[5])
            #expect(try await store.ledger(user: "alice", limit: 5, before: "no-such-entry").isEmpty)
            try await expectLedgerInvariant(store, "alice")
            try await expectLedgerInvariant(store, "bob")
        }
    }

    @Test(arguments: Backend.all)
    func recoveryLeavesACleanLedgerClean(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await store.apply(grant("alice", 10), allowOverdraft: false)
            _ = try await store.recoverLedger()
            #expect(try await store.balance(user: "alice") == 10)
            try await expectLedgerInvariant(store, "alice")
        }
    }
}
