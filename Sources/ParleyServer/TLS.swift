import NIOSSL
import Synchronization

/// Where the server's certificate chain and private key are (PEM files): with them it serves
/// HTTPS and `wss://` on its port instead of plain HTTP.
public struct TLSFiles: Sendable, Equatable {
    /// The server's certificate first, then the intermediates that lead to a trusted root.
    public var certificateChain: String
    public var privateKey: String

    public init(certificateChain: String, privateKey: String) {
        self.certificateChain = certificateChain
        self.privateKey = privateKey
    }
}

/// The TLS context new connections get: TLS 1.2 at least, BoringSSL's default (modern) cipher
/// suites, ALPN `http/1.1`. `reload` reads the files again (SIGHUP): connections made after it get
/// the new certificate, those open keep theirs, so no socket is dropped. A reload that fails (a
/// file half-written, a key that does not match) keeps the context in use.
final class TLSContexts: Sendable {
    let files: TLSFiles
    private let current: Mutex<NIOSSLContext>

    init(_ files: TLSFiles) throws {
        self.files = files
        current = Mutex(try Self.load(files))
    }

    var context: NIOSSLContext { current.withLock { $0 } }

    func reload() throws {
        let fresh = try Self.load(files)
        current.withLock { $0 = fresh }
    }

    static func load(_ files: TLSFiles) throws -> NIOSSLContext {
        let chain: [NIOSSLCertificate]
        let key: NIOSSLPrivateKey
        do {
            chain = try NIOSSLCertificate.fromPEMFile(files.certificateChain)
        } catch {
            throw ConfigurationError("cannot read the TLS certificate chain \(files.certificateChain) (PEM): \(error)")
        }
        guard !chain.isEmpty else { throw ConfigurationError("no certificate in \(files.certificateChain)") }
        do {
            key = try NIOSSLPrivateKey(file: files.privateKey, format: .pem)
        } catch {
            throw ConfigurationError("cannot read the TLS private key \(files.privateKey) (PEM, unencrypted): \(error)")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = ["http/1.1"]
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw ConfigurationError("cannot use the TLS certificate \(files.certificateChain) with the key \(files.privateKey): \(error)")
        }
    }

    /// Strict-Transport-Security for every response over TLS: browsers come back over HTTPS only.
    static let hsts = ("strict-transport-security", "max-age=31536000")
}
