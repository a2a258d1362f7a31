import ParleyCore

extension ChatStore {
    /// An empty conversation.
    public func createConversation(_ conversation: Conversation) async throws {
        try await createConversation(conversation, messages: [])
    }

    /// Stores a reply: in place of `replacing` (the reply it regenerates) while that is on the
    /// path, unless the path went on after the reply began (a message on it is newer than the
    /// reply's id: the user wrote on while the store refused the reply, and must not see their
    /// messages leave the path for it); else as `appendMessage` does, after its parent
    /// (`replacing`'s when it names none), so off the path unless that ends it. True when it took
    /// `replacing`'s place (or replaced nothing).
    @discardableResult
    public func appendReply(_ reply: Message, replacing: String?) async throws -> Bool {
        guard let replacing else {
            try await appendMessage(reply)
            return true
        }
        var reply = reply
        if let newest = try await messages(conversation: reply.conversation, limit: 1, before: nil).last, newest.id > reply.id {
            if reply.parent == nil, let original = try await message(id: replacing, conversation: reply.conversation) {
                reply.parent = original.parent ?? ""  // beside it
            }
        } else if try await appendAlternative(reply, replacing: replacing) != nil {
            return true
        }
        try await appendMessage(reply)
        return false
    }
}

/// Everything Parley persists, behind one async interface made of one protocol per domain, so a
/// part of the server depends only on what it uses (the credits on the ledger, the audit log on
/// privacy). One type per backend conforms to all of them, and every backend passes the same
/// conformance suite (Tests/ParleyStoreTests). Implementations must never block an event loop:
/// blocking drivers run their calls on a thread pool.
///
/// Ownership is part of every read: asking for another user's clone or conversation answers nil,
/// exactly as if it did not exist, so callers cannot leak existence by accident.
public protocol Store: ChatStore, LedgerStore, StreamJournalStore, ScheduleStore, RoomStore, PrivacyStore, PlanStore, PaymentStore, MediaStore,
    PersonaStore
{
    /// A round trip through the store (for `/healthz`): throws when it cannot serve calls, and
    /// `StoreError.full` for a while after a write found no space (see `SpaceWatch`).
    func ping() async throws

    /// Flushes and releases resources. Calls after `close` fail with `StoreError.closed`.
    func close() async throws

    /// A reply's prompt debit and what its request stores before the reply is generated, in one
    /// call: one commit where the backend has transactions, so the first token waits for one
    /// `fdatasync` instead of two (#26). `debit` is applied as `apply` applies it with `headroom`
    /// and no overdraft, and `opening` is stored only when it was applied (or had been): a refused
    /// debit stores nothing. When `opening` cannot be stored the call throws and nothing is
    /// charged (the debit is rolled back with it), or, where one transaction cannot hold both,
    /// it throws `OpeningNotStored`: the debit stands, for the caller to give back.
    func apply(_ debit: LedgerEntry, headroom: Int64, caps: [SpendCap], storing opening: ReplyOpening) async throws -> LedgerOutcome
}

/// What a chat request stores before its reply is generated: the user's message, in the same
/// write as the prompt's debit (`Store.apply(_:headroom:caps:storing:)`).
public enum ReplyOpening: Sendable, Equatable {
    /// A new conversation with its first messages (a card's greeting, the user's message).
    case conversation(Conversation, messages: [Message])
    /// Messages appended to their conversation, the first in place of `replacing` on its path
    /// when given (an edit): as `appendAlternative`, and nothing is stored (the call throws
    /// `ReplacedMessageLeftPath`) when `replacing` is no longer on the path.
    case messages([Message], replacing: String?)
}

/// An edit's message could not take the place of `id`: that message left the conversation's path.
public struct ReplacedMessageLeftPath: Error, Equatable {
    public var id: String
    public init(id: String) { self.id = id }
}

/// A message could not be stored after `id`, its parent: the conversation no longer has it.
public struct ParentMessageGone: Error, Equatable {
    public var id: String
    public init(id: String) { self.id = id }
}

