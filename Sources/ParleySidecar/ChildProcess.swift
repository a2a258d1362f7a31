#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CSpawn
import Foundation
import NIOConcurrencyHelpers

/// How a child process ended.
public enum ExitStatus: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signalled(Int32)

    init(waitStatus status: Int32) {
        // WIFEXITED/WEXITSTATUS/WTERMSIG are macros, not imported into Swift.
        let signal = status & 0x7f
        self = signal == 0 ? .exited((status >> 8) & 0xff) : .signalled(signal)
    }

    public var description: String {
        switch self {
        case .exited(let code): "exit code \(code)"
        case .signalled(let signal): "signal \(signal)"
        }
    }
}

public struct SpawnError: Error, CustomStringConvertible {
    public var description: String
}

/// A child process in a process group of its own (so a stop reaches everything it started, and a
/// Ctrl-C in Parley's terminal reaches Parley only, which then stops it after its drain).
///
/// Its stdin is a pipe whose write end only this object holds: when Parley exits, even by
/// `kill -9`, the child reads end-of-file, which is how a sidecar knows to exit with it. Its
/// stdout and stderr go to a log file (a model server's logs would drown Parley's own), or to a
/// descriptor the caller gives (the tests read their servers' output so).
public final class ChildProcess: Sendable {
    public let pid: pid_t
    private let stdinWriter: Int32
    private let state = NIOLockedValueBox(State())

    private struct State {
        var status: ExitStatus?
        var waiters: [Int: CheckedContinuation<ExitStatus?, Never>] = [:]
        var nextWaiter = 0
    }

    /// Starts `arguments[0]` (looked up in PATH when it has no slash) with `arguments`,
    /// `inherited` (this process's environment when nil) without the variables `withheld` names,
    /// plus `environment`, stdout and stderr appended to `logPath`.
    public static func spawn(
        arguments: [String], environment: [String: String] = [:], inherited: [String: String]? = nil,
        withheld: @Sendable (String) -> Bool = { _ in false }, logPath: String
    ) throws -> ChildProcess {
        let log = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw SpawnError(description: "cannot open \(logPath): \(String(cString: strerror(errno)))") }
        defer { close(log) }
        return try spawn(arguments: arguments, environment: environment, inherited: inherited, withheld: withheld, output: log)
    }

    /// `spawn(…logPath:)` with the child's stdout and stderr on `output`, a descriptor the caller
    /// still owns (a pipe's write end, say, to read what the child prints).
    ///
    /// Foundation's `Process.run()` is not used: on Linux it reads `/proc/self/fd` past the end
    /// of a buffer and now and then crashes the process that spawns (swift-corelibs-foundation
    /// PR #5472, not in Swift 6.3.1).
    public static func spawn(
        arguments: [String], environment: [String: String] = [:], inherited: [String: String]? = nil,
        withheld: @Sendable (String) -> Bool = { _ in false }, output log: Int32
    ) throws -> ChildProcess {
        guard let program = arguments.first, !program.isEmpty else { throw SpawnError(description: "no command to run") }
        let stdin = try closeOnExecPipe()
        defer { close(stdin.reader) }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // The child keeps these three and nothing else: whatever this process holds when the
        // child starts (another thread's pipe made a moment ago included) is closed in it.
        posix_spawn_file_actions_adddup2(&actions, stdin.reader, 0)
        posix_spawn_file_actions_adddup2(&actions, log, 1)
        posix_spawn_file_actions_adddup2(&actions, log, 2)
        let closing = parley_spawn_file_actions_addclosefrom(&actions, 3)
        guard closing == 0 else {
            close(stdin.writer)
            throw SpawnError(description: "cannot spawn here: \(String(cString: strerror(closing)))")
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // A group of its own; signals at their defaults and none blocked (Parley ignores or
        // traps some, and exec keeps an ignored disposition).
        var all = sigset_t(), none = sigset_t()
        sigfillset(&all)
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        var env = (inherited ?? ProcessInfo.processInfo.environment).filter { !withheld($0.key) }
        for (key, value) in environment { env[key] = value }
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }

        var pid: pid_t = 0
        let result = posix_spawnp(&pid, program, &actions, &attributes, argv, envp)
        guard result == 0 else {
            close(stdin.writer)
            throw SpawnError(description: "cannot run \(program): \(String(cString: strerror(result)))")
        }
        return ChildProcess(pid: pid, stdinWriter: stdin.writer)
    }

    /// A pipe whose two ends are close-on-exec from the start (pipe2), so a child another
    /// thread spawns at that moment cannot inherit them.
    public static func closeOnExecPipe() throws -> (reader: Int32, writer: Int32) {
        var ends: [Int32] = [-1, -1]
        guard parley_pipe_cloexec(&ends) == 0 else { throw SpawnError(description: "pipe: \(String(cString: strerror(errno)))") }
        return (ends[0], ends[1])
    }

    private init(pid: pid_t, stdinWriter: Int32) {
        self.pid = pid
        self.stdinWriter = stdinWriter
        // waitpid blocks: a thread of its own for the child's life, never a cooperative or loop thread.
        let thread = Thread { [self] in
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0, errno == EINTR {}
            finished(ExitStatus(waitStatus: status))
        }
        thread.name = "parley-child-\(pid)"
        thread.start()
    }

    deinit { close(stdinWriter) }

    private func finished(_ status: ExitStatus) {
        let waiters = state.withLockedValue { state in
            state.status = status
            defer { state.waiters = [:] }
            return state.waiters.values
        }
        waiters.forEach { $0.resume(returning: status) }
    }

    /// The exit status once the child has ended (nil while it runs).
    public var exitStatus: ExitStatus? { state.withLockedValue { $0.status } }

    /// Returns when the child has ended, or nil at once when the task is cancelled (so a race
    /// between the child's end and something else can finish without it).
    public func exited() async -> ExitStatus? {
        let id = state.withLockedValue { state in
            defer { state.nextWaiter += 1 }
            return state.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let status = state.withLockedValue { state -> ExitStatus?? in
                    if let status = state.status { return .some(status) }
                    if Task.isCancelled { return .some(nil) }
                    state.waiters[id] = continuation
                    return nil
                }
                if let status { continuation.resume(returning: status) }
            }
        } onCancel: {
            state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
        }
    }

    /// Sends `signal` to the child's whole process group (no-op once it was reaped: its id
    /// may belong to someone else by then).
    public func signalGroup(_ signal: Int32) {
        state.withLockedValue { state in
            if state.status == nil { _ = kill(-pid, signal) }
        }
    }

    /// SIGTERM to the group, then SIGKILL to the group if the child has not ended within `grace`.
    /// The group is killed even when its leader exited at once: a leader that leaves children
    /// behind must not leave them running.
    public func stop(grace: Duration) async -> ExitStatus {
        signalGroup(SIGTERM)
        let ended = await withTaskGroup(of: ExitStatus?.self) { group in
            group.addTask { await self.exited() }
            group.addTask {
                try? await Task.sleep(for: grace)  // a deadline, not a synchronisation: the child's exit is awaited beside it
                return nil
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        _ = kill(-pid, SIGKILL)  // the leader is reaped (or about to be) but the group may live on
        if let ended { return ended }
        return await exitedWithoutCancellation()
    }

    /// `exited()` for callers that must see the end even when their task was cancelled.
    private func exitedWithoutCancellation() async -> ExitStatus {
        await Task.detached { await self.exited()! }.value
    }
}
