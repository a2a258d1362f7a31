import ParleyCore
import ParleyServer
import ParleyTestSupport
import Testing

extension TestServer {
    /// `GET /v1/search` with `q` percent-encoded.
    func search(_ q: String, token: String, extra: String = "") async throws -> TestHTTPResponse {
        let encoded = q.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? q
        return try await get("/v1/search?q=\(encoded)\(extra)", token: token)
    }
}

/// Search (#24) over the real socket and REST API, on both stores: the caller's words only, a
/// marked snippet, paging, and nothing of a deleted conversation.
@Suite struct SearchIntegrationTests {
    @Test(arguments: TestServer.StoreKind.allCases)
    func findsTheCallersWordsOnlyWithAMarkedSnippet(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store)
        let alice = try await server.token("alice")
        let bob = try await server.token("bob")
        let aliceClone = cloneValue(try await server.createClone(token: alice), owner: "alice")
        let bobClone = cloneValue(try await server.createClone(token: bob), owner: "bob")
        let aliceSocket = try await server.connect(token: alice)
        try await aliceSocket.chatSend(id: "c1", clone: aliceClone.id, text: "My aardvark is called Pim")
        let first = try await aliceSocket.readReply()
        try await aliceSocket.chatSend(id: "c2", clone: aliceClone.id, text: "Pim the aardvark likes ants")
        let second = try await aliceSocket.readReply()
        let bobSocket = try await server.connect(token: bob)
        try await bobSocket.chatSend(id: "b1", clone: bobClone.id, text: "An aardvark named Pim, like Alice's")
        _ = try await bobSocket.readReply()

        let found = try await server.search("Aardvark pim", token: alice)
        #expect(found.status == .ok)
        let items = try found.json()["items"]?.arrayValue ?? []
        let conversations = Set(items.compactMap { $0["conversation"]?["id"]?.stringValue })
        #expect(conversations == [first.conversation, second.conversation], "Alice's own conversations only: \(items)")
        let messageHits = items.filter { $0["kind"] == .string("message") }
        #expect(messageHits.count == 2 && messageHits.allSatisfy { $0["message"]?["role"] == .string("user") })
        let marked = messageHits.first?["snippet"]?.arrayValue?.filter { $0["match"] == .bool(true) }.compactMap { $0["text"]?.stringValue }
        #expect(marked == ["Pim", "aardvark"], "newest first: 'Pim the aardvark likes ants'")
        let bobs = try await server.search("aardvark", token: bob).json()["items"]?.arrayValue ?? []
        #expect(bobs.allSatisfy { $0["conversation"]?["clone"] == .string(bobClone.id) } && !bobs.isEmpty)

        // Paging: one at a time reaches every hit once.
        var seen: [String] = []
        var before: String?
        repeat {
            let page = try await server.search("aardvark", token: alice, extra: "&limit=1" + (before.map { "&before=\($0)" } ?? "")).json()
            seen += page["items"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
            before = page["next_before"]?.stringValue
        } while before != nil
        let all = try await server.search("aardvark", token: alice).json()["items"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
        #expect(seen == all && all.count >= 4)

        // Bad requests get a clear 400.
        #expect(try await server.search("  ", token: alice).status == .badRequest)
        #expect(try await server.get("/v1/search", token: alice).errorCode == "bad_request")
        #expect(try await server.search("a b c d e f g h i", token: alice).status == .badRequest)
        #expect(try await server.search(String(repeating: "x", count: 501), token: alice).status == .badRequest)
        #expect(try await server.get("/v1/search?q=aardvark", token: nil).status == .unauthorized)

        // A deleted conversation is gone from search.
        #expect(
            try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/conversations/\(first.conversation)", token: alice).status == .noContent
        )
        let after = try await server.search("aardvark", token: alice).json()["items"]?.arrayValue ?? []
        #expect(!after.isEmpty && after.allSatisfy { $0["conversation"]?["id"] == .string(second.conversation) })
        await server.stop()
    }
}