/// A backend without one transaction across a debit and a reply's opening failed to store the
/// opening (`error`) after the debit: the debit stands (`applied`: by this call, not before).
public struct OpeningNotStored: Error {
    public var applied: Bool
    public var error: any Error
    public init(applied: Bool, error: any Error) {
        self.applied = applied
        self.error = error
    }
}

extension Store {
    /// One call after the other, for a backend without a transaction across both (MongoDB's
    /// documents here): the debit, then the opening; `OpeningNotStored` when the second fails.
    public func apply(_ debit: LedgerEntry, headroom: Int64, caps: [SpendCap], storing opening: ReplyOpening) async throws -> LedgerOutcome {
        let outcome = try await apply(debit, allowOverdraft: false, headroom: headroom, caps: caps)
        switch outcome {
        case .insufficient, .overLimit: return outcome
        case .applied, .alreadyApplied: break
        }
        do {
            try await storeOpening(opening)
        } catch {
            throw OpeningNotStored(applied: outcome.isApplied, error: error)
        }
        return outcome
    }

    /// Stores `opening` by itself.
    public func storeOpening(_ opening: ReplyOpening) async throws {
        switch opening {
        case .conversation(let conversation, let messages):
            try await createConversation(conversation, messages: messages)
        case .messages(let messages, let replacing):
            for (index, message) in messages.enumerated() {
                if index == 0, let replacing {
                    guard try await appendAlternative(message, replacing: replacing) != nil else {
                        throw ReplacedMessageLeftPath(id: replacing)
                    }
                } else {
                    try await appendMessage(message)
                }
            }
        }
    }
}

/// Users, clones, their conversations and messages.
public protocol ChatStore: Sendable {
    /// Records the user on first sight; returns the stored user either way.
    func ensureUser(_ id: String, now: Int64) async throws -> User

    func createClone(_ clone: Clone) async throws
    func clone(id: String, owner: String) async throws -> Clone?
    /// The owner's clones, oldest first, `limit` at most, after the one named `after` when given
    /// (a clone may carry megabytes of lorebook: callers read them a page at a time).
    func clones(owner: String, limit: Int, after: String?) async throws -> [Clone]
    /// How many clones the owner has, without reading them.
    func cloneCount(owner: String) async throws -> Int
    /// Replaces the stored clone with the same id and owner; false when there is none.
    func updateClone(_ clone: Clone) async throws -> Bool
    /// Deletes the clone with its conversations and their messages; false when there is none.
    func deleteClone(id: String, owner: String) async throws -> Bool

    /// Creates `conversation` with its first `messages`, in order (each after the one before it
    /// unless it names its parent), in one store call: one commit where the backend has
    /// transactions, so a new chat's first message or a branch's copy is never seen half-made.
    func createConversation(_ conversation: Conversation, messages: [Message]) async throws
    func conversation(id: String, owner: String) async throws -> Conversation?
    /// The owner's conversations, newest first, `limit` at most, older than `before` when given.
    func conversations(owner: String, limit: Int, before: String?) async throws -> [Conversation]

