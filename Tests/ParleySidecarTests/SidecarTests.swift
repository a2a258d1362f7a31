import Foundation
import Logging
import ParleyTestSupport
import Testing

@testable import ParleySidecar

#if canImport(Glibc)
import Glibc
#endif

/// A stand-in model server: answers GET /health 200 on the port it is given, after starting a
/// grandchild (`sleep`) whose pid it writes to a file, so a test sees what a stop leaves behind.
private let fakeServer = """
    import http.server, subprocess, sys
    port, pidfile = int(sys.argv[1]), sys.argv[2]
    open(pidfile, "w").write(str(subprocess.Popen(["sleep", "300"]).pid))
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """

private func temporaryDirectory() throws -> String {
    Scratch.directory("sidecar")
}

/// Whether `pid` is a live process (a zombie waiting for a reaper counts as gone).
private func isRunning(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
        let close = stat.lastIndex(of: ")")
    else { return false }
    return !stat[stat.index(close, offsetBy: 2)...].hasPrefix("Z")
}

private func healthAnswers(_ port: Int) async -> Bool {
    await HealthCheck.status(port: port, path: "/health") == 200
}

@Suite struct SidecarTests {
    let logger = Logger(label: "sidecar-test")

    private func fake(in directory: String) async throws -> (Sidecar.Configuration, port: Int, pidFile: String) {
        let port = try await Sidecar.freeLoopbackPort()
        let pidFile = directory + "/grandchild.pid"
        var configuration = Sidecar.Configuration(
            arguments: ["python3", "-c", fakeServer, String(port), pidFile],
            port: port, logPath: directory + "/sidecar.log")
        configuration.restartDelay = .milliseconds(50)
        return (configuration, port, pidFile)
    }

    private func grandchild(_ pidFile: String) throws -> pid_t {
        try #require(pid_t(String(contentsOfFile: pidFile, encoding: .utf8)))
    }

    @Test func startReturnsOnceReadyAndStopLeavesNoProcessOfItsGroup() async throws {
        let directory = try temporaryDirectory()
        let (configuration, port, pidFile) = try await fake(in: directory)
        let sidecar = try await Sidecar.start(configuration, logger: logger)
        let pid = try #require(sidecar.pid)
        #expect(await healthAnswers(port))
        let sleeper = try grandchild(pidFile)
        #expect(isRunning(pid) && isRunning(sleeper))
        await sidecar.stop()
        #expect(sidecar.pid == nil)
        #expect(!isRunning(pid))
        // Killed with its group, it takes a moment to end (longer on a loaded machine).
        #expect(await holds(within: .seconds(10)) { !isRunning(sleeper) }, "the grandchild went with its group")
        #expect(await !healthAnswers(port))
    }

    @Test func aPickedPortIsFreeAndOutsideTheRangeOutgoingConnectionsTakeTheirsFrom() async throws {
        let ephemeral = Sidecar.ephemeralPortRange()
        var seen = Set<Int>()
        for _ in 0..<8 {
            let port = try await Sidecar.freeLoopbackPort()
            #expect(port >= 1024 && !ephemeral.contains(port))
            seen.insert(port)
        }
        #expect(seen.count > 1, "picked at random, not one port every time")
    }

    @Test func aKilledProcessIsRestartedOnTheSamePort() async throws {
        let directory = try temporaryDirectory()
        let (configuration, port, _) = try await fake(in: directory)
        let sidecar = try await Sidecar.start(configuration, logger: logger)
        let first = try #require(sidecar.pid)
        kill(first, SIGKILL)
        await sidecar.restarted(count: 1)
        let second = try #require(sidecar.pid)
        #expect(second != first)
        #expect(await healthAnswers(port))
        kill(second, SIGKILL)
        await sidecar.restarted(count: 2)
        #expect(await healthAnswers(port))
        await sidecar.stop()
        #expect(!isRunning(second) && sidecar.pid == nil)
    }

    @Test func aCommandThatEndsBeforeItIsReadyFailsWithTheEndOfItsLog() async throws {
        let directory = try temporaryDirectory()
        let port = try await Sidecar.freeLoopbackPort()
        let configuration = Sidecar.Configuration(
            arguments: ["python3", "-c", "import sys; print('no module named xllamacpp', file=sys.stderr); sys.exit(3)"],
            port: port, logPath: directory + "/sidecar.log"
        )
        do {
            _ = try await Sidecar.start(configuration, logger: logger)
            Issue.record("started")
        } catch let error as Sidecar.StartError {
            guard case .exited(.exited(3), let tail) = error else {
                Issue.record("\(error)")
                return
            }
            #expect(tail.contains("no module named xllamacpp"))
            #expect("\(error)".contains("exit code 3"))
        }
    }

