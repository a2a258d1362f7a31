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
