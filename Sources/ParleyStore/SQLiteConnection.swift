import CSQLite
import ParleyCore

/// A value bound to or read from an SQLite statement.
public enum SQLValue: Sendable, Equatable {
    case null
    case int(Int64)
    case text(String)
    /// Bytes as they are (a voice clip's audio).
    case blob([UInt8])

    var int: Int64? { if case .int(let v) = self { v } else { nil } }
    var text: String? { if case .text(let v) = self { v } else { nil } }
    var blob: [UInt8]? { if case .blob(let v) = self { v } else { nil } }
}

/// One result row, read by column name (`row["created_at"]`), so a decoder does not depend on
/// the order of a SELECT's columns.
struct SQLRow: Sendable {
    /// Column name to position, shared by every row of one result.
    final class Columns: Sendable {
        let index: [String: Int]
        init(_ names: [String]) {
            index = Dictionary(names.enumerated().map { ($1, $0) }, uniquingKeysWith: { first, _ in first })
        }
    }

    let values: [SQLValue]
    let columns: Columns

    subscript(_ name: String) -> SQLValue {
        guard let position = columns.index[name] else {
            assertionFailure("no column '\(name)' in this result")
            return .null
        }
        return values[position]
    }
}

/// One SQLite connection. Owns the `sqlite3*` and every prepared statement. Not thread-safe:
/// it may move between threads, but its owner serialises every use (`SQLiteStore` holds it in a
/// `Mutex`), which is what the unchecked `Sendable` promises. Statements are prepared once and cached.
final class SQLiteConnection: @unchecked Sendable {
    private var handle: OpaquePointer?
    private var statements: [String: OpaquePointer] = [:]
    /// How many calls have failed for lack of space (`SQLITE_FULL`: a full disk or
    /// `max_page_count`), so the writer can tell a batch that ran out of space.
    private(set) var spaceFailures = 0

