import ParleyCore
import ParleyStore

/// Users' personas as this node knows them: a reply reads its user's from here, which asks the
/// store at most once every `freshness` per user (a change made on this node applies at once, one
/// made on another within it), so a reply costs no store read for it.
final class Personas: Sendable {
    let store: any PersonaStore
    private let clock: @Sendable () -> Int64
    private let values: FreshValues<Persona?>

    init(store: any PersonaStore, clock: @escaping @Sendable () -> Int64, freshness: Duration = .seconds(5), capacity: Int = 10_000) {
        self.store = store
        self.clock = clock
        values = FreshValues(freshness: Timestamp.millis(freshness), capacity: capacity)
    }

    /// `user`'s persona, nil for none.
    func persona(of user: String) async throws -> Persona? {
        try await values.value(of: user, now: clock()) { [store] in try await store.persona(user: user) }
    }

    /// Stores `persona` as `user`'s (nil: none).
    func set(_ persona: Persona?, user: String) async throws {
        try await store.setPersona(persona, user: user)
        values.forget(user)
    }

    /// What this node knows of `user`'s persona is stale (their account was deleted).
    func forget(_ user: String) { values.forget(user) }
}
