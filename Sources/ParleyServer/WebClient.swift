import Foundation
import NIOHTTP1

/// The browser client (`WebClient/`: HTML, CSS and JavaScript, no build step), read once from the
/// package's resources and served at `/`. Strict headers: the page runs only its own script and
/// style, talks only to this origin, and cannot be framed.
struct WebClient: Sendable {
    struct File: Sendable {
        var bytes: [UInt8]
        var contentType: String
    }

    /// Request path → file.
    let files: [String: File]

    static let served: [(path: String, file: String, type: String)] = [
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/app.js", "app.js", "text/javascript; charset=utf-8"),
        ("/app.css", "app.css", "text/css; charset=utf-8"),
    ]

    /// This module's resource bundle, where SwiftPM builds it: beside the executable. Nil for a
    /// binary copied without it. (`Bundle.module` falls back to the build directory's absolute
    /// path, and stops the process when that is gone too: a copied binary worked until its
    /// build directory was deleted, then stopped at start-up.)
    static let resources = Bundle(path: Bundle.main.bundleURL.appendingPathComponent("parley_ParleyServer.resources").path)

    /// Loads the files from the module's resource bundle; a missing one (or a missing bundle)
    /// leaves that path unserved (404) rather than failing start-up.
    static func load() -> WebClient {
        var files: [String: File] = [:]
        guard let root = resources?.resourceURL?.appendingPathComponent("WebClient") else { return WebClient(files: [:]) }
        for (path, name, type) in served {
            if let data = FileManager.default.contents(atPath: root.appendingPathComponent(name).path) {
                files[path] = File(bytes: Array(data), contentType: type)
            }
        }
        return WebClient(files: files)
    }

    static let headers: HTTPHeaders = [
        "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            + "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-cache",
    ]

    func response(for path: String) -> HTTPResponse? {
        guard let file = files[path] else { return nil }
        var headers = Self.headers
        headers.add(name: "content-type", value: file.contentType)
        return HTTPResponse(.ok, body: file.bytes, headers: headers)
    }
}
