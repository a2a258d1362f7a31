import ArgumentParser
import Foundation
import NIOCore

/// Where the server is and how to reach it; shared by every scenario.
struct TargetOptions: ParsableArguments {
    @Option(help: "Server address. Only loopback unless --allow-remote.")
    var host = "127.0.0.1"

    @Option(help: "Server port.")
    var port = 8080

    @Flag(help: "Allow a target outside 127.0.0.0/8 and ::1 (only against servers you own).")
    var allowRemote = false

    @Option(help: "The server's HS256 secret (or env PARLEY_JWT_SECRET); tokens are minted with it.")
    var secret: String?

    @Option(help: "File holding the server's secret (default: ./parley-data/jwt-secret when it exists).")
    var secretFile: String?

    @Option(help: "File of 'user token' lines to use instead of minting.")
    var tokensFile: String?

    @Option(help: "The server's process id: its CPU time and RSS are sampled from /proc during the run.")
    var serverPid: Int32?

    @Option(help: "Client event-loop threads.")
    var threads = 1

    @Flag(help: "Offer permessage-deflate and decompress what the server compresses; the report gives bytes on the wire beside bytes of JSON.")
    var deflate = false

    @Flag(help: "Ask for joined tokens (?coalesce=tokens), as the browser client does; each token of a frame counts as arriving with it.")
    var coalesce = false

    @Option(help: "Write the report as JSON to this file.")
    var json: String?

    @Option(help: "Prefix of the user ids this run uses (runs with different prefixes do not share state).")
    var userPrefix = "load"

    static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host == "[::1]" || host.hasPrefix("127.")
    }

    func validate() throws {
        guard Self.isLoopback(host) || allowRemote else {
            throw ValidationError("refusing to load \(host): only loopback targets unless --allow-remote")
        }
    }

    func tokens() throws -> TokenSource {
        var secret = self.secret ?? ProcessInfo.processInfo.environment["PARLEY_JWT_SECRET"]
        let file = secretFile ?? (FileManager.default.fileExists(atPath: "parley-data/jwt-secret") ? "parley-data/jwt-secret" : nil)
        if secret == nil, let file {
            secret = try String(contentsOfFile: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return try TokenSource(secret: secret, tokensFile: tokensFile)
    }

    func run(_ scenario: String) -> LoadRun {
        LoadRun(scenario: scenario, host: host, port: port, threads: threads, serverPID: serverPid, deflate: deflate, coalesce: coalesce)
    }

    var rest: RESTClient { RESTClient(base: "http://\(host.contains(":") ? "[\(host)]" : host):\(port)") }
}

@main
struct ParleyLoad: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "parley-load",
        abstract: "Load-test client for Parley: connect time, time to first token, inter-token gaps, fan-out and delivery delay.",
        discussion: "Every run is bounded in sockets and time. Latencies are HdrHistograms (p50…max); arrivals are open-loop.",
        subcommands: [Chat.self, Debate.self, Translation.self, Idle.self, Schedule.self, Model.self]
    )
}

/// Runs a scenario and always releases the client's event loops.
func running(_ run: LoadRun, _ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch {
        await run.shutdown()
        throw error
    }
    await run.shutdown()
}

/// Closes the sockets (on their loops, so the closes are not counted as drops).
func close(_ sockets: [LoadSocket]) async throws {
    for socket in sockets { try await socket.channel.eventLoop.submit { socket.close() }.get() }
}

struct Chat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "N sockets, each sending chat.send on an open-loop schedule and reading the streamed reply.")
    @OptionGroup var target: TargetOptions
    @Option(help: "Sockets (one user and clone each).") var sockets = 100
    @Option(help: "Each socket sends one message every this many ms.") var intervalMs = 3000
    @Option(help: "Seconds of sending (then the last replies are awaited, 30 s at most).") var duration = 20.0
    @Option(help: "The server's simulated pace (tokens/s), to compute the added delay per gap.") var tokensPerSecond = 20.0

    func validate() throws {
        guard (1...50_000).contains(sockets), intervalMs >= 10, (0.1...3600).contains(duration) else {
            throw ValidationError("--sockets 1-50000, --interval-ms ≥ 10, --duration 0.1-3600")
        }
    }

    func run() async throws {
        let run = target.run("chat")
        run.parameters = ["sockets": sockets, "interval_ms": intervalMs, "duration_s": duration, "nominal_tokens_per_second": tokensPerSecond]
        try await running(run) {
            let source = try target.tokens()
            let tokens = try (0..<sockets).map { try source.token(for: "\(target.userPrefix)-c\($0)") }
            let clones = try await target.rest.createClones(tokens: tokens)
            let connected = try await run.connect(tokens: tokens)
            let interval = UInt64(intervalMs) * 1_000_000
            let start = nowNanos() + 200_000_000
            let until = start + UInt64(duration * 1e9)
            // Socket i sends at start + phase(i) + k·interval while before `until`.
            let firsts = (0..<sockets).map { start + interval * UInt64($0) / UInt64(sockets) }
            let ended = Countdown(firsts.reduce(0) { $0 + ($1 < until ? Int((until - $1 - 1) / interval) + 1 : 0) })
            run.startMeasuring()
            let nominalGap = UInt64(1e9 / tokensPerSecond)
            for socket in connected {
                let clone = clones[socket.index]
                // The sockets' phases spread evenly over one interval: arrivals at a steady rate.
                let first = firsts[socket.index]
                try await socket.channel.eventLoop.submit {
                    let role = ChatRole(clone: clone, nominalGap: nominalGap, ended: ended)
                    socket.role = role
                    role.schedule(on: socket, first: first, interval: interval, until: until)
                }.get()
            }
            try await Task.sleep(for: .seconds(duration))
            if !(await ended.wait(timeout: .seconds(30))) { print("\(ended.left) replies did not end within 30 s of the last send") }
            try await run.finish(json: target.json)
            try await close(connected)
        }
    }
}

