import Foundation
import Histogram
import NIOCore
import NIOPosix
import Synchronization

/// One load run: the client's event loops with one recorder each, the sockets, the server and
/// client CPU/RSS watchers, and the report.
final class LoadRun: @unchecked Sendable {
    let group: MultiThreadedEventLoopGroup
    let host: String
    let port: Int
    let scenario: String
    var parameters: [String: Any] = [:]
    private let recorders: [ObjectIdentifier: Recorder]
    private let serverWatcher: ProcessWatcher?
    private let clientWatcher = ProcessWatcher(pid: getpid())
    private var started: UInt64 = 0
    private var measured: UInt64 = 0
    /// Extra figures a scenario reports (memory per socket, concurrency…).
    var extra: [(String, Any)] = []

    /// Whether sockets offer permessage-deflate.
    let deflate: Bool
    /// Whether sockets ask for joined tokens (`?coalesce=tokens`), as the browser client does.
    let coalesce: Bool

    init(scenario: String, host: String, port: Int, threads: Int, serverPID: Int32?, deflate: Bool = false, coalesce: Bool = false) {
        self.scenario = scenario
        self.deflate = deflate
        self.coalesce = coalesce
        self.host = host
        self.port = port
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        var recorders: [ObjectIdentifier: Recorder] = [:]
        for loop in group.makeIterator() { recorders[ObjectIdentifier(loop)] = Recorder() }
        self.recorders = recorders
        serverWatcher = serverPID.map(ProcessWatcher.init(pid:))
    }

    var threads: Int { recorders.count }

    func recorder(for loop: any EventLoop) -> Recorder { recorders[ObjectIdentifier(loop)]! }

    /// Opens one socket per token, `width` handshakes at a time.
    func connect(tokens: [String], width: Int = 64) async throws -> [LoadSocket] {
        let recorders = self.recorders
        return try await boundedMap(tokens.count, width: width) { index in
            try await openSocket(
                group: self.group, host: self.host, port: self.port, token: tokens[index], index: index, deflate: self.deflate,
                coalesce: self.coalesce
            ) {
                recorders[ObjectIdentifier($0)]!
            }
        }
    }

    /// Marks the start of the measured part (CPU and RSS are sampled from here).
    func startMeasuring() {
        started = nowNanos()
        serverWatcher?.start()
        clientWatcher.start()
    }

    /// Runs `body` on each loop (in turn) with its recorder: the only safe way to read them mid-run.
    func onEachLoop<T: Sendable>(_ body: @escaping @Sendable (Recorder) -> T) async throws -> [T] {
        var out: [T] = []
        for loop in group.makeIterator() {
            let recorder = self.recorder(for: loop)
            out.append(try await loop.submit { body(recorder) }.get())
        }
        return out
    }

    /// Adds what was recorded off the loops (the direct model scenario's tasks) to the report.
    func absorb(_ others: [Recorder]) async throws {
        let loop = group.next()
        let recorder = self.recorder(for: loop)
        try await loop.submit { for other in others { recorder.merge(other) } }.get()
    }

