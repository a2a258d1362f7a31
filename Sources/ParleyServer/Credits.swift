import CoreMetrics
import Logging
import ParleyCore
import ParleyStore
import Synchronization

/// How credits are charged; see README "Credits".
public struct CreditsConfiguration: Sendable {
    public var pricing = PricingTable.standard
    /// Credits a new user starts with (granted once, as ledger entry `welcome:<user>`), once per
    /// subject ever: a subject whose account was deleted gets none again (the grant moved to its
    /// pseudonym says it had one). 0 in production; `parley serve` defaults to a generous demo grant.
    public var startingGrant: Int64 = 0
    /// Output tokens that must be affordable, beyond the prompt, before a stream may start.
    public var outputReserveTokens = 32
    /// Output tokens paid for by a reply's first debit. Tokens are released only once paid for.
    public var batchTokens = 16
    /// Each later debit buys twice as many as the one before, up to this many (never below
    /// `batchTokens`): a long reply costs a few store commits instead of one per 16 tokens
    /// (#26), and the settlement refunds what was bought and not sent.
    public var maxBatchTokens = 128
    /// HMAC-SHA256 secret of the payment webhook; nil disables the webhook.
    public var paymentsSecret: String?
    /// How far a webhook's timestamp may be from now before it is refused as a replay.
    public var paymentsTolerance: Duration = .seconds(300)
    /// Largest single grant (admin or payment).
    public var maxGrant: Int64 = 1_000_000_000
    /// The plans users subscribe to (`--plans FILE`); the built-in one allows everything.
    public var plans = PlanCatalog.builtIn
    /// Unix ms now, for billing periods and subscriptions; tests move it.
    public var clock: @Sendable () -> Int64 = { Int64(Timestamp.nowMillis()) }

    public init() {}
}

/// Counters an operator watches for the credits feature: exported to the metrics backend, and
/// kept here too for the admin's usage view (since this node started).
final class CreditMetrics: Sendable {
    let debited: Counter
    let refunded: Counter
    let paywallHits: CountedCounter
    let refusals: CountedCounter
    /// Replies a user's own spending limit refused or stopped (`spend_limit`).
    let spendLimitHits: CountedCounter

    init(factory: any MetricsFactory) {
        debited = Counter(label: "parley_credits_debited_total", factory: factory)
        refunded = Counter(label: "parley_credits_refunded_total", factory: factory)
        paywallHits = CountedCounter(label: "parley_paywall_hits_total", factory: factory)
        refusals = CountedCounter(label: "parley_insufficient_credits_refusals_total", factory: factory)
        spendLimitHits = CountedCounter(label: "parley_spend_limit_hits_total", factory: factory)
    }
}

/// A metrics counter whose count this process can also read.
final class CountedCounter: Sendable {
    private let counter: Counter
    private let count = Atomic<Int>(0)

    init(label: String, factory: any MetricsFactory) { counter = Counter(label: label, factory: factory) }

    func increment() {
        counter.increment()
        count.add(1, ordering: .relaxed)
    }

    var value: Int { count.load(ordering: .relaxed) }
}

/// Grants and the one-time starting grant.
final class Credits: Sendable {
    let store: any LedgerStore
    /// What a deleted user's ledger rows are kept under (`AuditLog.pseudonym`).
    private let pseudonym: @Sendable (String) -> String
    let configuration: CreditsConfiguration
    let logger: Logger
    let metrics: CreditMetrics
    /// Users whose starting grant is known to be applied; only saves a store round trip.
    private let welcomed = Mutex(Set<String>())
    /// The plans, for their monthly allowance (nil: no allowance).
    let plans: PlanBook?
    /// `refill:` ids known to be applied; only saves a store round trip.
    private let refilled = Mutex(Set<String>())

    init(
        store: any LedgerStore, configuration: CreditsConfiguration, logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory,
        plans: PlanBook? = nil, pseudonym: @escaping @Sendable (String) -> String
    ) {
        self.plans = plans
        self.store = store
        self.pseudonym = pseudonym
        self.configuration = configuration
        self.logger = logger
        self.metrics = CreditMetrics(factory: metrics)
    }

    /// Applies what `user` is due before they spend: the starting grant (once ever) and their
    /// plan's allowance for this period (once per period and plan).
    func ensureGrants(_ user: String) async throws {
        try await ensureStartingGrant(user)
        try await ensureAllowance(user)
    }