    /// Appends a message after its `parent` (after the path's last message when that is nil) and
    /// moves the conversation's `updated_at` to the message's time. It is on the path when its
    /// parent is the path's last message; otherwise it is kept off it, as an alternative (a reply
    /// stored late, after its question was edited or answered another way, must not show on a
    /// path whose messages it does not follow). Throws `ParentMessageGone`, storing nothing, when
    /// the conversation no longer has its parent (deleted, with what was below it).
    func appendMessage(_ message: Message) async throws
    /// Appends `message` in place of `replaced` on the conversation's path: `replaced` and what
    /// follows it there leave the path (kept, as alternatives one can go back to) and `message`,
    /// given `replaced`'s parent, ends the path. Returns the stored message (with its parent); nil
    /// when `replaced` is not on the path of `message.conversation` (nothing is stored then).
    func appendAlternative(_ message: Message, replacing replaced: String) async throws -> Message?
    /// Makes the path through `message` the conversation's path: its ancestors, it, then from it
    /// on each newest child. False when the conversation has no such message.
    func activate(message: String, conversation: String) async throws -> Bool
    /// Renames a conversation of `owner`: the renamed conversation; nil when it has none of that id.
    func renameConversation(id: String, owner: String, title: String) async throws -> Conversation?
    /// Stores a conversation's rolling summary if the one it has runs through `previous` (nil:
    /// it has none), so that of two summaries written at once the first stays; false otherwise.
    func setSummary(_ summary: ConversationSummary, conversation: String, owner: String, replacing previous: String?) async throws -> Bool
    /// Deletes a conversation of `owner` and all its messages; false when it has none of that id.
    func deleteConversation(id: String, owner: String) async throws -> Bool
    /// Deletes a message and every message below it (the replies to it, their alternatives…).
    /// When it was on the path, the path goes on through its parent (to its newest other child).
    /// Returns how many messages were deleted: 0 when the conversation has no such message.
    func deleteMessage(id: String, conversation: String) async throws -> Int
    /// For each of `messages` (ids in `conversation`): how many messages share its parent and its
    /// place among them. Messages not found are left out.
    func alternatives(of messages: [String], conversation: String) async throws -> [String: Alternatives]
    /// A page of a conversation's path (the messages shown, oldest first): the newest `limit` of
    /// its messages older than `before` (a message id) when given. Messages off the path (replies
    /// regenerated, messages edited, branches not chosen) are not in it.
    func messages(conversation: String, limit: Int, before: String?) async throws -> [Message]
    /// A message by id, whatever its conversation (the caller checks whose that is); nil when absent.
    func message(id: String) async throws -> Message?
    /// A page of every message of a conversation, on its path or not (the privacy export), in
    /// chronological order: the newest `limit` older than `before` when given.
    func everyMessage(conversation: String, limit: Int, before: String?) async throws -> [Message]
    /// One message of a conversation, nil when absent.
    func message(id: String, conversation: String) async throws -> Message?
    /// `owner`'s messages (on the path or not) and conversation titles that hold every term of
    /// `query`, newest first (`SearchHit.order`), `limit` at most, older than `before` (a hit's
    /// id) when given. Never another user's: served by an index, not a scan.
    func search(owner: String, query: SearchQuery, limit: Int, before: String?) async throws -> [SearchHit]
}

/// Credits: balances and the ledger that explains them.
public protocol LedgerStore: Sendable {
    /// The user's balance; 0 for a user with no ledger entries.
    func balance(user: String) async throws -> Int64

    /// Applies one ledger entry atomically and idempotently: the balance changes by
    /// `entry.credits` and the entry is recorded, or neither happens. A negative entry that the
    /// balance does not cover is refused (`insufficient`) unless `allowOverdraft`. An entry whose
    /// id was applied before changes nothing (`alreadyApplied`). Concurrent callers can never
    /// overdraw a balance.
    ///
    /// With `caps` (a reply's entries, for a user who set spending limits), a negative entry is
    /// also refused (`overLimit`) when it would take what was spent in any cap's window past its
    /// `max`, atomically with the balance; a positive one (a settlement's return) gives back to
    /// each window what it returns. An entry applied before counts nothing again.
    ///
    /// `headroom` (≥ 0, for a debit without overdraft, a free one of 0 credits too): the balance,
    /// and each cap's window, must still cover `headroom` more after the entry, or it is refused
    /// the same way. A reply's prompt debit keeps its output reserve covered so, with no read
    /// before it.
    func apply(_ entry: LedgerEntry, allowOverdraft: Bool, headroom: Int64, caps: [SpendCap]) async throws -> LedgerOutcome

    /// One applied ledger entry by id, whoever it belongs to; nil when there is none.
    func ledgerEntry(id: String) async throws -> LedgerEntry?

    /// The user's applied ledger entries, newest first, `limit` at most, older than `before`.
    func ledger(user: String, limit: Int, before: String?) async throws -> [LedgerEntry]

