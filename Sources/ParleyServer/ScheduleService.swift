import CoreMetrics
import Logging
import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore
import Synchronization

/// Scheduled messages: creation and cancellation (protocol and REST), firing from the timer
/// wheel, and delivery to the owner's sockets or, when none is open, on their next connect.
///
/// What holds at each step of a firing (see `Schedule` for the statuses):
/// 1. `pending → firing` is a compare-and-set in the store that also fixes the message id (and
///    so the stream's ledger ids): only one firing can ever win, and a cancel after it fails.
/// 2. The message is generated and stored under that id, and the schedule moves to `fired`, in
///    one transaction (SQLite) or in idempotent steps ending with a compare-and-set (MongoDB).
///    A crash before that leaves it `firing`; the next start fires it again: an already stored
///    message is reused as is, otherwise it is generated again and its ledger ids, already
///    applied, are not charged twice. So the message is stored exactly once and never lost.
/// 3. `delivery` goes to every open socket; once one write succeeded the schedule moves to
///    `delivered`. A crash between the write and that update sends it again on the next
///    connect: delivery is at least once, and clients drop a repeat by its `schedule` id.
///
/// In a cluster (`cluster`), this node fires the schedules of the shards it holds, a user's
/// pending schedules are counted in the store, and a delivery goes to every node where the
/// owner has sockets (see `ScheduleShardKeeper`).
final class ScheduleService: FrameHandler {
    let store: any Store
    let streams: StreamRunner
    let requests: RequestTracker
    let hub: StreamHub
    let sockets: SocketHub
    let configuration: ServerConfiguration
    let logger: Logger
    let ids: IDGenerator
    let timer: ScheduleTimer
    let cluster: ScheduleShardKeeper?
    private let allocator = ByteBufferAllocator()
    private var limits: ScheduleLimits { configuration.frameLimits.schedule }

    private struct State {
        /// Pending schedules per owner (id → clone): the quota, and what a clone deletion cancels.
        var pending: [String: [String: String]] = [:]
        /// Schedules whose delivery is being written, so a connect and a firing never both send it.
        var delivering: Set<String> = []
        /// Schedules being fired here: a timer armed again meanwhile (a catch-up) waits for it.
        var inFlight: Set<String> = []
        var consumer: Task<Void, Never>?
        var stopping = false
    }

    private let state = Mutex(State())
    /// The owner's persona, for the prompt of a scheduled reply.
    private let personas: Personas

    init(
        store: any Store, streams: StreamRunner, configuration: ServerConfiguration, logger: Logger, ids: IDGenerator, loop: any EventLoop,
        cluster: ScheduleShardKeeper? = nil, personas: Personas
    ) {
        self.cluster = cluster
        self.personas = personas
        self.store = store
        self.streams = streams
        self.requests = streams.requests
        self.hub = streams.hub
        self.sockets = streams.sockets
        self.configuration = configuration
        self.logger = logger
        self.ids = ids
        self.timer = ScheduleTimer(loop: loop, tickMillis: configuration.scheduleTickMillis, metrics: configuration.metrics)
    }

    // MARK: Start and stop

    /// Loads every pending (and interrupted) schedule into the wheel, oldest deadline first, and
    /// starts firing. Those whose time passed while the server was down fire at once, in order.
    func start() async throws {
        if let cluster {
            // This node's own firings a stop cut; the pending ones come with its shards.
            let own = try await cluster.ownFirings()
            timer.add(own.map(Self.resumption))
            if !own.isEmpty { logger.info("resuming schedules this node was firing", metadata: ["count": "\(own.count)"]) }
            let consumer = Task { await self.consume() }
            state.withLock { $0.consumer = consumer }
            try await cluster.start(self)
            return
        }
        var live: [Schedule] = []
        var after: String?
        while true {
            let page = try await store.schedules(statuses: [.pending, .firing], owner: nil, limit: 1_000, after: after)
            live += page
            guard page.count == 1_000 else { break }
            after = page.last?.id
        }
        live.sort { ($0.at, $0.id) < ($1.at, $1.id) }
        state.withLock { s in
            for schedule in live where schedule.status == .pending {
                s.pending[schedule.owner, default: [:]][schedule.id] = schedule.clone
            }
        }
        timer.add(live.map { ScheduleTimer.Entry(id: $0.id, owner: $0.owner, at: $0.at) })
        if !live.isEmpty { logger.info("loaded schedules", metadata: ["count": "\(live.count)"]) }
        let consumer = Task { await self.consume() }
        state.withLock { $0.consumer = consumer }
    }

