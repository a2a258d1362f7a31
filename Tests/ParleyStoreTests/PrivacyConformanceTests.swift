import ParleyCore
import ParleyStore
import Testing

/// Two users' worth of everything Parley stores, for deletion to cut exactly one of them out.
private struct World {
    var clone: Clone
    var conversation: Conversation
    var messages: [Message]
    var schedule: Schedule
    var ownRoom: Room
    var ownRoomEntry: RoomEntry
}

private func populate(_ store: any Store, _ user: String, welcomeAt: Int64 = 1_000) async throws -> World {
    _ = try await store.ensureUser(user, now: 500)
    let clone = makeClone(owner: user)
    try await store.createClone(clone)
    let conversation = makeConversation(owner: user, clone: clone.id)
    try await store.createConversation(conversation)
    let messages = chained([makeMessage(conversation.id, "\(user) says hi"), makeMessage(conversation.id, "hello \(user)", role: .assistant)])
    for message in messages { try await store.appendMessage(message) }
    let schedule = makeSchedule(owner: user, clone: clone.id, at: 9_000)
    try await store.createSchedule(schedule)
    let room = makeRoom(owner: user)
    try await store.createRoom(room)
    let entry = RoomEntry(id: ids.make(.roomEntry), room: room.id, kind: .said, speaker: user, text: "\(user) opens", createdAt: 3_000)
    try await store.appendRoomEntry(entry)
    _ = try await store.apply(grant(user, 100, id: LedgerEntry.welcomeID(for: user), at: welcomeAt), allowOverdraft: false)
    _ = try await store.apply(debit(user, 30), allowOverdraft: false)
    try await store.appendAudit(AuditEvent(id: ids.make(.audit), at: 4_000, actor: user, action: "clone.created", target: clone.id, ipHash: "ab12"))
    try await store.setPersona(Persona(name: "\(user) herself", description: "\(user)'s persona"), user: user)
    return World(clone: clone, conversation: conversation, messages: messages, schedule: schedule, ownRoom: room, ownRoomEntry: entry)
}

