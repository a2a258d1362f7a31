import Foundation

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

    /// A fresh database's URI.
    public static func uri() -> String {
        let database = "parley_test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(16).lowercased()
        if let query = baseURI.firstIndex(of: "?") {
            return baseURI[..<query] + "/" + database + baseURI[query...]
        }
        return baseURI + "/" + database
    }

    /// The Python wire server. Its stdin stays open as long as this process lives; when the test
    /// process exits, the pipe closes and the server exits with it.
    enum WireServer {
        nonisolated(unsafe) static var keepAlive: Pipe?
        nonisolated(unsafe) static var process: Process?

        static func start() -> String {
            let script = URL(fileURLWithPath: #filePath)
                .deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("fixtures/mongo_wire_server.py").path
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["python3", script, "--port", "0"]
            let stdin = Pipe()
            let stdout = Pipe()
            process.standardInput = stdin
            process.standardOutput = stdout
            do {
                try process.run()
            } catch {
                fatalError("cannot start the MongoDB wire test server (python3 \(script)): \(error)")
            }
            var line = Data()
            while !line.contains(UInt8(ascii: "\n")) {
                let chunk = stdout.fileHandleForReading.availableData
                if chunk.isEmpty {
                    fatalError("the MongoDB wire test server exited; run `pip install -r Tests/interop/requirements.txt`")
                }
                line += chunk
            }
            let text = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            guard text.hasPrefix("listening on "), let port = Int(text.dropFirst("listening on ".count)) else {
                fatalError("unexpected output from the MongoDB wire test server: \(text)")
            }
            keepAlive = stdin
            self.process = process
            return "mongodb://127.0.0.1:\(port)"
        }
    }
}
