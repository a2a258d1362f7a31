import Foundation
import NIOPosix
import ParleyNATS
import ParleyTestSupport
import Testing

/// The next `count` messages (fewer if the subscription ends first).
func next(_ count: Int, from messages: inout AsyncStream<NATSMessage>.AsyncIterator) async -> [NATSMessage] {
    var out: [NATSMessage] = []
    while out.count < count, let message = await messages.next() { out.append(message) }
    return out
}

/// Cancels `subscription` after `seconds`, which ends its messages: a bound, so a failure cannot hang.
func watchdog(_ subscription: NATSSubscription, seconds: Int = 10) -> Task<Void, Never> {
    Task {
        try? await Task.sleep(for: .seconds(seconds))
        if !Task.isCancelled { subscription.cancel() }
    }
}

@Suite(.serialized) struct NATSTests {
    let threads = NIOThreadPool.singleton

    @Test func coreMessagesArriveInOrder() async throws {
        let server = try NATSServer()
        let connection = try await NATSConnection.connect(url: server.url, threads: threads)
        let subscription = try connection.subscribe("room.r1")
        try await connection.flush()
        for i in 0..<1_000 { try connection.publish("room.r1", Array("token \(i)".utf8)) }
        try await connection.flush()
        let bound = watchdog(subscription)
        var iterator = subscription.messages.makeAsyncIterator()
        let messages = await next(1_000, from: &iterator)
        bound.cancel()
        #expect(messages.map { String(decoding: $0.payload, as: UTF8.self) } == (0..<1_000).map { "token \($0)" })
        #expect(messages.allSatisfy { $0.subject == "room.r1" && $0.sequence == nil } && subscription.dropped == 0)
        subscription.cancel()
        connection.close()
        await server.stop()
    }

    @Test func aLostLinkAndItsReturnAreReported() async throws {
        let server = try NATSServer()
        let connection = try await NATSConnection.connect(url: server.url, threads: threads)
        let (events, reported) = AsyncStream<NATSLinkEvent>.makeStream()
        connection.observeLink { reported.yield($0) }
        let subscription = try connection.subscribe("after")
        try await connection.flush()
        try await server.restart()
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == .lost)
        #expect(await iterator.next() == .restored)
        #expect(connection.isConnected)
        // The subscription made before the outage was renewed with the link.
        try connection.publish("after", Array("back".utf8))
        try await connection.flush()
        let bound = watchdog(subscription)
        var messages = subscription.messages.makeAsyncIterator()
        #expect(await next(1, from: &messages).map(\.payload) == [Array("back".utf8)])
        bound.cancel()
        connection.close()
        await server.stop()
    }

    @Test func aRetriedPublishIsStoredOnceAndAStaleWriterIsFenced() async throws {
        let server = try NATSServer()
        let connection = try await NATSConnection.connect(url: server.url, threads: threads)
        let js = try connection.jetStream()
        try await js.addStream(.init(name: "STREAMS", subjects: ["stream.>"]))
        try await js.addStream(.init(name: "STREAMS", subjects: ["stream.>"]))  // again, as every node's start does
        let first = try await js.publish("stream.s1", Array("a".utf8), messageID: "STREAMS:1")
        let retried = try await js.publish("stream.s1", Array("a".utf8), messageID: "STREAMS:1")
        #expect(first == JetStream.PublishAck(stream: "STREAMS", sequence: 1, duplicate: false))
        #expect(retried == JetStream.PublishAck(stream: "STREAMS", sequence: 1, duplicate: true))
        let second = try await js.publish("stream.s1", Array("b".utf8), messageID: "STREAMS:2", expectedLastSubjectSequence: 1)
        #expect(second.sequence == 2 && !second.duplicate)
        // A writer that believes the subject's last sequence is still 1 is refused.
        await #expect {
            _ = try await js.publish("stream.s1", Array("stale".utf8), messageID: "STREAMS:3", expectedLastSubjectSequence: 1)
        } throws: { error in
            (error as? NATSError)?.isWrongLastSequence == true
        }
        connection.close()
        await server.stop()
    }

    @Test func anOrderedConsumerReplaysFromASequenceThenContinuesLive() async throws {
        let server = try NATSServer()
        let connection = try await NATSConnection.connect(url: server.url, threads: threads)
        let js = try connection.jetStream()
        try await js.addStream(.init(name: "STREAMS", subjects: ["stream.>"]))
        for i in 1...10 { _ = try await js.publish("stream.s1", Array("t\(i)".utf8), messageID: "s1:\(i)") }
        _ = try await js.publish("stream.other", Array("not this one".utf8))
        // A resume after token 6: from sequence 7 on.
        let subscription = try js.subscribeOrdered("stream.s1", from: 7)
        let bound = watchdog(subscription)
        var iterator = subscription.messages.makeAsyncIterator()
        let replayed = await next(4, from: &iterator)
        for i in 11...13 { _ = try await js.publish("stream.s1", Array("t\(i)".utf8), messageID: "s1:\(i)") }
        let live = await next(3, from: &iterator)
        bound.cancel()
        #expect((replayed + live).map { String(decoding: $0.payload, as: UTF8.self) } == (7...13).map { "t\($0)" })
        #expect((replayed + live).map(\.sequence) == [7, 8, 9, 10, 12, 13, 14], "stream sequences: 11 is the other subject's")
        subscription.cancel()
        connection.close()
        await server.stop()
    }
}
