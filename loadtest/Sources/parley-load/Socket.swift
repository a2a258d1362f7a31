import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket
import ParleyDeflate
#if canImport(Glibc)
import Glibc
#endif

/// The type of a server frame, read from its first bytes (`{"type":"…"`) without parsing JSON:
/// the client must cost far less per frame than the server it measures.
enum FrameType {
    case token, streamStart, streamEnd, welcome, roomEvent, roomState, delivery, error, other

    private static let prefix = Array(#"{"type":""#.utf8)

    init(_ bytes: ByteBufferView) {
        guard bytes.count > Self.prefix.count + 4, bytes.starts(with: Self.prefix) else {
            self = .other
            return
        }
        let rest = bytes.dropFirst(Self.prefix.count)
        if rest.starts(with: "token\"".utf8) {
            self = .token
        } else if rest.starts(with: "stream.start\"".utf8) {
            self = .streamStart
        } else if rest.starts(with: "stream.end\"".utf8) {
            self = .streamEnd
        } else if rest.starts(with: "room.event\"".utf8) {
            self = .roomEvent
        } else if rest.starts(with: "room.state\"".utf8) {
            self = .roomState
        } else if rest.starts(with: "delivery\"".utf8) {
            self = .delivery
        } else if rest.starts(with: "welcome\"".utf8) {
            self = .welcome
        } else if rest.starts(with: "error\"".utf8) {
            self = .error
        } else {
            self = .other
        }
    }
}

/// The offset of `needle` in `haystack` (memchr for its first byte, then memcmp).
func find(_ needle: [UInt8], in haystack: UnsafeRawBufferPointer) -> Int? {
    guard let base = haystack.baseAddress, !needle.isEmpty else { return nil }
    return needle.withUnsafeBytes { n -> Int? in
        var offset = 0
        while haystack.count - offset >= n.count {
            guard let hit = memchr(base + offset, Int32(n[0]), haystack.count - offset) else { return nil }
            let at = base.distance(to: hit)
            guard haystack.count - at >= n.count else { return nil }
            if memcmp(hit, n.baseAddress!, n.count) == 0 { return at }
            offset = at + 1
        }
        return nil
    }
}

/// A field name as it appears in a frame (`"stream":`), searched for with memmem: the client
/// must stay far cheaper per frame than the server it measures.
struct Needle: Sendable {
    let bytes: [UInt8]
    init(_ key: String, quoted: Bool = true) { bytes = Array("\"\(key)\":\(quoted ? "\"" : "")".utf8) }

    static let stream = Needle("stream"), ref = Needle("ref"), source = Needle("source"), event = Needle("event")
    static let id = Needle("id"), user = Needle("user"), text = Needle("text"), code = Needle("code")
    static let seq = Needle("seq", quoted: false), from = Needle("from", quoted: false)
}

extension ByteBufferView {
    /// The byte range of the value after `needle` (up to the closing quote, or the last digit).
    func valueRange(_ needle: Needle) -> Range<Int>? {
        withUnsafeBytes { raw -> Range<Int>? in
            guard let hit = find(needle.bytes, in: raw) else { return nil }
            let start = hit + needle.bytes.count
            var end = start
            let quoted = needle.bytes.last == UInt8(ascii: "\"")
            while end < raw.count, quoted ? raw[end] != UInt8(ascii: "\"") : (raw[end] >= 0x30 && raw[end] <= 0x39) { end += 1 }
            return end < raw.count || !quoted ? start..<end : nil
        }
    }

    /// The string value of a field (allocates: for the rare frames).
    func string(_ needle: Needle) -> Substring? {
        guard let range = valueRange(needle) else { return nil }
        return Substring(decoding: self[(startIndex + range.lowerBound)..<(startIndex + range.upperBound)], as: UTF8.self)
    }

    /// A hash of a field's value, without allocating (ids as dictionary keys on the hot path).
    func hash(_ needle: Needle, _ extra: UInt64 = 0) -> UInt64? {
        guard let range = valueRange(needle) else { return nil }
        return withUnsafeBytes { key(UnsafeRawBufferPointer(rebasing: $0[range]), extra) }
    }

    func int(_ needle: Needle) -> Int64? {
        guard let range = valueRange(needle), !range.isEmpty else { return nil }
        return withUnsafeBytes { raw in raw[range].reduce(0) { $0 * 10 + Int64($1 - 0x30) } }
    }

    /// The seqs a token frame carries: `from`…`seq` when it joins several (`--coalesce`), else `seq`.
    var tokenSeqs: ClosedRange<Int64>? {
        guard let last = int(.seq) else { return nil }
        let first = int(.from) ?? last
        return first <= last ? first...last : nil
    }

    /// How many tokens a token frame carries (1 unless joined).
    var tokenCount: Int { tokenSeqs?.count ?? 1 }
}

/// What a scenario does with one socket's frames. Called on the socket's event loop only.
protocol SocketRole: AnyObject {
    func received(_ type: FrameType, _ bytes: ByteBufferView, at nanos: UInt64, on socket: LoadSocket)
}

/// One WebSocket of the load. Confined to its channel's event loop, like its role and recorder.
final class LoadSocket: @unchecked Sendable {
    let index: Int
    let channel: any Channel
    let recorder: Recorder
    var role: (any SocketRole)?
    /// Set before this client closes the socket, so the close is not counted as a drop.
    var closing = false

