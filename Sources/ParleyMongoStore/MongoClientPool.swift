import CMongo
#if canImport(Glibc)
import Glibc
#endif
import ParleyCore
import ParleyStore

/// Owns the process's `mongoc_client_pool_t` and its URI. Clients are popped for one command
/// and pushed back at once, from any thread (the pool is thread-safe).
package final class MongoClientPool: @unchecked Sendable {
    private static let initialized: Bool = {
        mongoc_init()
        // The driver logs every monitoring event by default; keep warnings and worse.
        mongoc_log_set_handler(
            { level, domain, message, _ in
                guard level.rawValue <= MONGOC_LOG_LEVEL_WARNING.rawValue, let message else { return }
                let line = Array("mongoc \(domain.map { String(cString: $0) } ?? ""): \(String(cString: message))\n".utf8)
                _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            }, nil)
        return true
    }()

    private let uri: OpaquePointer
    private let pool: OpaquePointer
    let database: String

    /// `socketTimeoutMS`: how long a command may wait for the server's answer, unless the URI
    /// says (nil: libmongoc's default, 300 s).
    package init(uri text: String, serverSelectionTimeoutMS: Int32 = 5_000, socketTimeoutMS: Int32? = nil) throws(StoreError) {
        _ = Self.initialized
        var error = bson_error_t()
        guard let uri = mongoc_uri_new_with_error(text, &error) else {
            throw StoreError.backend("invalid MongoDB URI: \(error.messageText)")
        }
        if mongoc_uri_get_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, 0) == 0 {
            mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, serverSelectionTimeoutMS)
        }
        if let socketTimeoutMS, !mongoc_uri_has_option(uri, MONGOC_URI_SOCKETTIMEOUTMS) {
            mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SOCKETTIMEOUTMS, socketTimeoutMS)
        }
        if mongoc_uri_get_option_as_utf8(uri, MONGOC_URI_APPNAME, nil) == nil {
            mongoc_uri_set_appname(uri, "parley")
        }
        guard let pool = mongoc_client_pool_new(uri) else {
            mongoc_uri_destroy(uri)
            throw StoreError.backend("cannot create a MongoDB client pool for \(text)")
        }
        mongoc_client_pool_set_error_api(pool, 2)
        self.uri = uri
        self.pool = pool
        database = mongoc_uri_get_database(uri).map { String(cString: $0) } ?? "parley"
    }

    deinit {
        mongoc_client_pool_destroy(pool)
        mongoc_uri_destroy(uri)
    }

    /// Runs one database command and returns the server's reply. A reply with `ok: 0` or a
    /// network failure throws `MongoCommandError`; `writeErrors` inside an `ok: 1` reply do not
    /// (the caller interprets them).
    package func command(_ command: JSONValue, database: String? = nil) throws -> JSONValue {
        let document = try BSONDocument(command)
        guard let client = mongoc_client_pool_pop(pool) else {
            throw StoreError.backend("no MongoDB client available")
        }
        defer { mongoc_client_pool_push(pool, client) }
        var error = bson_error_t()
        let (ok, reply) = BSONDocument.output { reply in
            mongoc_client_command_simple(client, database ?? self.database, document.pointer, nil, reply, &error)
        }
        guard ok else {
            throw MongoCommandError(domain: error.domain, code: error.code, message: error.messageText)
        }
        return try reply.json()
    }
}

/// A command that failed in the driver or on the server.
struct MongoCommandError: Error, CustomStringConvertible {
    var domain: UInt32
    var code: UInt32
    var message: String

    var description: String { "MongoDB error \(code) (domain \(domain)): \(message)" }

    var isDuplicateKey: Bool { code == 11000 || code == 11001 }

    /// The server has no disk left to write on (`OutOfDiskSpace`).
    var isOutOfDiskSpace: Bool { code == 14031 }

    /// Failures worth retrying: the network, server selection, or a primary going away.
    var isTransient: Bool {
        if domain == MONGOC_ERROR_STREAM.rawValue || domain == MONGOC_ERROR_SERVER_SELECTION.rawValue { return true }
        return Self.transientCodes.contains(code)
    }

    static let transientCodes: Set<UInt32> = [6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436]
}
