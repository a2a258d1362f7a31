import ParleyCore
import Testing

@Suite struct SearchTests {
    @Test func termsAreRunsOfLettersAndDigitsLowercased() throws {
        #expect(SearchText.terms("Hello, WORLD! hello-world 42x café") == ["42x", "café", "hello", "world"])
        #expect(SearchText.terms("東京タワー and ÉCOLE") == ["and", "école", "東京タワー"])
        #expect(SearchText.terms(String(repeating: "a", count: 100)) == [String(repeating: "a", count: SearchText.maxTermBytes)])
        #expect(SearchText.terms("— … !!") == [])
    }

    @Test func aQueryNamesDistinctTermsAndIsBounded() throws {
        #expect(try SearchQuery.parse("Zebra zebra ZOO")?.terms == ["zebra", "zoo"])
        #expect(try SearchQuery.parse("Zebra zoo")?.ftsExpression == "\"zebra\" \"zoo\"")
        #expect(try SearchQuery.parse("  ?! ") == nil)
        #expect(throws: ValidationError.self) { try SearchQuery.parse("a b c d e f g h i") }
        let query = try #require(try SearchQuery.parse("zoo zebra"))
        #expect(query.matches("The ZEBRA at the zoo"))
        #expect(!query.matches("The zebras at the zoo"))
    }

    @Test func aSnippetMarksEveryMatchInAWindowAroundTheFirst() throws {
        let query = try #require(try SearchQuery.parse("zebra"))
        let short = SearchSnippet(text: "A Zebra met a zebra.", query: query)
        #expect(
            short.runs == [
                .init("A ", match: false), .init("Zebra", match: true), .init(" met a ", match: false), .init("zebra", match: true),
                .init(".", match: false),
            ])
        let long = String(repeating: "lorem ipsum ", count: 20) + "the zebra " + String(repeating: "dolor sit ", count: 30)
        let cut = SearchSnippet(text: long, query: query)
        #expect(cut.runs.first == .init("…", match: false) || cut.runs.first?.text.hasPrefix("…") == true)
        #expect(cut.runs.last?.text.hasSuffix("…") == true)
        #expect(cut.runs.filter(\.match).map(\.text) == ["zebra"])
        let shown = cut.runs.map(\.text).joined()
        #expect(shown.count <= SearchSnippet.width + 2)
        // The window starts at a word, not inside one.
        #expect(shown.dropFirst().first == " " || shown.dropFirst().first?.isLetter == true)
        #expect(!shown.dropFirst().hasPrefix("orem") && !shown.dropFirst().hasPrefix("psum"))
        #expect(SearchSnippet(text: "no match here", query: query).runs == [.init("no match here", match: false)])
        #expect(
            short.json
                == .array([
                    .object([("text", .string("A "))]), .object([("text", .string("Zebra")), ("match", .bool(true))]),
                    .object([("text", .string(" met a "))]), .object([("text", .string("zebra")), ("match", .bool(true))]),
                    .object([("text", .string("."))]),
                ]))
    }

    @Test func hitsOfBothKindsSortByTimeAndPageByEitherId() {
        let conversation = Conversation(id: "cv_B", owner: "a", clone: "c", title: "t", createdAt: 0, updatedAt: 0)
        let hits = [
            SearchHit(kind: .title, id: "cv_02", conversation: conversation), SearchHit(kind: .message, id: "msg_03", conversation: conversation),
            SearchHit(kind: .message, id: "msg_01", conversation: conversation),
        ]
        #expect(SearchHit.newestFirst(hits, limit: 2).map(\.id) == ["msg_03", "cv_02"])
        #expect(SearchHit.bound("cv_02", prefix: .message) == "msg_02")
        #expect(SearchHit.bound(nil, prefix: .message) == nil)
    }
}