    /// Stops firing: timers that come due from now on stay pending in the store for the next start.
    func stopFiring() async {
        state.withLock { $0.stopping = true }
        await timer.stop()
    }

    /// Waits for the firings in flight (their streams are stopped by `StreamRunner.shutdown`);
    /// in a cluster, then lets the shards go to the other nodes.
    func drain() async {
        let consumer = state.withLock { $0.consumer }
        await consumer?.value
        await cluster?.stop()
    }

    /// Arms the pending schedules of `shards` (due before `dueBefore`, when given): a node of
    /// a cluster took them, or catches up.
    func load(shards: Set<Int>, dueBefore: Int64? = nil) async throws {
        guard let cluster else { return }
        var after: String?
        while true {
            let page = try await cluster.pending(shards: shards, dueBefore: dueBefore, limit: 1_000, after: after)
            let idle = state.withLock { s in page.filter { !s.inFlight.contains($0.id) } }
            timer.add(idle.map { ScheduleTimer.Entry(id: $0.id, owner: $0.owner, at: $0.at) })
            guard page.count == 1_000 else { return }
            after = page.last?.id
        }
    }

    /// Finishes the firings a stopped node left (`NodeReaper` made them this node's).
    func resumeFirings(_ schedules: [Schedule]) {
        timer.add(schedules.map(Self.resumption))
    }

    /// A firing to finish, at once: its time came when it was claimed.
    private static func resumption(_ schedule: Schedule) -> ScheduleTimer.Entry {
        ScheduleTimer.Entry(id: schedule.id, owner: schedule.owner, at: min(schedule.at, Int64(Timestamp.nowMillis())), resumes: true)
    }

    /// Fires timers as they come, at most `maxConcurrentFirings` at once (a backlog after a long
    /// outage must not start thousands of generations together).
    private func consume() async {
        await withTaskGroup(of: Void.self) { group in
            var running = 0
            for await entry in timer.fired {
                // Stopping, or fired here already (a catch-up armed it again): not fired (again).
                if state.withLock({ $0.stopping || !$0.inFlight.insert(entry.id).inserted }) { continue }
                if running >= configuration.maxConcurrentFirings {
                    await group.next()
                    running -= 1
                }
                running += 1
                // Message ids sort by time and order the transcript, so they are taken here, in
                // firing order, not in whatever order the concurrent firings reach their claim.
                let messageID = ids.make(.message)
                group.addTask {
                    await self.fire(entry, messageID: messageID)
                    _ = self.state.withLock { $0.inFlight.remove(entry.id) }
                }
            }
        }
    }

    // MARK: Create, list, cancel

