import Foundation
import HeapModule
import NIOCore
import Synchronization

/// How long a client may take over each part of an HTTP exchange (WebSockets, once upgraded, have
/// their own keepalive). A slow client cannot hold a connection, a descriptor and a parser open.
public struct HTTPTimeouts: Sendable {
    /// From accepting a connection, or from the first byte of a later request, to the end of the
    /// request's head: 408 and closed after it.
    public var head: Duration = .seconds(10)
    /// From a response to the next request's first byte on a kept-alive connection: closed after it.
    public var idle: Duration = .seconds(60)
    /// The longest pause between two pieces of a request body: 408 and closed after it.
    public var bodyProgress: Duration = .seconds(30)

    public init() {}
}

/// The connections still speaking HTTP (not yet upgraded to WebSocket), kept under a cap. When a
/// new connection would pass it, the oldest one that is only waiting for a request (its first, or
/// its next on keep-alive) is closed to make room: a flood of unfinished requests cannot starve
/// real ones of descriptors. With none to evict, the new connection is refused.
final class HTTPConnectionRegistry: Sendable {
    private struct Entry {
        let channel: any Channel
        let order: UInt64
        var waiting = true
    }

    /// A connection that began waiting, by when it was admitted.
    private struct Waiting: Comparable {
        let order: UInt64
        let id: ObjectIdentifier
        static func < (a: Waiting, b: Waiting) -> Bool { a.order < b.order }
    }

    private struct State {
        var entries: [ObjectIdentifier: Entry] = [:]
        var next: UInt64 = 0
        /// The waiting connections, oldest first: one item each time a connection began waiting.
        /// An item whose connection left, or is busy (it gets a new item when it waits again),
        /// is dropped as it comes up. Finding the oldest was a scan of every connection at each
        /// one admitted at the cap, a flood of unfinished requests' own cost (#26).
        var waiting = Heap<Waiting>()

        mutating func oldestWaiting() -> Entry? {
            while let item = waiting.popMin() {
                if let entry = entries[item.id], entry.order == item.order, entry.waiting { return entry }
            }
            return nil
        }

        /// Items of connections gone or busy are dropped once they outnumber the connections.
        mutating func compact() {
            guard waiting.count > 2 * entries.count + 64 else { return }
            waiting = Heap(entries.filter(\.value.waiting).map { Waiting(order: $0.value.order, id: $0.key) })
        }
    }

    let limit: Int
    private let state = Mutex(State())

    init(limit: Int) {
        self.limit = max(1, limit)
    }

    /// The default cap: a quarter of the process's descriptor limit, so sockets, the store and
    /// the log always keep the rest.
    static func defaultLimit() -> Int {
        var limit = rlimit()
        #if canImport(Glibc)
        let ok = getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0
        #else
        let ok = getrlimit(RLIMIT_NOFILE, &limit) == 0
        #endif
        // RLIM_INFINITY is all ones; it and any huge limit get the top of the range.
        guard ok, limit.rlim_cur < 1 << 20 else { return 65_536 }
        return max(8, min(65_536, Int(limit.rlim_cur) / 4))
    }

    /// Registers `channel`; false when the cap is reached and no waiting connection could go.
    func admit(_ channel: any Channel) -> Bool {
        let evicted = state.withLock { s -> (any Channel)?? in
            var evict: Entry?
            if s.entries.count >= limit {
                evict = s.oldestWaiting()
                guard let victim = evict else { return .none }
                s.entries.removeValue(forKey: ObjectIdentifier(victim.channel))
            }
            let id = ObjectIdentifier(channel)
            s.entries[id] = Entry(channel: channel, order: s.next)
            s.waiting.insert(Waiting(order: s.next, id: id))
            s.next += 1
            s.compact()
            return .some(evict?.channel)
        }
        guard let evicted else { return false }
        evicted?.close(promise: nil)
        return true
    }

