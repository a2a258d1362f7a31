import Logging
import NIOCore
import ParleyCore
import ParleyStore
import Synchronization

/// Keeps one stream's journal in the store while it streams, off the token path: `offer` only
/// hands over the newest snapshot, and one write at a time stores whatever is newest when it
/// starts, so a slow store delays the journal, never a token. `finish` waits for the last write
/// and removes the row once the reply is stored the ordinary way.
final class StreamJournalWriter: Sendable {
    /// How long a reply streams between two journal snapshots at most (one is also taken with
    /// every prepaid batch): about what a crash can cut from the stored text.
    static let interval: UInt64 = 200_000_000

    private struct State {
        var journal: StreamJournal
        var dirty = true
        var writing: Task<Void, Never>?
        var finished = false
    }

    private let store: any StreamJournalStore
    private let logger: Logger
    private let state: Mutex<State>

    /// Starts journaling `journal` (no text yet): its first write goes out at once.
    init(_ journal: StreamJournal, store: any StreamJournalStore, logger: Logger) {
        self.store = store
        self.logger = logger
        state = Mutex(State(journal: journal))
        write()
    }

    /// The text so far and the output tokens it holds.
    func offer(text: String, outputTokens: Int) {
        state.withLock { s in
            guard !s.finished else { return }
            s.journal.text = text
            s.journal.outputTokens = outputTokens
            s.journal.updatedAt = Int64(Timestamp.nowMillis())
            s.dirty = true
        }
        write()
    }

    /// Starts the writer unless one runs; it writes until nothing newer is left.
    private func write() {
        state.withLock { s in
            guard s.writing == nil, s.dirty, !s.finished else { return }
            s.writing = Task { await self.drain() }
        }
    }

    private func drain() async {
        while true {
            let next = state.withLock { s -> StreamJournal? in
                guard s.dirty, !s.finished else {
                    s.writing = nil
                    return nil
                }
                s.dirty = false
                return s.journal
            }
            guard let next else { return }
            do {
                try await store.saveStreamJournal(next)
            } catch {
                logger.warning(
                    "journaling a reply failed; a crash now would lose more of it", metadata: ["stream": "\(next.stream)", "error": "\(error)"])
            }
        }
    }

    /// Stops journaling, waits for a write in flight, and removes the journal, unless `keep` (the
    /// reply could not be stored: the next start-up stores it from the journal).
    func finish(keep: Bool = false) async {
        let (writing, journal) = state.withLock { s in
            s.finished = true
            return (s.writing, s.journal)
        }
        await writing?.value
        do {
            if keep {
                try await store.saveStreamJournal(journal)
            } else {
                try await store.deleteStreamJournal(stream: journal.stream)
            }
        } catch {
            logger.warning("removing a reply's journal failed; the next start-up finds it stored already", metadata: ["error": "\(error)"])
        }
    }
}
