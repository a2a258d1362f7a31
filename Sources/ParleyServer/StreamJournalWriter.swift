import Logging
import NIOCore
import ParleyCore
import ParleyStore
import Synchronization

/// The journals of the replies streaming on this node, written together: each reply's newest
/// snapshot waits here and one write stores every waiting snapshot, at most once per `interval`
/// (at once when none went out for that long). A thousand replies then cost the store one
/// commit per interval instead of one each (they were half of its write calls, #26); a slow
/// store delays the journals, never a token. The journals of replies stored since go in the
/// same write: a reply's end waits for no commit of its journal (one a crash leaves behind
/// meanwhile is finished again by the recovery, which finds the reply stored and settled).
final class StreamJournals: Sendable {
    /// How long a reply streams between two snapshots at most (one is also offered with every
    /// prepaid batch); what waits is written within one more interval. Together they bound what
    /// a crash can cut from the stored text.
    static let interval: UInt64 = 100_000_000

    private struct State {
        /// The newest snapshot of each reply that changed since its last write.
        var waiting: [String: StreamJournal] = [:]
        /// Replies stored since the last write: their journals are deleted with the next.
        var finished: [String] = []
        /// The replies the write in flight stores, and that write.
        var inFlight: (streams: Set<String>, write: Task<Void, Never>)?
        var writer: Task<Void, Never>?
    }

    private let store: any StreamJournalStore
    private let logger: Logger
    private let state = Mutex(State())

    init(store: any StreamJournalStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    /// Starts journaling `journal` (no text yet): its first snapshot is written with the next.
    func open(_ journal: StreamJournal) -> StreamJournalWriter {
        let writer = StreamJournalWriter(journal, journals: self)
        offer(journal)
        return writer
    }

    fileprivate func offer(_ journal: StreamJournal) {
        state.withLock { s in
            s.waiting[journal.stream] = journal
            startWriter(&s)
        }
    }

    private func startWriter(_ s: inout State) {
        guard s.writer == nil else { return }
        s.writer = Task { await self.writeWaiting() }
    }

    /// Returns once every snapshot and deletion handed over so far is written (at shutdown,
    /// after the last stream ended, before the store closes).
    func flush() async {
        while let writer = state.withLock({ $0.writer }) { await writer.value }
    }

    /// Writes what waits, then again once per interval while anything does.
    private func writeWaiting() async {
        while true {
            let started = NIODeadline.now()
            let write = state.withLock { s -> Task<Void, Never>? in
                guard !s.waiting.isEmpty || !s.finished.isEmpty else {
                    s.writer = nil
                    return nil
                }
                let batch = Array(s.waiting.values)
                let finished = s.finished
                s.waiting.removeAll(keepingCapacity: true)
                s.finished.removeAll(keepingCapacity: true)
                let write = Task { [store, logger] in
                    do {
                        try await store.saveStreamJournals(batch, deleting: finished)
                    } catch {
                        // Not tried again (a store that stays down would keep the writer, and a
                        // shutdown's flush, going): the next start-up finds those replies stored
                        // and settled and drops their journals.
                        logger.warning(
                            "journaling replies failed; a crash now would lose more of them",
                            metadata: ["replies": "\(batch.count)", "finished": "\(finished.count)", "error": "\(error)"])
                    }
                }
                s.inFlight = (Set(batch.map(\.stream)), write)
                return write
            }
            guard let write else { return }
            await write.value
            state.withLock { $0.inFlight = nil }
            let spent = UInt64((NIODeadline.now() - started).nanoseconds)
            if spent < Self.interval { try? await Task.sleep(nanoseconds: Self.interval - spent) }
        }
    }

    /// Drops `stream`'s waiting snapshot and waits for a write in flight that holds it: once this
    /// returns, no older snapshot of it can reach the store.
    fileprivate func close(_ stream: String) async {
        let write = state.withLock { s -> Task<Void, Never>? in
            s.waiting[stream] = nil
            guard let inFlight = s.inFlight, inFlight.streams.contains(stream) else { return nil }
            return inFlight.write
        }
        await write?.value
    }

    /// The reply is stored: its journal is deleted with the next write. A write in flight that
    /// holds it is awaited first, so no snapshot of it lands after this returns (an account
    /// deletion that stopped the reply then finds every journal it deletes).
    fileprivate func delete(_ stream: String) async {
        await close(stream)
        state.withLock { s in
            s.finished.append(stream)
            startWriter(&s)
        }
    }

    /// The reply could not be stored: its whole text is written now, for the next start-up.
    fileprivate func keep(_ journal: StreamJournal) async {
        await close(journal.stream)
        do {
            try await store.saveStreamJournal(journal)
        } catch {
            logger.warning("journaling a reply that could not be stored failed", metadata: ["stream": "\(journal.stream)", "error": "\(error)"])
        }
    }
}

/// One reply's journal: `offer` hands the newest text to `StreamJournals`; `finish` removes the
/// row once the reply is stored the ordinary way.
final class StreamJournalWriter: Sendable {
    private struct State {
        var journal: StreamJournal
        var finished = false
    }

    private let journals: StreamJournals
    private let state: Mutex<State>

    fileprivate init(_ journal: StreamJournal, journals: StreamJournals) {
        self.journals = journals
        state = Mutex(State(journal: journal))
    }

    /// The text so far and the output tokens it holds.
    func offer(text: String, outputTokens: Int) {
        update(text: text, outputTokens: outputTokens) { journal in
            // Under the writer's lock, so no snapshot is handed over once `finish` has begun.
            journals.offer(journal)
        }
    }

    /// The reply as it ended (its message or settlement refused by the store): `finish(keep:)`
    /// then writes it whole.
    func ended(text: String, outputTokens: Int, reason: StreamEndReason) {
        update(text: text, outputTokens: outputTokens) { journal in journal.ended = reason }
    }

    /// Sets the text and its tokens, then `then`, unless finished.
    private func update(text: String, outputTokens: Int, then: (inout StreamJournal) -> Void) {
        state.withLock { s in
            guard !s.finished else { return }
            s.journal.text = text
            s.journal.outputTokens = outputTokens
            s.journal.updatedAt = Int64(Timestamp.nowMillis())
            then(&s.journal)
        }
    }

    /// Stops journaling, waits for a write in flight, and has the journal deleted with the next
    /// write, unless `keep` (the reply could not be stored: the journal is written whole now and
    /// the next start-up stores the reply from it).
    func finish(keep: Bool = false) async {
        let journal = state.withLock { s in
            s.finished = true
            return s.journal
        }
        if keep { await journals.keep(journal) } else { await journals.delete(journal.stream) }
    }
}
