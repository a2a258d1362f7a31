/// What a plan may switch on or off (#27). Replies a feature starts inside another (a title, a
/// summary) follow the feature they belong to and are not listed.
public enum PlanFeature: String, Sendable, Equatable, Hashable, CaseIterable, Comparable {
    case chat
    case debate
    case translation
    case schedule
    /// Voiced replies and voice messages (#29).
    case voice

    public static func < (a: PlanFeature, b: PlanFeature) -> Bool { a.rawValue < b.rawValue }
}

/// The limits a plan sets on its users. Nil: the plan sets none (the server's own limits still
/// hold, such as `--max-pending-schedules`).
public struct PlanLimits: Sendable, Equatable {
    /// Replies streaming at once.
    public var concurrentStreams: Int?
    /// Clones kept.
    public var clones: Int?
    /// Scheduled messages waiting to fire.
    public var pendingSchedules: Int?
    /// Rooms created and not ended.
    public var rooms: Int?
    /// Messages a minute (`chat.send`, `chat.regenerate`, `chat.edit`), as a bucket of that many
    /// refilled evenly over the minute.
    public var messagesPerMinute: Int?

    public init(
        concurrentStreams: Int? = nil, clones: Int? = nil, pendingSchedules: Int? = nil, rooms: Int? = nil, messagesPerMinute: Int? = nil
    ) {
        self.concurrentStreams = concurrentStreams
        self.clones = clones
        self.pendingSchedules = pendingSchedules
        self.rooms = rooms
        self.messagesPerMinute = messagesPerMinute
    }

    public enum Kind: String, Sendable, CaseIterable {
        case concurrentStreams = "concurrent_streams"
        case clones
        case pendingSchedules = "pending_schedules"
        case rooms
        case messagesPerMinute = "messages_per_minute"
    }

    public subscript(kind: Kind) -> Int? {
        get {
            switch kind {
            case .concurrentStreams: concurrentStreams
            case .clones: clones
            case .pendingSchedules: pendingSchedules
            case .rooms: rooms
            case .messagesPerMinute: messagesPerMinute
            }
        }
        set {
            switch kind {
            case .concurrentStreams: concurrentStreams = newValue
            case .clones: clones = newValue
            case .pendingSchedules: pendingSchedules = newValue
            case .rooms: rooms = newValue
            case .messagesPerMinute: messagesPerMinute = newValue
            }
        }
    }
}

/// A plan a user is on: its monthly credit allowance and what it allows.
public struct Plan: Sendable, Equatable {
    /// What the allowance does at the start of a period.
    public enum Renewal: String, Sendable, Equatable {
        /// The balance is raised to the allowance (never lowered): unused credits do not pile up
        /// month after month, and bought credits above the allowance are kept.
        case topUp = "top_up"
        /// The allowance is added whatever the balance.
        case add
    }

    public var id: String
    public var name: String
    /// Credits each period (a calendar month, UTC); 0 for none.
    public var monthlyCredits: Int64
    public var renewal: Renewal
    public var features: Set<PlanFeature>
    public var limits: PlanLimits

    public init(
        id: String, name: String, monthlyCredits: Int64 = 0, renewal: Renewal = .topUp, features: Set<PlanFeature> = Set(PlanFeature.allCases),
        limits: PlanLimits = PlanLimits()
    ) {
        self.id = id
        self.name = name
        self.monthlyCredits = monthlyCredits
        self.renewal = renewal
        self.features = features
        self.limits = limits
    }

    /// Whether `count` more of `kind` stays within this plan (`count` is what the user would have).
    public func allows(_ count: Int, of kind: PlanLimits.Kind) -> Bool { limits[kind].map { count <= $0 } ?? true }

    public var json: JSONValue {
        .object([
            ("id", .string(id)), ("name", .string(name)), ("monthly_credits", .int(monthlyCredits)),
            ("renewal", .string(renewal.rawValue)),
            ("features", .array(features.sorted().map { .string($0.rawValue) })),
            ("limits", .object(PlanLimits.Kind.allCases.map { ($0.rawValue, limits[$0].map { .int(Int64($0)) } ?? .null) })),
        ])
    }
}

/// The plans a server offers (`--plans FILE`), in the file's order, and the one a user without
/// a subscription is on.
public struct PlanCatalog: Sendable, Equatable {
    public private(set) var plans: [Plan]
    public private(set) var defaultPlan: Plan

    /// The built-in catalog: one `free` plan allowing everything, with no allowance and no limits
    /// of its own (a server without `--plans` behaves as before plans existed).
    public static let builtIn = PlanCatalog(unchecked: [Plan(id: "free", name: "Free")], default: "free")

    private init(unchecked plans: [Plan], default id: String) {
        self.plans = plans
        defaultPlan = plans.first { $0.id == id } ?? plans[0]
    }

    public func plan(_ id: String) -> Plan? { plans.first { $0.id == id } }

    /// The first plan (in the file's order, cheapest first by convention) that allows `feature`.
    public func first(allowing feature: PlanFeature) -> Plan? { plans.first { $0.features.contains(feature) } }

