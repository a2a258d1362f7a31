import MetricsTestKit
import NIOCore
import NIOPosix
import Testing

@testable import ParleyServer

/// The server's event loops count a tick that held a loop past `LoopPolls.stall` (#26).
@Suite struct EventLoopStallsTests {
    @Test func aLoopHeldPastTheStallCountsInTheServersMetric() async throws {
        let metrics = TestMetrics()
        var configuration = ServerConfiguration()
        configuration.metrics = metrics
        configuration.eventLoopThreads = 1
        let group = ParleyServer.eventLoops(configuration)
        let loop = group.next()
        // The loop works 150 ms in one task, then sets a timer 200 ms on: its tick ends then
        // (nothing else is due), and the timer runs in a later one.
        let later = try await loop.submit {
            let end = NIODeadline.now() + .milliseconds(150)
            while NIODeadline.now() < end {}
            return loop.scheduleTask(in: .milliseconds(200)) {}
        }.get()
        try await later.futureResult.get()
        #expect(try metrics.expectCounter("parley_event_loop_stalls_total").totalValue == 1)
        try await group.shutdownGracefully()
    }
}