    /// A page of `ledger(user:limit:before:)` and the user's balance, read at one moment: the
    /// balance is the sum of every entry applied up to then, the page's newest included, none
    /// applied later (what `GET /v1/credits` shows side by side).
    func ledgerPage(user: String, limit: Int, before: String?) async throws -> (entries: [LedgerEntry], balance: Int64)

    /// What `user` spent on each of `ids` (conversations or rooms, as `link` says): the negated
    /// sum of the applied entries linked to it. Ids with no entry are absent.
    func costs(user: String, link: LedgerLink, ids: [String]) async throws -> [String: Int64]

    /// Every user's applied entries created in [from, to) (`to` nil: on), oldest first, `limit`
    /// at most, after the entry `after` (its time and id) when given: the admin's usage report.
    func ledgerEntries(from: Int64, to: Int64?, after: (createdAt: Int64, id: String)?, limit: Int) async throws -> [LedgerEntry]

    /// Completes or voids entries a crash left half-applied (a no-op where applying is one
    /// transaction). Called at start-up, before serving. Returns how many it settled. A store
    /// several nodes share (MongoDB) takes only the entries `node` left (and those no node
    /// stamped); nil takes every one. A store one node owns (SQLite) has no other node's.
    func recoverLedger(node: String?) async throws -> Int
}

extension LedgerEntry {
    /// The headroom `LedgerStore.apply` holds this entry to when `asked`: none for a grant, a
    /// settlement's return or an overdraft.
    public func headroom(_ asked: Int64, allowOverdraft: Bool) -> Int64 {
        credits <= 0 && !allowOverdraft ? max(0, asked) : 0
    }
}

extension LedgerStore {
    public func apply(_ entry: LedgerEntry, allowOverdraft: Bool) async throws -> LedgerOutcome {
        try await apply(entry, allowOverdraft: allowOverdraft, headroom: 0, caps: [])
    }

    public func apply(_ entry: LedgerEntry, allowOverdraft: Bool, caps: [SpendCap]) async throws -> LedgerOutcome {
        try await apply(entry, allowOverdraft: allowOverdraft, headroom: 0, caps: caps)
    }

    /// Every entry a crash left half-applied, whichever node wrote it.
    public func recoverLedger() async throws -> Int { try await recoverLedger(node: nil) }
}

/// What a reply in flight has streamed so far, so a crash cannot lose what a user saw.
public protocol StreamJournalStore: Sendable {
    /// Stores the journal of a reply in flight, replacing the one of the same stream.
    func saveStreamJournal(_ journal: StreamJournal) async throws
    /// Stores several journals (each replacing the one of its stream) and deletes those of the
    /// `finished` streams (none of which is among `journals`), in one write where the backend can.
    func saveStreamJournals(_ journals: [StreamJournal], deleting finished: [String]) async throws
    func deleteStreamJournal(stream: String) async throws
    /// Journals left by replies a crash cut short, oldest first, `limit` at most: those `node`
    /// wrote (and those no node stamped) in a store several nodes share, every one for nil.
    func streamJournals(limit: Int, node: String?) async throws -> [StreamJournal]
}

extension StreamJournalStore {
    public func saveStreamJournals(_ journals: [StreamJournal], deleting finished: [String]) async throws {
        for journal in journals { try await saveStreamJournal(journal) }
        for stream in finished { try await deleteStreamJournal(stream: stream) }
    }

    public func saveStreamJournals(_ journals: [StreamJournal]) async throws {
        try await saveStreamJournals(journals, deleting: [])
    }

    public func streamJournals(limit: Int) async throws -> [StreamJournal] { try await streamJournals(limit: limit, node: nil) }
}