    init(path: String) throws {
        var db: OpaquePointer?
        let flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close_v2(db)
            throw StoreError.backend("cannot open SQLite database at \(path): \(message)")
        }
        handle = db
        sqlite3_extended_result_codes(db, 1)
    }

    deinit { close() }

    func close() {
        for statement in statements.values { sqlite3_finalize(statement) }
        statements.removeAll()
        if let handle { sqlite3_close_v2(handle) }
        handle = nil
    }

    /// Runs one or more statements that take no parameters (schema, pragmas).
    func exec(_ sql: String) throws {
        let db = try open()
        var error: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(db, sql, nil, nil, &error)
        if rc != SQLITE_OK {
            let message = error.map { String(cString: $0) } ?? "code \(rc)"
            sqlite3_free(error)
            throw failure(rc, "SQLite: \(message)")
        }
    }

    /// Runs one statement that takes no parameters and returns no rows (a transaction's `BEGIN`,
    /// `COMMIT`, `SAVEPOINT`…), prepared once and kept: `exec` parses its SQL on every call, and
    /// a chat reply's store calls begin and end about a dozen of them.
    func command(_ sql: String) throws {
        let db = try open()
        let statement = try prepared(sql, db)
        let rc = sqlite3_step(statement)
        guard rc == SQLITE_DONE else {
            let failure = error(db, rc)
            sqlite3_reset(statement)
            throw failure
        }
        sqlite3_reset(statement)
    }

    /// Runs a statement and returns its rows.
    @discardableResult
    func query(_ sql: String, _ params: [SQLValue] = []) throws -> [SQLRow] {
        let db = try open()
        let statement = try prepared(sql, db)
        defer {
            sqlite3_reset(statement)
            sqlite3_clear_bindings(statement)
        }
        for (i, param) in params.enumerated() {
            let index = Int32(i + 1)
            let rc: Int32 =
                switch param {
                case .null: sqlite3_bind_null(statement, index)
                case .int(let v): sqlite3_bind_int64(statement, index, v)
                case .text(let v): Self.bind(v, to: statement, at: index)
                case .blob(let v):
                    v.withUnsafeBytes { sqlite3_bind_blob64(statement, index, $0.baseAddress, sqlite3_uint64($0.count), parley_sqlite_transient()) }
                }
            guard rc == SQLITE_OK else { throw error(db, rc) }
        }
        let names = SQLRow.Columns((0..<sqlite3_column_count(statement)).map { String(cString: sqlite3_column_name(statement, $0)) })
        var rows: [SQLRow] = []
        while true {
            let rc = sqlite3_step(statement)
            if rc == SQLITE_DONE { break }
            guard rc == SQLITE_ROW else { throw error(db, rc) }
            let columns = sqlite3_column_count(statement)
            var row: [SQLValue] = []
            row.reserveCapacity(Int(columns))
            for c in 0..<columns {
                switch sqlite3_column_type(statement, c) {
                case SQLITE_NULL: row.append(.null)
                case SQLITE_INTEGER: row.append(.int(sqlite3_column_int64(statement, c)))
                case SQLITE_BLOB:
                    let count = Int(sqlite3_column_bytes(statement, c))
                    let bytes = sqlite3_column_blob(statement, c).map { Array(UnsafeRawBufferPointer(start: $0, count: count)) } ?? []
                    row.append(.blob(bytes))
                default:
                    // By its length, not up to a NUL: text may hold one (the text first, then its length, as SQLite asks).
                    if let text = sqlite3_column_text(statement, c) {
                        let count = Int(sqlite3_column_bytes(statement, c))
                        row.append(.text(String(decoding: UnsafeBufferPointer(start: text, count: count), as: UTF8.self)))
                    } else {
                        row.append(.null)
                    }
                }
            }
            rows.append(SQLRow(values: row, columns: names))
        }
        return rows
    }

    /// Binds `text` with its length in bytes: a length of -1 would make SQLite stop at the first
    /// NUL character, and "A\u{0}B" would be stored as "A".
    private static func bind(_ text: String, to statement: OpaquePointer, at index: Int32) -> Int32 {
        var text = text
        return text.withUTF8 { utf8 in
            // An empty buffer may have no address, and a NULL pointer would bind NULL, not "".
            guard let base = utf8.baseAddress, utf8.count > 0 else { return sqlite3_bind_text(statement, index, "", 0, parley_sqlite_transient()) }
            return base.withMemoryRebound(to: CChar.self, capacity: utf8.count) {
                sqlite3_bind_text64(statement, index, $0, sqlite3_uint64(utf8.count), parley_sqlite_transient(), UInt8(SQLITE_UTF8))
            }
        }
    }

    /// Rows changed by the last statement.
    var changes: Int { handle.map { Int(sqlite3_changes($0)) } ?? 0 }

    /// Rows changed since the connection opened.
    var totalChanges: Int64 { handle.map { sqlite3_total_changes64($0) } ?? 0 }

    /// Whether a transaction is open (the store's group commit runs every call inside one).
    var inTransaction: Bool { handle.map { sqlite3_get_autocommit($0) == 0 } ?? false }

    /// Runs `body` atomically: its own transaction, or a savepoint inside the one that is open;
    /// rolled back if it throws.
    func transaction<T>(_ body: () throws -> T) throws -> T {
        guard inTransaction else {
            try command("BEGIN IMMEDIATE")
            do {
                let result = try body()
                try command("COMMIT")
                return result
            } catch {
                try? command("ROLLBACK")
                throw error
            }
        }
        try command("SAVEPOINT atomic")
        do {
            let result = try body()
            try command("RELEASE atomic")
            return result
        } catch {
            try? command("ROLLBACK TO atomic")
            try? command("RELEASE atomic")
            throw error
        }
    }

    private func open() throws -> OpaquePointer {
        guard let handle else { throw StoreError.closed }
        return handle
    }

    private func prepared(_ sql: String, _ db: OpaquePointer) throws -> OpaquePointer {
        if let cached = statements[sql] { return cached }
        var statement: OpaquePointer?
        let rc = sqlite3_prepare_v3(db, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, nil)
        guard rc == SQLITE_OK, let statement else { throw error(db, rc) }
        statements[sql] = statement
        return statement
    }

    private func error(_ db: OpaquePointer, _ rc: Int32) -> StoreError {
        let message = String(cString: sqlite3_errmsg(db))
        if parley_sqlite_is_unique_violation(rc) != 0 {
            return .duplicateKey(message)
        }
        return failure(rc, "SQLite error \(rc): \(message)")
    }

    private func failure(_ rc: Int32, _ message: String) -> StoreError {
        // Extended result codes keep the primary code in the low byte.
        guard rc & 0xff == SQLITE_FULL else { return .backend(message) }
        spaceFailures += 1
        return .full(message)
    }
}