@Suite("Privacy conformance") struct PrivacyConformanceTests {
    @Test(arguments: Backend.all)
    func deletingAUserRemovesEverythingOfThemAndNothingOfOthers(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let alice = try await populate(store, "alice")
            let bob = try await populate(store, "bob")
            // Alice in Bob's translation chat: she said something, it was translated, a clone answered.
            var shared = makeRoom(owner: "bob")
            shared.kind = .translation
            shared.members = ["alice", "carol"]
            shared.languages = ["alice": LanguageTag("fr")!, "bob": LanguageTag("en")!]
            shared.muted = ["alice"]
            try await store.createRoom(shared)
            let said = RoomEntry(
                id: ids.make(.roomEntry), room: shared.id, kind: .said, speaker: "alice", text: "bonjour", createdAt: 3_100,
                lang: LanguageTag("fr"))
            let translated = RoomEntry(
                id: ids.make(.roomEntry), room: shared.id, kind: .translation, speaker: "alice", text: "hello",
                createdAt: 3_200, lang: LanguageTag("en"), source: said.id)
            let answer = RoomEntry(id: ids.make(.roomEntry), room: shared.id, kind: .turn, speaker: "cl_bob", text: "hi", createdAt: 3_300)
            for entry in [said, translated, answer] { try await store.appendRoomEntry(entry) }
            try await store.appendAudit(AuditEvent(id: ids.make(.audit), at: 4_100, actor: "admin", action: "credits.granted", target: "alice"))
            let aliceLedger = try await allEntries(store, "alice")
            let aliceBalance = try await store.balance(user: "alice")
            #expect(aliceBalance == 70)

            let report = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
            #expect(report.clones == 1 && report.conversations == 1 && report.messages == 2 && report.schedules == 1)
            #expect(report.rooms == 1 && report.roomEntries == 3, "her room's entry, what she said elsewhere and its translation")
            #expect(report.ledgerRowsKept == 2)

            #expect(try await store.clones(owner: "alice", limit: 100, after: nil).isEmpty)
            #expect(try await store.clone(id: alice.clone.id, owner: "alice") == nil)
            #expect(try await store.conversation(id: alice.conversation.id, owner: "alice") == nil)
            #expect(try await store.conversations(owner: "alice", limit: 10, before: nil).isEmpty)
            #expect(try await store.messages(conversation: alice.conversation.id, limit: 10, before: nil).isEmpty)
            #expect(try await store.schedules(owner: "alice", limit: 10, before: nil).isEmpty)
            #expect(try await store.schedule(id: alice.schedule.id, owner: "alice") == nil)
            #expect(try await store.room(id: alice.ownRoom.id) == nil)
            #expect(try await store.roomEntries(room: alice.ownRoom.id, limit: 10, before: nil).isEmpty)
            #expect(try await store.rooms(owner: "alice", limit: 10, after: nil).isEmpty)
            #expect(try await store.roomEntries(room: shared.id, limit: 10, before: nil) == [answer])
            let scrubbed = try #require(try await store.room(id: shared.id))
            #expect(scrubbed.members == ["carol"] && scrubbed.languages == ["bob": LanguageTag("en")!] && scrubbed.muted.isEmpty)
            #expect(try await store.balance(user: "alice") == 0)
            #expect(try await store.ledger(user: "alice", limit: 10, before: nil).isEmpty)
            #expect(try await store.persona(user: "alice") == nil)

            // The books still balance, under the pseudonym, with no link to content.
            let kept = try await allEntries(store, "deleted:0f0f")
            #expect(Set(kept.map(\.id)) == Set(aliceLedger.map { $0.detached(to: "deleted:0f0f").id }))
            #expect(kept.sorted { $0.id < $1.id } == aliceLedger.map { $0.detached(to: "deleted:0f0f") }.sorted { $0.id < $1.id })
            #expect(kept.allSatisfy { $0.stream == nil && $0.conversation == nil && $0.room == nil && $0.note == nil })
            #expect(try await store.balance(user: "deleted:0f0f") == aliceBalance)
            try await expectLedgerInvariant(store, "deleted:0f0f")
            let audit = try await store.auditEvents(limit: 50, before: nil, involving: nil)
            #expect(!audit.contains { $0.actor == "alice" || $0.target == "alice" })
            #expect(audit.filter { $0.actor == "deleted:0f0f" }.count == 1 && audit.filter { $0.target == "deleted:0f0f" }.count == 1)

            // Bob keeps everything.
            #expect(try await store.clones(owner: "bob", limit: 100, after: nil) == [bob.clone])
            #expect(try await store.messages(conversation: bob.conversation.id, limit: 10, before: nil) == bob.messages)
            #expect(try await store.schedule(id: bob.schedule.id, owner: "bob") == bob.schedule)
            #expect(try await store.roomEntries(room: bob.ownRoom.id, limit: 10, before: nil) == [bob.ownRoomEntry])
            #expect(try await store.balance(user: "bob") == 70)
            #expect(try await store.persona(user: "bob") == Persona(name: "bob herself", description: "bob's persona"))
            try await expectLedgerInvariant(store, "bob")

            // A retried deletion finds nothing more to do and moves no credits twice.
            let again = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
            #expect(again.clones == 0 && again.messages == 0 && again.roomEntries == 0)
            #expect(try await store.balance(user: "deleted:0f0f") == aliceBalance)
        }
    }

    @Test(arguments: Backend.all)
    func aSubjectDeletedTwiceIsDeletedTwiceAndItsBooksKeepBothGrants(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            _ = try await populate(store, "alice")
            _ = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
            let first = try #require(try await store.ledgerEntry(id: LedgerEntry.welcomeID(for: "deleted:0f0f")))
            #expect(first.user == "deleted:0f0f" && first.credits == 100)
            #expect(try await store.ledgerEntry(id: LedgerEntry.welcomeID(for: "alice")) == nil)
            // She comes back with everything again, a second starting grant among it (as versions
            // that re-granted returning users did), and deletes her account again.
            let world = try await populate(store, "alice", welcomeAt: 5_000)
            let report = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
            #expect(report.clones == 1 && report.conversations == 1 && report.messages == 2 && report.rooms == 1)
            #expect(try await store.clones(owner: "alice", limit: 100, after: nil).isEmpty)
            #expect(try await store.conversation(id: world.conversation.id, owner: "alice") == nil)
            #expect(try await store.balance(user: "alice") == 0)
            let kept = try await allEntries(store, "deleted:0f0f")
            #expect(kept.count == 4 && kept.filter { $0.id.hasPrefix(LedgerEntry.welcomeID(for: "deleted:0f0f")) }.count == 2)
            #expect(try await store.balance(user: "deleted:0f0f") == 140)
            try await expectLedgerInvariant(store, "deleted:0f0f")
            // And a third time, with nothing new: nothing changes.
            _ = try await store.deleteUser("alice", pseudonym: "deleted:0f0f")
            #expect(try await allEntries(store, "deleted:0f0f").count == 4)
        }
    }

    @Test(arguments: Backend.all)
    func purgeRemovesExactlyTheExpiredUnsavedContent(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            let made = chained([
                makeMessage(conversation.id, "old", at: 100), makeMessage(conversation.id, "old but saved", role: .assistant, at: 200),
                makeMessage(conversation.id, "also old", at: 300), makeMessage(conversation.id, "exactly at the cutoff", at: 301),
                makeMessage(conversation.id, "new", role: .assistant, at: 400),
            ])
            let (old, older, edge, fresh) = (made[0], made[2], made[3], made[4])
            var kept = made[1]
            for message in [old, kept, older, edge, fresh] { try await store.appendMessage(message) }
            #expect(try await store.setMessageSaved(id: kept.id, conversation: conversation.id, saved: true))
            #expect(try await store.setMessageSaved(id: kept.id, conversation: "cv_other", saved: true) == false)
            kept.saved = true
            let room = makeRoom()
            try await store.createRoom(room)
            let oldEntry = RoomEntry(id: ids.make(.roomEntry), room: room.id, kind: .turn, speaker: "cl_a", text: "old turn", createdAt: 150)
            let newEntry = RoomEntry(id: ids.make(.roomEntry), room: room.id, kind: .turn, speaker: "cl_a", text: "new turn", createdAt: 350)
            try await store.appendRoomEntry(oldEntry)
            try await store.appendRoomEntry(newEntry)

            // One at a time, oldest first, then nothing more.
            #expect(try await store.purge(createdBefore: 301, limit: 1) == PurgeResult(messages: 1, roomEntries: 1))
            #expect(try await store.message(id: old.id, conversation: conversation.id) == nil)
            #expect(try await store.message(id: older.id, conversation: conversation.id) == older)
            #expect(try await store.purge(createdBefore: 301, limit: 1) == PurgeResult(messages: 1, roomEntries: 0))
            #expect(try await store.purge(createdBefore: 301, limit: 1) == PurgeResult())
            #expect(try await store.messages(conversation: conversation.id, limit: 10, before: nil) == [kept, edge, fresh])
            #expect(try await store.roomEntries(room: room.id, limit: 10, before: nil) == [newEntry])
            // Unsaving hands the message back to retention.
            #expect(try await store.setMessageSaved(id: kept.id, conversation: conversation.id, saved: false))
            #expect(try await store.purge(createdBefore: 301, limit: 10) == PurgeResult(messages: 1, roomEntries: 0))
            #expect(try await store.conversation(id: conversation.id, owner: "alice") != nil, "the conversation itself stays")
        }
    }

    @Test(arguments: Backend.all)
    func roomsByOwnerAndTheAuditLogPageInOrder(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let rooms = [makeRoom(owner: "alice"), makeRoom(owner: "bob"), makeRoom(owner: "alice"), makeRoom(owner: "alice")]
            for room in rooms { try await store.createRoom(room) }
            let mine = rooms.filter { $0.owner == "alice" }
            #expect(try await store.rooms(owner: "alice", limit: 2, after: nil) == Array(mine.prefix(2)))
            #expect(try await store.rooms(owner: "alice", limit: 2, after: mine[1].id) == [mine[2]])

            let events = (0..<5).map {
                AuditEvent(
                    id: ids.make(.audit), at: Int64(1_000 + $0), actor: "alice", action: "clone.deleted", target: "cl_\($0)",
                    ipHash: $0 == 0 ? nil : "ff\($0)", detail: ["n": "\($0)"])
            }
            for event in events { try await store.appendAudit(event) }
            #expect(try await store.auditEvents(limit: 3, before: nil, involving: nil) == Array(events.reversed().prefix(3)))
            #expect(try await store.auditEvents(limit: 3, before: events[2].id, involving: nil) == [events[1], events[0]])
        }
    }

    /// A user's own audit events (their export) are those they did or that were done to them,
    /// paged like the whole log; the age purge takes the oldest first, in batches, and nothing newer.
    @Test(arguments: Backend.all)
    func theAuditLogIsReadPerUserAndPurgedByAge(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let events = [("alice", nil), ("root", "alice"), ("bob", nil), ("root", "bob"), ("alice", "cl_1"), ("bob", "alice")].enumerated().map {
                AuditEvent(
                    id: ids.make(.audit), at: Int64(1_000 * ($0.offset + 1)), actor: $0.element.0, action: "x", target: $0.element.1, ipHash: nil)
            }
            for event in events { try await store.appendAudit(event) }
            let alices = events.filter { $0.actor == "alice" || $0.target == "alice" }.reversed()
            #expect(try await store.auditEvents(limit: 10, before: nil, involving: "alice") == Array(alices))
            #expect(try await store.auditEvents(limit: 2, before: events[4].id, involving: "alice") == [events[1], events[0]])
            #expect(try await store.auditEvents(limit: 10, before: nil, involving: "carol") == [])

            #expect(try await store.purgeAudit(before: 3_500, limit: 2) == 2)
            #expect(try await store.purgeAudit(before: 3_500, limit: 2) == 1)
            #expect(try await store.purgeAudit(before: 3_500, limit: 2) == 0)
            #expect(try await store.auditEvents(limit: 10, before: nil, involving: nil) == Array(events.suffix(3).reversed()))
        }
    }

    /// Signed-out sessions (#28): by name, or every one issued before a time (the latest such
    /// time kept); one user's never another's; gone with the account.
    @Test(arguments: Backend.all)
    func signedOutSessionsAreKeptPerUser(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            #expect(try await store.sessionRevocations(user: "alice") == SessionRevocations())
            try await store.revokeSessions(user: "alice", session: "ses_a", at: 10)
            try await store.revokeSessions(user: "alice", session: "ses_a", at: 20)
            try await store.revokeSessions(user: "alice", session: nil, at: 100)
            try await store.revokeSessions(user: "alice", session: nil, at: 50)
            try await store.revokeSessions(user: "bob", session: "ses_b", at: 10)
            #expect(try await store.sessionRevocations(user: "alice") == SessionRevocations(sessions: ["ses_a"], allBefore: 100))
            #expect(try await store.sessionRevocations(user: "bob") == SessionRevocations(sessions: ["ses_b"]))
            _ = try await store.deleteUser("alice", pseudonym: "deleted:0a0a")
            #expect(try await store.sessionRevocations(user: "alice") == SessionRevocations())
            #expect(try await store.sessionRevocations(user: "bob") == SessionRevocations(sessions: ["ses_b"]))
        }
    }
}
