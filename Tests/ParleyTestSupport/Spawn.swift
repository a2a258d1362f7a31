#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ParleySidecar

/// A server the tests start (the MongoDB wire server, nats-server): spawned with ParleySidecar's
/// `ChildProcess`, in a process group of its own, its stdout and stderr on a pipe read here.
///
/// Not with Foundation's `Process`: its `run()` reads `/proc/self/fd` past the end of a buffer on
/// Linux and now and then crashed the test process with a SIGSEGV, whose backtrace of a
/// thousand threads then held the whole run still for minutes (swift-corelibs-foundation
/// PR #5472, not in Swift 6.3.1).
enum Spawn {
    /// Starts `arguments` and reads what it prints until `ready` finds what it waits for in all
    /// of it so far; the rest is read on a thread of its own until the child closes its end (so
    /// the pipe never fills and blocks the child) and, when `echo`, copied to this process's
    /// stderr. Throws with what it printed when it exits before.
    static func start<T>(
        _ arguments: [String], echo: Bool = false, until ready: (String) -> T?
    ) throws -> (ChildProcess, T) {
        let (reader, writer) = try ChildProcess.closeOnExecPipe()
        let child: ChildProcess
        do {
            child = try ChildProcess.spawn(arguments: arguments, output: writer)
            close(writer)
        } catch {
            close(reader)
            close(writer)
            throw FixtureError(description: "\(error)")
        }
        var printed: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            if let found = ready(String(decoding: printed, as: UTF8.self)) {
                Thread.detachNewThread { drain(reader, echo: echo) }
                return (child, found)
            }
            let n = read(reader, &buffer, buffer.count)
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                close(reader)
                child.signalGroup(SIGKILL)
                throw FixtureError(description: "\(arguments.joined(separator: " ")) exited: \(String(decoding: printed, as: UTF8.self))")
            }
            printed += buffer[..<n]
        }
    }

    private static func drain(_ descriptor: Int32, echo: Bool) {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(descriptor, &buffer, buffer.count)
            if n > 0 {
                if echo { _ = buffer.withUnsafeBytes { write(2, $0.baseAddress, n) } }
                continue
            }
            if n < 0, errno == EINTR { continue }
            break
        }
        close(descriptor)
    }
}