/// Scheduled messages and the compare-and-set steps that fire each exactly once.
public protocol ScheduleStore: Sendable {
    func createSchedule(_ schedule: Schedule) async throws
    func schedule(id: String, owner: String) async throws -> Schedule?
    /// The owner's schedules, newest first, `limit` at most, older than `before` when given.
    func schedules(owner: String, limit: Int, before: String?) async throws -> [Schedule]
    /// Schedules in one of `statuses` (of `owner` when given), oldest first, `limit` at most,
    /// created after `after` when given: start-up loading and the undelivered inbox.
    func schedules(statuses: [Schedule.Status], owner: String?, limit: Int, after: String?) async throws -> [Schedule]
    /// Atomically moves a schedule that is in status `from` to `change`; nil (and no change)
    /// when it was not in `from`. This compare-and-set is what makes a schedule fire once.
    func transitionSchedule(id: String, from: Schedule.Status, to change: ScheduleChange) async throws -> Schedule?
    /// Stores the message of a `firing` schedule (and its conversation when `newConversation`)
    /// and marks it `fired`. In one transaction where the backend has them; idempotent always: a
    /// message or conversation already stored under its id (by an attempt a crash interrupted) is
    /// kept. Returns the fired schedule, nil when it was not firing.
    func completeSchedule(id: String, message: Message, newConversation: Conversation?, now: Int64) async throws -> Schedule?
}

/// Debate rooms and translation chats with their transcripts.
public protocol RoomStore: Sendable {
    func createRoom(_ room: Room) async throws
    /// A room by id whoever asks: link rooms are readable by anyone with the id, so the caller
    /// checks access (the one read here without an owner).
    func room(id: String) async throws -> Room?
    /// Replaces the stored room with the same id; false when there is none.
    func updateRoom(_ room: Room) async throws -> Bool
    /// Rooms in one of `statuses`, oldest first, `limit` at most, created after `after`.
    func rooms(statuses: [Room.Status], limit: Int, after: String?) async throws -> [Room]
    func appendRoomEntry(_ entry: RoomEntry) async throws
    /// A page of a room's transcript in chronological order: the newest `limit` entries older
    /// than `before` (an entry id) when given.
    func roomEntries(room: String, limit: Int, before: String?) async throws -> [RoomEntry]
    /// The rooms `owner` owns, oldest first, `limit` at most, created after `after` (the export).
    func rooms(owner: String, limit: Int, after: String?) async throws -> [Room]
}

/// What the privacy promises need: saved messages, deleting a user, retention, the audit log.
public protocol PrivacyStore: Sendable {
    /// Marks a message of a conversation saved (kept by retention) or not; false when absent.
    func setMessageSaved(id: String, conversation: String, saved: Bool) async throws -> Bool
    /// Deletes everything stored of the user: their clones with their conversations and
    /// messages, schedules, the rooms they own with their transcripts, what they said in other
    /// rooms and their membership there, and the user record. Ledger rows and the balance are
    /// kept, as the law requires, moved to `pseudonym` and detached from content
    /// (`LedgerEntry.detached`); their audit events move to the pseudonym too. Idempotent: a
    /// retried call after a crash part-way finishes the job.
    func deleteUser(_ id: String, pseudonym: String) async throws -> UserDeletion
    /// Deletes up to `limit` unsaved messages and up to `limit` room entries created before
    /// `cutoff` (Unix ms), oldest first. Callers repeat until a pass deletes fewer than `limit`.
    func purge(createdBefore cutoff: Int64, limit: Int) async throws -> PurgeResult
    /// Signs sessions of `user` out (#28): the one named `session`, or, for nil, every session
    /// whose token was issued before `at` (Unix ms). Idempotent.
    func revokeSessions(user: String, session: String?, at: Int64) async throws
    /// What `revokeSessions` stored for `user`.
    func sessionRevocations(user: String) async throws -> SessionRevocations
    func appendAudit(_ event: AuditEvent) async throws
    /// Audit events newest first, `limit` at most, older than `before` (an event id) when given;
    /// with `involving`, only those whose actor or target is that user (their export).
    func auditEvents(limit: Int, before: String?, involving user: String?) async throws -> [AuditEvent]
    /// Deletes up to `limit` audit events recorded before `cutoff` (Unix ms), oldest first, and
    /// says how many. Callers repeat until a pass deletes fewer than `limit`.
    func purgeAudit(before cutoff: Int64, limit: Int) async throws -> Int
}

