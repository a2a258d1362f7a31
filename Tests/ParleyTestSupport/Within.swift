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

/// Whether `condition` holds within `limit`, looked at every 10 ms: for effects with no event to
/// await (a socket's close reaching a gauge; a killed process that is not this one's child ending).
public func holds(within limit: Duration, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + limit
    while try await !condition() {
        guard ContinuousClock.now < deadline else { return false }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return true
}
