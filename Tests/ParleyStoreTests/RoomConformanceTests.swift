import ParleyCore
import ParleyStore
import Testing

func makeRoom(owner: String = "mod", status: Room.Status = .open) -> Room {
    Room(
        id: ids.make(.room), owner: owner, topic: "Tea or coffee?",
        debaters: [Room.Debater(clone: "cl_a", stance: "tea", name: "Ada"), Room.Debater(clone: "cl_b", stance: "", name: "Bob")],
        rounds: 2, policy: .natural, maxTokensPerTurn: 120, visibility: .link, status: status, createdAt: 1_000, updatedAt: 1_000)
}

@Suite("Room conformance") struct RoomConformanceTests {
    @Test(arguments: Backend.all)
    func roomsRoundTripAndUpdate(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            var room = makeRoom()
            try await store.createRoom(room)
            #expect(try await store.room(id: room.id) == room)
            #expect(try await store.room(id: "rm_missing") == nil)
            room.status = .running
            room.turnsTaken = 3
            room.muted = ["cl_b", "vic"]
            room.kicked = ["eve"]
            room.updatedAt = 2_000
            #expect(try await store.updateRoom(room))
            #expect(try await store.room(id: room.id) == room)
            var foreign = room
            foreign.owner = "someone-else"
            #expect(try await store.updateRoom(foreign) == false, "only the moderator's room is updated")
            await #expect(throws: StoreError.self) { try await store.createRoom(room) }
        }
    }

    @Test(arguments: Backend.all)
    func roomsByStatusPageInCreationOrder(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let rooms = [makeRoom(status: .running), makeRoom(status: .paused), makeRoom(status: .running), makeRoom(status: .running)]
            for room in rooms { try await store.createRoom(room) }
            #expect(try await store.rooms(statuses: [.running], limit: 10, after: nil).map(\.id) == [rooms[0].id, rooms[2].id, rooms[3].id])
            #expect(try await store.rooms(statuses: [.running], limit: 1, after: rooms[0].id).map(\.id) == [rooms[2].id])
            #expect(try await store.rooms(statuses: [], limit: 10, after: nil).isEmpty)
        }
    }

    @Test(arguments: Backend.all)
    func transcriptsPageNewestLastAndKeepEveryField(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let room = makeRoom()
            try await store.createRoom(room)
            var entries: [RoomEntry] = []
            for i in 0..<5 {
                let entry =
                    i % 2 == 0
                    ? RoomEntry(
                        id: ids.make(.roomEntry), room: room.id, kind: .turn, speaker: "cl_a", text: "turn \(i)", createdAt: Int64(i),
                        reason: i == 4 ? .cancelled : .complete, stream: "st_\(i)")
                    : RoomEntry(id: ids.make(.roomEntry), room: room.id, kind: .said, speaker: "vic", text: "said \(i)", createdAt: Int64(i))
                try await store.appendRoomEntry(entry)
                entries.append(entry)
            }
            #expect(try await store.roomEntries(room: room.id, limit: 10, before: nil) == entries)
            #expect(try await store.roomEntries(room: room.id, limit: 2, before: nil) == Array(entries[3...]))
            #expect(try await store.roomEntries(room: room.id, limit: 2, before: entries[3].id) == Array(entries[1...2]))
            #expect(try await store.roomEntries(room: "rm_other", limit: 10, before: nil).isEmpty)
            #expect(entries[4].interrupted && !entries[0].interrupted)
        }
    }

    @Test(arguments: Backend.all)
    func translationChatsKeepMembersLanguagesAndLinkedTranslations(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let en = LanguageTag("en")!, pt = LanguageTag("pt-BR")!
            var room = Room(
                id: ids.make(.room), kind: .translation, owner: "alice", topic: "", debaters: [Room.Debater(clone: "cl_z", stance: "", name: "Zoé")],
                rounds: 0, policy: .roundRobin, maxTokensPerTurn: 0, visibility: .private, members: ["bruno", "chen", "ann.lee@example.com"],
                // A user id may hold dots (an e-mail as subject): MongoDB keeps it as a field name.
                languages: ["alice": en, "cl_z": LanguageTag("fr")!, "ann.lee@example.com": pt], createdAt: 1_000, updatedAt: 1_000)
            try await store.createRoom(room)
            #expect(try await store.room(id: room.id) == room)
            room.languages["bruno"] = pt
            room.updatedAt = 2_000
            #expect(try await store.updateRoom(room))
            #expect(try await store.room(id: room.id)?.languages["bruno"] == pt)
            #expect(try await store.room(id: room.id) == room)

            let said = RoomEntry(id: ids.make(.roomEntry), room: room.id, kind: .said, speaker: "alice", text: "Hello", createdAt: 1, lang: en)
            let translated = RoomEntry(
                id: ids.make(.roomEntry), room: room.id, kind: .translation, speaker: "alice", text: "Olá", createdAt: 2,
                reason: .complete, stream: "st_1", lang: pt, source: said.id)
            let reply = RoomEntry(
                id: ids.make(.roomEntry), room: room.id, kind: .turn, speaker: "cl_z", text: "Salut", createdAt: 3,
                reason: .complete, stream: "st_2", lang: LanguageTag("fr")!)
            let replyTranslated = RoomEntry(
                id: ids.make(.roomEntry), room: room.id, kind: .translation, speaker: "cl_z", text: "Hi", createdAt: 4,
                reason: .cancelled, stream: "st_3", lang: en, source: reply.id, speakerIsClone: true)
            for entry in [said, translated, reply, replyTranslated] { try await store.appendRoomEntry(entry) }
            let back = try await store.roomEntries(room: room.id, limit: 10, before: nil)
            #expect(back == [said, translated, reply, replyTranslated])
            #expect(back.map(\.speakerIsClone) == [false, false, true, true])
        }
    }
}
