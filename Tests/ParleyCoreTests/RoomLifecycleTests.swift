import ParleyCore
import Testing

/// The moderator's controls as a pure state machine: no sockets, no store.
@Suite struct RoomLifecycleTests {
    func room(_ status: Room.Status, kind: Room.Kind = .debate, policy: Room.TurnPolicy = .roundRobin) -> Room {
        Room(
            id: "rm_1", kind: kind, owner: "mod", topic: "Is cheese a dessert?",
            debaters: [Room.Debater(clone: "a", stance: "yes", name: "Ada"), Room.Debater(clone: "b", stance: "no", name: "Bob")],
            rounds: 2, policy: policy, maxTokensPerTurn: 50, visibility: .link, status: status, createdAt: 0, updatedAt: 0)
    }

    func apply(_ action: RoomAction, target: String? = nil, _ room: Room, speaking: String? = nil) -> Result<RoomControl, FrameError> {
        RoomLifecycle.apply(action, target: target, to: room, speaking: speaking, now: 42)
    }

    /// Which status each turn action needs, and where it leads; every other status is a conflict.
    @Test(arguments: [
        (RoomAction.start, Room.Status.open, Room.Status.running, "started"),
        (.resume, .paused, .running, "resumed"),
        (.pause, .running, .paused, "paused"),
        (.next, .running, .running, "next"),
    ])
    func aTurnActionMovesTheRoomFromOneStatusOnly(_ action: RoomAction, from: Room.Status, to: Room.Status, event: String) throws {
        for status in Room.Status.allCases {
            let outcome = apply(action, room(status))
            if status == from {
                let control = try outcome.get()
                #expect(control.room.status == to && control.event == event && control.room.updatedAt == 42)
                #expect(control.startsLoop == (action != .pause))
                #expect(control.stopsTurn == (action == .pause || action == .next))
            } else {
                guard case .failure(let error) = outcome else {
                    Issue.record("\(action) from \(status) was allowed")
                    continue
                }
                #expect(error.code == .conflict, "\(action) from \(status)")
            }
        }
    }

    @Test func endStopsEveryStreamFromAnyStatusButOnce() throws {
        for status in [Room.Status.open, .running, .paused] {
            let control = try apply(.end, room(status)).get()
            #expect(control.room.status == .ended && control.event == "ended" && control.stopsAllStreams && !control.startsLoop)
        }
        guard case .failure(let error) = apply(.end, room(.ended)) else {
            Issue.record("ended twice")
            return
        }
        #expect(error.code == .conflict && error.message == "room rm_1 already ended")
    }

    @Test func nextSkipsTheSpeakerOrHandsTheTurnToTheModeratorsChoice() throws {
        #expect(try apply(.next, room(.running), speaking: "a").get().nextSpeaker == "b", "a cut-short turn is not given back")
        #expect(try apply(.next, room(.running)).get().nextSpeaker == nil)
        let chosen = try apply(.next, target: "a", room(.running, policy: .moderator), speaking: "a").get()
        #expect(chosen.nextSpeaker == "a" && chosen.subject == .clone("a"))
        guard case .failure(let unknown) = apply(.next, target: "zz", room(.running)),
            case .failure(let unnamed) = apply(.next, room(.running, policy: .moderator))
        else {
            Issue.record("allowed")
            return
        }
        #expect(unknown.code == .notFound && unnamed.code == .badRequest)
    }

    @Test func muteUnmuteAndKickNameTheirSubjectAndSpareTheModerator() throws {
        let muted = try apply(.mute, target: "a", room(.running)).get()
        #expect(muted.room.muted == ["a"] && muted.subject == .clone("a") && !muted.startsLoop)
        #expect(try apply(.mute, target: "a", muted.room).get().room.muted == ["a"], "muting twice mutes once")
        let unmuted = try apply(.unmute, target: "a", muted.room).get()
        #expect(unmuted.room.muted.isEmpty && unmuted.startsLoop, "a running room's loop may have waited for the clone")
        #expect(try apply(.unmute, target: "a", room(.paused)).get().startsLoop == false)
        let viewer = try apply(.mute, target: "vic", room(.open)).get()
        #expect(viewer.subject == .user("vic"))
        let kicked = try apply(.kick, target: "vic", room(.running)).get()
        #expect(kicked.room.kicked == ["vic"] && kicked.kickedUser == "vic" && kicked.event == "kicked")
        for action in [RoomAction.mute, .kick] {
            guard case .failure(let error) = apply(action, target: "mod", room(.running)) else {
                Issue.record("\(action) the moderator")
                continue
            }
            #expect(error.code == .badRequest)
        }
    }

    @Test func aTranslationChatHasNoTurnsButCanBeModerated() throws {
        let chat = room(.open, kind: .translation)
        for action in [RoomAction.start, .pause, .resume, .next, .regenerate] {
            guard case .failure(let error) = apply(action, chat) else {
                Issue.record("\(action) in a translation chat")
                continue
            }
            #expect(error.code == .badRequest)
        }
        #expect(try apply(.end, chat).get().room.status == .ended)
        #expect(try apply(.kick, target: "bruno", chat).get().kickedUser == "bruno")
    }

    /// Regenerate runs the last turn again between turns of a running or paused room, leaving
    /// its status as it was; the live room finds that turn.
    @Test func regenerateNeedsARunningOrPausedRoomBetweenTurns() throws {
        for status in [Room.Status.running, .paused] {
            let control = try apply(.regenerate, room(status)).get()
            #expect(control.regeneratesLastTurn && control.startsLoop && control.event == "regenerating")
            #expect(control.room.status == status && !control.stopsTurn)
        }
        for status in [Room.Status.open, .ended] {
            guard case .failure(let error) = apply(.regenerate, room(status)) else {
                Issue.record("regenerate in \(status)")
                return
            }
            #expect(error.code == .conflict)
        }
        guard case .failure(let error) = apply(.regenerate, room(.running), speaking: "a") else {
            Issue.record("while a turn streams")
            return
        }
        #expect(error.code == .conflict && error.message.contains("pause"))
    }

    @Test func aRegeneratedTurnTakesThePlaceOfTheOneItReplaces() {
        let first = RoomEntry(id: "re_1", room: "rm_1", kind: .turn, speaker: "a", text: "one", createdAt: 1, reason: .complete)
        let said = RoomEntry(id: "re_2", room: "rm_1", kind: .said, speaker: "u", text: "hm", createdAt: 2)
        let again = RoomEntry(id: "re_3", room: "rm_1", kind: .turn, speaker: "a", text: "two", createdAt: 3, reason: .complete, source: "re_1")
        let translation = RoomEntry(id: "re_4", room: "rm_1", kind: .translation, speaker: "u", text: "hm!", createdAt: 4, source: "re_2")
        #expect(RoomEntry.current([first, said, again, translation]) == [said, again, translation])
        #expect(RoomEntry.current([first, said]) == [first, said])
        let debate = room(.running)
        #expect(TurnTaking.next(room: debate, transcript: [first, said, again], requested: nil) == "b")
    }
}
