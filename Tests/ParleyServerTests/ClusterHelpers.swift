import Foundation
import ParleyTestSupport

@testable import ParleyServer

extension TestServer {
    /// A node of a cluster (#22) on the MongoDB database `uri` and the nats-server `nats`.
    static func clusterNode(
        _ id: String, nats: NATSServer, uri: String, secret: String = "cluster-test-secret-" + UUID().uuidString,
        _ configure: @escaping @Sendable (inout ServerConfiguration) -> Void = { _ in }
    ) async throws -> TestServer {
        try await TestServer.start(store: .mongodb) {
            $0.storeURI = uri
            $0.brokerURL = nats.url
            $0.jwtSecret = secret
            $0.nodeID = id
            configure(&$0)
        }
    }
}