    /// Validates and stores a new schedule for `owner` and arms its timer.
    func create(owner: String, _ request: ScheduleRequest) async throws(FrameError) -> Schedule {
        let plan: Plan?
        do {
            try await streams.credits.plans?.require(.schedule, user: owner, ref: nil, what: "scheduled messages")
            plan = try await streams.credits.plans?.plan(of: owner)
            guard try await store.clone(id: request.clone, owner: owner) != nil else {
                throw FrameError(ref: nil, code: .notFound, message: "no clone \(request.clone)")
            }
            if let conversationID = request.conversation {
                guard let conversation = try await store.conversation(id: conversationID, owner: owner) else {
                    throw FrameError(ref: nil, code: .notFound, message: "no conversation \(conversationID)")
                }
                guard conversation.clone == request.clone else {
                    throw FrameError(ref: nil, code: .badRequest, message: "conversation \(conversationID) is with another clone")
                }
            }
        } catch let error as FrameError {
            throw error
        } catch {
            throw requests.internalFailure(error, what: "schedule request")
        }
        let now = Int64(Timestamp.nowMillis())
        let schedule = Schedule(
            id: ids.make(.schedule), owner: owner, clone: request.clone, conversation: request.conversation,
            at: request.at, content: request.content, status: .pending, createdAt: now, updatedAt: now)
        // The plan's limit, where it is below the server's, answers plan_required.
        let cap = plan.flatMap { plan in plan.limits.pendingSchedules.flatMap { $0 < limits.maxPendingPerUser ? (plan, $0) : nil } }
        // Made only when it is the answer (making it counts a plan refusal).
        var overPlan: (@Sendable () -> FrameError)?
        if let (plan, limit) = cap, let plans = streams.credits.plans {
            overPlan = { plans.refusal(limit + 1, of: .pendingSchedules, on: plan, ref: nil, what: "pending scheduled messages") }
        }
        if let cluster { return try await createInCluster(schedule, cluster, limit: cap?.1, overPlan: overPlan) }
        // The quota is taken before the write, so concurrent creates cannot overshoot it.
        let admitted = state.withLock { s -> Bool in
            guard s.pending[owner, default: [:]].count < (cap?.1 ?? limits.maxPendingPerUser) else { return false }
            s.pending[owner, default: [:]][schedule.id] = schedule.clone
            return true
        }
        guard admitted else { throw overPlan?() ?? tooMany() }
        do {
            try await store.createSchedule(schedule)
        } catch {
            releaseQuota(schedule)
            throw requests.internalFailure(error, what: "schedule request")
        }
        timer.add(ScheduleTimer.Entry(id: schedule.id, owner: owner, at: schedule.at))
        return schedule
    }

    /// In a cluster the user's pending schedules are counted in the store, after the write: it
    /// is kept when it is among the user's first `maxPendingPerUser` pending ones. (Two creates
    /// racing on two nodes whose clocks differ can both pass: README says so.)
    private func createInCluster(
        _ schedule: Schedule, _ cluster: ScheduleShardKeeper, limit planLimit: Int?, overPlan: (@Sendable () -> FrameError)?
    ) async throws(FrameError) -> Schedule {
        do {
            try await store.createSchedule(schedule)
            let limit = planLimit ?? limits.maxPendingPerUser
            if try await !cluster.isWithinPendingLimit(schedule, limit: limit), try await cluster.withdraw(schedule) {
                throw overPlan?() ?? tooMany()
            }
        } catch let error as FrameError {
            throw error
        } catch {
            throw requests.internalFailure(error, what: "schedule request")
        }
        cluster.announce(ScheduleTimer.Entry(id: schedule.id, owner: schedule.owner, at: schedule.at))
        return schedule
    }

    private func tooMany() -> FrameError { Self.tooMany(limits) }

    private static func tooMany(_ limits: ScheduleLimits) -> FrameError {
        FrameError(
            ref: nil, code: .limitExceeded,
            message: "at most \(limits.maxPendingPerUser) schedules may be pending; cancel one or wait for one to fire")
    }

    /// Cancels a pending schedule; `conflict` once it started firing.
    func cancel(owner: String, id: String) async throws(FrameError) -> Schedule {
        do {
            let change = ScheduleChange(status: .cancelled, updatedAt: Int64(Timestamp.nowMillis()))
            if let cancelled = try await store.transitionSchedule(id: id, from: .pending, to: change), cancelled.owner == owner {
                timer.cancel(id: id)
                releaseQuota(cancelled)
                return cancelled
            }
            guard let existing = try await store.schedule(id: id, owner: owner) else {
                throw FrameError(ref: nil, code: .notFound, message: "no schedule \(id)")
            }
            throw FrameError(ref: nil, code: .conflict, message: "schedule \(id) is \(existing.status.rawValue) and can no longer be cancelled")
        } catch let error as FrameError {
            throw error
        } catch {
            throw requests.internalFailure(error, what: "schedule request")
        }
    }

