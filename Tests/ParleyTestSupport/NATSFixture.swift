import Foundation
import ParleySidecar

public struct FixtureError: Error, CustomStringConvertible {
    public var description: String
}

/// A real nats-server (Debian's, installed by `scripts/setup.sh --test`) with JetStream on, on
/// a free loopback port, its store in a temporary directory; `stop` ends it and removes the store.
public final class NATSServer: @unchecked Sendable {
    private var child: ChildProcess
    public let directory: String
    public private(set) var url = ""

    public init() throws {
        directory = Scratch.path("nats")
        (child, url) = try Self.launch(port: "-1", directory: directory)
    }

    /// Kills the server (SIGKILL: what it had not handled is lost) and, once it is gone, starts
    /// another on the same port and store.
    public func restart() async throws {
        child.signalGroup(SIGKILL)
        _ = await child.exited()
        guard let port = url.split(separator: ":").last else { throw FixtureError(description: "no port in \(url)") }
        (child, url) = try Self.launch(port: String(port), directory: directory)
    }

    private static func launch(port: String, directory: String) throws -> (ChildProcess, String) {
        // It logs to stderr: the line naming its client port comes before "Server is ready".
        try Spawn.start(["nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", directory]) { text -> String? in
            guard text.contains("Server is ready"),
                let line = text.split(separator: "\n").first(where: { $0.contains("Listening for client connections on ") }),
                let port = line.split(separator: ":").last.map({ String($0).trimmingCharacters(in: .whitespaces) })
            else { return nil }
            return "nats://127.0.0.1:\(port)"
        }
    }

    /// A test that failed before `stop` leaves no server running behind it.
    deinit {
        child.signalGroup(SIGKILL)
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Ends the server (SIGTERM, SIGKILL after 5 s) and returns once it has exited.
    public func stop() async {
        _ = await child.stop(grace: .seconds(5))
        try? FileManager.default.removeItem(atPath: directory)
    }
}