    init(index: Int, channel: any Channel, recorder: Recorder) {
        self.index = index
        self.channel = channel
        self.recorder = recorder
    }

    /// Sends one text message, masked as a client must.
    func send(_ text: String) {
        let frame = WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: channel.allocator.buffer(string: text))
        channel.writeAndFlush(frame, promise: nil)
    }

    func close() {
        closing = true
        channel.close(promise: nil)
    }
}

/// Reads frames into the socket's role and counters.
final class LoadSocketHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame
    var socket: LoadSocket?
    /// The server's compressed stream, one decompressor for the socket's life (the server keeps
    /// its context); nil when permessage-deflate was not negotiated.
    let inflater: Inflater?

    init(deflate: Bool) {
        inflater = deflate ? Inflater(limit: 1 << 20) : nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard let socket else { return }
        switch frame.opcode {
        case .text:
            let at = nowNanos()
            socket.recorder.frames += 1
            socket.recorder.wireBytes += frame.length
            var payload = frame.data
            if frame.rsv1 {
                guard let inflater else {
                    context.fireErrorCaught(InflateError.corrupt("a compressed frame on a socket without permessage-deflate"))
                    return
                }
                payload = context.channel.allocator.buffer(capacity: frame.length * 4)
                do {
                    try inflater.inflate(frame.data, final: true, into: &payload)
                } catch {
                    socket.recorder.errors["inflate_failed", default: 0] += 1
                    context.close(promise: nil)
                    return
                }
            }
            let bytes = payload.readableBytesView
            socket.recorder.bytes += bytes.count
            let type = FrameType(bytes)
            if type == .error {
                socket.recorder.errors[bytes.string(.code).map(String.init) ?? "unknown", default: 0] += 1
            }
            socket.role?.received(type, bytes, at: at, on: socket)
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.data)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .connectionClose:
            // Counted by close code: what closed it (1008 a slow reader, 1011 a keepalive…).
            var data = frame.unmaskedData
            let code = data.readInteger(as: UInt16.self).map { " \($0)" } ?? ""
            if !socket.closing { socket.recorder.errors["closed_by_server" + code, default: 0] += 1 }
            socket.closing = true
            context.close(promise: nil)
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let socket, !socket.closing {
            socket.recorder.dropped += 1
            socket.closing = true
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

struct UpgradeRefused: Error, CustomStringConvertible {
    var description: String { "the server refused the WebSocket upgrade (bad token?)" }
}

/// Opens one authenticated socket; `recorder` belongs to the event loop the socket lands on.
func openSocket(
    group: any EventLoopGroup, host: String, port: Int, token: String, index: Int, deflate: Bool = false, coalesce: Bool = false,
    recorderFor: @escaping @Sendable (any EventLoop) -> Recorder
) async throws -> LoadSocket {
    var headers = HTTPHeaders()
    if deflate { headers.add(name: "Sec-WebSocket-Extensions", value: PerMessageDeflate.name) }
    headers.add(name: "host", value: "\(host):\(port)")
    headers.add(name: "content-length", value: "0")
    headers.add(name: "authorization", value: "Bearer \(token)")
    let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: coalesce ? "/v1/ws?coalesce=tokens" : "/v1/ws", headers: headers)
    let started = nowNanos()
    let upgrade: EventLoopFuture<LoadSocket?> = try await ClientBootstrap(group: group)
        .channelOption(.socketOption(.tcp_nodelay), value: 1)
        .connect(host: host, port: port) { channel in
            channel.eventLoop.makeCompletedFuture {
                let upgrader = NIOTypedWebSocketClientUpgrader<LoadSocket?>(
                    maxFrameSize: 1 << 20,
                    upgradePipelineHandler: { channel, response in
                        channel.eventLoop.makeCompletedFuture {
                            let compressed = response.headers["Sec-WebSocket-Extensions"].contains { $0.hasPrefix(PerMessageDeflate.name) }
                            let handler = LoadSocketHandler(deflate: compressed)
                            let socket = LoadSocket(index: index, channel: channel, recorder: recorderFor(channel.eventLoop))
                            if compressed { socket.recorder.compressedSockets += 1 }
                            handler.socket = socket
                            try channel.pipeline.syncOperations.addHandler(handler)
                            return socket
                        }
                    }
                )
                let configuration = NIOTypedHTTPClientUpgradeConfiguration<LoadSocket?>(
                    upgradeRequestHead: head, upgraders: [upgrader],
                    notUpgradingCompletionHandler: { channel in
                        channel.close(promise: nil)
                        return channel.eventLoop.makeSucceededFuture(nil)
                    }
                )
                var pipeline = NIOUpgradableHTTPClientPipelineConfiguration(upgradeConfiguration: configuration)
                // The welcome shares a read with the 101; the default would drop it.
                pipeline.leftOverBytesStrategy = .forwardBytes
                return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: pipeline)
            }
        }
    guard let socket = try await upgrade.get() else { throw UpgradeRefused() }
    let elapsed = nowNanos() - started
    try await socket.channel.eventLoop.submit {
        socket.recorder.record(.connect, nanos: elapsed)
        // The async connect API leaves autoRead off; this client reads with a plain handler.
        socket.channel.setOption(.autoRead, value: true).whenSuccess { socket.channel.read() }
    }.get()
    return socket
}
