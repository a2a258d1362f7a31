import Foundation
import Logging
import ParleyCore
import Synchronization

/// One JSON object per log line on stderr (`--log-format json`), for log shippers:
/// `{"ts":"2026-12-02T01:20:00.123Z","level":"info","label":"parley","message":"listening","port":"8080",…}`.
/// Metadata keys sit beside the fixed ones (a key that collides with one is prefixed `meta_`).
/// Lines are written whole, one `write` each, so lines from several threads never interleave.
struct JSONLinesLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    private static let output = Mutex(FileHandle.standardError)
    private static let fixed: Set<String> = ["ts", "level", "label", "message", "source"]

    init(label: String, metadataProvider: Logger.MetadataProvider? = nil) {
        self.label = label
        self.metadataProvider = metadataProvider
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { $1 } }
        if let own = event.metadata { merged.merge(own) { $1 } }
        var fields: [(String, JSONValue)] = [
            ("ts", .string(Timestamp.rfc3339(millis: Int64(Timestamp.nowMillis())))),
            ("level", .string(event.level.rawValue)), ("label", .string(label)),
            ("message", .string(event.message.description)), ("source", .string(event.source)),
        ]
        for key in merged.keys.sorted() {
            fields.append((Self.fixed.contains(key) ? "meta_" + key : key, Self.json(merged[key]!)))
        }
        var line = JSONValue.object(fields).serialized()
        line.append(UInt8(ascii: "\n"))
        Self.output.withLock { $0.write(Data(line)) }
    }

    static func json(_ value: Logger.Metadata.Value) -> JSONValue {
        switch value {
        case .string(let text): .string(text)
        case .stringConvertible(let convertible): .string(convertible.description)
        case .array(let items): .array(items.map(json))
        case .dictionary(let entries): .object(entries.keys.sorted().map { ($0, json(entries[$0]!)) })
        }
    }
}
