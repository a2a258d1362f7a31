import NIOHTTP1

/// A small table-driven router: each route is a method, a path pattern with `:name` segments,
/// and a handler. Unknown paths answer 404, known paths with another method 405.
struct Router<Context: Sendable>: Sendable {
    typealias Handler = @Sendable (HTTPRequest, [String: String], Context) async throws -> HTTPResponse

    private struct Route: Sendable {
        var method: HTTPMethod
        var segments: [Substring]
        var handler: Handler
    }

    private var routes: [Route] = []

    mutating func add(_ method: HTTPMethod, _ pattern: String, _ handler: @escaping Handler) {
        routes.append(Route(method: method, segments: Self.split(pattern), handler: handler))
    }

    enum Match {
        case found(Handler, parameters: [String: String])
        case methodNotAllowed(allowed: [HTTPMethod])
        case notFound
    }

    func match(_ method: HTTPMethod, path: String) -> Match {
        let parts = Self.split(path)
        var allowed: [HTTPMethod] = []
        for route in routes {
            guard let parameters = Self.bind(route.segments, to: parts) else { continue }
            if route.method == method { return .found(route.handler, parameters: parameters) }
            allowed.append(route.method)
        }
        return allowed.isEmpty ? .notFound : .methodNotAllowed(allowed: allowed)
    }

    private static func split(_ path: String) -> [Substring] {
        path.split(separator: "/", omittingEmptySubsequences: true)
    }

    private static func bind(_ pattern: [Substring], to parts: [Substring]) -> [String: String]? {
        guard pattern.count == parts.count else { return nil }
        var parameters: [String: String] = [:]
        for (p, part) in zip(pattern, parts) {
            if p.first == ":" {
                parameters[String(p.dropFirst())] = String(part).removingPercentEncoding ?? String(part)
            } else if p != part {
                return nil
            }
        }
        return parameters
    }
}