struct Debate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One debate room, M listening members: fan-out delay of every token.")
    @OptionGroup var target: TargetOptions
    @Option(help: "Listening members.") var members = 1000
    @Option(help: "Rounds (two clones, so twice as many turns).") var rounds = 2
    @Option(help: "Tokens per turn at most.") var turnTokens = 60
    @Option(help: "Seconds to wait for the debate to end.") var timeout = 120.0

    func run() async throws {
        let run = target.run("debate")
        run.parameters = ["members": members, "rounds": rounds, "turn_tokens": turnTokens]
        try await running(run) {
            let source = try target.tokens()
            let moderator = try source.token(for: "\(target.userPrefix)-mod")
            let clones = try await target.rest.createClones(tokens: [moderator, moderator])
            let room =
                try await target.rest.post(
                    "/v1/rooms", token: moderator,
                    json: [
                        "kind": "debate", "topic": "Is the sea a good neighbour?", "rounds": rounds, "visibility": "link",
                        "max_tokens_per_turn": turnTokens,
                        "clones": clones.map { ["clone": $0, "stance": "an honest one"] },
                    ])["id"] as! String
            let tokens = try (0..<members).map { try source.token(for: "\(target.userPrefix)-m\($0)") }
            let connected = try await run.connect(tokens: tokens)
            let joined = Countdown(members)
            let ended = Countdown(members)
            for socket in connected {
                try await socket.channel.eventLoop.submit {
                    socket.role = ListenerRole(joined: joined, ended: ended)
                    socket.send(#"{"type":"room.join","id":"j","room":"\#(room)"}"#)
                }.get()
            }
            guard await joined.wait(timeout: .seconds(60)) else { throw LoadError("\(joined.left) members did not join within 60 s") }
            let mod = try await run.connect(tokens: [moderator])[0]
            let modJoined = Countdown(1)
            try await mod.channel.eventLoop.submit {
                mod.role = ListenerRole(joined: modJoined, ended: Countdown(1))
                mod.send(#"{"type":"room.join","id":"j","room":"\#(room)"}"#)
            }.get()
            guard await modJoined.wait(timeout: .seconds(30)) else { throw LoadError("the moderator could not join") }
            run.startMeasuring()
            try await mod.channel.eventLoop.submit {
                mod.role = IdleRole()
                mod.send(#"{"type":"room.control","id":"go","room":"\#(room)","action":"start"}"#)
            }.get()
            if !(await ended.wait(timeout: .seconds(timeout))) { print("\(ended.left) members did not see the debate end") }
            try await run.finish(json: target.json, analyze: recordFanOut)
            try await close(connected + [mod])
        }
    }
}

struct Translation: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One translation chat: members in several languages say things on an open-loop schedule.")
    @OptionGroup var target: TargetOptions
    @Option(help: "Members (the first one owns the chat).") var members = 30
    @Option(help: "Languages, spread over the members.") var languages = 3
    @Option(help: "Each member says something every this many ms.") var intervalMs = 5000
    @Option(help: "Seconds of talking (then 30 s at most for the last translations).") var duration = 20.0
    @Option(help: "The server's simulated pace (tokens/s).") var tokensPerSecond = 20.0

    static let tags = ["en", "pt", "zh", "fr", "de", "es", "ja", "ko", "it", "nl"]

    func run() async throws {
        guard (2...50).contains(members), (1...Self.tags.count).contains(languages) else {
            throw ValidationError("--members 2-50, --languages 1-\(Self.tags.count)")
        }
        let run = target.run("translation")
        run.parameters = ["members": members, "languages": languages, "interval_ms": intervalMs, "duration_s": duration]
        try await running(run) {
            let source = try target.tokens()
            let users = (0..<members).map { "\(target.userPrefix)-t\($0)" }
            let tokens = try users.map { try source.token(for: $0) }
            let language = { (index: Int) in Self.tags[index % languages] }
            let room =
                try await target.rest.post(
                    "/v1/rooms", token: tokens[0],
                    json: [
                        "kind": "translation", "members": Array(users.dropFirst()),
                        "languages": Dictionary(uniqueKeysWithValues: users.enumerated().map { ($1, language($0)) }),
                    ])["id"] as! String
            let connected = try await run.connect(tokens: tokens)
            let joined = Countdown(members)
            let nominalGap = UInt64(1e9 / tokensPerSecond)
            for socket in connected {
                let user = users[socket.index]
                try await socket.channel.eventLoop.submit {
                    socket.role = TranslatorRole(room: room, user: user, nominalGap: nominalGap, joined: joined)
                    socket.send(#"{"type":"room.join","id":"j","room":"\#(room)"}"#)
                }.get()
            }
            guard await joined.wait(timeout: .seconds(60)) else { throw LoadError("\(joined.left) members did not join within 60 s") }
            let interval = UInt64(intervalMs) * 1_000_000
            let start = nowNanos() + 200_000_000
            let until = start + UInt64(duration * 1e9)
            run.startMeasuring()
            for socket in connected {
                let first = start + interval * UInt64(socket.index) / UInt64(members)
                try await socket.channel.eventLoop.submit {
                    (socket.role as? TranslatorRole)?.schedule(on: socket, first: first, interval: interval, until: until)
                }.get()
            }
            try await Task.sleep(for: .seconds(duration))
            // Bounded wait for the last translations: until no token arrived for 2 s, 30 s at most.
            var last = -1
            for _ in 0..<15 {
                let tokens = try await run.onEachLoop { $0.tokens }.reduce(0, +)
                if tokens == last { break }
                last = tokens
                try await Task.sleep(for: .seconds(2))
            }
            try await run.finish(json: target.json, analyze: recordDelivery)
            try await close(connected)
        }
    }
}

struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "N authenticated idle sockets: the server's memory per connection.")
    @OptionGroup var target: TargetOptions
    @Option(help: "Sockets.") var sockets = 1000
    @Option(help: "Seconds to hold them open once all are connected.") var hold = 5.0

    func run() async throws {
        guard (1...60_000).contains(sockets) else { throw ValidationError("--sockets 1-60000") }
        let run = target.run("idle")
        run.parameters = ["sockets": sockets, "hold_s": hold]
        try await running(run) {
            let source = try target.tokens()
            let tokens = try (0..<sockets).map { try source.token(for: "\(target.userPrefix)-i\($0)") }
            let before = target.serverPid.flatMap(ProcessSample.of(pid:))
            run.startMeasuring()
            let connected = try await run.connect(tokens: tokens)
            try await Task.sleep(for: .seconds(hold))
            if let before, let pid = target.serverPid, let after = ProcessSample.of(pid: pid) {
                let perSocket = Double(after.rssBytes - before.rssBytes) / Double(sockets)
                run.extra.append(("server_rss_per_socket_bytes", Int(perSocket)))
            }
            if let me = ProcessSample.of(pid: getpid()) { run.extra.append(("client_rss_bytes", me.rssBytes)) }
            try await run.finish(json: target.json)
            try await close(connected)
        }
    }
}

