// Search latency with many messages stored (#24: a word said 1,000 messages ago found in under
// 50 ms on SQLite with 100,000 messages).
//
//   swift build -c release --product parley-bench-search
//   .build/release/parley-bench-search                          # 100,000 messages, SQLite
//   .build/release/parley-bench-search --mongodb mongodb://…    # the same against MongoDB
//   .build/debug/parley-bench-search --messages 2000 --searches 20   # CI's toy size
//
// Fills a fresh store through the Store API (20 users, 5 conversations each, messages of 8–30
// words from a 3,000-word vocabulary), with one rare word said by the measured user 1,000 of
// their messages before their last, and by one other user. Then times `search` for the rare
// word, a two-word query and a word common to every user. Its own checks (exit 1): the rare word
// finds exactly the measured user's message, and no search returns another user's words.
import Foundation
import ParleyCore
import ParleyMongoStore
import ParleyStore

struct Options {
    var messages = 100_000
    var searches = 200
    var mongodb: String?

    init(_ arguments: [String]) {
        var iterator = arguments.dropFirst().makeIterator()
        while let flag = iterator.next() {
            guard let value = iterator.next() else { Self.usage() }
            switch flag {
            case "--messages": messages = Self.number(value)
            case "--searches": searches = Self.number(value)
            case "--mongodb": mongodb = value
            default: Self.usage()
            }
        }
        if messages < 100 { Self.usage() }
    }

    static func number(_ text: String) -> Int {
        guard let value = Int(text), value > 0 else { usage() }
        return value
    }

    static func usage() -> Never {
        print("usage: parley-bench-search [--messages N (>= 100)] [--searches N] [--mongodb URI]")
        exit(64)
    }
}

let options = Options(CommandLine.arguments)
let users = (0..<20).map { "user\($0)" }
let measured = users[0]
let rare = "quokka"
let ids = IDGenerator()
var random = SplitMix64(seed: 24)
let syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "pe", "da", "zu", "ho", "fi", "ga", "be"]
let vocabulary: [String] = (0..<3_000).map { i in
    var word = ""
    var n = i
    repeat {
        word += syllables[n % syllables.count]
        n /= syllables.count
    } while n > 0
    return word + syllables[i % 7]
}

/// Said with the rare word, and about 7% of all words.
let common = vocabulary[0]

@MainActor func sentence() -> String {
    let count = 8 + Int(random.next() % 23)
    // Skewed like prose: the first words of the vocabulary are far more common than the rest.
    return (0..<count).map { _ in
        let r = Double(random.next() % 1_000_000) / 1_000_000
        return vocabulary[Int(r * r * r * Double(vocabulary.count))]
    }.joined(separator: " ")
}

func percentile(_ sorted: [Double], _ p: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }

let store: any Store
if let uri = options.mongodb {
    store = try await MongoStore.open(uri: uri)
} else {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("parley-bench-search-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    store = try await SQLiteStore.open(path: directory.appendingPathComponent("parley.sqlite").path)
}

// Each user's conversations, filled in parallel (SQLite commits concurrent appends together).
let perUser = options.messages / users.count
var plans: [(owner: String, conversation: String, texts: [String])] = []
var rareMessage = ""
for user in users {
    _ = try await store.ensureUser(user, now: 1)
    let clone = Clone(
        id: ids.make(.clone), owner: user, name: "Bench", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 1, updatedAt: 1)
    try await store.createClone(clone)
    for c in 0..<5 {
        let conversation = Conversation(id: ids.make(.conversation), owner: user, clone: clone.id, title: sentence(), createdAt: 1, updatedAt: 1)
        try await store.createConversation(conversation)
        var texts = (0..<(perUser / 5)).map { _ in sentence() }
        // 1,000 messages before the conversation's last (its first, in a smaller run).
        if user == measured, c == 4 { texts[max(0, texts.count - 1_000)] += " \(common) " + rare }
        if user == users[1], c == 0 { texts[0] += " \(common) " + rare }
        plans.append((user, conversation.id, texts))
    }
}
let fillStart = ContinuousClock.now
let stored = try await withThrowingTaskGroup(of: String?.self) { group in
    for plan in plans {
        group.addTask {
            var found: String?
            for (i, text) in plan.texts.enumerated() {
                let message = Message(
                    id: ids.make(.message), conversation: plan.conversation, role: i % 2 == 0 ? .user : .assistant, text: text,
                    createdAt: Int64(Timestamp.nowMillis()))
                try await store.appendMessage(message)
                if text.hasSuffix(" " + rare), plan.owner == measured { found = message.id }
            }
            return found
        }
    }
    var first: String?
    for try await found in group { first = first ?? found }
    return first
}
rareMessage = stored ?? ""
let filled = ContinuousClock.now - fillStart
let fillSeconds = Double(filled.components.seconds) + Double(filled.components.attoseconds) / 1e18
print("stored \(plans.reduce(0) { $0 + $1.texts.count }) messages of \(users.count) users in \(String(format: "%.1f", fillSeconds)) s")

var failures: [String] = []
@MainActor func measure(_ label: String, _ text: String, limit: Int, check: ([SearchHit]) -> String?) async throws {
    let query = try SearchQuery.parse(text)!
    var times: [Double] = []
    var last: [SearchHit] = []
    for _ in 0..<options.searches {
        let start = ContinuousClock.now
        last = try await store.search(owner: measured, query: query, limit: limit, before: nil)
        let elapsed = ContinuousClock.now - start
        times.append(Double(elapsed.components.seconds) * 1_000 + Double(elapsed.components.attoseconds) / 1e15)
    }
    if let problem = check(last) { failures.append("\(label): \(problem)") }
    if last.contains(where: { $0.conversation.owner != measured }) { failures.append("\(label): another user's words") }
    times.sort()
    print(
        "\(label.padding(toLength: 34, withPad: " ", startingAt: 0)) hits \(String(last.count).padding(toLength: 4, withPad: " ", startingAt: 0)) "
            + String(format: "p50 %.2f ms  p99 %.2f ms  max %.2f ms", percentile(times, 0.5), percentile(times, 0.99), times.last!))
}

try await measure("rare word, said 1,000 messages ago", rare, limit: 20) { hits in
    hits.map(\.id) == [rareMessage] ? nil : "expected only \(rareMessage), got \(hits.map(\.id))"
}
try await measure("two words, one of them common", "\(common) \(rare)", limit: 20) { hits in
    hits.map(\.id) == [rareMessage] ? nil : "expected only \(rareMessage), got \(hits.map(\.id))"
}
try await measure("common word (first page of 20)", common, limit: 20) { hits in
    hits.count == 20 ? nil : "expected a full page, got \(hits.count)"
}
try await store.close()
if !failures.isEmpty {
    print("FAILED:\n" + failures.joined(separator: "\n"))
    exit(1)
}
