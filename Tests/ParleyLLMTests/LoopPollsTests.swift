import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import ParleyLLM

/// Keeps the calling thread busy for `work` (a loop's task that holds it).
func busy(_ work: TimeAmount) {
    let end = NIODeadline.now() + work
    while NIODeadline.now() < end {}
}

/// `LoopPolls` reports a loop's stalls (a tick that read nothing for `LoopPolls.stall`) and
/// counts its ticks for the thread that runs it.
@Suite struct LoopPollsTests {
    @Test(.timeLimit(.minutes(1))) func aTickThatHeldTheLoopPastTheStallIsReportedAndAShortOneIsNot() async throws {
        let reported = Mutex<[TimeAmount]>([])
        let first = Mutex<CheckedContinuation<Void, Never>?>(nil)
        let group = LoopPolls.eventLoops(threads: 1) { length in
            reported.withLock { $0.append(length) }
            first.withLock { $0.take() }?.resume()
        }
        let loop = group.next()
        // A short tick first, ended before the long one starts (the second task is scheduled in
        // the future, so the first tick ends and the loop polls between them).
        try await loop.submit { busy(.milliseconds(1)) }.get()
        await withCheckedContinuation { continuation in
            first.withLock { $0 = continuation }
            _ = loop.scheduleTask(in: .milliseconds(5)) { busy(.milliseconds(150)) }
        }
        let lengths = reported.withLock { $0 }
        #expect(lengths.count == 1 && lengths[0] >= .milliseconds(150), "\(lengths)")
        // The loop's own thread sees its ticks counted; another thread sees nothing.
        let ticks = try await loop.submit { LoopPolls.finishedTicks }.get()
        #expect((ticks ?? 0) >= 2)
        #expect(LoopPolls.finishedTicks == nil)
        try await group.shutdownGracefully()
    }

    @Test func aGroupsLoopsCountFromTheirFirstTask() async throws {
        // Work given to a new loop may run before its first tick ends; it must still find the
        // loop's count (0), or the ticker takes the loop for one that does not report.
        let group = LoopPolls.eventLoops(threads: 2)
        for loop in group.makeIterator() {
            #expect(try await loop.submit { LoopPolls.finishedTicks }.get() != nil)
        }
        try await group.shutdownGracefully()
    }
}