    /// Cancels the owner's pending schedules of a clone (or all of them) that is being deleted.
    func cancelAll(clone: String? = nil, owner: String) async {
        var victims = state.withLock { s in (s.pending[owner] ?? [:]).filter { clone == nil || $0.value == clone }.map(\.key) }
        if cluster != nil {
            // Another node may fire them: the store knows them all.
            let pending = (try? await store.schedules(statuses: [.pending], owner: owner, limit: 1_000, after: nil)) ?? []
            victims = pending.filter { clone == nil || $0.clone == clone }.map(\.id)
        }
        for id in victims { _ = try? await cancel(owner: owner, id: id) }
    }

    private func releaseQuota(_ schedule: Schedule) {
        state.withLock { s in
            s.pending[schedule.owner]?.removeValue(forKey: schedule.id)
            if s.pending[schedule.owner]?.isEmpty == true { s.pending.removeValue(forKey: schedule.owner) }
        }
    }

    // MARK: Protocol

    func handle(_ frame: ScheduleFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
        requests.serve(frame.id, from: connection, turn: turn, what: "schedule request") {
            let owner = connection.identity.user
            switch frame {
            case let .create(id, request):
                connection.send(ServerFrame.scheduleOK(ref: id, schedule: try await self.create(owner: owner, request)))
            case let .cancel(id, scheduleID):
                connection.send(ServerFrame.scheduleCancelled(ref: id, schedule: try await self.cancel(owner: owner, id: scheduleID)))
            }
        }
    }

    // MARK: Firing

    private func fire(_ entry: ScheduleTimer.Entry, messageID: String) async {
        do {
            guard let schedule = try await store.schedule(id: entry.id, owner: entry.owner) else { return }
            switch schedule.status {
            case .pending: try await claimAndProduce(schedule, messageID: messageID)
            // In a cluster, a firing found here is another node's unless this node is to finish it.
            case .firing where cluster == nil || entry.resumes: try await resume(schedule)
            case .firing: return
            default: releaseQuota(schedule)  // cancelled or done meanwhile
            }
        } catch {
            // The schedule stays as stored (pending or firing); try again a little later (and at
            // the next start in any case).
            logger.error("firing a schedule failed; retrying", metadata: ["schedule": "\(entry.id)", "error": "\(error)"])
            timer.add(
                ScheduleTimer.Entry(
                    id: entry.id, owner: entry.owner, at: Self.millis(after: configuration.scheduleErrorRetry), resumes: entry.resumes))
        }
    }

    private func claimAndProduce(_ schedule: Schedule, messageID: String) async throws {
        guard let clone = try await store.clone(id: schedule.clone, owner: schedule.owner) else {
            releaseQuota(schedule)
            return try await fail(schedule, from: .pending, "the clone \(schedule.clone) was deleted")
        }
        let newConversation = schedule.conversation == nil
        let conversationID = schedule.conversation ?? Self.conversationID(forMessage: messageID)
        if !newConversation, try await store.conversation(id: conversationID, owner: schedule.owner) == nil {
            releaseQuota(schedule)
            return try await fail(schedule, from: .pending, "the conversation \(conversationID) was deleted")
        }
        try await holding(schedule, conversation: conversationID, isNew: newConversation) { hold in
            let change = ScheduleChange(
                status: .firing, updatedAt: Int64(Timestamp.nowMillis()), conversation: conversationID, message: messageID)
            guard let claimed = try await store.transitionSchedule(id: schedule.id, from: .pending, to: change) else {
                hub.release(user: schedule.owner, conversation: conversationID)
                releaseQuota(schedule)
                return  // cancelled just now
            }
            releaseQuota(schedule)
            try await produce(claimed, clone: clone, newConversation: newConversation, hold: hold)
        }
    }

