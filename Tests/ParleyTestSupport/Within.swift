/// What `body` returns, or `TestTimeout` when it takes longer than `limit` (a test awaiting an
/// event that never comes fails instead of hanging).
public func within<T: Sendable>(_ limit: Duration, _ what: String, _ body: @escaping @Sendable () async -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { race in
        race.addTask { await body() }
        race.addTask {
            try await Task.sleep(for: limit)
            return nil
        }
        defer { race.cancelAll() }
        guard let first = try await race.next(), let value = first else { throw TestTimeout(description: "\(what): nothing within \(limit)") }
        return value
    }
}