    /// The plan's monthly allowance, applied lazily on the period's first use as ledger entry
    /// `refill:<user>:<period>:<plan>`: the id makes it once per period however many nodes or
    /// restarts, and a user who changes plan mid-period gets the new plan's (topping up to it, or
    /// adding it) once too. A top-up that finds the balance at or above the allowance records 0
    /// credits, so spending afterwards in the period brings no second one.
    func ensureAllowance(_ user: String) async throws {
        guard let plans else { return }
        let plan = try await plans.plan(of: user)
        guard plan.monthlyCredits > 0 else { return }
        let period = BillingPeriod(containing: plans.clock())
        let id = "refill:\(user):\(period.id):\(plan.id)"
        guard !refilled.withLock({ $0.contains(id) }) else { return }
        if try await store.ledgerEntry(id: id) == nil {
            let amount = plan.renewal == .add ? plan.monthlyCredits : max(0, plan.monthlyCredits - (try await store.balance(user: user)))
            _ = try await store.apply(
                Self.grantEntry(id: id, user: user, credits: amount, note: "\(plan.name) plan allowance for \(period.id)"), allowOverdraft: false)
        }
        refilled.withLock { set in
            if set.count >= 100_000 { set.removeAll() }  // bounded: worst case one more lookup
            set.insert(id)
        }
    }

    private func ensureStartingGrant(_ user: String) async throws {
        guard configuration.startingGrant > 0, !welcomed.withLock({ $0.contains(user) }) else { return }
        // Deleting an account and coming back must not be a way to mint credits.
        let hadAccount = try await store.ledgerEntry(id: LedgerEntry.welcomeID(for: pseudonym(user))) != nil
        if !hadAccount {
            _ = try await store.apply(
                Self.grantEntry(
                    id: LedgerEntry.welcomeID(for: user), user: user, credits: configuration.startingGrant,
                    note: "starting grant"), allowOverdraft: false)
        }
        welcomed.withLock { set in
            if set.count >= 100_000 { set.removeAll() }  // bounded: worst case one more idempotent write
            set.insert(user)
        }
    }

    /// A deleted user is looked up afresh should they return (and finds no grant due).
    func forget(_ user: String) {
        _ = welcomed.withLock { $0.remove(user) }
    }

    /// Checks a grant from outside (an admin, a payment) before it is applied.
    func validateGrant(user: String, credits amount: Int64) throws(ValidationError) {
        guard Authenticator.isValidSubject(user) else { throw ValidationError("'user' is not a valid user id") }
        guard (1...configuration.maxGrant).contains(amount) else {
            throw ValidationError("'credits' must be from 1 to \(configuration.maxGrant)")
        }
    }

    /// Applies a grant validated by `validateGrant` under its idempotency id.
    func grant(id: String, user: String, credits amount: Int64, note: String) async throws -> (entry: LedgerEntry, outcome: LedgerOutcome) {
        let entry = Self.grantEntry(id: id, user: user, credits: amount, note: note)
        return (entry, try await store.apply(entry, allowOverdraft: false))
    }

    /// Takes a refunded order's credits back once (`refund:<order>`), even below zero.
    func refund(order: String, user: String, credits amount: Int64) async throws -> (entry: LedgerEntry, outcome: LedgerOutcome) {
        let entry = LedgerEntry(
            id: "refund:" + order, user: user, kind: .refund, credits: -amount, note: "payment \(order) refunded",
            createdAt: Int64(Timestamp.nowMillis()))
        return (entry, try await store.apply(entry, allowOverdraft: true))
    }

    private static func grantEntry(id: String, user: String, credits: Int64, note: String) -> LedgerEntry {
        LedgerEntry(id: id, user: user, kind: .grant, credits: credits, note: note, createdAt: Int64(Timestamp.nowMillis()))
    }

    /// Applies a one-off debit (a voiced sentence, a transcription) within the user's balance and
    /// the spending limits they set, as a stream's batches are; counted when applied.
    func debit(_ entry: LedgerEntry) async throws -> LedgerOutcome {
        let limits = try await plans?.spendLimits(of: entry.user) ?? SpendLimits()
        let outcome = try await store.apply(entry, allowOverdraft: false, caps: SpendCap.caps(limits, at: configuration.clock()))
        if outcome.isApplied { metrics.debited.increment(by: -entry.credits) }
        return outcome
    }

    func meter(user: String, stream: String, conversation: String?, room: String? = nil, model: String, feature: Feature) -> CreditMeter {
        CreditMeter(credits: self, user: user, stream: stream, conversation: conversation, room: room, model: model, feature: feature)
    }
}

