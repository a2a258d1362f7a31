import Foundation
import ParleyCore
import ParleyMongoStore
import ParleyServer
import ParleySidecar

/// Where the MongoDB conformance run points: a real server when PARLEY_TEST_MONGODB_URI is set,
/// otherwise the wire-protocol test server in Tests/fixtures, started once for the whole run.
public enum MongoFixture {
    /// A base URI without a database; each test gets a database of its own.
    public static let baseURI: String = {
        if let real = ProcessInfo.processInfo.environment["PARLEY_TEST_MONGODB_URI"], !real.isEmpty {
            return real.hasSuffix("/") ? String(real.dropLast()) : real
        }
        return WireServer.start()
    }()

    public static var isRealServer: Bool {
        !(ProcessInfo.processInfo.environment["PARLEY_TEST_MONGODB_URI"] ?? "").isEmpty
    }

    /// A fresh database's URI, with `options` (`name=value` pairs) added to the base's own.
    public static func uri(options: [String] = []) -> String {
        let database = "parley_test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(16).lowercased()
        return uri(base: baseURI, database: database, options: options)
    }

    /// `base` (`mongodb://hosts[/][?options]`) naming `database`: its path replaced, its options
    /// kept and `options` appended to them.
    public static func uri(base: String, database: String, options: [String] = []) -> String {
        var hosts = Substring(base)
        var query: [Substring] = []
        if let mark = base.firstIndex(of: "?") {
            hosts = base[..<mark]
            query = base[base.index(after: mark)...].split(separator: "&")
        }
        // Past the scheme, a `/` starts the path: the database replaces it. A database named
        // there is also the one credentials are checked against, so it stays that as authSource.
        var authSource: [String] = []
        if let scheme = hosts.range(of: "://"), let slash = hosts[scheme.upperBound...].firstIndex(of: "/") {
            let path = hosts[hosts.index(after: slash)...]
            if !path.isEmpty, !query.contains(where: { $0.lowercased().hasPrefix("authsource=") }) { authSource = ["authSource=\(path)"] }
            hosts = hosts[..<slash]
        }
        let all = query.map(String.init) + authSource + options
        return hosts + "/" + database + (all.isEmpty ? "" : "?" + all.joined(separator: "&"))
    }

    /// The Python wire server. Its stdin stays open as long as this process lives; when the test
    /// process exits, the pipe closes and the server exits with it.
    enum WireServer {
        nonisolated(unsafe) static var process: ChildProcess?

        static func start() -> String {
            let script = URL(fileURLWithPath: #filePath)
                .deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("fixtures/mongo_wire_server.py").path
            do {
                // What it prints after its port (a traceback, say) goes on to the test's stderr.
                let (process, port) = try Spawn.start(["python3", script, "--port", "0"], echo: true) { text -> Int? in
                    let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast()  // the last is unfinished
                    guard let line = lines.first(where: { $0.hasPrefix("listening on ") }) else { return nil }
                    return Int(line.dropFirst("listening on ".count))
                }
                self.process = process
                // It runs one command at a time: when a full test run opens a hundred stores at
                // once, a driver's first answer can wait longer than the 5 s Parley allows a
                // real server (CI once failed eleven tests so on a loaded machine).
                return "mongodb://127.0.0.1:\(port)/?serverSelectionTimeoutMS=30000"
            } catch {
                fatalError("cannot start the MongoDB wire test server (run `pip install -r Tests/interop/requirements.txt`): \(error)")
            }
        }
    }
}

/// mongod's `failCommand` fail point (the wire test server implements the same subset).
extension MongoFixture {
    /// A server has one `failCommand` fail point, and arming it replaces what another test armed:
    /// tests that arm it, in any suite of the run, take this first, one at a time.
    package static let failPointLock = FIFOLock()

    /// A name of a test's own for its clients (their appName), so a fail point armed for it
    /// cannot hit the other tests running in parallel.
    package static func appName() -> String { "parley-test-" + String(UInt64.random(in: 0...UInt64.max), radix: 36) }

    /// A fresh database's URI whose clients carry an appName of their own (`appName`).
    package static func isolatedURI() -> (uri: String, app: String) {
        let app = appName()
        return (uri(options: ["appname=" + app]), app)
    }

    /// Fails the next `times` of `commands` from the clients of `app`. `blockTimeMS`: the command
    /// waits that long, then runs (mongod's `blockConnection`). `skip` and `dropReply` are the
    /// wire test server's own (tests that use them run there only): the first `skip` matching
    /// commands go through; the command runs and its reply is lost.
    package static func failNext(
        _ times: Int, _ commands: [String], app: String, errorCode: Int? = nil, closeConnection: Bool = false, blockTimeMS: Int? = nil,
        skip: Int = 0, dropReply: Bool = false
    ) throws {
        var data: [(String, JSONValue)] = [("failCommands", .array(commands.map(JSONValue.string))), ("appName", .string(app))]
        if let errorCode { data.append(("errorCode", .int(Int64(errorCode)))) }
        if closeConnection { data.append(("closeConnection", .bool(true))) }
        if let blockTimeMS { data += [("blockConnection", .bool(true)), ("blockTimeMS", .int(Int64(blockTimeMS)))] }
        if dropReply { data.append(("dropReply", .bool(true))) }
        var mode: [(String, JSONValue)] = [("times", .int(Int64(times)))]
        if skip > 0 { mode.append(("skip", .int(Int64(skip)))) }
        _ = try MongoClientPool(uri: uri()).command(
            .object([
                ("configureFailPoint", .string("failCommand")),
                ("mode", .object(mode)),
                ("data", .object(data)),
            ]), database: "admin")
    }

    package static func turnOffFailPoint() throws {
        _ = try MongoClientPool(uri: uri()).command(
            .object([("configureFailPoint", .string("failCommand")), ("mode", .string("off"))]), database: "admin")
    }
}