    /// A firing a crash interrupted: reuse the stored message if it got that far, else produce it again.
    private func resume(_ schedule: Schedule) async throws {
        guard let messageID = schedule.message, let conversationID = schedule.conversation else {
            return try await fail(schedule, from: .firing, "the schedule's record is incomplete")
        }
        let newConversation = conversationID == Self.conversationID(forMessage: messageID)
        if let stored = try await store.message(id: messageID, conversation: conversationID) {
            let fired = try await store.completeSchedule(id: schedule.id, message: stored, newConversation: nil, now: Int64(Timestamp.nowMillis()))
            if let fired { await deliver(fired, stored) }
            return
        }
        guard let clone = try await store.clone(id: schedule.clone, owner: schedule.owner) else {
            return try await fail(schedule, from: .firing, "the clone \(schedule.clone) was deleted")
        }
        try await holding(schedule, conversation: conversationID, isNew: newConversation) { hold in
            try await produce(schedule, clone: clone, newConversation: newConversation, hold: hold)
        }
    }

    /// Runs `body` holding the conversation for one stream (this node's hold is released by
    /// `body`'s paths, the cluster's after it unless `body` handed it to the stream); when it is
    /// busy (the owner is chatting in it), the timer is re-armed to try again shortly. A text
    /// message for a new conversation needs no claim: nothing else can be in that conversation
    /// and nothing is generated (so many reminders due at once are not held back by the user's
    /// concurrent-stream limit).
    private func holding(_ schedule: Schedule, conversation: String, isNew: Bool, _ body: (ClusterHold?) async throws -> Void) async throws {
        if isNew, case .text = schedule.content { return try await body(nil) }
        var held = hub.reserve(user: schedule.owner, conversation: conversation) == .reserved
        if held, let slots = streams.slots {
            held = try await slots.claim(user: schedule.owner, conversation: conversation) == .reserved
            if !held { hub.release(user: schedule.owner, conversation: conversation) }
            guard held else { return rearm(schedule) }
            let hold = ClusterHold { await slots.release(conversation: conversation) }
            do {
                try await body(hold)
            } catch {
                await hold.giveBack()
                throw error
            }
            return await hold.giveBack()
        }
        guard held else { return rearm(schedule) }
        try await body(nil)
    }

    /// A scheduled message's hold on its conversation across the cluster, given back after the
    /// firing, or by its stream once handed over: a message the store refused keeps it until
    /// stored, so that no node stores the conversation's next message before it.
    private final class ClusterHold: Sendable {
        private let release: @Sendable () async -> Void
        private let handedOver = Atomic<Bool>(false)

        init(_ release: @escaping @Sendable () async -> Void) { self.release = release }

        /// For the stream, which gives it back from here on.
        func handOver() -> @Sendable () async -> Void {
            handedOver.store(true, ordering: .relaxed)
            return release
        }

        /// Gives it back unless the stream took it over.
        func giveBack() async {
            guard !handedOver.load(ordering: .relaxed) else { return }
            await release()
        }
    }

    private func rearm(_ schedule: Schedule) {
        timer.add(
            ScheduleTimer.Entry(
                id: schedule.id, owner: schedule.owner, at: Self.millis(after: configuration.scheduleBusyRetry), resumes: schedule.status == .firing))
    }

