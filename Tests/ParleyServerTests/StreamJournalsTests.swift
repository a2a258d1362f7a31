import Logging
import ParleyCore
@testable import ParleyServer
import ParleyStore
import Synchronization
import Testing

/// The node's journal writer (`StreamJournals`): the snapshots of many replies go to the store
/// together, and a finished reply's journal never comes back after its removal.
@Suite struct StreamJournalsTests {
    /// Journals in memory; each `saveStreamJournals` call is recorded and waits while `held`.
    final class GatedJournals: StreamJournalStore {
        private struct State {
            var rows: [String: StreamJournal] = [:]
            var calls: [[String]] = []
            /// The journals each call deleted.
            var deletions: [[String]] = []
            var held = false
            var failing = false
            var arrived: [CheckedContinuation<Void, Never>] = []
            var waiters: [CheckedContinuation<Void, Never>] = []
            var log: [String] = []
        }
        private let state = Mutex(State())

        var rows: [String: StreamJournal] { state.withLock { $0.rows } }
        var calls: [[String]] { state.withLock { $0.calls } }
        var deletions: [[String]] { state.withLock { $0.deletions } }
        var log: [String] { state.withLock { $0.log } }

        func hold() { state.withLock { $0.held = true } }
        func fail() { state.withLock { $0.failing = true } }
        func release() {
            let waiters = state.withLock { s in
                s.held = false
                defer { s.waiters.removeAll() }
                return s.waiters
            }
            for waiter in waiters { waiter.resume() }
        }

        /// Returns once a held write is waiting at the gate.
        func writeArrived() async {
            await withCheckedContinuation { continuation in
                let now = state.withLock { s in
                    guard s.waiters.isEmpty else { return true }
                    s.arrived.append(continuation)
                    return false
                }
                if now { continuation.resume() }
            }
        }

        func saveStreamJournal(_ journal: StreamJournal) async throws { try await saveStreamJournals([journal], deleting: []) }

        func saveStreamJournals(_ journals: [StreamJournal], deleting finished: [String]) async throws {
            state.withLock { s in
                s.calls.append(journals.map(\.stream).sorted())
                s.deletions.append(finished.sorted())
            }
            await withCheckedContinuation { continuation in
                let (pass, arrived) = state.withLock { s -> (Bool, [CheckedContinuation<Void, Never>]) in
                    guard s.held else { return (true, []) }
                    s.waiters.append(continuation)
                    defer { s.arrived.removeAll() }
                    return (false, s.arrived)
                }
                for waiter in arrived { waiter.resume() }
                if pass { continuation.resume() }
            }
            if state.withLock({ $0.failing }) { throw StoreError.closed }
            state.withLock { s in
                for j in journals {
                    s.rows[j.stream] = j
                    s.log.append("save \(j.stream) \(j.outputTokens)")
                }
                for stream in finished {
                    s.rows[stream] = nil
                    s.log.append("delete \(stream)")
                }
            }
        }

        func deleteStreamJournal(stream: String) async throws {
            state.withLock { s in
                s.rows[stream] = nil
                s.log.append("delete \(stream)")
            }
        }

        func streamJournals(limit: Int, node: String?) async throws -> [StreamJournal] { Array(rows.values.prefix(limit)) }
    }

    func journal(_ stream: String) -> StreamJournal {
        StreamJournal(
            stream: stream, user: "alice", model: "simulated", feature: "chat", inputTokens: 1, target: .settleOnly(), messageID: "msg_\(stream)",
            createdAt: 0)
    }

    /// Waits (on events, not time) until `condition` holds; the writer's next round is at most
    /// one interval away.
    func eventually(_ condition: () -> Bool) async {
        while !condition() { await Task.yield() }
    }

    @Test func theSnapshotsOfManyRepliesGoToTheStoreInOneCall() async throws {
        let store = GatedJournals()
        let journals = StreamJournals(store: store, logger: Logger(label: "test"))
        store.hold()
        let first = journals.open(journal("st_first"))
        await store.writeArrived()  // the first write goes out at once and waits at the gate
        var writers: [StreamJournalWriter] = []
        for n in 0..<100 {
            let writer = journals.open(journal("st_\(n)"))
            for tokens in 1...3 { writer.offer(text: String(repeating: "a", count: tokens), outputTokens: tokens) }
            writers.append(writer)
        }
        first.offer(text: "hi", outputTokens: 1)
        store.release()
        await eventually { store.rows.count == 101 && store.rows["st_first"]?.outputTokens == 1 }
        // The first call held one reply; every snapshot made meanwhile went in the next one,
        // each reply's newest only.
        #expect(store.calls.count == 2)
        #expect(store.calls.last?.count == 101)
        #expect((0..<100).allSatisfy { store.rows["st_\($0)"]?.outputTokens == 3 })
        for writer in writers { await writer.finish() }
        await first.finish()
        await journals.flush()
        #expect(store.rows.isEmpty)
    }

