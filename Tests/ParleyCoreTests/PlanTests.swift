import ParleyCore
import Testing

@Suite struct PlanTests {
    static let file: JSONValue = try! JSONValue.parse(
        Array(
            """
            {"default": "free", "plans": [
              {"id": "free", "name": "Free", "features": ["chat"], "limits": {"concurrent_streams": 1, "clones": 2}},
              {"id": "plus", "name": "Plus", "monthly_credits": 1000, "features": ["chat", "schedule"], "limits": {"concurrent_streams": 2, "clones": 10}},
              {"id": "pro", "name": "Pro", "monthly_credits": 5000, "renewal": "add", "limits": {"clones": null}}
            ]}
            """.utf8))

    @Test func aPlansFileIsReadInOrderWithItsDefaultsAndLimits() throws {
        let catalog = try PlanCatalog(parsing: Self.file)
        #expect(catalog.plans.map(\.id) == ["free", "plus", "pro"])
        #expect(catalog.defaultPlan.id == "free")
        let pro = try #require(catalog.plan("pro"))
        #expect(pro.features == Set(PlanFeature.allCases), "no list: every feature")
        #expect(pro.renewal == .add && pro.monthlyCredits == 5000 && pro.limits == PlanLimits())
        #expect(catalog.plan("plus")?.renewal == .topUp, "top_up unless said")
        // The first plan that allows a feature or a count: the file lists the cheapest first.
        #expect(catalog.first(allowing: .debate)?.id == "pro")
        #expect(catalog.first(allowing: .schedule)?.id == "plus")
        #expect(catalog.first(allowing: 2, of: .concurrentStreams)?.id == "plus")
        #expect(catalog.first(allowing: 3, of: .concurrentStreams)?.id == "pro")
        #expect(catalog.first(allowing: 1, of: .clones)?.id == "free")
        #expect(try PlanCatalog(parsing: catalog.json) == catalog, "what GET /v1/plans answers reads back the same")
        #expect(PlanCatalog.builtIn.defaultPlan.features == Set(PlanFeature.allCases))
    }

    @Test(arguments: [
        (#"{"plans": []}"#, "1-100 plans"),
        (#"{"plans": [{"id": "a b"}]}"#, "letters, digits"),
        (#"{"plans": [{"id": "a"}, {"id": "a"}]}"#, "listed twice"),
        (#"{"plans": [{"id": "a", "features": ["video"]}]}"#, "unknown feature 'video'"),
        (#"{"plans": [{"id": "a", "renewal": "rollover"}]}"#, "'top_up' or 'add'"),
        (#"{"plans": [{"id": "a", "limits": {"clones": -1}}]}"#, "limits.clones"),
        (#"{"plans": [{"id": "a", "limits": {"sockets": 1}}]}"#, "sockets"),
        (#"{"plans": [{"id": "a", "monthly_credits": -5}]}"#, "monthly_credits"),
        (#"{"default": "b", "plans": [{"id": "a"}]}"#, "default plan 'b'"),
        (#"{"plans": [{"id": "a"}], "currency": "EUR"}"#, "currency"),
    ])
    func aBadPlansFileSaysWhatIsWrong(_ text: String, _ expected: String) throws {
        let error = #expect(throws: ValidationError.self) { try PlanCatalog(parsing: try JSONValue.parse(Array(text.utf8))) }
        #expect(error?.message.contains(expected) == true, "\(error?.message ?? "")")
    }

    @Test func aBillingPeriodIsTheCalendarMonthInUTC() {
        let day: Int64 = 86_400_000
        // 2026-12-04T03:00Z, in December; the last millisecond of the year, still December.
        let december = BillingPeriod(containing: 1_796_353_200_000)
        #expect(december.id == "2026-12")
        #expect(Timestamp.rfc3339(millis: december.start) == "2026-12-01T00:00:00.000Z")
        #expect(Timestamp.rfc3339(millis: december.end) == "2027-01-01T00:00:00.000Z")
        #expect(BillingPeriod(containing: december.end - 1).id == "2026-12")
        #expect(BillingPeriod(containing: december.end).id == "2027-01")
        // A leap February has 29 days.
        let february = BillingPeriod(containing: RFC3339.parse("2028-02-15T12:00:00Z")!)
        #expect(february.id == "2028-02" && february.end - february.start == 29 * day)
        #expect(BillingPeriod(containing: 0).id == "1970-01")
    }
}