    @Test func aCommandThatNeverAnswersItsHealthCheckIsStoppedAndReported() async throws {
        let directory = try temporaryDirectory()
        let port = try await Sidecar.freeLoopbackPort()
        let marker = "299.\(UInt16.random(in: 1000...9999))"  // finds this test's process in /proc, however slow its start
        var configuration = Sidecar.Configuration(arguments: ["sleep", marker], port: port, logPath: directory + "/sidecar.log")
        configuration.startTimeout = .milliseconds(500)
        do {
            _ = try await Sidecar.start(configuration, logger: logger)
            Issue.record("started")
        } catch let error as Sidecar.StartError {
            guard case .notReady = error else {
                Issue.record("\(error)")
                return
            }
        }
        let running = (try FileManager.default.contentsOfDirectory(atPath: "/proc")).compactMap { pid_t($0) }.filter { pid in
            let cmdline = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
            return cmdline == "sleep\0\(marker)\0" && isRunning(pid)
        }
        #expect(running.isEmpty, "a sidecar that is not ready in time is stopped")
    }

    @Test func parleysOwnVariablesAreWithheldFromTheSidecar() async throws {
        // Given as the environment passed on, not set with setenv: that raced the tests that
        // start processes meanwhile (Foundation's Process.run copying the environment crashed).
        let inherited = ProcessInfo.processInfo.environment.merging(
            ["PARLEY_SIDECAR_TEST_SECRET": "hunter2", "SIDECAR_TEST_PLAIN": "visible"], uniquingKeysWith: { $1 })
        let directory = try temporaryDirectory()
        var configuration = Sidecar.Configuration(
            arguments: [
                "python3", "-c",
                "import os; print(os.environ.get('PARLEY_SIDECAR_TEST_SECRET'), os.environ.get('SIDECAR_TEST_PLAIN'), os.environ.get('PARLEY_MODEL_PORT')); exit(3)",
            ],
            port: 1, logPath: directory + "/sidecar.log"
        )
        configuration.environment = ["PARLEY_MODEL_PORT": "1"]
        configuration.inherited = inherited
        do {
            _ = try await Sidecar.start(configuration, logger: logger)
            Issue.record("started")
        } catch let error as Sidecar.StartError {
            guard case .exited(_, let tail) = error else {
                Issue.record("\(error)")
                return
            }
            #expect(tail == "None visible 1", "the secret is withheld, other variables and the port are passed")
        }
    }

    @Test func aCommandThatCannotRunSaysSo() async throws {
        let directory = try temporaryDirectory()
        let configuration = Sidecar.Configuration(
            arguments: ["parley-no-such-program"], port: 1,
            logPath: directory + "/sidecar.log")
        do {
            _ = try await Sidecar.start(configuration, logger: logger)
            Issue.record("started")
        } catch let error as Sidecar.StartError {
            #expect("\(error)".contains("parley-no-such-program"), "\(error)")
        }
    }

    @Test func aChildHoldsItsThreeStandardDescriptorsAndNothingElse() async throws {
        var inheritable: [Int32] = [-1, -1]
        try #require(pipe(&inheritable) == 0, "a pipe without close-on-exec, as C code in the process might make")
        defer { inheritable.forEach { close($0) } }
        let output = try ChildProcess.closeOnExecPipe()
        for end in [output.reader, output.writer] { #expect(fcntl(end, F_GETFD) & FD_CLOEXEC != 0) }
        let child = try ChildProcess.spawn(arguments: ["sh", "-c", "ls /proc/$$/fd"], output: output.writer)
        close(output.writer)
        var printed: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 512)
        while case let n = read(output.reader, &buffer, buffer.count), n != 0 {
            if n > 0 { printed += buffer[..<n] } else if errno != EINTR { break }
        }
        close(output.reader)
        #expect(await child.exited() == .exited(0))
        let held = String(decoding: printed, as: UTF8.self).split(whereSeparator: \.isWhitespace)
        #expect(held == ["0", "1", "2"], "the child's descriptors, beside ours \(inheritable)")
    }

    @Test func theLocalModelCommandGetsItsPort() throws {
        let model = try #require(LocalModel.command("llama-server -m m.gguf --port {port}  --host 127.0.0.1"))
        let configuration = model.sidecar(port: 8123, logPath: "/tmp/x.log")
        #expect(configuration.arguments == ["llama-server", "-m", "m.gguf", "--port", "8123", "--host", "127.0.0.1"])
        #expect(configuration.healthURL == "http://127.0.0.1:8123/health")
        #expect(configuration.environment["PARLEY_MODEL_PORT"] == "8123")
        #expect(LocalModel.command("   ") == nil)
        let bundled = try #require(LocalModel.bundled(parallel: 4))
        #expect(bundled.command.first == "python3" && bundled.command[1].hasSuffix("model-server.py"))
        #expect(FileManager.default.fileExists(atPath: bundled.command[1]))
        #expect(bundled.command.contains("8192"), "4 slots of 2048 tokens")
    }
}