    /// The first plan on which a user would have `count` of `kind`.
    public func first(allowing count: Int, of kind: PlanLimits.Kind) -> Plan? { plans.first { $0.allows(count, of: kind) } }

    public var json: JSONValue {
        .object([("default", .string(defaultPlan.id)), ("plans", .array(plans.map(\.json)))])
    }

    /// `{"default":"free","plans":[{"id","name","monthly_credits"?,"renewal"?,"features"?,"limits"?}]}`:
    /// ids are 1-64 letters, digits, `_` or `-`, unique; `features` defaults to all of them.
    public init(parsing value: JSONValue) throws(ValidationError) {
        var reader = try JSONObjectReader(value, what: "the plans file")
        guard case .array(let items)? = try reader.value("plans"), !items.isEmpty, items.count <= 100 else {
            throw ValidationError("the plans file needs a 'plans' array of 1-100 plans")
        }
        let defaultID = try reader.string("default")
        try reader.rejectUnknown()
        var plans: [Plan] = []
        for (index, item) in items.enumerated() {
            var p = try JSONObjectReader(item, what: "plans[\(index)]")
            let id = try p.requiredString("id")
            let idIsValid = id.utf8.allSatisfy { $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") || $0.isASCIIAlphanumeric }
            guard (1...64).contains(id.utf8.count), idIsValid else {
                throw ValidationError("plans[\(index)].id must be 1-64 letters, digits, '_' or '-'")
            }
            guard !plans.contains(where: { $0.id == id }) else { throw ValidationError("plan '\(id)' is listed twice") }
            let name = try p.string("name") ?? id
            guard (1...100).contains(name.count) else { throw ValidationError("plans[\(index)].name must be 1-100 characters") }
            let credits = try p.int("monthly_credits") ?? 0
            guard (0...1_000_000_000).contains(credits) else { throw ValidationError("plans[\(index)].monthly_credits must be 0-1000000000") }
            let renewalName = try p.string("renewal") ?? Plan.Renewal.topUp.rawValue
            guard let renewal = Plan.Renewal(rawValue: renewalName) else {
                throw ValidationError("plans[\(index)].renewal must be 'top_up' or 'add'")
            }
            var features = Set(PlanFeature.allCases)
            if let names = try p.stringArray("features") {
                features = []
                for name in names {
                    guard let feature = PlanFeature(rawValue: name) else {
                        let known = PlanFeature.allCases.map(\.rawValue).joined(separator: ", ")
                        throw ValidationError("plans[\(index)].features: unknown feature '\(name)' (known: \(known))")
                    }
                    features.insert(feature)
                }
            }
            var limits = PlanLimits()
            if let value = try p.value("limits") {
                var l = try JSONObjectReader(value, what: "plans[\(index)].limits")
                for kind in PlanLimits.Kind.allCases {
                    guard let n = try l.value(kind.rawValue), n != .null else { continue }
                    guard let count = n.intValue, (0...1_000_000).contains(count) else {
                        throw ValidationError("plans[\(index)].limits.\(kind.rawValue) must be 0-1000000 or null")
                    }
                    limits[kind] = Int(count)
                }
                try l.rejectUnknown()
            }
            try p.rejectUnknown()
            plans.append(Plan(id: id, name: name, monthlyCredits: credits, renewal: renewal, features: features, limits: limits))
        }
        let chosen = defaultID ?? plans[0].id
        guard plans.contains(where: { $0.id == chosen }) else { throw ValidationError("the default plan '\(chosen)' is not in 'plans'") }
        self.init(unchecked: plans, default: chosen)
    }
}

/// A billing period: the calendar month (UTC) holding a moment.
public struct BillingPeriod: Sendable, Equatable {
    /// `2026-12`.
    public var id: String
    /// Unix ms, inclusive.
    public var start: Int64
    /// Unix ms, exclusive: the next period's start.
    public var end: Int64

    public init(containing millis: Int64) {
        let days = Int64((Double(millis) / 86_400_000).rounded(.down))
        let (year, month, _) = CivilDate.from(days: days)
        id = (year < 1000 ? String(repeating: "0", count: 4 - String(year).count) : "") + "\(year)-" + (month < 10 ? "0" : "") + "\(month)"
        start = CivilDate.days(year: year, month: month, day: 1) * 86_400_000
        let (nextYear, nextMonth) = month == 12 ? (year + 1, 1) : (year, month + 1)
        end = CivilDate.days(year: nextYear, month: nextMonth, day: 1) * 86_400_000
    }
}

/// Days since 1970-01-01 and back (H. Hinnant's algorithms, valid for the whole proleptic
/// Gregorian calendar), for UTC dates without Foundation.
enum CivilDate {
    static func from<I: BinaryInteger>(days z0: I) -> (year: I, month: I, day: I) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }

    static func days<I: BinaryInteger>(year y0: I, month: I, day: I) -> I {
        let y = month <= 2 ? y0 - 1 : y0
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }
}

extension UInt8 {
    fileprivate var isASCIIAlphanumeric: Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(self) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(self)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(self)
    }
}
