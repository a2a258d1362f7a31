import ArgumentParser
import Foundation
import ParleyServer

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a signed token for a user.")

    @OptionGroup var secret: SecretOptions

    @Option(help: "The user the token speaks for.")
    var sub: String

    @Option(help: "Optional role claim, e.g. admin.")
    var role: String?

    @Option(help: "Lifetime in seconds.")
    var ttl = 3600

    func validate() throws {
        guard ttl > 0 else { throw ArgumentParser.ValidationError("--ttl must be positive") }
    }

    func run() async throws {
        do {
            let key: String
            if let given = secret.resolvedSecret {
                key = given
            } else {
                try FileManager.default.createDirectory(atPath: secret.dataDir, withIntermediateDirectories: true)
                key = try SecretFile.loadOrCreate(at: secret.dataDir + "/jwt-secret")
            }
            let authenticator = await Authenticator.make(secret: key)
            print(try await authenticator.issue(subject: sub, role: role, ttl: .seconds(ttl)))
        } catch {
            FileHandle.standardError.write(Data("parley: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