    @Test func theJournalsOfStoredRepliesAreDeletedTogether() async throws {
        let store = GatedJournals()
        let journals = StreamJournals(store: store, logger: Logger(label: "test"))
        let writers = (0..<50).map { journals.open(journal("st_\($0)")) }
        await eventually { store.rows.count == 50 }
        store.hold()
        let busy = journals.open(journal("st_busy"))
        await store.writeArrived()  // a write in flight holds st_busy only
        // Finishing waits for no commit of its own: only for a write in flight that holds it.
        for writer in writers { await writer.finish() }
        #expect(store.rows.count == 50, "deleted with the next write, not one by one")
        store.release()
        await busy.finish()
        await journals.flush()
        #expect(store.rows.isEmpty)
        let fifty = Set((0..<50).map { "st_\($0)" })
        #expect(store.deletions.contains { Set($0).isSuperset(of: fifty) }, "the fifty went in one write")
        #expect(store.deletions.flatMap { $0 }.sorted() == (fifty.union(["st_busy"])).sorted())
        // Never a save of a reply after its deletion.
        for stream in fifty.union(["st_busy"]) {
            #expect(store.log.lastIndex(of: "delete \(stream)")! > store.log.lastIndex { $0.hasPrefix("save \(stream) ") }!)
        }
    }

    /// A store that fails every write: the deletions are not retried for ever, so the flush a
    /// shutdown awaits returns (the next start-up drops those journals).
    @Test func aFlushReturnsWhenTheStoreFails() async throws {
        let store = GatedJournals()
        let journals = StreamJournals(store: store, logger: Logger(label: "test"))
        let writer = journals.open(journal("st_a"))
        await eventually { store.rows["st_a"] != nil }
        store.fail()
        await writer.finish()
        await journals.flush()
        #expect(store.deletions.last == ["st_a"], "tried once")
        #expect(store.rows["st_a"] != nil)
    }

    @Test func aFinishedReplysJournalIsNeverWrittenAgain() async throws {
        let store = GatedJournals()
        let journals = StreamJournals(store: store, logger: Logger(label: "test"))
        store.hold()
        let writer = journals.open(journal("st_a"))
        await store.writeArrived()
        writer.offer(text: "two tokens", outputTokens: 2)  // waits for the next round
        let finished = Task { await writer.finish() }
        // The removal waits for the write in flight (it holds st_a) and drops the waiting one.
        try await Task.sleep(for: .milliseconds(50))
        #expect(!store.log.contains("delete st_a"), "the removal ran before the write in flight ended")
        store.release()
        await finished.value
        writer.offer(text: "late", outputTokens: 3)  // after finish: ignored
        await journals.flush()
        #expect(store.log == ["save st_a 0", "delete st_a"])
        #expect(store.rows.isEmpty)
        // Another reply's write afterwards carries nothing of st_a.
        let other = journals.open(journal("st_b"))
        await eventually { store.rows["st_b"] != nil }
        #expect(store.calls.allSatisfy { !$0.contains("st_a") || $0 == ["st_a"] })
        await other.finish()
    }

    /// A reply that could not be stored keeps its journal, whole, with the text it ended with.
    @Test func aReplyThatCouldNotBeStoredKeepsItsWholeTextInItsJournal() async throws {
        let store = GatedJournals()
        let journals = StreamJournals(store: store, logger: Logger(label: "test"))
        let writer = journals.open(journal("st_a"))
        writer.offer(text: "Tea, for", outputTokens: 2)
        await eventually { store.rows["st_a"]?.text == "Tea, for" }
        writer.offer(text: "Tea, for a start.", outputTokens: 5)
        await writer.finish(keep: true)
        await journals.flush()
        #expect(store.rows["st_a"]?.text == "Tea, for a start.")
        #expect(store.rows["st_a"]?.outputTokens == 5)
        #expect(store.rows["st_a"]?.messageID == "msg_st_a")
        writer.offer(text: "late", outputTokens: 6)  // after finish: ignored
        await journals.flush()
        #expect(store.rows["st_a"]?.text == "Tea, for a start.")
    }
}
