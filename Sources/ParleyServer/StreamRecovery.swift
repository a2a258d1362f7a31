import Logging
import ParleyCore
import ParleyStore

/// Finishes, at start-up, the replies a crash (even `kill -9`) left open: each journal's text is
/// stored where the reply belonged, marked `interrupted` (or as it ended, for a reply the store
/// refused once it had), and its credits are settled for exactly that text (what its ledger
/// entries prepaid beyond it is refunded). Runs before anything is served; every step is
/// idempotent, so a crash during recovery only means it runs again.
struct StreamRecovery {
    let store: any Store
    let credits: Credits
    let logger: Logger

    /// What became of one journal: its reply's id when stored, and what it charged (nil when an
    /// earlier recovery had settled it).
    struct Finished {
        var journal: StreamJournal
        var stored: String?
        var usage: Usage
        var cost: Int64?
        var balance: Int64?
    }

    /// Finishes every journal `node` left (every one for nil: the node is alone on its store);
    /// returns how many. `revise` may extend a journal with what it missed (a cluster's copy of
    /// the tokens sent after its last write); `finished` hears of each once it is stored and
    /// settled.
    func run(
        node: String? = nil, revise: (StreamJournal) async -> StreamJournal = { $0 }, finished: (Finished) async -> Void = { _ in }
    ) async throws -> Int {
        var count = 0
        while true {
            let journals = try await store.streamJournals(limit: 100, node: node)
            guard !journals.isEmpty else { return count }
            for journal in journals {
                await finished(try await finish(await revise(journal)))
                count += 1
            }
        }
    }

    private func finish(_ journal: StreamJournal) async throws -> Finished {
        let usage = Usage(inputTokens: journal.inputTokens, outputTokens: journal.outputTokens)
        let stream = journal.stream
        var room: String?
        var conversation: String?
        switch journal.target {
        case .conversation(let id, _), .alternative(let id, _): conversation = id
        case .roomTurn(let id, _): room = id
        case .settleOnly(let linked, let linkedRoom): (conversation, room) = (linked, linkedRoom)
        }
        var outcome = Finished(journal: journal, usage: usage)
        if try await store.ledgerEntry(id: "\(stream):settle") == nil {
            // What the stream paid: its prompt and its prepaid batches (numbered without gaps).
            var charged: Int64 = -(try await store.ledgerEntry(id: "\(stream):in")?.credits ?? 0)
            var batches = 0
            while let batch = try await store.ledgerEntry(id: "\(stream):\(batches + 1)") {
                charged -= batch.credits
                batches += 1
            }
            let meter = credits.meter(
                user: journal.user, stream: stream, conversation: conversation, room: room, model: journal.model,
                feature: Feature(rawValue: journal.feature) ?? .chat)
            await meter.recover(charged: charged, batches: batches)
            let (cost, balance, settled) = await meter.settle(usage: usage)
            // Its journal stays for the next recovery.
            guard settled else { throw SettlementFailed(stream: stream) }
            (outcome.cost, outcome.balance) = (cost, balance)
        }
        func reply(in conversation: String, parent: String?) -> Message {
            Message(
                id: journal.messageID, conversation: conversation, role: .assistant, text: journal.text, createdAt: journal.updatedAt,
                reason: journal.ended ?? .interrupted, usage: usage, stream: stream, parent: parent)
        }
        do {
            // Absent when its owner deleted it (or the account, or the room) meanwhile: nothing to show.
            if try await Self.targetExists(journal.target, owner: journal.user, in: store) {
                outcome.stored = journal.messageID
                switch journal.target {
                case .conversation(let id, let parent):
                    // After the message it answers, wherever the path has gone since.
                    try await store.appendReply(reply(in: id, parent: parent), replacing: nil)
                case .alternative(let id, let original):
                    // A regenerated reply takes its original's place, as it would have had it ended.
                    try await store.appendReply(reply(in: id, parent: nil), replacing: original)
                case .roomTurn(let id, let speaker):
                    try await store.appendRoomEntry(
                        RoomEntry(
                            id: journal.messageID, room: id, kind: .turn, speaker: speaker, text: journal.text,
                            createdAt: journal.updatedAt, reason: journal.ended ?? .interrupted, stream: stream))
                case .settleOnly:
                    break
                }
            }
        } catch StoreError.duplicateKey {
            // Stored by the stream itself just before the crash, or by an earlier recovery.
        } catch is ParentMessageGone {
            // The message it answers was deleted meanwhile, with what was below it: so is the reply.
            outcome.stored = nil
        }
        try await store.deleteStreamJournal(stream: stream)
        logger.notice(
            "stored a reply a crash cut short",
            metadata: [
                "stream": "\(stream)", "tokens": "\(journal.outputTokens)", "target": "\(journal.target.columns.kind)",
            ])
        return outcome
    }
}

extension StreamRecovery {
    /// Whether a journal's conversation or room is still there to store its reply in (a
    /// settle-only journal, a translation's, has nothing to store). The recovery and a retry
    /// while the node runs (`KeptReplies`) store only where it holds.
    static func targetExists(_ target: StreamJournal.Target, owner: String, in store: any Store) async throws -> Bool {
        switch target {
        case .conversation(let id, _), .alternative(let id, _): try await store.conversation(id: id, owner: owner) != nil
        case .roomTurn(let room, _): try await store.room(id: room) != nil
        case .settleOnly: false
        }
    }
}

/// A recovered stream's settlement could not be stored (logged where it failed): its journal
/// stays for the next recovery.
struct SettlementFailed: Error, CustomStringConvertible {
    var stream: String
    var description: String { "the settlement of stream \(stream) could not be stored" }
}