struct Schedule: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Many schedules due at the same instant: how late their deliveries arrive.")
    @OptionGroup var target: TargetOptions
    @Option(help: "Users (one socket and clone each).") var users = 50
    @Option(help: "Schedules per user (at most the server's --max-pending-schedules).") var perUser = 100
    @Option(help: "All schedules are due this many ms after they are created.") var leadMs = 5000

    func run() async throws {
        guard (1...5000).contains(users), (1...1000).contains(perUser) else { throw ValidationError("--users 1-5000, --per-user 1-1000") }
        let run = target.run("schedule")
        run.parameters = ["users": users, "per_user": perUser, "lead_ms": leadMs]
        try await running(run) {
            let source = try target.tokens()
            let tokens = try (0..<users).map { try source.token(for: "\(target.userPrefix)-s\($0)") }
            let clones = try await target.rest.createClones(tokens: tokens)
            let connected = try await run.connect(tokens: tokens)
            let due = wallMillis() + Int64(leadMs)
            let at = ISO8601DateFormatter.string(
                from: Date(timeIntervalSince1970: Double(due) / 1000), timeZone: .gmt,
                formatOptions: [.withInternetDateTime, .withFractionalSeconds])
            let created = Countdown(users * perUser)
            let delivered = Countdown(users * perUser)
            for socket in connected {
                let clone = clones[socket.index]
                try await socket.channel.eventLoop.submit {
                    socket.role = ScheduleRole(due: due, created: created, delivered: delivered)
                    for n in 0..<perUser {
                        socket.send(#"{"type":"schedule.create","id":"s\#(n)","clone":"\#(clone)","at":"\#(at)","text":"Reminder \#(n)"}"#)
                    }
                }.get()
            }
            guard await created.wait(timeout: .milliseconds(leadMs)) else {
                throw LoadError("only \(users * perUser - created.left) schedules were created before they were due; raise --lead-ms")
            }
            run.startMeasuring()
            if !(await delivered.wait(timeout: .seconds(60) + .milliseconds(leadMs))) { print("\(delivered.left) deliveries did not arrive") }
            try await run.finish(json: target.json)
            try await close(connected)
        }
    }
}
