import NIOCore
import NIOEmbedded
@testable import ParleyServer
import Testing

/// The HTTP connections kept under a cap: at it, the oldest connection only waiting for a
/// request goes to make room; with none waiting, the new one is refused.
@Suite struct HTTPConnectionRegistryTests {
    func connected() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    @Test func atTheCapTheOldestWaitingConnectionGoes() throws {
        let registry = HTTPConnectionRegistry(limit: 3)
        let (a, b, c) = (try connected(), try connected(), try connected())
        for channel in [a, b, c] { #expect(registry.admit(channel)) }
        registry.setWaiting(a, false)  // busy with a request
        let d = try connected()
        #expect(registry.admit(d) && a.isActive && !b.isActive && c.isActive)
        registry.setWaiting(a, true)  // done: waits for its next request, the oldest again
        let e = try connected()
        #expect(registry.admit(e) && !a.isActive && c.isActive)
        for channel in [c, d, e] { registry.setWaiting(channel, false) }
        #expect(!registry.admit(try connected()), "none waiting: refused")
        registry.setWaiting(d, true)
        let f = try connected()
        #expect(registry.admit(f) && !d.isActive && c.isActive && e.isActive)
        #expect(registry.counts.connections == 3)
    }

    /// A keep-alive connection waits and works in turn at every request: what is queued for the
    /// waiting stays bounded by the connections, however many requests they serve.
    @Test func theWaitingQueueStaysBoundedOverManyRequests() throws {
        let registry = HTTPConnectionRegistry(limit: 100)
        let channels = try (0..<10).map { _ in try connected() }
        for channel in channels { #expect(registry.admit(channel)) }
        for _ in 0..<1_000 {
            for channel in channels {
                registry.setWaiting(channel, false)
                registry.setWaiting(channel, true)
            }
        }
        #expect(registry.counts.connections == 10 && registry.counts.queued <= 2 * 10 + 64)
        for channel in channels.prefix(5) { registry.remove(channel) }
        #expect(registry.counts.connections == 5)
    }
}