    /// Merges the loops' recorders and prints (and optionally writes) the report.
    func finish(json path: String?, analyze: (Recorder) -> Void = { _ in }) async throws {
        measured = nowNanos() - started
        let server = serverWatcher?.stop()
        let client = clientWatcher.stop()
        let total = Recorder()
        for loop in group.makeIterator() {
            let recorder = self.recorder(for: loop)
            try await loop.submit { total.merge(recorder) }.get()
        }
        analyze(total)
        let seconds = Double(measured) / 1e9
        var report: [String: Any] = ["scenario": scenario, "parameters": parameters, "duration_s": seconds]
        var latencies: [String: Any] = [:]
        print("\nparley-load \(scenario): \(String(format: "%.1f", seconds)) s measured, \(threads) client threads")
        print("latency (ms)                     count      p50      p90      p99    p99.9      max")
        for metric in Metric.allCases {
            guard let h = total.histograms[metric], h.totalCount > 0 else { continue }
            let q = [50.0, 90, 99, 99.9].map { Double(h.valueAtPercentile($0)) / 1000 }
            let max = Double(h.max) / 1000
            print(
                metric.rawValue.padding(toLength: 28, withPad: " ", startingAt: 0)
                    + String(format: "%10llu %8.2f %8.2f %8.2f %8.2f %8.2f", h.totalCount, q[0], q[1], q[2], q[3], max))
            latencies[metric.rawValue] = [
                "count": h.totalCount, "p50_ms": q[0], "p90_ms": q[1], "p99_ms": q[2], "p99_9_ms": q[3], "max_ms": max,
                "mean_ms": h.mean / 1000,
            ]
        }
        report["latency"] = latencies
        let counters: [String: Any] = [
            "frames": total.frames, "bytes": total.bytes, "tokens": total.tokens, "streams": total.streams,
            "frames_per_s": Double(total.frames) / seconds, "bytes_per_s": Double(total.bytes) / seconds,
            "errors": total.errors, "sockets_dropped": total.dropped,
        ]
        report["counters"] = counters
        if deflate {
            // Payload bytes only (frame headers are the same either way).
            let ratio = total.bytes > 0 ? Double(total.wireBytes) / Double(total.bytes) : 0
            report["deflate"] = [
                "compressed_sockets": total.compressedSockets, "wire_bytes": total.wireBytes, "json_bytes": total.bytes,
                "wire_to_json": ratio,
            ]
            print(
                String(
                    format: "permessage-deflate on %d sockets: %.2f MB on the wire for %.2f MB of JSON (%.1f%%, %.1f%% saved)",
                    total.compressedSockets, Double(total.wireBytes) / 1e6, Double(total.bytes) / 1e6, ratio * 100, (1 - ratio) * 100))
        }
        print(
            String(
                format: "frames %d (%.0f/s), %.2f MB (%.2f MB/s), tokens %d, streams %d, sockets dropped %d",
                total.frames, Double(total.frames) / seconds, Double(total.bytes) / 1e6, Double(total.bytes) / 1e6 / seconds,
                total.tokens, total.streams, total.dropped))
        print(
            "errors: "
                + (total.errors.isEmpty ? "none" : total.errors.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))
        if let server {
            let perFrame = total.frames > 0 ? server.cpu / Double(total.frames) * 1e6 : 0
            // With joined tokens a frame may carry many: the cost per token is the one to compare.
            let perToken = total.tokens > 0 ? server.cpu / Double(total.tokens) * 1e6 : 0
            report["server"] = [
                "cpu_s": server.cpu, "cpu_utilization": server.cpu / seconds, "rss_start_bytes": server.rssStart,
                "rss_end_bytes": server.rssEnd, "rss_peak_bytes": server.rssPeak, "cpu_us_per_frame_delivered": perFrame,
                "cpu_us_per_token_delivered": perToken,
            ]
            print(
                String(
                    format:
                        "server: %.2f CPU-s (%.0f%% of one core), %.1f µs CPU per frame delivered (%.2f per token), "
                        + "RSS %.1f → %.1f MiB (peak %.1f)",
                    server.cpu, server.cpu / seconds * 100, perFrame, perToken, Double(server.rssStart) / 1_048_576,
                    Double(server.rssEnd) / 1_048_576, Double(server.rssPeak) / 1_048_576))
        }
        if let client {
            let utilization = client.cpu / seconds
            let bound = utilization > 0.85 * Double(threads)
            report["client"] = ["cpu_s": client.cpu, "cpu_utilization": utilization, "client_bound": bound]
            print(
                String(format: "client: %.2f CPU-s (%.0f%% of one core)", client.cpu, utilization * 100)
                    + (bound ? " — the CLIENT was saturated: these latencies measure it, not the server" : ""))
        }
        for (key, value) in extra {
            report[key] = value
            print("\(key): \(value)")
        }
        if let path {
            let data = try JSONSerialization.data(withJSONObject: report, options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: path))
            print("report written to \(path)")
        }
    }

    func shutdown() async {
        try? await group.shutdownGracefully()
    }
}

/// A countdown other threads can wait on without sleeping: scenarios wait for joins, ends
/// and deliveries with it, bounded by a deadline.
final class Countdown: Sendable {
    private let remaining: Atomic<Int>
    private let done = Mutex<CheckedContinuation<Void, Never>?>(nil)
    private let finished = Atomic<Bool>(false)

    init(_ count: Int) {
        remaining = Atomic(count)
        if count <= 0 { finished.store(true, ordering: .sequentiallyConsistent) }
    }

    var left: Int { max(0, remaining.load(ordering: .relaxed)) }

    func tick() {
        if remaining.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue == 0 { fire() }
    }

    private func fire() {
        finished.store(true, ordering: .sequentiallyConsistent)
        done.withLock {
            $0?.resume()
            $0 = nil
        }
    }

    /// Waits until the count reaches zero or `timeout` passes; false on timeout.
    func wait(timeout: Duration) async -> Bool {
        let timer = Task {
            try await Task.sleep(for: timeout)
            self.fire()
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = done.withLock { waiting -> Bool in
                if finished.load(ordering: .sequentiallyConsistent) { return true }
                waiting = c
                return false
            }
            if now { c.resume() }
        }
        timer.cancel()
        return remaining.load(ordering: .sequentiallyConsistent) <= 0
    }
}

/// FNV-1a of an id, as a compact key for cross-loop joins (`extra` mixes in a seq).
func key(_ id: some Sequence<UInt8>, _ extra: UInt64 = 0) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in id {
        hash ^= UInt64(byte)
        hash = hash &* 0x0000_0100_0000_01B3
    }
    return key(hash, mixing: extra)
}

/// `key(id, extra)` from `key(id)`: a stream's tokens keyed without hashing its id again.
func key(_ hash: UInt64, mixing extra: UInt64) -> UInt64 {
    hash ^ (extra &* 0x9E37_79B9_7F4A_7C15)
}
