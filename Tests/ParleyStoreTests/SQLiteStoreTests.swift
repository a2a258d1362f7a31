import CSQLite
import ParleyCore
@testable import ParleyStore
import Testing

/// What only the SQLite backend promises: durability across reopen and schema versioning.
@Suite struct SQLiteStoreTests {
    @Test func dataSurvivesCloseAndReopen() async throws {
        let path = temporaryPath("reopen") + "/parley.sqlite"
        let store = try await SQLiteStore.open(path: path)
        let clone = makeClone(owner: "alice")
        try await store.createClone(clone)
        try await store.close()

        let reopened = try await SQLiteStore.open(path: path)
        #expect(try await reopened.clone(id: clone.id, owner: "alice") == clone)
        try await reopened.close()
    }

    @Test func aNewerSchemaIsRefused() async throws {
        let path = temporaryPath("schema") + "/parley.sqlite"
        try await SQLiteStore.open(path: path).close()
        let connection = try SQLiteConnection(path: path)
        try connection.exec("PRAGMA user_version = \(SQLiteStore.schemaVersion + 1)")
        connection.close()

        await #expect(throws: StoreError.schemaTooNew(found: SQLiteStore.schemaVersion + 1, supported: SQLiteStore.schemaVersion)) {
            _ = try await SQLiteStore.open(path: path)
        }
    }

    @Test func theSchemaVersionIsRecorded() async throws {
        let path = temporaryPath("version") + "/parley.sqlite"
        try await SQLiteStore.open(path: path).close()
        let connection = try SQLiteConnection(path: path)
        defer { connection.close() }
        #expect(try connection.query("PRAGMA user_version").first?["user_version"] == .int(Int64(SQLiteStore.schemaVersion)))
        #expect(try connection.query("PRAGMA journal_mode").first?["journal_mode"] == .text("wal"))
    }

    @Test func anUnopenablePathIsAClearError() async throws {
        await #expect {
            _ = try await SQLiteStore.open(path: "/proc/definitely/not/here.sqlite")
        } throws: { error in
            "\(error)".contains("cannot open SQLite database")
        }
    }
}
