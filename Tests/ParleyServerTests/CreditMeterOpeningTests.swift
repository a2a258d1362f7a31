import Foundation
import Logging
import MetricsTestKit
import ParleyCore
import ParleyLLM
import ParleyMongoStore
@testable import ParleyServer
import ParleyStore
import ParleyTestSupport
import Testing

/// A chat request's message goes to the store in the prompt's debit (one commit before the first
/// token, #26). A message that cannot be stored must leave nothing charged, whichever store.
@Suite struct CreditMeterOpeningTests {
    static func open(_ backend: String) async throws -> any Store {
        if backend == "mongodb" { return try await MongoStore.open(uri: MongoFixture.uri()) }
        let path = Scratch.path("opening", suffix: ".sqlite")
        return try await SQLiteStore.open(path: path)
    }

    /// An edit of a message that left its conversation's path: the request fails with that, and
    /// the balance is what it was (SQLite: the debit rolled back with it; MongoDB: the debit
    /// given back by the stream's settlement, as for a stream that never ran).
    @Test(arguments: ["sqlite", "mongodb"])
    func aMessageThatCannotBeStoredLeavesNothingCharged(_ backend: String) async throws {
        let store = try await Self.open(backend)
        do {
            _ = try await store.apply(
                LedgerEntry(id: "welcome", user: "alice", kind: .grant, credits: 1_000, createdAt: 1), allowOverdraft: false)
            try await store.createClone(
                Clone(id: "cl_1", owner: "alice", name: "Ada", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 1, updatedAt: 1))
            let credits = Credits(
                store: store, configuration: CreditsConfiguration(), logger: Logger(label: "test"), metrics: TestMetrics(), pseudonym: { $0 })
            let edit = Message(id: "ms_edit", conversation: "cv_1", role: .user, text: "again", createdAt: 2)
            let opening = CreditMeter.Opening(opening: .messages([edit], replacing: "ms_gone"), store: store)

            let meter = credits.meter(user: "alice", stream: "st_1", conversation: "cv_1", model: SimulatedProvider.modelName, feature: .chat)
            await #expect(throws: ReplacedMessageLeftPath(id: "ms_gone")) { try await meter.begin(inputTokens: 100, storing: opening) }
            #expect(try await store.balance(user: "alice") == 1_000)
            #expect(await meter.charged == 0)
            let prompt = try await store.ledgerEntry(id: "st_1:in")
            let settlement = try await store.ledgerEntry(id: "st_1:settle")
            if store is SQLiteStore {
                #expect(prompt == nil && settlement == nil)
            } else {
                #expect(prompt != nil && settlement?.credits == -(prompt?.credits ?? 0))
            }

            // The same request with a message that can be stored: charged once, stored once.
            let message = Message(id: "ms_1", conversation: "cv_2", role: .user, text: "hello", createdAt: 3)
            let conversation = Conversation(id: "cv_2", owner: "alice", clone: "cl_1", title: "hello", createdAt: 3, updatedAt: 3)
            let next = credits.meter(user: "alice", stream: "st_2", conversation: "cv_2", model: SimulatedProvider.modelName, feature: .chat)
            try await next.begin(
                inputTokens: 100, storing: CreditMeter.Opening(opening: .conversation(conversation, messages: [message]), store: store))
            let charged = await next.charged
            #expect(charged > 0)
            #expect(try await store.balance(user: "alice") == 1_000 - charged)
            #expect(try await store.messages(conversation: "cv_2", limit: 5, before: nil).map(\.id) == ["ms_1"])
        } catch {
            try? await store.close()
            throw error
        }
        try await store.close()
    }
}
