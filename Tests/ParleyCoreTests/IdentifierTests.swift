import ParleyCore
import Synchronization
import Testing

@Suite struct IdentifierTests {
    @Test func idsSortInCreationOrderWithinOneMillisecond() {
        let generator = IDGenerator(clock: { 1_700_000_000_000 })
        let ids = (0..<1000).map { _ in generator.make(.message) }
        #expect(ids == ids.sorted())
        #expect(Set(ids).count == ids.count)
    }

    @Test func idsSortAcrossMilliseconds() {
        let now = Mutex<UInt64>(1_700_000_000_000)
        let generator = IDGenerator(clock: { now.withLock { $0 } })
        var ids: [String] = []
        for _ in 0..<50 {
            ids.append(generator.make(.clone))
            now.withLock { $0 += 1 }
        }
        #expect(ids == ids.sorted())
    }

    @Test func idsHaveTheirKindsShape() {
        let id = IDGenerator().make(.conversation)
        #expect(id.hasPrefix("cv_"))
        #expect(IDGenerator.isValid(id, kind: .conversation))
        #expect(!IDGenerator.isValid(id, kind: .clone))
        #expect(!IDGenerator.isValid("cv_short", kind: .conversation))
    }

    @Test func roomAndRequestIdsAreUnguessableFromTheirNeighbours() {
        // One millisecond: the counter would make these consecutive; the CSPRNG must not.
        let generator = IDGenerator(clock: { 1_700_000_000_000 })
        let message = generator.make(.message)
        let rooms = (0..<1000).map { _ in generator.make(.room) }
        let requests = (0..<1000).map { _ in generator.make(.request) }
        let next = generator.make(.message)
        #expect(rooms == rooms.sorted(), "rooms still sort in creation order")
        #expect(rooms.allSatisfy { $0.split(separator: "_")[1].count == 52 && IDGenerator.isValid($0, kind: .room) })
        #expect(requests.allSatisfy { $0.split(separator: "_")[1].count == 36 })
        #expect(IDGenerator.isValid("rm_01JD3V6Q2M0000000000000ABC", kind: .room), "rooms made before stay valid")
        let randomParts = rooms.map { $0.split(separator: "_")[1].dropFirst(26) } + requests.map { $0.split(separator: "_")[1].dropFirst(10) }
        #expect(Set(randomParts).count == randomParts.count)
        // Request ids do not advance (so cannot reveal) the counter the other ids share.
        #expect(Self.counter(next) == Self.counter(message) + 1001)
        // 130 bits: every character of the random part takes many values across ids.
        for position in 0..<IDGenerator.randomCharacters {
            let values = Set(randomParts.map { Array($0.utf8)[position] })
            #expect(values.count > 25, "position \(position) is not random")
        }
    }

    private static func counter(_ id: String) -> UInt64 {
        let alphabet = Array("0123456789ABCDEFGHJKMNPQRSTVWXYZ".utf8)
        return id.split(separator: "_")[1].utf8.dropFirst(10).prefix(16).reduce(0) { $0 << 5 | UInt64(alphabet.firstIndex(of: $1)!) }
    }

    @Test(arguments: [
        (Int64(0), "1970-01-01T00:00:00.000Z"),
        (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
    ])
    func rfc3339(_ millis: Int64, _ expected: String) {
        #expect(Timestamp.rfc3339(millis: millis) == expected)
    }
}