    /// Whether `channel` is only waiting for a request (evictable) or busy with one.
    func setWaiting(_ channel: any Channel, _ waiting: Bool) {
        state.withLock { s in
            let id = ObjectIdentifier(channel)
            guard let entry = s.entries[id], entry.waiting != waiting else { return }
            s.entries[id]!.waiting = waiting
            if waiting {
                s.waiting.insert(Waiting(order: entry.order, id: id))
                s.compact()
            }
        }
    }

    func remove(_ channel: any Channel) {
        state.withLock { s in
            s.entries.removeValue(forKey: ObjectIdentifier(channel))
            s.compact()
        }
    }

    /// Connections registered, and items queued as waiting (for tests: the queue stays bounded).
    var counts: (connections: Int, queued: Int) { state.withLock { ($0.entries.count, $0.waiting.count) } }
}

/// The first handler of an HTTP connection: it sees every byte before the parser and enforces
/// `HTTPTimeouts` on the phase the connection is in. `HTTPHandler` tells it when a request's head
/// and end arrived and when a response went out. Removed when the connection upgrades.
final class HTTPTimeoutHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    static let name = "parley.http-timeouts"

    enum Phase: Equatable {
        /// Waiting for (the rest of) a request head.
        case head
        /// Reading a request body.
        case body
        /// The request is complete and being answered: the server's time, not the client's.
        case responding
        /// Kept alive between requests.
        case idle
    }

    private(set) var phase = Phase.head
    private let timeouts: HTTPTimeouts
    private let registry: HTTPConnectionRegistry?
    private var timer: Scheduled<Void>?
    /// Bytes of a next (pipelined) request came while answering this one.
    private var readAhead = false
    /// The request being read was answered already (`answeredEarly`).
    private var answered = false
    private var context: ChannelHandlerContext?

    init(timeouts: HTTPTimeouts, registry: HTTPConnectionRegistry?) {
        self.timeouts = timeouts
        self.registry = registry
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        arm(timeouts.head)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        registry?.remove(context.channel)
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        registry?.remove(context.channel)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch phase {
        case .idle:
            enter(.head)
        case .body:
            arm(timeouts.bodyProgress)  // progress: the pause starts again
        case .responding:
            readAhead = true
        case .head:
            break
        }
        context.fireChannelRead(data)
    }

    /// A request's head was parsed: its body (if any) must keep coming.
    func headReceived() { enter(.body) }

    /// The request was answered before its end (a body over the cap): a timeout now only closes,
    /// since a 408 after that answer would read as garbage.
    func answeredEarly() { answered = true }

    /// The whole request arrived: no client deadline while the server answers it.
    func requestReceived() { enter(.responding) }

    /// A kept-alive response was written: the next request may come within the idle timeout.
    func responseSent() {
        guard phase == .responding else { return }
        enter(readAhead ? .head : .idle)
        readAhead = false
    }

    private func enter(_ next: Phase) {
        phase = next
        if let channel = context?.channel { registry?.setWaiting(channel, next == .head || next == .idle) }
        switch next {
        case .head: arm(timeouts.head)
        case .body: arm(timeouts.bodyProgress)
        case .idle: arm(timeouts.idle)
        case .responding:
            timer?.cancel()
            timer = nil
        }
    }

    private func arm(_ timeout: Duration) {
        timer?.cancel()
        guard let context else { return }
        let expected = phase
        timer = context.eventLoop.assumeIsolated().scheduleTask(in: TimeAmount(timeout)) { [self] in
            guard phase == expected, let context = self.context else { return }
            expire(context: context)
        }
    }

    private func expire(context: ChannelHandlerContext) {
        if phase == .idle || answered {
            context.close(promise: nil)
            return
        }
        // Written below the HTTP encoder: the parser may be mid-request, so no response part fits.
        let what = phase == .head ? "request head" : "request body"
        let body = #"{"error":{"code":"bad_request","message":"the \#(what) took too long to arrive"}}"#
        let response =
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: \(body.utf8.count)\r\n"
            + "connection: close\r\n\r\n" + body
        context.writeAndFlush(NIOAny(context.channel.allocator.buffer(string: response))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}
