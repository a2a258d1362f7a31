import Foundation
import Logging
import ParleyCore
import ParleyMongoStore
@testable import ParleyServer
import ParleyTestSupport
import Testing

/// One process per data directory, one node per MongoDB database unless they are a cluster's
/// (#22): a second one is refused with a message naming the first, a node alone and a cluster
/// do not mix, and a node that loses its lease is told.
@Suite struct SoleNodeTests {
    func temporaryDirectory() throws -> String {
        Scratch.directory("lock")
    }

    /// A node whose port is taken stops at start-up with a message saying so, and lets go of
    /// what it had opened: its data directory serves the next start at once.
    @Test func aServerThatCannotListenSaysSoAndGivesItsDataDirectoryBack() async throws {
        let first = try await TestServer.start()
        let directory = try temporaryDirectory()
        await #expect {
            _ = try await TestServer.start {
                $0.port = first.port
                $0.dataDirectory = directory
            }
        } throws: { error in
            "\(error)".contains("cannot listen on 127.0.0.1:\(first.port)")
        }
        let next = try await TestServer.start { $0.dataDirectory = directory }
        #expect(try await next.get("/healthz", token: nil).status == .ok)
        await next.stop()
        await first.stop()
    }

    @Test func aSecondHolderOfTheDataDirectoryIsRefusedUntilTheFirstLetsGo() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = try DataDirectoryLock.acquire(directory: directory)
        #expect {
            _ = try DataDirectoryLock.acquire(directory: directory)
        } throws: { error in
            "\(error)".contains("another parley process (pid \(getpid())) is using the data directory \(directory)")
        }
        first.release()
        // The lock goes with the last descriptor of its open file: a child another test spawns at
        // that moment holds a copy (close-on-exec) until its exec, so a refusal may linger a
        // moment. Tried again for up to 5 s; a lock never let go still fails.
        let deadline = ContinuousClock.now + .seconds(5)
        while true {
            do {
                try DataDirectoryLock.acquire(directory: directory).release()
                break
            } catch  where ContinuousClock.now < deadline {
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
    }

    @Test func theNodeLeaseIsOneNodesUntilItExpiresAndOnlyItsHolderGivesItUp() async throws {
        let store = try await MongoStore.open(uri: MongoFixture.uri())
        // As stored: the first holder at epoch 1,000 (its claim's time), the next one more.
        let a = NodeLease(node: "a", host: "h1", pid: 1, expires: 2_000, epoch: 1_000)
        let b = NodeLease(node: "b", host: "h2", pid: 2, expires: 3_000, epoch: 1_001)
        #expect(try await store.claimNodeLease(a, now: 1_000) == nil, "free: taken")
        #expect(try await store.claimNodeLease(b, now: 1_500) == a, "held and live: refused, naming the holder")
        var renewed = a
        renewed.expires = 2_500
        #expect(try await store.claimNodeLease(renewed, now: 1_900) == nil, "its holder renews it")
        #expect(try await store.claimNodeLease(b, now: 2_400) == renewed, "renewed: still refused")
        #expect(try await store.claimNodeLease(b, now: 2_600) == nil, "expired: taken over")
        #expect(try await store.claimNodeLease(renewed, now: 2_700) == b, "the old holder finds it gone")
        try await store.releaseNodeLease(node: "a")
        #expect(try await store.claimNodeLease(a, now: 2_800) == b, "only the holder gives it up")
        try await store.releaseNodeLease(node: "b")
        #expect(try await store.claimNodeLease(a, now: 2_800) == nil)
        try await store.close()
    }

    @Test func aNodeThatCannotRenewItsLeaseIsToldToStopBeforeItExpires() async throws {
        let uri = MongoFixture.uri()
        let store = try await MongoStore.open(uri: uri)
        let keeper = try await NodeLeaseKeeper.claim(
            store: store, node: "node-a", key: "node-a", period: .milliseconds(900), logger: Logger(label: "t"))
        // The store goes out of reach: no renewal succeeds from now on.
        try await store.close()
        let reason = try await within(.seconds(10), "the lease reported lost") { await keeper.lost() }
        #expect(reason?.hasPrefix("the node lease could not be renewed before it expired") == true, "\(reason ?? "nil")")
        let observer = try await MongoStore.open(uri: uri)
        let lease = try #require(try await observer.nodeLeases()["node-a"])
        // Told a sixth of a period before the stored lease expires (when exactly the watchdog
        // runs is the scheduler's: a loaded machine may be late by that much).
        #expect(keeper.stopsAtMillis <= lease.expires - 150)
        await keeper.release()
        try await observer.close()
    }

    @Test func aSecondNodeOnOneDatabaseIsRefusedAndAnOvertakenNodeIsTold() async throws {
        // A lease of 15 s (renewed every 5 s): with shorter ones a slow MongoDB-protocol server
        // (SecantusDB or the wire test server, both in Python), busy with the second node's
        // start-up and a full test run, answered a renewal so late that the first node was told
        // to stop for that (rightly) before it saw the takeover (6 s was not always enough).
        let first = try await TestServer.start(store: .mongodb) { $0.nodeLeasePeriod = .seconds(15) }
        let uri = try #require(first.configuration.storeURI)
        await #expect {
            _ = try await TestServer.start(store: .mongodb) {
                $0.storeURI = uri
                $0.nodeLeasePeriod = .seconds(15)
            }
        } throws: { error in
            "\(error)".contains("another Parley node") && "\(error)".contains("is serving from this MongoDB database")
        }
        // Another node takes the lease (as if the first had stalled past it): the first hears of it.
        let intruder = try await MongoStore.open(uri: uri)
        let farFuture = Int64(Date().timeIntervalSince1970 * 1000) + 3_600_000
        let takeover = NodeLease(node: "intruder", host: "elsewhere", pid: 9, expires: farFuture * 2)
        #expect(try await intruder.claimNodeLease(takeover, now: farFuture) == nil)
        let reason = try await withThrowingTaskGroup(of: String?.self) { race in
            race.addTask { await first.server.nodeLeaseLost() }
            race.addTask {
                try await Task.sleep(for: .seconds(40))  // a bound, so a failure cannot hang
                return "no word within 40 s"
            }
            defer { race.cancelAll() }
            return try await race.next() ?? nil
        }
        #expect(reason?.contains("node intruder on elsewhere (pid 9) took the node lease (node) over") == true, "\(reason ?? "nil")")
        try await intruder.close()
        await first.stop()
    }

    @Test func aNodeAloneAndAClustersNodesDoNotShareADatabase() async throws {
        let nats = try NATSServer()
        let alone = try await TestServer.start(store: .mongodb) { $0.nodeLeasePeriod = .seconds(3) }
        let uri = try #require(alone.configuration.storeURI)
        await #expect {
            _ = try await TestServer.start(store: .mongodb) {
                $0.storeURI = uri
                $0.brokerURL = nats.url
            }
        } throws: { error in
            "\(error)".contains("a node without --broker") && "\(error)".contains("serves from this MongoDB database")
        }
        await alone.stop()  // gives its lease up
        let clustered = try await TestServer.start(store: .mongodb) {
            $0.storeURI = uri
            $0.brokerURL = nats.url
            $0.nodeLeasePeriod = .seconds(3)
        }
        await #expect {
            _ = try await TestServer.start(store: .mongodb) { $0.storeURI = uri }
        } throws: { error in
            "\(error)".contains("the nodes of a cluster") && "\(error)".contains("--broker to join them")
        }
        await clustered.stop()
        await nats.stop()
    }
}
