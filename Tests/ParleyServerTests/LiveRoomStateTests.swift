import ParleyCore
@testable import ParleyServer
import Testing

/// Who a room in memory counts as in it (`LiveRoom.State`).
@Suite struct LiveRoomStateTests {
    let room = Room(
        id: "rm_1", owner: "mod", topic: "Is cheese a dessert?", debaters: [], rounds: 1, policy: .roundRobin, maxTokensPerTurn: 100,
        visibility: .link, createdAt: 0, updatedAt: 0)

    /// A join that lands after its socket's close was handled: nothing would ever remove that
    /// member again (and the room would never leave memory), so it does not become one.
    @Test func aSocketThatClosedDoesNotBecomeAMember() throws {
        let hub = SocketHub()
        let (ann, bob) = (try SocketHubTests.Socket("c1", user: "ann"), try SocketHubTests.Socket("c2", user: "bob"))
        for socket in [ann, bob] { #expect(hub.add(socket.connection)) }
        var state = LiveRoom.State(room: room, transcript: [])
        let annJoined = state.subscribe(ann.connection, hub: hub)
        hub.remove(bob.connection)  // bob's socket closed while his join was on its way
        let bobJoined = state.subscribe(bob.connection, hub: hub)
        #expect(annJoined && !bobJoined)
        #expect(state.users == ["ann"] && state.memberCount == 1 && state.members["c2"] == nil)
        #expect(hub.isSubscribed("c1", to: .room("rm_1")) && !hub.isSubscribed("c2", to: .room("rm_1")))
    }
}

/// A room's users, counted by their sockets and kept in order (`LiveRoom.Roster`).
@Suite struct RosterTests {
    @Test func aUserIsInWhileAnySocketOfTheirsIsAndTheListStaysInOrder() {
        var roster = LiveRoom.Roster()
        let firsts = ["mia", "ann", "zed", "ann", "bob"].map { roster.add($0) }
        #expect(firsts == [true, true, true, false, true], "ann's second socket is not her first")
        #expect(roster.users == ["ann", "bob", "mia", "zed"])
        let lasts = ["ann", "ann", "ann", "zed", "bob"].map { roster.remove($0) }
        #expect(lasts == [false, true, false, true, true], "ann keeps one socket, then none, then there is none to remove")
        #expect(roster.users == ["mia"] && !roster.contains("ann") && roster.contains("mia"))
    }

    /// Against the set it stands for, over many random joins and leaves.
    @Test func itAlwaysListsExactlyTheUsersWithASocketSorted() {
        var roster = LiveRoom.Roster()
        var sockets: [String: Int] = [:]
        var random = SystemRandomNumberGenerator()
        for _ in 0..<5_000 {
            let user = "u\(Int.random(in: 0..<60, using: &random))"
            if Bool.random(using: &random) {
                let first = roster.add(user)
                #expect(first == (sockets[user] == nil))
                sockets[user, default: 0] += 1
            } else {
                let last = roster.remove(user)
                #expect(last == (sockets[user] == 1))
                if let count = sockets[user] { sockets[user] = count == 1 ? nil : count - 1 }
            }
            #expect(roster.users == sockets.keys.sorted())
        }
    }
}