/// A user's signed-out sessions: those named, and every token issued before `allBefore`.
public struct SessionRevocations: Sendable, Equatable {
    public var sessions: Set<String>
    /// Unix ms; nil when the user never signed out everywhere.
    public var allBefore: Int64?

    public init(sessions: Set<String> = [], allBefore: Int64? = nil) {
        self.sessions = sessions
        self.allBefore = allBefore
    }
}

/// The new state of a schedule; nil fields keep their stored value.
public struct ScheduleChange: Sendable, Equatable {
    public var status: Schedule.Status
    public var updatedAt: Int64
    public var conversation: String?
    public var message: String?
    public var failure: String?

    public init(status: Schedule.Status, updatedAt: Int64, conversation: String? = nil, message: String? = nil, failure: String? = nil) {
        self.status = status
        self.updatedAt = updatedAt
        self.conversation = conversation
        self.message = message
        self.failure = failure
    }
}

public enum StoreError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A unique key already holds that value.
    case duplicateKey(String)
    /// The stored schema is newer than this build understands; refuse rather than corrupt it.
    case schemaTooNew(found: Int, supported: Int)
    case closed
    /// The store has no space left to write (a full disk, or its size limit): nothing more is
    /// stored until space is freed. Reads still work. The message is for operators.
    case full(String)
    /// The backend cannot be reached (the network, or no primary to write to) after the
    /// retries a call gets: try again shortly. The message is for operators.
    case unreachable(String)
    /// The backend failed; the message is for operators, not clients.
    case backend(String)

    public var description: String {
        switch self {
        case .duplicateKey(let key): "duplicate key: \(key)"
        case .schemaTooNew(let found, let supported):
            "the store's schema version \(found) is newer than this build supports (\(supported)); upgrade Parley"
        case .closed: "the store is closed"
        case .full(let message): "no space left to store anything: \(message)"
        case .unreachable(let message): "the store is unreachable: \(message)"
        case .backend(let message): message
        }
    }
}

/// How every backend stores a room's languages: a JSON object of id → tag.
public enum RoomCoding {
    public static func languages(_ languages: [String: LanguageTag]) -> JSONValue {
        .object(languages.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value.value)) })
    }

    /// Tags that no longer parse are dropped rather than failing the whole room.
    public static func languages(_ value: JSONValue) -> [String: LanguageTag] {
        guard case .object(let pairs) = value else { return [:] }
        var out: [String: LanguageTag] = [:]
        for (id, tag) in pairs {
            if let text = tag.stringValue, let language = LanguageTag(text) { out[id] = language }
        }
        return out
    }
}

/// A user's subscription to a plan (#27), as the payment provider's events left it.
public struct Subscription: Sendable, Equatable {
    public enum Status: String, Sendable, Equatable {
        case active
        /// A renewal failed: the plan holds until `periodEnd`, and a renewal makes it active again.
        case pastDue = "past_due"
        /// Cancelled: the plan holds until `periodEnd`, then the user is on the default plan.
        case cancelled
    }

    public var user: String
    public var plan: String
    public var status: Status
    /// Unix ms: the paid period's end, after which the plan lapses unless renewed.
    public var periodEnd: Int64
    /// The time (Unix ms) of the provider's event this state came from: an older event arriving
    /// late changes nothing.
    public var updatedAt: Int64
    /// That event's id. Events are ordered by (`updatedAt`, `event`): of two in the same
    /// millisecond the greater id wins, whichever arrives first, so every node and every delivery
    /// order ends in the same state, and a replay never changes it.
    public var event: String

    public init(user: String, plan: String, status: Status, periodEnd: Int64, updatedAt: Int64, event: String = "") {
        self.user = user
        self.plan = plan
        self.status = status
        self.periodEnd = periodEnd
        self.updatedAt = updatedAt
        self.event = event
    }

