import Foundation
import Histogram
#if canImport(Glibc)
import Glibc
#endif

/// Monotonic nanoseconds (CLOCK_MONOTONIC), cheap enough to read per frame.
@inline(__always)
func nowNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// Wall-clock milliseconds since the epoch (for schedule due times, which the server keeps in wall time).
func wallMillis() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

/// The latencies one scenario records, in microseconds.
enum Metric: String, CaseIterable, Sendable {
    case connect = "connect"
    case ttft = "time_to_first_token"
    case gap = "inter_token_gap"
    case addedGap = "added_inter_token_delay"
    case stream = "whole_stream"
    case fanout = "fanout_delay"
    case delivery = "delivery_delay"
}

/// What one event loop measured. Confined to its loop while the run lasts (no locks on the hot
/// path); merged at the end.
final class Recorder: @unchecked Sendable {
    var histograms: [Metric: Histogram<UInt64>] = [:]
    var frames = 0
    /// Payload bytes of JSON received (after decompression).
    var bytes = 0
    /// Payload bytes as they came over the wire (compressed or not).
    var wireBytes = 0
    /// Sockets on which permessage-deflate was negotiated.
    var compressedSockets = 0
    var tokens = 0
    var streams = 0
    var errors: [String: Int] = [:]
    var dropped = 0
    /// (key, arrival ns) pairs for measures computed after the run (fan-out, translation delivery).
    var arrivals: [(UInt64, UInt64)] = []
    /// (key, scheduled ns) of what this client sent, joined with `arrivals` after the run.
    var origins: [(UInt64, UInt64)] = []

    func record(_ metric: Metric, nanos: UInt64) {
        // Three significant digits up to one hour: enough for any stall worth seeing.
        _ = histograms[metric, default: Histogram(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)]
            .record(max(1, nanos / 1000))
    }

    /// An inter-token gap, and how much longer than the nominal pace it was (the added delay).
    func recordGap(_ gap: UInt64, nominal: UInt64) {
        record(.gap, nanos: gap)
        record(.addedGap, nanos: gap > nominal ? gap - nominal : 0)
    }

    func merge(_ other: Recorder) {
        for (metric, histogram) in other.histograms {
            histograms[metric, default: Histogram(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)].add(histogram)
        }
        frames += other.frames
        bytes += other.bytes
        wireBytes += other.wireBytes
        compressedSockets += other.compressedSockets
        tokens += other.tokens
        streams += other.streams
        dropped += other.dropped
        for (code, count) in other.errors { errors[code, default: 0] += count }
        arrivals += other.arrivals
        origins += other.origins
    }
}

/// CPU time and resident memory of a process, from /proc.
struct ProcessSample {
    var cpuSeconds: Double
    var rssBytes: Int

    static func of(pid: Int32) -> ProcessSample? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        else { return nil }
        // Fields after the command name (which may hold spaces) start after the last ')'.
        guard let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let utime = Double(fields[11]), let stime = Double(fields[12]) else { return nil }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        var rss = 0
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            rss = (Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0") ?? 0) * 1024
        }
        return ProcessSample(cpuSeconds: (utime + stime) / ticks, rssBytes: rss)
    }
}

/// Samples a process's CPU and RSS every 250 ms while a run lasts (peak RSS, CPU over the run).
final class ProcessWatcher: @unchecked Sendable {
    let pid: Int32
    private let lock = NSLock()
    private var first: ProcessSample?
    private var last: ProcessSample?
    private var peakRSS = 0
    private var timer: (any DispatchSourceTimer)?

    init(pid: Int32) {
        self.pid = pid
    }

    func start() {
        sample()
        let timer = DispatchSource.makeTimerSource(queue: .global())
        timer.schedule(deadline: .now() + .milliseconds(250), repeating: .milliseconds(250))
        timer.setEventHandler { [weak self] in self?.sample() }
        timer.resume()
        self.timer = timer
    }

    func sample() {
        guard let now = ProcessSample.of(pid: pid) else { return }
        lock.lock()
        if first == nil { first = now }
        last = now
        peakRSS = max(peakRSS, now.rssBytes)
        lock.unlock()
    }

    /// CPU seconds since `start`, and the RSS at the start, now and at its peak.
    func stop() -> (cpu: Double, rssStart: Int, rssEnd: Int, rssPeak: Int)? {
        timer?.cancel()
        sample()
        lock.lock()
        defer { lock.unlock() }
        guard let first, let last else { return nil }
        return (last.cpuSeconds - first.cpuSeconds, first.rssBytes, last.rssBytes, peakRSS)
    }
}
