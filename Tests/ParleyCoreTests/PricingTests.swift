import ParleyCore
import Testing

@Suite struct PricingTests {
    let table = PricingTable(models: ["m": ModelPrice(inputPer1K: 300, outputPer1K: 1_500)], featureMultipliers: [.debate: 150])

    @Test func costsRoundUpOnce() {
        #expect(table.inputCost(tokens: 0, model: "m", feature: .chat) == 0)
        #expect(table.inputCost(tokens: 1, model: "m", feature: .chat) == 1)  // 0.3 → 1
        #expect(table.inputCost(tokens: 10, model: "m", feature: .chat) == 3)
        #expect(table.outputCost(tokens: 3, model: "m", feature: .chat) == 5)  // 4.5 → 5
        #expect(table.outputCost(tokens: 2, model: "m", feature: .debate) == 5)  // 4.5 → 5
        #expect(table.outputCost(tokens: 1, model: "unknown", feature: .chat) == nil)
    }

    @Test(arguments: [1, 3, 7, 16])
    func batchesSumToTheCostOfTheWhole(_ batch: Int) {
        var charged: Int64 = 0
        var done = 0
        while done < 101 {
            let next = min(101, done + batch)
            charged += table.outputCost(tokens: next, model: "m", feature: .debate)! - table.outputCost(tokens: done, model: "m", feature: .debate)!
            done = next
        }
        #expect(charged == table.outputCost(tokens: 101, model: "m", feature: .debate))
        #expect(charged == 228)  // ceil(101 × 1500 × 1.5 / 1000) = ceil(227.25)
    }

    @Test func parsesAndPrintsThePriceList() throws {
        let text = #"{"models":{"m":{"input_per_1k":300,"output_per_1k":1500}},"features":{"debate":150}}"#
        let parsed = try PricingTable.parse(try JSONValue.parse(Array(text.utf8)))
        #expect(parsed == table)
        #expect(
            try PricingTable.parse(parsed.json)
                == PricingTable(
                    models: table.models,
                    featureMultipliers: [.chat: 100, .debate: 150, .translation: 100, .scheduled: 100, .title: 100, .summary: 100]))
    }

    @Test func rejectsBadPriceLists() {
        func message(_ text: String) -> String? {
            do {
                _ = try PricingTable.parse(try! JSONValue.parse(Array(text.utf8)))
                return nil
            } catch { return error.message }
        }
        #expect(message(#"{}"#) == "the price list needs a 'models' object")
        #expect(message(#"{"models":{"m":{"input_per_1k":-1,"output_per_1k":1}}}"#)?.contains("non-negative") == true)
        #expect(message(#"{"models":{},"features":{"poetry":100}}"#) == "unknown feature 'poetry'")
        #expect(message(#"{"models":{},"extra":1}"#) == "unknown field 'extra'")
    }
}