    /// Generates or writes the message of a claimed (`firing`) schedule, stores it and delivers it.
    /// The conversation is reserved by the caller and released here.
    private func produce(_ schedule: Schedule, clone: Clone, newConversation: Bool, hold: ClusterHold?) async throws {
        let messageID = schedule.message!
        let conversationID = schedule.conversation!
        let now = Int64(Timestamp.nowMillis())
        let conversation =
            newConversation
            ? Conversation(
                id: conversationID, owner: schedule.owner, clone: clone.id, title: Self.title(schedule, clone: clone),
                createdAt: now, updatedAt: now)
            : nil
        let store = self.store
        switch schedule.content {
        case .text(let text):
            defer { if !newConversation { hub.release(user: schedule.owner, conversation: conversationID) } }
            let message = Message(id: messageID, conversation: conversationID, role: .assistant, text: text, createdAt: now)
            if let fired = try await store.completeSchedule(id: schedule.id, message: message, newConversation: conversation, now: now) {
                await deliver(fired, message)
            }
        case .prompt(let instruction):
            let history =
                newConversation ? [] : try await store.messages(conversation: conversationID, limit: configuration.historyMessages - 1, before: nil)
            // The instruction is part of the prompt only; the transcript shows the clone's message alone.
            let cue = Message(
                id: messageID, conversation: conversationID, role: .user,
                text: "(Scheduled message: write to the user now, unprompted, about: \(instruction))", createdAt: now)
            var (summary, turns): (ConversationSummary?, [Message]) = (nil, history + [cue])
            if !newConversation, let existing = try await store.conversation(id: conversationID, owner: schedule.owner) {
                (summary, turns) = try await store.promptHistory(of: existing, turns)
            }
            let prompt = PromptAssembler(contextBudget: configuration.contextBudgetTokens).assemble(
                clone: clone, history: turns, summary: summary?.text, user: try await personas.persona(of: schedule.owner))
            let request = CompletionRequest(
                model: configuration.model(for: clone), messages: prompt.messages, speaker: clone.name, maxOutputTokens: configuration.maxOutputTokens
            )
            let prepared: StreamRunner.Prepared
            do {
                prepared = try await streams.prepare(
                    prompt, request: request, payer: schedule.owner, feature: .scheduled, conversation: conversationID,
                    streamID: schedule.streamID!)
            } catch let refusal as CreditMeter.Refusal {
                hub.release(user: schedule.owner, conversation: conversationID)
                return try await fail(
                    schedule, from: .firing,
                    "insufficient_credits: the message needs \(refusal.required) credits; the balance was \(refusal.balance)")
            } catch {
                hub.release(user: schedule.owner, conversation: conversationID)
                throw error
            }
            let live = streams.open(
                id: prepared.id, owner: schedule.owner, model: prepared.model,
                kind: .reply(conversation: conversationID, clone: clone.id, schedule: schedule.id),
                readers: [.user(schedule.owner)], bufferCapacity: configuration.resumeBufferTokens)
            // Delivered by whichever finds the other done: this firing once its stream has
            // ended, or, for a message the store refused, the retry that stores it later.
            let delivery = Mutex<(fired: (Schedule, Message)?, ended: Bool)>((nil, false))
            // A retry stores it only while its clone, and the conversation it goes to, are there.
            let (owner, cloneID) = (schedule.owner, clone.id)
            let keptPlace: StreamRunner.KeptPlace = {
                guard try await store.clone(id: cloneID, owner: owner) != nil else { return false }
                guard !newConversation else { return true }
                return try await store.conversation(id: conversationID, owner: owner) != nil
            }
            await streams.run(live, prepared, messageID: messageID, journal: .settleOnly(), hold: hold?.handOver(), keptPlace: keptPlace) {
                message in
                guard
                    let done = try await store.completeSchedule(
                        id: schedule.id, message: message, newConversation: conversation, now: message.createdAt)
                else { return }
                if delivery.withLock({ d in
                    d.fired = (done, message)
                    return d.ended
                }) {
                    await self.deliver(done, message)
                }
            }
            let fired = delivery.withLock { d in
                d.ended = true
                return d.fired
            }
            if let (done, message) = fired {
                await deliver(done, message)
            }
        }
    }

