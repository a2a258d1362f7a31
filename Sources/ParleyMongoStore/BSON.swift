import CMongo
import ParleyCore
import ParleyStore

/// Owns one `bson_t` for its whole life: built from extended JSON, or handed to a driver call to
/// fill (an "out" document). `deinit` destroys it, so no path can leak or double-free one.
final class BSONDocument {
    /// Swift imports `bson_t` as opaque (it is declared 128-byte aligned).
    let pointer: OpaquePointer
    /// Memory we allocated ourselves (out documents); libbson frees its own heap documents.
    private let ownsStorage: Bool
    private var initialized: Bool

    /// Parses MongoDB extended JSON (canonical or relaxed), e.g. `{"$numberLong":"7"}`.
    init(json: String) throws(StoreError) {
        var error = bson_error_t()
        guard let document = bson_new_from_json(json, -1, &error) else {
            throw StoreError.backend("cannot encode BSON: \(error.messageText)")
        }
        pointer = document
        ownsStorage = false
        initialized = true
    }

    convenience init(_ value: JSONValue) throws(StoreError) {
        try self.init(json: value.serializedString())
    }

    /// Aligned, uninitialised storage for a driver call that initialises it (e.g. a `reply`).
    private init(uninitialized: ()) {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: parley_bson_size(), alignment: parley_bson_alignment())
        pointer = OpaquePointer(raw)
        ownsStorage = true
        initialized = false
    }

    /// Runs `body` with an out document it must initialise (mongoc always does, even on error).
    static func output<T>(_ body: (OpaquePointer) throws -> T) rethrows -> (T, BSONDocument) {
        let document = BSONDocument(uninitialized: ())
        let result = try body(document.pointer)
        document.initialized = true
        return (result, document)
    }

    deinit {
        if initialized { bson_destroy(pointer) }
        if ownsStorage { UnsafeMutableRawPointer(pointer).deallocate() }
    }

    /// The document as relaxed extended JSON, parsed. 64-bit integers stay exact.
    func json() throws(StoreError) -> JSONValue {
        var length = 0
        guard let text = bson_as_relaxed_extended_json(pointer, &length) else {
            throw StoreError.backend("cannot decode BSON")
        }
        defer { bson_free(text) }
        let bytes = UnsafeRawBufferPointer(start: text, count: length)
        do {
            return try JSONValue.parse(bytes)
        } catch {
            throw StoreError.backend("cannot parse the BSON's JSON form: \(error)")
        }
    }
}

extension bson_error_t {
    var messageText: String {
        withUnsafeBytes(of: message) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }
}

extension JSONValue {
    /// A 64-bit integer in canonical extended JSON, so BSON stores an int64 whatever its size.
    static func long(_ value: Int64) -> JSONValue {
        .object([("$numberLong", .string(String(value)))])
    }
}
