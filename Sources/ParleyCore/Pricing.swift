/// What a generated reply is for; each feature may cost more or less than plain chat.
public enum Feature: String, Sendable, Equatable, CaseIterable {
    case chat, debate, translation, scheduled
    /// A new conversation's title, written by the clone's model after its first reply.
    case title
    /// A conversation's rolling summary of the turns that no longer fit a prompt.
    case summary
}

/// Credits per 1000 tokens for one model.
public struct ModelPrice: Sendable, Equatable {
    public var inputPer1K: Int64
    public var outputPer1K: Int64

    public init(inputPer1K: Int64, outputPer1K: Int64) {
        self.inputPer1K = inputPer1K
        self.outputPer1K = outputPer1K
    }
}

/// The price list: per model, and a multiplier (in percent) per feature.
///
/// Costs are computed on running totals and rounded up once: the cost of the first `n` output
/// tokens is `ceil(n × outputPer1K × multiplier / 100 000)`, and a batch is charged the
/// difference between two running totals. However a reply is cut into batches, the sum of its
/// debits equals the cost of its whole length: rounding never compounds.
public struct PricingTable: Sendable, Equatable {
    public var models: [String: ModelPrice]
    public var featureMultipliers: [Feature: Int64]
    /// Speech and transcription (#29): priced by characters and seconds, not tokens.
    public var voice: VoicePrice

    public init(models: [String: ModelPrice], featureMultipliers: [Feature: Int64] = [:], voice: VoicePrice = .standard) {
        self.models = models
        self.featureMultipliers = featureMultipliers
        self.voice = voice
    }

    /// The default list: prices for the simulated provider so development and load tests
    /// exercise metering exactly as production does, and the same for the local model
    /// (`--local-model`, SmolLM2), so the starting grant lasts as long with either.
    public static let standard = PricingTable(
        models: [
            "simulated": ModelPrice(inputPer1K: 1_000, outputPer1K: 2_000),
            "smollm2": ModelPrice(inputPer1K: 1_000, outputPer1K: 2_000),
        ],
        featureMultipliers: [.chat: 100, .debate: 100, .translation: 100, .scheduled: 100, .title: 100, .summary: 100]
    )

    public func price(for model: String) -> ModelPrice? { models[model] }

    public func multiplier(_ feature: Feature) -> Int64 { featureMultipliers[feature] ?? 100 }

    /// Cost of `tokens` prompt tokens.
    public func inputCost(tokens: Int, model: String, feature: Feature) -> Int64? {
        price(for: model).map { Self.ceilCost(Int64(tokens), $0.inputPer1K, multiplier(feature)) }
    }

    /// Cost of the first `tokens` output tokens of a reply (a running total).
    public func outputCost(tokens: Int, model: String, feature: Feature) -> Int64? {
        price(for: model).map { Self.ceilCost(Int64(tokens), $0.outputPer1K, multiplier(feature)) }
    }

    static func ceilCost(_ tokens: Int64, _ per1K: Int64, _ percent: Int64) -> Int64 {
        let numerator = tokens.multipliedReportingOverflow(by: per1K).partialValue.multipliedReportingOverflow(by: percent).partialValue
        return (numerator + 99_999) / 100_000
    }

    // MARK: JSON

    /// `{"models":{"name":{"input_per_1k":n,"output_per_1k":n}},"features":{"chat":100,…}}`
    public var json: JSONValue {
        .object([
            ("unit", .string("credits per 1000 tokens; feature multipliers in percent")),
            (
                "models",
                .object(
                    models.sorted { $0.key < $1.key }.map {
                        ($0.key, .object([("input_per_1k", .int($0.value.inputPer1K)), ("output_per_1k", .int($0.value.outputPer1K))]))
                    })
            ),
            ("features", .object(Feature.allCases.map { ($0.rawValue, .int(multiplier($0))) })),
            ("voice", voice.json),
        ])
    }

    public static func parse(_ value: JSONValue) throws(ValidationError) -> PricingTable {
        var reader = try JSONObjectReader(value, what: "price list")
        guard case .object(let modelPairs)? = try reader.value("models") else {
            throw ValidationError("the price list needs a 'models' object")
        }
        _ = try reader.string("unit")
        var models: [String: ModelPrice] = [:]
        for (name, entry) in modelPairs {
            var m = try JSONObjectReader(entry, what: "models.\(name)")
            guard let input = try m.int("input_per_1k"), let output = try m.int("output_per_1k"), input >= 0, output >= 0 else {
                throw ValidationError("models.\(name) needs non-negative integers 'input_per_1k' and 'output_per_1k'")
            }
            try m.rejectUnknown()
            models[name] = ModelPrice(inputPer1K: input, outputPer1K: output)
        }
        var multipliers: [Feature: Int64] = [:]
        if let features = try reader.intMap("features") {
            for (name, percent) in features {
                guard let feature = Feature(rawValue: name) else { throw ValidationError("unknown feature '\(name)'") }
                guard (0...10_000).contains(percent) else { throw ValidationError("features.\(name) must be 0-10000 (percent)") }
                multipliers[feature] = percent
            }
        }
        let voice = try reader.value("voice").map { value throws(ValidationError) in try VoicePrice.parse(value) } ?? .standard
        try reader.rejectUnknown()
        return PricingTable(models: models, featureMultipliers: multipliers, voice: voice)
    }
}
