// swift-tools-version:6.0
import Foundation
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny")
]

let package = Package(
    name: "parley",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "parley", targets: ["parley"]),
        .executable(name: "parley-load", targets: ["parley-load"]),
        .executable(name: "parley-bench-timers", targets: ["parley-bench-timers"]),
        .executable(name: "parley-bench-fanout", targets: ["parley-bench-fanout"]),
        .executable(name: "parley-bench-search", targets: ["parley-bench-search"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.7.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", "4.0.0"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        // The Prometheus backend behind GET /metrics (the executable bootstraps it).
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        // The executable's lifecycle: SIGTERM/SIGINT start a graceful shutdown (the drain).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        // TLS termination (HTTPS and wss on the server's port); AsyncHTTPClient already brings it in.
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        // Only for the timer benchmark's binary-heap baseline.
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        // HTTP for the real LLM providers (OpenAI-compatible, Anthropic).
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        // Only for the load-test client's latency histograms.
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
    ],
    targets: [
        // System SQLite (Debian libsqlite3-dev): the only C surface of the embedded store.
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        // The MongoDB C driver (Debian libmongoc-dev, libbson-dev).
        .systemLibrary(
            name: "CMongo",
            pkgConfig: "libmongoc-1.0",
            providers: [.apt(["libmongoc-dev", "libbson-dev"])]
        ),
        // The NATS C client (Debian libnats-dev), for the cluster's broker (issue #22).
        .systemLibrary(
            name: "CNats",
            pkgConfig: "libnats",
            providers: [.apt(["libnats-dev"])]
        ),
        // NATS and JetStream through nats.c: a Swift type owns every pointer; blocking calls run on a thread pool.
        .target(
            name: "ParleyNATS",
            dependencies: ["CNats", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")],
            swiftSettings: strict
        ),
        // zlib (Debian zlib1g-dev), for WebSocket permessage-deflate.
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // permessage-deflate (RFC 7692): offer negotiation and the zlib streams that own their memory.
        .target(
            name: "ParleyDeflate",
            dependencies: ["CZlib", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strict
        ),
        // The socket's frame-level checks below the protocol: RFC 6455 frame validation and the
        // permessage-deflate handler. Apart from the server so the fuzzer builds without its stack.
        .target(
            name: "ParleyWebSocket",
            dependencies: [
                "ParleyDeflate", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // Pure domain logic: models, protocol frames, validation, tokenizer, prompt assembly. No I/O.
        .target(name: "ParleyCore", swiftSettings: strict),
        // Persistence behind one Store protocol; blocking calls run on a NIOThreadPool.
        .target(
            name: "ParleyStore",
            dependencies: [
                "ParleyCore", "CSQLite",
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // The production store: MongoDB through libmongoc, conforming to the same Store protocol.
        .target(
            name: "ParleyMongoStore",
            dependencies: [
                "ParleyCore", "ParleyStore", "CMongo",
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // LLM providers behind one streaming protocol.
        // A provider may also push its events on an event loop (NIOCore); NIOPosix only lends the
        // shared loops a pulled stream of a pushing provider runs on.
        .target(
            name: "ParleyLLM",
            dependencies: ["ParleyCore", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")],
            swiftSettings: strict),
        // The HTTP providers (real models), kept apart so the pure provider logic builds without an HTTP stack.
        .target(
            name: "ParleyProviders",
            dependencies: [
                "ParleyLLM", "ParleyCore",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // The NIO server that wires store, providers and protocol together.
        .target(
            name: "ParleyServer",
            dependencies: [
                "ParleyCore", "ParleyStore", "ParleyMongoStore", "ParleyLLM", "ParleyDeflate", "ParleyWebSocket", "ParleyNATS",
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            // The browser client, served at `/`.
            resources: [.copy("WebClient")],
            swiftSettings: strict
        ),
        // pipe2 and posix_spawn's closefrom, which glibc declares only under _GNU_SOURCE.
        .target(name: "CSpawn"),
        // A model server run beside Parley (a sidecar): started, health-checked, restarted, stopped.
        // Carries the local SmolLM2 server script that `parley serve --local-model` runs.
        .target(
            name: "ParleySidecar",
            dependencies: [
                "CSpawn",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            resources: [.copy("model-server.py"), .copy("voice-server.py")],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "parley",
            dependencies: [
                "ParleyServer", "ParleyCore", "ParleyLLM", "ParleyProviders", "ParleyDeflate", "ParleySidecar", "ParleyMongoStore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // The load-test client: a standalone WebSocket client (it links no server code).
        .executableTarget(
            name: "parley-load",
            dependencies: [
                "ParleyCore", "ParleyLLM", "ParleyProviders", "ParleyDeflate",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "loadtest/Sources/parley-load",
            swiftSettings: strict
        ),
        // Timer wheel vs binary heap with 1M pending timers (BENCHMARKS.md).
        .executableTarget(
            name: "parley-bench-timers",
            dependencies: ["ParleyCore", .product(name: "HeapModule", package: "swift-collections")],
            path: "loadtest/Sources/parley-bench-timers",
            swiftSettings: strict
        ),
        // Fan-out delay in a debate room with 1000 members (BENCHMARKS.md).
        .executableTarget(
            name: "parley-bench-fanout",
            dependencies: [
                "ParleyServer", "ParleyCore", "ParleyTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            path: "loadtest/Sources/parley-bench-fanout",
            swiftSettings: strict
        ),
        // Search latency with 100,000 messages stored (BENCHMARKS.md).
        .executableTarget(
            name: "parley-bench-search",
            dependencies: ["ParleyCore", "ParleyStore", "ParleyMongoStore"],
            path: "loadtest/Sources/parley-bench-search",
            swiftSettings: strict
        ),
        // Test helpers shared by the test targets (a small NIO WebSocket client, server fixtures).
        .target(
            name: "ParleyTestSupport",
            dependencies: [
                "ParleyServer", "ParleyLLM", "ParleySidecar", "ParleyMongoStore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            path: "Tests/ParleyTestSupport",
            swiftSettings: strict
        ),
        .testTarget(name: "ParleyCoreTests", dependencies: ["ParleyCore", "ParleyLLM"], swiftSettings: strict),
        .testTarget(
            name: "ParleyStoreTests",
            dependencies: [
                "ParleyStore", "ParleyMongoStore", "ParleyCore", "ParleyTestSupport", .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "ParleyDeflateTests",
            dependencies: ["ParleyDeflate", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strict
        ),
        .testTarget(
            name: "ParleyWebSocketTests",
            dependencies: [
                "ParleyWebSocket", "ParleyDeflate",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "ParleySidecarTests",
            dependencies: ["ParleySidecar", "ParleyTestSupport", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        .testTarget(
            name: "ParleyLLMTests",
            dependencies: [
                "ParleyLLM", "ParleyCore", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
            ], swiftSettings: strict),
        .testTarget(
            name: "ParleyProvidersTests",
            dependencies: [
                "ParleyProviders", "ParleyLLM", "ParleyCore",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "ParleyNATSTests",
            dependencies: ["ParleyNATS", "ParleyTestSupport", .product(name: "NIOPosix", package: "swift-nio")],
            swiftSettings: strict
        ),
        .testTarget(
            name: "ParleyServerTests",
            dependencies: [
                "ParleyServer", "ParleyTestSupport", "ParleyStore", "ParleyMongoStore", "ParleyLLM", "ParleyCore", "ParleyDeflate", "ParleyNATS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
    ]
)

// The libFuzzer target exists only for scripts/fuzz.sh (PARLEY_FUZZ=1): it has no main of its
// own, since -sanitize=fuzzer supplies libFuzzer's, so an ordinary build could not link it.
if ProcessInfo.processInfo.environment["PARLEY_FUZZ"] != nil {
    package.targets.append(
        .executableTarget(
            name: "parley-fuzz",
            dependencies: [
                "ParleyWebSocket", "ParleyCore", "ParleyDeflate",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            path: "Fuzz/parley-fuzz",
            swiftSettings: strict + [.unsafeFlags(["-parse-as-library"])]
        )
    )
    package.products.append(.executable(name: "parley-fuzz", targets: ["parley-fuzz"]))
}
