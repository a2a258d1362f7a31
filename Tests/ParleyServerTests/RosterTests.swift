@testable import ParleyServer
import Testing

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