    private func fail(_ schedule: Schedule, from: Schedule.Status, _ reason: String) async throws {
        let change = ScheduleChange(status: .failed, updatedAt: Int64(Timestamp.nowMillis()), failure: reason)
        guard let failed = try await store.transitionSchedule(id: schedule.id, from: from, to: change) else { return }
        logger.notice("schedule failed", metadata: ["schedule": "\(schedule.id)", "reason": "\(reason)"])
        streams.broker.publish(allocator.buffer(bytes: ServerFrame.scheduleFailed(schedule: failed)), to: .user(schedule.owner))
    }

    // MARK: Delivery

    /// Sends a fired schedule's message to every open socket of its owner and records it
    /// delivered once a write succeeded. With no socket open it waits in the inbox. Written to
    /// the sockets directly, not published: "delivered" needs to know that a write succeeded.
    private func deliver(_ schedule: Schedule, _ message: Message) async {
        let frame = deliveryFrame(schedule, message)
        // The owner's sockets on other nodes: each node writes to its own and records it.
        cluster?.deliverElsewhere(frame, schedule: schedule.id, user: schedule.owner)
        await write(frame, schedule: schedule.id, to: sockets.connections(of: schedule.owner))
    }

    /// Another node fired a schedule of a user with sockets here.
    func deliverHere(_ frame: ByteBuffer, schedule: String, user: String) async {
        await write(frame, schedule: schedule, to: sockets.connections(of: user))
    }

    private func deliveryFrame(_ schedule: Schedule, _ message: Message) -> ByteBuffer {
        allocator.buffer(bytes: ServerFrame.delivery(schedule: schedule.id, conversation: message.conversation, message: message))
    }

    private func write(_ frame: ByteBuffer, schedule id: String, to connections: [ClientConnection]) async {
        guard !connections.isEmpty, state.withLock({ $0.delivering.insert(id).inserted }) else { return }
        defer { _ = state.withLock { $0.delivering.remove(id) } }
        var written = false
        for connection in connections {
            if (try? await connection.write(frame).get()) != nil { written = true }
        }
        guard written else { return }
        do {
            _ = try await store.transitionSchedule(
                id: id, from: .fired, to: ScheduleChange(status: .delivered, updatedAt: Int64(Timestamp.nowMillis())))
        } catch {
            logger.error("recording a delivery failed; it will be sent again", metadata: ["schedule": "\(id)", "error": "\(error)"])
        }
    }

    /// A socket opened: send it the owner's undelivered messages, oldest first.
    func connected(_ connection: ClientConnection) {
        _ = requests.track {
            let owner = connection.identity.user
            var after: String?
            do {
                while true {
                    let page = try await self.store.schedules(statuses: [.fired], owner: owner, limit: 100, after: after)
                    for schedule in page.sorted(by: { ($0.at, $0.id) < ($1.at, $1.id) }) {
                        guard let id = schedule.message, let conversation = schedule.conversation,
                            let message = try await self.store.message(id: id, conversation: conversation)
                        else { continue }
                        await self.write(self.deliveryFrame(schedule, message), schedule: schedule.id, to: [connection])
                    }
                    guard page.count == 100 else { break }
                    after = page.last?.id
                }
            } catch {
                self.logger.error("sending undelivered messages failed", metadata: ["user": "\(owner)", "error": "\(error)"])
            }
        }
    }

    // MARK: Helpers

    static func millis(after delay: Duration) -> Int64 {
        Int64(Timestamp.nowMillis()) + Timestamp.millis(delay)
    }

    /// The id of the conversation a schedule without one creates: derived from its message id,
    /// so a retried firing creates the same one.
    static func conversationID(forMessage message: String) -> String {
        "cv_" + message.dropFirst("msg_".count)
    }

    static func title(_ schedule: Schedule, clone: Clone) -> String {
        switch schedule.content {
        case .prompt(let prompt): ChatService.title(for: prompt)
        case .text: "Message from \(clone.name)"
        }
    }
}
