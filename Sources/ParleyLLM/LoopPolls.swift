import NIOCore
import NIOPosix

/// Counts, for each event loop created with it as its metrics delegate, the ticks that loop
/// finished. NIO runs every ready task and due timer in one tick and polls its sockets only when
/// none is left: work that is due again by the time it ends (a timer wheel that fell behind on a
/// saturated loop) keeps that tick going, and the loop reads nothing for as long as it lasts:
/// pongs and `stop`s unread, live sockets closed as silent (#26: a tick of 9 s in a 10,000-stream
/// run). A tick's end is followed by a poll, so work that waits for the count to move waits for
/// the loop to read its sockets (`LoopTicker`).
public final class LoopPolls: NIOEventLoopMetricsDelegate, Sendable {
    /// A tick this long is a stall: the loop read none of its sockets meanwhile.
    public static let stall = TimeAmount.milliseconds(100)

    /// One loop thread's count, touched only on that thread.
    private final class Count: @unchecked Sendable {
        var ticks: UInt64 = 0
    }

    /// Per thread: a loop's thread belongs to one group, whichever delegate that group has.
    private static let counts = ThreadSpecificVariable<Count>()
    private let stalled: (@Sendable (TimeAmount) -> Void)?

    /// Made only by `eventLoops`, which counts each loop's ticks from its first task.
    private init(stalled: (@Sendable (TimeAmount) -> Void)?) {
        self.stalled = stalled
    }

    /// A group of `threads` loops that report their ticks to a new `LoopPolls`; `stalled` is told
    /// each tick of `stall` or longer (on the loop's thread), with its length. Each loop's count
    /// starts at 0 with its first task, before any the caller gives it: without it, work done
    /// before the loop's first tick ended (a loop that has not polled yet, as busy as any) would
    /// find no count and take the loop for one that does not report (a test's first timers ran a
    /// whole second without a poll).
    public static func eventLoops(threads: Int, stalled: (@Sendable (TimeAmount) -> Void)? = nil) -> MultiThreadedEventLoopGroup {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads, metricsDelegate: LoopPolls(stalled: stalled))
        for loop in group.makeIterator() {
            loop.execute { if counts.currentValue == nil { counts.currentValue = Count() } }
        }
        return group
    }

    public func processedTick(info: NIOEventLoopTickInfo) {
        if let count = Self.counts.currentValue {
            count.ticks &+= 1
        } else {
            // A tick that ended before the loop ran its first task (`eventLoops`' one).
            let count = Count()
            count.ticks = 1
            Self.counts.currentValue = count
        }
        if let stalled {
            let length = info.endTime - info.startTime
            if length >= Self.stall { stalled(length) }
        }
    }

    /// The ticks the calling thread's loop finished; nil when that loop does not report them (a
    /// group not made by `eventLoops`, or an embedded loop in tests).
    static var finishedTicks: UInt64? { counts.currentValue?.ticks }
}
