import Foundation

public struct FixtureError: Error, CustomStringConvertible {
    public var description: String
}

/// A real nats-server (Debian's, installed by `scripts/setup.sh --test`) with JetStream on, on
/// a free loopback port, its store in a temporary directory; `stop` ends it and removes the store.
public final class NATSServer: @unchecked Sendable {
    private(set) var process = Process()
    public let directory: String
    public private(set) var url = ""

    public init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("parley-nats-\(UUID().uuidString)").path
        url = try launch(port: "-1")
    }

    /// Kills the server (SIGKILL: what it had not handled is lost) and starts another on the
    /// same port and store.
    public func restart() throws {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        process = Process()
        guard let port = url.split(separator: ":").last else { throw FixtureError(description: "no port in \(url)") }
        _ = try launch(port: String(port))
    }

    private func launch(port: String) throws -> String {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", directory]
        let output = Pipe()
        process.standardError = output
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        var text = ""
        while !text.contains("Server is ready") {
            let chunk = output.fileHandleForReading.availableData
            guard !chunk.isEmpty else {
                throw FixtureError(description: "nats-server exited: \(text) (install it with scripts/setup.sh --test)")
            }
            text += String(decoding: chunk, as: UTF8.self)
        }
        guard let line = text.split(separator: "\n").first(where: { $0.contains("Listening for client connections on ") }),
            let port = line.split(separator: ":").last.map({ String($0).trimmingCharacters(in: .whitespaces) })
        else { throw FixtureError(description: "nats-server printed no client port: \(text)") }
        // Keep reading its log so the pipe never fills and blocks it: on a thread of its own,
        // blocking until the server exits. Not with `readabilityHandler`, whose dispatch source,
        // torn down as the process ends, crashed a test run in libdispatch's
        // `_dispatch_event_loop_drain` on Linux (swift-corelibs-foundation PR #5507).
        // read(2) on a descriptor of its own, retried on EINTR: FileHandle.availableData traps on
        // an interrupted read (a signal during a test run's backtrace did that).
        let log = fcntl(output.fileHandleForReading.fileDescriptor, F_DUPFD_CLOEXEC, 0)
        Thread.detachNewThread {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = read(log, &buffer, buffer.count)
                if n > 0 || (n < 0 && errno == EINTR) { continue }
                break
            }
            close(log)
        }
        return "nats://127.0.0.1:\(port)"
    }

    /// A test that failed before `stop` leaves no server running behind it.
    deinit {
        if process.isRunning { process.terminate() }
    }

    public func stop() {
        process.terminate()
        process.waitUntilExit()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
