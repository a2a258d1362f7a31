import Crypto
import Foundation
import NIOHTTP1
import ParleyCore
import ParleyServer
@testable import ParleyStore
import ParleyTestSupport
import Testing

@Suite struct AuthTests {
    @Test func validTokensUpgradeByHeaderOrQuery() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let byHeader = try await TestWebSocket.connect(port: server.port, token: token)
        #expect(try await byHeader.nextJSON() == .object([("type", .string("welcome")), ("user", .string("alice")), ("protocol", .int(1))]))
        let byQuery = try await TestWebSocket.connect(port: server.port, uri: "/v1/ws?token=\(token)")
        #expect(try await byQuery.nextJSON()["user"] == .string("alice"))
        await server.stop()
    }

    @Test func missingForgedAndExpiredTokensAre401WithoutUpgrade() async throws {
        let server = try await TestServer.start()
        let forged = try await Authenticator.make(secret: String(repeating: "x", count: 40)).issue(subject: "alice", ttl: .seconds(60))
        let expired = try await server.server.authenticator.issue(subject: "alice", ttl: .seconds(60), now: Date(timeIntervalSinceNow: -3600))
        let cases: [(String?, String)] = [
            (nil, "missing token"), (forged, "invalid token"), (expired, "token expired"), ("garbage", "invalid token"),
        ]
        for (token, message) in cases {
            let response = try await server.upgradeAttempt(token: token)
            #expect(response.status == .unauthorized, "\(message)")
            #expect(response.errorCode == "unauthorized")
            #expect(response.headers.first(name: "www-authenticate") == "Bearer")
            #expect(try response.json()["error"]?["message"]?.stringValue?.hasPrefix(message) == true)
            await #expect(throws: UpgradeRefused.self) {
                _ = try await TestWebSocket.connect(port: server.port, token: token)
            }
        }
        #expect(try await server.get("/v1/clones", token: nil).status == .unauthorized)
        #expect(try await server.get("/v1/clones", token: expired).status == .unauthorized)
        await server.stop()
    }

    @Test func aPlainGETOfTheSocketEndpointAsksForAnUpgrade() async throws {
        let server = try await TestServer.start()
        let response = try await server.get("/v1/ws", token: try await server.token("alice"))
        #expect(response.status == .upgradeRequired)
        await server.stop()
    }

    @Test func aSocketIsClosedWhenItsTokenExpires() async throws {
        let server = try await TestServer.start()
        // `exp` counts whole seconds: a 1 s token issued late in a second had expired by the
        // time a loaded machine read its welcome, and on a slower one a 2 s token was gone
        // before the connection was (I/O on a closed channel). Five leave at least four.
        let socket = try await server.connect(token: try await server.token("alice", ttl: .seconds(5)))
        var closed: TestInbound?
        while closed == nil {
            let inbound = try await socket.next(timeout: .seconds(10))
            if case .close = inbound { closed = inbound }
        }
        #expect(closed == .close(code: 1008, reason: "token expired"))
        await server.stop()
    }

    /// An HS256 token written by hand, so its header and claims are exactly what the test says.
    private func handMade(header: String, claims: String, secret: String) -> String {
        func b64(_ bytes: some Sequence<UInt8>) -> String {
            Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
        }
        let input = b64(Array(header.utf8)) + "." + b64(Array(claims.utf8))
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: Array(secret.utf8)))
        return input + "." + b64(mac)
    }

    @Test func notBeforeAndCriticalHeadersAreHonoured() async throws {
        let server = try await TestServer.start()
        let secret = try String(contentsOfFile: server.configuration.secretPath, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let now = Int(Date().timeIntervalSince1970)
        let plain = #"{"alg":"HS256","typ":"JWT"}"#
        let valid = handMade(header: plain, claims: #"{"sub":"alice","exp":\#(now + 600),"nbf":\#(now - 5)}"#, secret: secret)
        #expect(try await server.server.authenticator.verify(valid).user == "alice")
        let early = handMade(header: plain, claims: #"{"sub":"alice","exp":\#(now + 600),"nbf":\#(now + 300)}"#, secret: secret)
        await #expect(throws: AuthError.notYetValid) { _ = try await server.server.authenticator.verify(early) }
        let critical = handMade(
            header: #"{"alg":"HS256","typ":"JWT","crit":["b64"],"b64":false}"#,
            claims: #"{"sub":"alice","exp":\#(now + 600)}"#, secret: secret)
        await #expect(throws: AuthError.invalidToken) { _ = try await server.server.authenticator.verify(critical) }
        // A header naming a member twice is refused (RFC 7515 4), even when both say the same.
        let twice = handMade(header: #"{"alg":"HS256","typ":"JWT","alg":"HS256"}"#, claims: #"{"sub":"alice","exp":\#(now + 600)}"#, secret: secret)
        await #expect(throws: AuthError.invalidToken) { _ = try await server.server.authenticator.verify(twice) }
        let notAnObject = handMade(header: #"["HS256"]"#, claims: #"{"sub":"alice","exp":\#(now + 600)}"#, secret: secret)
        await #expect(throws: AuthError.invalidToken) { _ = try await server.server.authenticator.verify(notAnObject) }
        let refused = try await server.get("/v1/clones", token: early)
        #expect(refused.status == .unauthorized)
        #expect(try refused.json()["error"]?["message"]?.stringValue?.hasPrefix("token not valid yet") == true)
        await server.stop()
    }

    @Test func subjectsAreValidated() async throws {
        let server = try await TestServer.start()
        await #expect(throws: AuthError.invalidSubject) {
            _ = try await server.token("not a valid subject!")
        }
        await server.stop()
    }
}

@Suite struct RESTTests {
    @Test func healthz() async throws {
        let server = try await TestServer.start()
        let response = try await server.get("/healthz", token: nil)
        #expect(response.status == .ok)
        #expect(response.text == #"{"status":"ok","store":"ok"}"#)
        #expect(response.headers.first(name: "content-type") == "application/json; charset=utf-8")
        // A store that cannot serve calls makes the server unhealthy: a balancer stops sending here.
        try await server.server.store.close()
        let down = try await server.get("/healthz", token: nil)
        #expect(down.status == .serviceUnavailable)
        #expect(down.text == #"{"status":"unavailable","store":"unreachable"}"#)
        // A request the closed store cannot serve is told so, not that the server failed.
        let refused = try await server.get("/v1/clones", token: try await server.token("alice"))
        #expect(refused.status == .serviceUnavailable)
        #expect(try refused.json()["error"]?["code"] == .string("unavailable"))
        await server.stop()
    }

    /// A store with no space left (a full disk) makes a request that writes fail `unavailable`
    /// (503 over REST), not `internal`, and `/healthz` say `full` until a write is stored again.
    @Test func aFullStoreAnswersUnavailableAndHealthSaysFull() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        let store = try #require(server.server.store as? SQLiteStore)
        // The database may not grow, and its free space is taken: to SQLite, as full as a full disk.
        // (The filler's table made first: its root page may be one the database has no room for.)
        try await store.run { db in
            try db.exec("CREATE TABLE filler (pad BLOB)")
            let pages = try db.query("PRAGMA page_count").first?["page_count"].int ?? 0
            try db.exec("PRAGMA max_page_count = \(pages)")
        }
        for size in [10_000, 1_000, 100, 10] {
            // Each in its own call: one that finds no space undoes its whole transaction.
            while (try? await store.run({ db in try db.exec("INSERT INTO filler VALUES (zeroblob(\(size)))") })) != nil {}
        }
        let long = String(repeating: "many words ", count: 700)
        try await socket.chatSend(id: "c1", clone: clone, text: long)
        let refused = try await socket.next(type: "error").frame
        #expect(refused["ref"] == .string("c1"))
        #expect(refused["code"] == .string("unavailable"))
        let created = try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/clones", token: token, json: .object([("name", .string("Bo")), ("system_prompt", .string(long))]))
        #expect(created.status == .serviceUnavailable)
        #expect(try created.json()["error"]?["code"] == .string("unavailable"))
        let full = try await server.get("/healthz", token: nil)
        #expect(full.status == .serviceUnavailable)
        #expect(full.text == #"{"status":"unavailable","store":"full"}"#)

        try await store.run { db in try db.exec("PRAGMA max_page_count = 1073741823") }
        try await socket.chatSend(id: "c2", clone: clone, text: long)
        let end = try await socket.next(type: "stream.end").frame
        #expect(end["reason"] == .string("complete"))
        let healthy = try await server.get("/healthz", token: nil)
        #expect(healthy.text == #"{"status":"ok","store":"ok"}"#)
        await server.stop()
    }

    @Test func cloneLifecycle() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let created = try await TestHTTPClient.json(
            port: server.port, .POST, "/v1/clones", token: token,
            json: .object([
                ("name", .string("Ada")), ("traits", .array([.string("witty")])), ("system_prompt", .string("Hi")),
                ("sliders", .object([("warmth", .int(10))])), ("memory", .array([.string("m1")])),
            ]))
        #expect(created.status == .created)
        let clone = try created.json()
        let id = clone["id"]!.stringValue!
        #expect(created.headers.first(name: "location") == "/v1/clones/\(id)")
        #expect(try await server.get("/v1/clones/\(id)", token: token).json() == clone)
        #expect(try await server.get("/v1/clones", token: token).json()["clones"] == .array([clone]))

        let patched = try await TestHTTPClient.json(
            port: server.port, .PATCH, "/v1/clones/\(id)", token: token,
            json: .object([("traits", .array([.string("calm")]))]))
        #expect(patched.status == .ok)
        #expect(try patched.json()["traits"] == .array([.string("calm")]))
        #expect(try patched.json()["name"] == .string("Ada"))
        #expect(try await server.get("/v1/clones/\(id)", token: token).json()["traits"] == .array([.string("calm")]))

        let deleted = try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/clones/\(id)", token: token)
        #expect(deleted.status == .noContent)
        #expect(try await server.get("/v1/clones/\(id)", token: token).status == .notFound)
        await server.stop()
    }

    @Test func badInputIsA400WithAJSONError() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let cases: [([UInt8]?, String)] = [
            (nil, "the request needs a JSON body"),
            (Array("{oops".utf8), "the body is not valid JSON: expected a key in quotes at byte 1"),
            (Array(#"{"name":"A","name":"B"}"#.utf8), #"the body is not valid JSON: the key "name" is repeated at byte 12"#),
            (Array(#"{"traits":[]}"#.utf8), "missing field 'name'"),
            (Array(#"{"name":"A","sliders":{"x":500}}"#.utf8), "slider 'x' must be between 0 and 100"),
            (Array(#"{"name":"A","nmae":"B"}"#.utf8), "unknown field 'nmae'"),
        ]
        for (body, message) in cases {
            let response = try await TestHTTPClient.request(port: server.port, .POST, "/v1/clones", token: token, body: body)
            #expect(response.status == .badRequest)
            #expect(try response.json() == .object([("error", .object([("code", .string("bad_request")), ("message", .string(message))]))]))
        }
        #expect(try await server.get("/v1/conversations?limit=0", token: token).status == .badRequest)
        #expect(try await server.get("/v1/conversations?limit=abc", token: token).status == .badRequest)
        await server.stop()
    }

    /// More clones than a page are written a page at a time as they are read (each may carry
    /// megabytes: all of a user's were held in memory together, in the list and the export),
    /// every one once, oldest first; a short list is answered whole, with its length.
    @Test(arguments: TestServer.StoreKind.allCases)
    func aLongListOfClonesIsWrittenAPageAtATime(_ store: TestServer.StoreKind) async throws {
        let server = try await TestServer.start(store: store) { $0.requestsPerSecondPerUser = nil }
        let token = try await server.token("alice")
        var created: [String] = []
        for n in 0..<3 { created.append(try #require(try await server.createClone(token: token, name: "C\(n)")["id"]?.stringValue)) }
        let short = try await server.get("/v1/clones", token: token)
        #expect(short.headers["content-length"].first.flatMap(Int.init) == short.body.count && short.headers["transfer-encoding"].isEmpty)
        #expect(try short.json()["clones"]?.arrayValue?.compactMap { $0["id"]?.stringValue } == created)
        for n in 3..<37 { created.append(try #require(try await server.createClone(token: token, name: "C\(n)")["id"]?.stringValue)) }
        _ = try await server.createClone(token: try await server.token("bob"), name: "Bob's")
        let long = try await server.get("/v1/clones", token: token)
        #expect(long.status == .ok && long.headers["transfer-encoding"] == ["chunked"])
        let listed = try long.json()["clones"]?.arrayValue ?? []
        #expect(listed.compactMap { $0["id"]?.stringValue } == created)
        #expect(listed.compactMap { $0["name"]?.stringValue } == (0..<37).map { "C\($0)" })
        #expect(listed.last == (try await server.get("/v1/clones/\(created[36])", token: token).json()))
        let exported = try await server.get("/v1/me/export", token: token).json()["clones"]?.arrayValue ?? []
        #expect(exported.compactMap { $0["id"]?.stringValue } == created)
        await server.stop()
    }

    /// A user's clones are capped (creating one is free, and each may carry megabytes of card):
    /// past the cap, creating or importing is 429 `limit_exceeded`; a deletion makes room, and
    /// another user has their own.
    @Test func aUsersClonesAreCapped() async throws {
        let server = try await TestServer.start { $0.maxClonesPerUser = 2 }
        let alice = try await server.token("alice")
        let first = try #require(try await server.createClone(token: alice)["id"]?.stringValue)
        _ = try await server.createClone(token: alice)
        let refused = try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones", token: alice, json: .object([("name", .string("C"))]))
        #expect(refused.status == .tooManyRequests && refused.errorCode == "limit_exceeded")
        #expect(try refused.json()["error"]?["message"] == .string("at most 2 clones per user; delete one to make another"))
        let card = JSONValue.object([
            ("spec", .string("chara_card_v2")), ("spec_version", .string("2.0")),
            ("data", .object([("name", .string("Mara")), ("description", .string("d"))])),
        ])
        let imported = try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones/import", token: alice, json: card)
        #expect(imported.status == .tooManyRequests && imported.errorCode == "limit_exceeded")
        _ = try await server.createClone(token: try await server.token("bob"))
        #expect(try await TestHTTPClient.request(port: server.port, .DELETE, "/v1/clones/\(first)", token: alice).status == .noContent)
        #expect(try await TestHTTPClient.json(port: server.port, .POST, "/v1/clones/import", token: alice, json: card).status == .created)
        #expect(try await server.get("/v1/clones", token: alice).json()["clones"]?.arrayValue?.count == 2)
        await server.stop()
    }

    /// Creates sent at the same moment keep to the cap (each counted before it was written, so
    /// all of them passed it): on one node exactly the cap is created, and every create answered
    /// 201 is a clone the list shows.
    @Test func clonesCreatedAtOnceKeepToTheCap() async throws {
        let server = try await TestServer.start { $0.maxClonesPerUser = 3 }
        let alice = try await server.token("alice")
        let statuses = try await withThrowingTaskGroup(of: HTTPResponseStatus.self) { group in
            for n in 0..<24 {
                group.addTask {
                    try await TestHTTPClient.json(
                        port: server.port, .POST, "/v1/clones", token: alice, json: .object([("name", .string("C\(n)"))])
                    ).status
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(statuses).isSubset(of: [.created, .tooManyRequests]), "\(statuses)")
        let created = statuses.filter { $0 == .created }.count
        let listed = try await server.get("/v1/clones", token: alice).json()["clones"]?.arrayValue?.count
        #expect(created == 3, "\(statuses)")
        #expect(listed == 3)
        await server.stop()
    }

    /// A query that cannot be read one way only is a 400 saying why: a parameter given twice
    /// (the first counted, where many frameworks count the last) or one that is not UTF-8 once
    /// decoded (read as empty, it was answered as missing: "'q' must name at least one word").
    @Test func aQueryReadableTwoWaysIsA400() async throws {
        let server = try await TestServer.start()
        let token = try await server.token("alice")
        let name = String(repeating: "x", count: 70)
        let long = "/v1/clones?\(name)&\(name)"
        let cases: [(String, String)] = [
            ("/v1/conversations?limit=5&limit=500", "the query parameter 'limit' is given twice"),
            ("/v1/conversations?limit=5&li%6Dit=500", "the query parameter 'li%6Dit' is given twice"),
            ("/v1/search?q=%FF", "the query parameter 'q' is not percent-encoded UTF-8"),
            ("/v1/search?q=%zz", "the query parameter 'q' is not percent-encoded UTF-8"),
            ("/v1/search?%FF=aardvark", "the query parameter '%FF' is not percent-encoded UTF-8"),
            (long, "the query parameter '\(String(repeating: "x", count: 64))…' is given twice"),
        ]
        for (path, message) in cases {
            let response = try await server.get(path, token: token)
            #expect(response.status == .badRequest, "\(path)")
            #expect(try response.json() == .object([("error", .object([("code", .string("bad_request")), ("message", .string(message))]))]))
        }
        // What still reads one way is answered as before: an empty parameter, a `+`, `%20`.
        #expect(try await server.get("/v1/conversations?limit=2&&before=", token: token).status == .ok)
        #expect(try await server.get("/v1/search?q=aard%20vark+x", token: token).status == .ok)
        await server.stop()
    }

    /// One user's REST requests past the rate (1 a second, bursts of 2 here) are 429 with
    /// `Retry-After`; another user's are not held back by them. How many pass depends only on
    /// how long the loop took: the burst, plus one a second.
    @Test func aUserPastTheRequestRateIsToldToWaitAndOthersAreNot() async throws {
        let server = try await TestServer.start { $0.requestsPerSecondPerUser = 1 }
        let (alice, bob) = (try await server.token("alice"), try await server.token("bob"))
        var statuses: [HTTPResponseStatus] = []
        let started = ContinuousClock.now
        var refusal: TestHTTPResponse?
        for _ in 0..<50 {
            let response = try await server.get("/v1/clones", token: alice)
            statuses.append(response.status)
            if response.status == .tooManyRequests {
                refusal = response
                break
            }
        }
        let seconds = Int((ContinuousClock.now - started).components.seconds)
        #expect(statuses.prefix(2) == [.ok, .ok], "the burst")
        #expect(statuses.count <= 3 + seconds, "refused once the burst and the refills are spent")
        #expect(refusal?.errorCode == "rate_limited")
        #expect(refusal?.headers.first(name: "retry-after") == "1")
        #expect(try refusal?.json()["error"]?["message"] == .string("more than 1 requests a second from alice; try again shortly"))
        #expect(try await server.get("/v1/clones", token: bob).status == .ok, "bob has his own bucket")
        await server.stop()
    }

    @Test func unknownRoutesWrongMethodsAndHugeBodies() async throws {
        let server = try await TestServer.start { $0.maxRequestBodyBytes = 1024 }
        let token = try await server.token("alice")
        let missing = try await server.get("/v1/nothing", token: token)
        #expect(missing.status == .notFound)
        #expect(missing.errorCode == "not_found")
        let wrong = try await TestHTTPClient.request(port: server.port, .PUT, "/v1/clones", token: token)
        #expect(wrong.status == .methodNotAllowed)
        #expect(wrong.headers.first(name: "allow") == "POST, GET")
        let huge = try await TestHTTPClient.request(port: server.port, .POST, "/v1/clones", token: token, body: Array(repeating: 0x41, count: 5000))
        #expect(huge.status == .payloadTooLarge)
        #expect(huge.errorCode == "too_large")
        await server.stop()
    }

    @Test func messagesAndConversationsPage() async throws {
        let server = try await TestServer.start { $0.simulated.replyTokens = 3 }
        let token = try await server.token("alice")
        let clone = try await server.createClone(token: token)["id"]!.stringValue!
        let socket = try await server.connect(token: token)
        try await socket.chatSend(id: "c0", clone: clone, text: "turn 0")
        let conversation = try await socket.readReply().conversation
        for i in 1..<3 {
            try await socket.chatSend(id: "c\(i)", clone: clone, conversation: conversation, text: "turn \(i)")
            _ = try await socket.readReply()
        }
        let newest = try await server.get("/v1/conversations/\(conversation)/messages?limit=4", token: token).json()
        let texts = newest["messages"]!.arrayValue!.map { $0["text"]!.stringValue! }
        #expect(texts.count == 4)
        #expect(texts[0] == "turn 1" && texts[2] == "turn 2")
        let cursor = newest["next_before"]!.stringValue!
        let older = try await server.get("/v1/conversations/\(conversation)/messages?limit=4&before=\(cursor)", token: token).json()
        #expect(older["messages"]!.arrayValue!.map { $0["role"]!.stringValue! } == ["user", "assistant"])
        #expect(older["messages"]!.arrayValue![0]["text"] == .string("turn 0"))
        #expect(older["next_before"] == .null)

        try await socket.chatSend(id: "n", clone: clone, text: "another conversation")
        let second = try await socket.readReply().conversation
        let list = try await server.get("/v1/conversations?limit=1", token: token).json()
        #expect(list["conversations"]!.arrayValue!.map { $0["id"]!.stringValue! } == [second])
        let rest = try await server.get("/v1/conversations?limit=1&before=\(list["next_before"]!.stringValue!)", token: token).json()
        #expect(rest["conversations"]!.arrayValue!.map { $0["id"]!.stringValue! } == [conversation])
        #expect(rest["conversations"]!.arrayValue![0]["title"] == .string("turn 0"))
        await server.stop()
    }

    @Test func deletingACloneEndsItsStreamsAndDeletesItsTranscripts() async throws {
        let chat = try await LongReply.start()
        let deleted = try await TestHTTPClient.request(port: chat.server.port, .DELETE, "/v1/clones/\(chat.clone)", token: chat.token)
        #expect(deleted.status == .noContent)
        #expect(try await chat.socket.next(type: "stream.end").frame["reason"] == .string("cancelled"))
        #expect(try await chat.server.get("/v1/conversations/\(chat.conversation)/messages", token: chat.token).status == .notFound)
        await chat.server.stop()
    }
}
