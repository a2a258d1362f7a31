// Fan-out delivery delay in a debate room with many members.
//
//   swift run -c release parley-bench-fanout                 # 1000 members (BENCHMARKS.md)
//   swift run parley-bench-fanout --members 50 --tokens 20   # a quick smoke run
//
// Starts a Parley server in this process (embedded SQLite, simulated provider pacing tokens),
// connects N member sockets plus the moderator over loopback, runs one debate turn and records,
// on each member's event loop, when every token frame arrived. A token's delivery delay at a
// member is its arrival there minus its first arrival at any member: how long the fan-out of one
// encoded frame to N sockets takes. Clients and server share the machine, so figures are an
// upper bound of what the server alone costs.
import Foundation
import NIOCore
import ParleyCore
import ParleyServer
import ParleyTestSupport
import Synchronization

struct Options {
    var members = 1_000
    var tokens = 200
    var tokensPerSecond = 50.0

    init(_ arguments: [String]) {
        var iterator = arguments.dropFirst().makeIterator()
        while let flag = iterator.next() {
            guard let value = iterator.next().flatMap(Double.init) else { Self.usage() }
            switch flag {
            case "--members": members = Int(value)
            case "--tokens": tokens = Int(value)
            case "--tokens-per-sec": tokensPerSecond = value
            default: Self.usage()
            }
        }
    }

    static func usage() -> Never {
        print("usage: parley-bench-fanout [--members N] [--tokens N] [--tokens-per-sec X]")
        exit(64)
    }
}

/// Arrival times per token seq, per member.
final class Arrivals: Sendable {
    private let times: Mutex<[[ContinuousClock.Instant?]]>
    init(members: Int, tokens: Int) { times = Mutex(Array(repeating: Array(repeating: nil, count: tokens + 1), count: members)) }
    func record(member: Int, seq: Int, at time: ContinuousClock.Instant) {
        times.withLock { if seq < $0[member].count { $0[member][seq] = time } }
    }
    var all: [[ContinuousClock.Instant?]] { times.withLock { $0 } }
}

/// The seq of a token frame, read without parsing the JSON (this runs for every frame).
func tokenSeq(_ buffer: ByteBuffer) -> Int? {
    let view = buffer.readableBytesView
    guard view.starts(with: #"{"type":"token""#.utf8) else { return nil }
    let marker = Array(#""seq":"#.utf8)
    guard let range = view.firstRange(of: marker) else { return nil }
    var value = 0
    for byte in view[range.upperBound...] {
        guard (48...57).contains(byte) else { break }
        value = value * 10 + Int(byte - 48)
    }
    return value
}

func percentile(_ sorted: [Double], _ p: Double) -> Double {
    sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
}

let options = Options(CommandLine.arguments)
var configuration = ServerConfiguration()
configuration.port = 0
configuration.dataDirectory = FileManager.default.temporaryDirectory.appendingPathComponent("parley-bench-\(UUID().uuidString)").path
configuration.simulated.timeToFirstToken = .zero
configuration.simulated.tokensPerSecond = options.tokensPerSecond
configuration.simulated.replyTokens = options.tokens
configuration.credits.startingGrant = 1_000_000_000
let server = try await ParleyServer.start(configuration: configuration)
let port = server.port
let moderator = try await server.authenticator.issue(subject: "mod", ttl: .seconds(3600))

func post(_ path: String, _ body: JSONValue) async throws -> JSONValue {
    let response = try await TestHTTPClient.json(port: port, .POST, path, token: moderator, json: body)
    return try response.json()
}
let a = try await post("/v1/clones", .object([("name", .string("Ada"))]))["id"]!
let b = try await post("/v1/clones", .object([("name", .string("Bob"))]))["id"]!
let room = try await post(
    "/v1/rooms",
    .object([
        ("kind", .string("debate")), ("topic", .string("Is cheese a dessert?")), ("rounds", .int(1)), ("visibility", .string("link")),
        ("max_tokens_per_turn", .int(Int64(options.tokens))),
        ("clones", .array([.object([("clone", a), ("stance", .string("yes"))]), .object([("clone", b), ("stance", .string("no"))])])),
    ]))["id"]!.stringValue!

let arrivals = Arrivals(members: options.members, tokens: options.tokens)
var sockets: [TestWebSocket] = []
let connectStart = ContinuousClock.now
for member in 0..<options.members {
    let token = try await server.authenticator.issue(subject: "u\(member)", ttl: .seconds(3600))
    let socket = try await TestWebSocket.connect(port: port, token: token) { buffer, time in
        guard let seq = tokenSeq(buffer) else { return false }
        arrivals.record(member: member, seq: seq, at: time)
        return true
    }
    _ = try await socket.nextJSON()  // welcome
    try await socket.send(.object([("type", .string("room.join")), ("id", .string("j")), ("room", .string(room))]))
    _ = try await socket.next(type: "room.state")
    sockets.append(socket)
}
let connectTime = ContinuousClock.now - connectStart

let mod = try await TestWebSocket.connect(port: port, token: moderator)
_ = try await mod.nextJSON()
try await mod.send(.object([("type", .string("room.join")), ("id", .string("j")), ("room", .string(room))]))
_ = try await mod.next(type: "room.state")
try await mod.send(.object([("type", .string("room.control")), ("id", .string("c")), ("room", .string(room)), ("action", .string("start"))]))
_ = try await mod.next(type: "stream.end", timeout: .seconds(600))  // the first turn
// Every member's last token of the turn has arrived once the moderator saw stream.end and each
// member's own stream.end is read (frames on one socket arrive in order).
for socket in sockets { _ = try await socket.next(type: "stream.end", timeout: .seconds(120)) }

var delays: [Double] = []
var spreads: [Double] = []
var missing = 0
let table = arrivals.all
for seq in 1...options.tokens {
    let times = table.compactMap { $0[seq] }
    missing += table.count - times.count
    guard let first = times.min() else { continue }
    let millis = times.map { Double(($0 - first).components.attoseconds) / 1e15 + Double(($0 - first).components.seconds) * 1000 }
    delays += millis
    spreads.append(millis.max() ?? 0)
}
delays.sort()
spreads.sort()
print("\(options.members) members, one turn of \(options.tokens) tokens at \(options.tokensPerSecond) tokens/s; joined in \(connectTime)")
print("| members | tokens delivered | missing | delay p50 | delay p99 | delay max | per-token spread p50 / p99 |")
print("| --- | --- | --- | --- | --- | --- | --- |")
func ms(_ x: Double) -> String { String((x * 100).rounded() / 100) + " ms" }
print(
    "| \(options.members) | \(delays.count) | \(missing) | \(ms(percentile(delays, 0.5))) | \(ms(percentile(delays, 0.99))) | \(ms(delays.last ?? 0)) | \(ms(percentile(spreads, 0.5))) / \(ms(percentile(spreads, 0.99))) |"
)
for socket in sockets { await socket.drop() }
await mod.drop()
await server.shutdown()
try? FileManager.default.removeItem(atPath: configuration.dataDirectory)
exit(missing == 0 ? 0 : 1)