    /// Whether this state comes from a later event than `other`'s.
    public func isNewer(than other: Subscription) -> Bool { (updatedAt, event) > (other.updatedAt, other.event) }
}

/// Which plan each user subscribed to (#27). Deleting a user deletes theirs.
public protocol PlanStore: Sendable {
    func subscription(user: String) async throws -> Subscription?
    /// Stores `subscription` unless the one stored came from an event as new or newer
    /// (`Subscription.isNewer`); true when it was stored. Atomic: of two racing writes the newer wins.
    func saveSubscription(_ subscription: Subscription) async throws -> Bool
    /// The limits `user` set on their own spending (none set: no limits).
    func spendLimits(user: String) async throws -> SpendLimits
    func setSpendLimits(_ limits: SpendLimits, user: String) async throws
    /// What `user`'s replies spent in each of `windows` (`SpendCap.window`); absent: nothing.
    func spent(user: String, windows: [String]) async throws -> [String: Int64]
    /// Deletes up to `limit` spend windows of every user that are over: days before `day`
    /// (`day:YYYY-MM-DD`) and months before `month` (`month:YYYY-MM`); says how many.
    func purgeSpendWindows(before day: String, _ month: String, limit: Int) async throws -> Int
}

/// Who each user is to their clones (`Persona`). Deleting a user deletes theirs.
public protocol PersonaStore: Sendable {
    func persona(user: String) async throws -> Persona?
    /// Stores `persona` as `user`'s in place of any before, or with nil removes theirs.
    func setPersona(_ persona: Persona?, user: String) async throws
}

/// Payment orders and the webhook's delivery log (#27), kept 7 years for tax and disputes.
/// Deleting a user moves theirs to the pseudonym, like the ledger.
public protocol PaymentStore: Sendable {
    /// Records `change` on order `id` atomically, creating the order for `user` (sortable `key`)
    /// when it is new, and returns the order after it; `applied` is false when the change's event
    /// was recorded before (nothing changed). `credits` is the pack's, when the event names it.
    func recordOrderChange(
        order id: String, user: String, key: String, credits: Int64?, change: PaymentOrder.Change
    ) async throws -> (order: PaymentOrder, applied: Bool)
    func paymentOrder(id: String) async throws -> PaymentOrder?
    /// Orders newest first (by `key`), `limit` at most, before `before` (a key); one user's or, for
    /// nil, everyone's.
    func paymentOrders(user: String?, limit: Int, before: String?) async throws -> [PaymentOrder]
    func appendWebhookDelivery(_ delivery: WebhookDelivery) async throws
    /// Deliveries newest first, `limit` at most, older than `before` (an id) when given.
    func webhookDeliveries(limit: Int, before: String?) async throws -> [WebhookDelivery]
    /// Deletes up to `limit` orders last changed, and up to `limit` deliveries made, before
    /// `cutoff` (Unix ms), oldest first; returns how many in all. Callers repeat until a pass
    /// deletes fewer than `limit` of each.
    func purgePayments(before cutoff: Int64, limit: Int) async throws -> (orders: Int, deliveries: Int)
}

/// What a ledger entry may be linked to, for summing costs.
public enum LedgerLink: String, Sendable {
    case conversation
    case room
}

/// Voiced replies' audio (#29). A clip goes with its conversation, its room and its owner's
/// account; unsaved ones are purged by age.
public protocol MediaStore: Sendable {
    func saveClip(_ clip: VoiceClip) async throws
    /// The owner's clip, with its audio when `withAudio`.
    func clip(id: String, owner: String, withAudio: Bool) async throws -> VoiceClip?
    /// The owner's clips, newest first, without their audio.
    func clips(owner: String, limit: Int, before: String?) async throws -> [VoiceClip]
    func setClipSaved(id: String, owner: String, saved: Bool) async throws -> Bool
    func deleteClip(id: String, owner: String) async throws -> Bool
    /// Deletes up to `limit` unsaved replies' clips made before `cutoff` (never a recording); how many.
    func purgeClips(createdBefore cutoff: Int64, limit: Int) async throws -> Int
}