/// Charges one stream: its prompt up front, its output in prepaid batches, and a settlement at
/// the end. Ledger ids are `<stream>:in`, `<stream>:1`, `<stream>:2`…, `<stream>:settle`, so a
/// retried write can never charge twice. An actor: the stream's task and its settlement use it.
actor CreditMeter {
    private let credits: Credits
    let user: String
    private let stream: String
    /// What the stream's entries are linked to.
    let conversation: String?
    let room: String?
    private let model: String
    let feature: Feature
    private var pricing: PricingTable { credits.configuration.pricing }

    private(set) var charged: Int64 = 0
    private(set) var prepaidTokens = 0
    /// `prepaidTokens` for readers outside the actor: the token loop asks `isPaid` first and only
    /// hops onto the actor when a new batch must be bought (once per batch, not per token).
    private nonisolated let prepaid = Atomic<Int>(0)
    private(set) var balance: Int64 = 0
    private var batches = 0
    /// The limits the user set on their own spending, read when the stream begins.
    private var limits = SpendLimits()
    /// True once a spend limit, not the balance, stopped the stream (reason `spend_limit`).
    private(set) var stoppedBySpendLimit = false
    /// The spend windows an entry made now counts against.
    private var caps: [SpendCap] { SpendCap.caps(limits, at: credits.configuration.clock()) }

    init(credits: Credits, user: String, stream: String, conversation: String?, room: String?, model: String, feature: Feature) {
        self.credits = credits
        self.user = user
        self.stream = stream
        self.conversation = conversation
        self.room = room
        self.model = model
        self.feature = feature
    }

    /// Why a stream may not start: the balance and what it needed. With `bySpendLimit`, a limit
    /// the user set is what falls short: `balance` is then what the limit still allows.
    struct Refusal: Error {
        var balance: Int64
        var required: Int64
        var bySpendLimit = false
    }

    /// What a reply's request stores with its prompt's debit, and the store that takes both.
    struct Opening: Sendable {
        var opening: ReplyOpening
        var store: any Store
    }

    /// Checks that the prompt and the minimum output reserve are covered and charges the
    /// prompt, storing `opening` in the same write when given. Throws `Refusal` (nothing charged
    /// or stored) when they are not, and the store's error when `opening` could not be stored
    /// (nothing charged then either).
    func begin(inputTokens: Int, storing opening: Opening? = nil) async throws {
        guard let inputCost = pricing.inputCost(tokens: inputTokens, model: model, feature: feature),
            let reserve = pricing.outputCost(tokens: credits.configuration.outputReserveTokens, model: model, feature: feature)
        else {
            throw ProviderPriceMissing(model: model)
        }
        try await credits.ensureGrants(user)
        limits = try await credits.plans?.spendLimits(of: user) ?? SpendLimits()
        // One store call: the prompt's debit, refused (nothing charged) unless the balance and the
        // user's spending limits still cover the output reserve after it, so a reply that could
        // not send a token is refused before its prompt is charged. (The batches enforce both
        // exactly as the reply goes.)
        let debit = entry("in", -inputCost, tokens: inputTokens)
        let outcome: LedgerOutcome
        do {
            outcome =
                if let opening {
                    try await opening.store.apply(debit, headroom: reserve, caps: caps, storing: opening.opening)
                } else {
                    try await credits.store.apply(debit, allowOverdraft: false, headroom: reserve, caps: caps)
                }
        } catch let failure as OpeningNotStored {
            // Charged, but the message was not stored: given back as for a stream that never ran.
            if failure.applied { credits.metrics.debited.increment(by: inputCost) }
            charged += inputCost
            _ = await settle(usage: Usage(inputTokens: 0, outputTokens: 0))
            throw failure.error
        }
        switch outcome {
        case .insufficient(let balance):
            credits.metrics.refusals.increment()
            throw Refusal(balance: balance, required: inputCost + reserve)
        case .overLimit(_, let available):
            credits.metrics.spendLimitHits.increment()
            throw Refusal(balance: available, required: inputCost + reserve, bySpendLimit: true)
        case .applied, .alreadyApplied:
            break
        }
        if outcome.isApplied { credits.metrics.debited.increment(by: inputCost) }
        charged += inputCost
        balance = outcome.balance
    }

    /// Makes sure output token number `index` (1-based) is paid for, buying the next batch when
    /// needed, or as much of it as the balance covers. False: not even this token is affordable.
    func authorize(token index: Int) async throws -> Bool {
        guard index > prepaidTokens else { return true }
        defer { prepaid.store(prepaidTokens, ordering: .releasing) }
        var size = batchSize(number: batches + 1)
        while size >= 1 {
            let cost = outputCost(prepaidTokens + size) - outputCost(prepaidTokens)
            let outcome = try await credits.store.apply(entry(String(batches + 1), -cost, tokens: size), allowOverdraft: false, caps: caps)
            balance = outcome.balance
            let available: Int64
            switch outcome {
            case .applied, .alreadyApplied:
                if outcome.isApplied { credits.metrics.debited.increment(by: cost) }
                batches += 1
                prepaidTokens += size
                charged += cost
                return true
            case .insufficient(let balance):
                stoppedBySpendLimit = false
                available = balance
            case .overLimit(let balance, let allowed):
                stoppedBySpendLimit = allowed < balance
                available = min(balance, allowed)
            }
            // Buy the largest smaller batch the balance and the limits cover (a refused id may be reused).
            var affordable = size - 1
            while affordable >= 1, outputCost(prepaidTokens + affordable) - outputCost(prepaidTokens) > available {
                affordable -= 1
            }
            size = affordable
        }
        if stoppedBySpendLimit { credits.metrics.spendLimitHits.increment() } else { credits.metrics.paywallHits.increment() }
        return false
    }

    /// Tokens debit number `number` (1-based) buys when the balance allows: `batchTokens`, then
    /// doubling up to `maxBatchTokens`.
    private func batchSize(number: Int) -> Int {
        let first = max(1, credits.configuration.batchTokens)
        let most = max(first, credits.configuration.maxBatchTokens)
        return min(most, first << min(number - 1, 20))
    }

    /// Takes up a stream a crash cut short: what its ledger entries charged (`<stream>:in` and
    /// `batches` prepaid batches), so that `settle` reconciles it like any other.
    func recover(charged: Int64, batches: Int) {
        self.charged = charged
        self.batches = batches
    }

    /// Whether output token `index` (1-based) is already paid for; no actor hop.
    nonisolated func isPaid(token index: Int) -> Bool { index <= prepaid.load(ordering: .acquiring) }

    /// How many output tokens are paid for so far; no actor hop.
    nonisolated var paidThrough: Int { prepaid.load(ordering: .acquiring) }

    /// The cost of the next output token, for the paywall frame.
    var nextTokenCost: Int64 { outputCost(prepaidTokens + 1) - outputCost(prepaidTokens) }

    /// Reconciles what was charged with what the stream really used (the provider's usage when
    /// it reported one, else the prompt estimate and the tokens delivered): refunds unused
    /// prepaid credits or charges the rest, as far as the balance allows. Returns the stream's
    /// cost and the balance after it, and whether the store took the settlement (when not, the
    /// caller keeps the stream's journal, so the recovery settles it).
    func settle(usage: Usage) async -> (cost: Int64, balance: Int64, settled: Bool) {
        let actual =
            (pricing.inputCost(tokens: usage.inputTokens, model: model, feature: feature) ?? 0)
            + outputCost(usage.outputTokens)
        var difference = charged - actual  // positive: refund
        do {
            if difference != 0 {
                let caps = self.caps
                var outcome = try await credits.store.apply(
                    entry("settle", difference, tokens: 0, kind: .settlement), allowOverdraft: false, caps: caps)
                if case .overLimit = outcome {
                    // A last charge past a limit: the tokens were delivered, so it is charged anyway.
                    outcome = try await credits.store.apply(entry("settle", difference, tokens: 0, kind: .settlement), allowOverdraft: false)
                }
                if case .insufficient(let available) = outcome, available > 0 {
                    credits.logger.warning(
                        "settlement charged only part of the usage", metadata: ["stream": "\(stream)", "short": "\(-difference - available)"])
                    difference = -available
                    outcome = try await credits.store.apply(entry("settle", difference, tokens: 0, kind: .settlement), allowOverdraft: false)
                }
                if case .insufficient = outcome {
                    difference = 0
                } else {
                    charged -= difference
                    if outcome.isApplied {
                        if difference > 0 { credits.metrics.refunded.increment(by: difference) }
                        if difference < 0 { credits.metrics.debited.increment(by: -difference) }
                    }
                }
                balance = outcome.balance
            } else if let current = try? await credits.store.balance(user: user) {
                balance = current  // nothing to settle: without it, the last balance known
            }
        } catch {
            credits.logger.error("settling a stream failed", metadata: ["stream": "\(stream)", "error": "\(error)"])
            return (charged, balance, false)
        }
        return (charged, balance, true)
    }

    private func outputCost(_ tokens: Int) -> Int64 {
        pricing.outputCost(tokens: tokens, model: model, feature: feature) ?? 0
    }

    private func entry(_ suffix: String, _ credits: Int64, tokens: Int, kind: LedgerEntry.Kind = .debit) -> LedgerEntry {
        LedgerEntry(
            id: "\(stream):\(suffix)", user: user, kind: kind, credits: credits, tokens: tokens, stream: stream,
            conversation: conversation, room: room, model: model, feature: feature.rawValue,
            createdAt: Int64(Timestamp.nowMillis()))
    }
}

/// The price list has no entry for the model a reply would use: a configuration error.
struct ProviderPriceMissing: Error, CustomStringConvertible {
    var model: String
    var description: String { "no price is configured for model '\(model)'" }
}
