import CoreMetrics
import NIOCore
import NIOWebSocket
import ParleyCore
import Synchronization

/// One authenticated WebSocket. Sendable: frames may be sent from any thread; NIO hops them onto
/// the channel's event loop in order.
///
/// Its outbound queue is bounded: a socket that lets more than `maxQueuedBytes` pile up (a reader
/// too slow for the streams it follows) is closed with 1008 so it cannot hold memory or slow
/// anyone else. It can reconnect and catch up (`stream.resume`, `room.join`). Two counts make the
/// bound, neither costing a promise per frame: bytes on their way to the event loop (counted here),
/// and bytes NIO holds for the socket (its write-buffer high water mark is `maxQueuedBytes`; the
/// channel turning unwritable cuts the socket off, see `WebSocketHandler`).
public final class ClientConnection: Sendable {
    public let id: String
    public let identity: Identity
    let channel: any Channel
    let maxQueuedBytes: Int
    /// Counts sockets cut off as too slow (`parley_slow_reader_disconnects_total`).
    private let slowReaderCutOffs: Counter?
    /// Bytes handed to `send` off the event loop and not yet given to NIO.
    private let inTransit = Atomic<Int>(0)
    private let cutOff = Atomic<Bool>(false)
    /// Open, closing or closed: every path that closes the socket goes through it, so one close
    /// frame is sent whoever closes first (the handler, a shutdown, an account deletion, a cut-off).
    private let lifecycle = Mutex(WebSocketLifecycle())
    /// Its requests take effect in the order they arrived.
    let order = RequestOrder()
    /// Flushes its writes once per event-loop tick, with every other socket's on that loop.
    private let flushes: FlushBatch
    /// Loop-confined: how frames reach the socket, and whether a flush is due.
    private let output: NIOLoopBoundBox<Output>
    /// The client asked for consecutive tokens of a stream that wait for the same flush to come
    /// as one frame (`?coalesce=tokens`; `HeldTokens`).
    let joinsTokens: Bool

    private struct Output {
        /// Where whole frames go when they need nothing from the pipeline (no permessage-deflate):
        /// a frame encoded once is written past the encoder to every socket.
        var pastEncoder: PastEncoder?
        var flushDue = false
        /// Tokens waiting for the flush, when the socket joins tokens.
        var held: HeldTokens?
        /// A close frame was written: no frame kept for the flush or token held goes after it.
        var closeWritten = false
        /// Frames of tokens written and not yet taken by the kernel (the peer's window and the
        /// socket's buffer are full): tokens that come meanwhile are held and joined until the
        /// last of them is.
        var tokenFramesInFlight = 0
        /// Whole frames written since the last flush, back to back, handed to NIO as one buffer
        /// at the flush (#26: one pipeline write per socket per tick, not one per frame). A lone
        /// frame stays the buffer encoded once for every socket; a second one copies it.
        var unflushed: ByteBuffer?

        /// Keeps a whole frame for the flush (none after our close frame); returns the bytes
        /// kept and whether the socket's flush is still to be asked for. One access to the
        /// loop-bound state a frame, not one a field (#26).
        mutating func keep(_ frame: ByteBuffer) -> (bytes: Int, askFlush: Bool) {
            guard !closeWritten else { return (0, false) }
            // Appended in place: the box holds the only reference (a lone frame stays the
            // buffer shared by every socket, and a second one copies it).
            if unflushed == nil { unflushed = frame } else { unflushed!.writeImmutableBuffer(frame) }
            let askFlush = !flushDue
            flushDue = true
            return (unflushed!.readableBytes, askFlush)
        }

        /// The frames kept for the flush, taken, and where they go; nil when there are none, or
        /// our close frame went (they are dropped then).
        mutating func takeUnflushed() -> (frames: ByteBuffer, to: PastEncoder)? {
            guard let frames = unflushed else { return nil }
            unflushed = nil
            guard !closeWritten, let pastEncoder else { return nil }
            return (frames, pastEncoder)
        }
    }

    /// Where whole WebSocket frames are written past the encoder.
    enum PastEncoder {
        /// The channel itself, when nothing else is on the way to the socket (no TLS handler):
        /// what the pipeline's head would call, without the pipeline's two hops a write.
        case socket(any ChannelCore)
        /// Through the handlers after the encoder (TLS).
        case handlers(after: ChannelHandlerContext)

        func write(_ frames: ByteBuffer, promise: EventLoopPromise<Void>?) {
            switch self {
            case .socket(let core): core.write0(NIOAny(frames), promise: promise)
            case .handlers(let encoder): encoder.write(NIOAny(frames), promise: promise)
            }
        }

        func flush() {
            switch self {
            case .socket(let core): core.flush0()
            case .handlers(let encoder): encoder.flush()
            }
        }
    }

    init(
        id: String, identity: Identity, channel: any Channel, remoteIP: String? = nil, maxQueuedBytes: Int = 4 * 1024 * 1024,
        slowReaderCutOffs: Counter? = nil, flushes: FlushBatch? = nil, joinsTokens: Bool = false
    ) {
        self.joinsTokens = joinsTokens
        self.remoteIP = remoteIP ?? channel.remoteAddress?.ipAddress
        self.slowReaderCutOffs = slowReaderCutOffs
        self.id = id
        self.identity = identity
        self.channel = channel
        self.maxQueuedBytes = maxQueuedBytes
        self.flushes = flushes ?? FlushBatch(loop: channel.eventLoop)
        output = .makeBoxSendingValue(Output(), as: Output.self, eventLoop: channel.eventLoop)
    }

    /// Frames may be written past the pipeline's WebSocket encoder (call on the loop, once the
    /// pipeline is complete): only when no handler between it and the tail changes outbound frames.
    /// `straightToSocket`: nothing between the encoder and the socket handles outbound data
    /// either (no TLS handler): whole frames are handed to the channel itself.
    func writePastEncoder(straightToSocket: Bool = false) throws {
        let encoder = try channel.pipeline.syncOperations.context(handlerType: WebSocketFrameEncoder.self)
        output.value.pastEncoder = straightToSocket ? .socket(channel._channelCore) : .handlers(after: encoder)
    }

    /// The client's address (the peer's, or what a trusted proxy forwarded), for the audit log,
    /// which keeps only its hash. Read at the upgrade: a closed socket has no peer address left.
    let remoteIP: String?

    var isActive: Bool { channel.isActive && !cutOff.load(ordering: .relaxed) }

    /// The water marks a socket's channel gets: unwritable past `maxQueuedBytes` pending.
    static func waterMark(maxQueuedBytes: Int) -> ChannelOptions.Types.WriteBufferWaterMark {
        ChannelOptions.Types.WriteBufferWaterMark(low: max(1, maxQueuedBytes / 2), high: max(2, maxQueuedBytes))
    }

    /// Sends one text message. The buffer is shared, not copied, when fanned out to many sockets.
    /// On the socket's loop it is written at once; use `sendBehindQueued` for a topic's frames.
    func send(_ buffer: ByteBuffer) {
        // Both ways check the cut-off themselves.
        if channel.eventLoop.inEventLoop {
            writeOnLoop(buffer, encoded: nil)
            return
        }
        sendBehindQueued(buffer)
    }

    /// Sends one text message behind every task already queued for the socket's loop, even when
    /// called on that loop: a stream's token published there (a `TokenPump`) must not overtake
    /// the replay a resume handed over from another thread a moment before.
    /// `token`: the buffer is that token of a stream (`writeOnLoop`).
    func sendBehindQueued(_ buffer: ByteBuffer, token: TokenLayout? = nil) {
        guard !cutOff.load(ordering: .relaxed) else { return }
        let loop = channel.eventLoop
        let size = buffer.readableBytes
        guard inTransit.wrappingAdd(size, ordering: .relaxed).newValue <= maxQueuedBytes else {
            inTransit.wrappingSubtract(size, ordering: .relaxed)
            cutOffSlowReader()
            return
        }
        loop.execute {
            self.inTransit.wrappingSubtract(size, ordering: .relaxed)
            self.writeOnLoop(buffer, encoded: nil, token: token)
        }
    }

    /// Writes one text message on the socket's loop: `encoded` is the whole WebSocket frame
    /// (`WireFrame.text(payload)`) when the caller encoded it once for many sockets. Flushed at
    /// the end of the loop's tick, so frames that queue for a socket leave in one `writev`.
    /// `token`: the payload is that token of a stream; a socket that joins tokens holds it until
    /// the flush (or the next frame that is not the stream's next token), joined with the ones
    /// that follow it meanwhile.
    func writeOnLoop(_ payload: ByteBuffer, encoded: ByteBuffer?, token: TokenLayout? = nil) {
        guard !cutOff.load(ordering: .relaxed) else { return }
        if joinsTokens {
            if let token {
                if output.value.held?.continues(with: token) == true {
                    output.value.held!.append(payload, layout: token)
                    // Held tokens count against the socket's bound as queued frames do.
                    if output.value.held!.bytes > maxQueuedBytes { cutOffSlowReader() }
                    return  // its flush is due already, or the frame in flight will write it
                }
                writeHeld()
                output.value.held = HeldTokens(payload, encoded: encoded, layout: token)
                flushDue()
                return
            }
            // Whatever follows a token goes after it.
            writeHeld()
        }
        write(payload, encoded: encoded)
    }

    /// Writes a frame: kept for the flush (asked for here) without `promise`, at once with one.
    private func write(_ payload: ByteBuffer, encoded: ByteBuffer?, promise: EventLoopPromise<Void>? = nil) {
        // Not written inside an access to `output`: a failed write can close the channel at once,
        // and its close handler clears `output` (an overlapping access would trap).
        if let pastEncoder = output.value.pastEncoder {
            let frame = encoded ?? WireFrame.text(payload, allocator: channel.allocator)
            guard promise != nil else { return keepForFlush(frame) }
            writeUnflushed()
            pastEncoder.write(frame, promise: promise)
        } else {
            channel.write(WebSocketFrame(fin: true, opcode: WireFrame.opcode(of: payload), data: payload), promise: promise)
            if promise == nil { flushDue() }
        }
    }

    /// Adds a whole frame to those the flush hands to NIO. They count against the socket's
    /// bound as NIO's queue does (NIO sees them only at the flush).
    private func keepForFlush(_ frame: ByteBuffer) {
        let (bytes, askFlush) = output.value.keep(frame)
        if askFlush { flushes.add(self) }
        if bytes > maxQueuedBytes { cutOffSlowReader() }
    }

    /// Hands the frames kept for the flush to NIO, before anything written to the socket after
    /// them; dropped once the socket is cut off or our close frame went.
    private func writeUnflushed() {
        guard let (frames, pastEncoder) = output.value.takeUnflushed(), !cutOff.load(ordering: .relaxed) else { return }
        pastEncoder.write(frames, promise: nil)
    }

    private func flushDue() {
        if !output.value.flushDue {
            output.value.flushDue = true
            flushes.add(self)
        }
    }

    /// Writes the tokens held, one frame for all of them.
    private func writeHeld() {
        guard let held = output.value.held else { return }
        output.value.held = nil
        guard !cutOff.load(ordering: .relaxed), !output.value.closeWritten else { return }
        let (payload, encoded) = flushes.joined(held, allocator: channel.allocator)
        let written = channel.eventLoop.makePromise(of: Void.self)
        output.value.tokenFramesInFlight += 1
        written.futureResult.whenComplete { _ in self.tokensWritten() }
        write(payload, encoded: encoded, promise: written)
    }

    /// A frame of tokens reached the kernel (or the socket closed): tokens held meanwhile go
    /// with the next flush.
    private func tokensWritten() {
        output.value.tokenFramesInFlight -= 1
        if output.value.tokenFramesInFlight == 0, output.value.held != nil { flushDue() }
    }

    /// The batch's flush: every frame written since the last one leaves now. Tokens held wait
    /// while a frame of tokens is still on its way: they could not leave before it anyway.
    fileprivate func flushOnLoop() {
        let heldGo = output.withValue { o in
            o.flushDue = false
            return joinsTokens && o.tokenFramesInFlight == 0
        }
        if heldGo { writeHeld() }
        writeUnflushed()
        // Read after the writes: one that failed may have closed the channel and cleared it.
        if let pastEncoder = output.value.pastEncoder { pastEncoder.flush() } else { channel.flush() }
    }

    /// Sends one text message; the future succeeds once it was written to the socket.
    func write(_ buffer: ByteBuffer) -> EventLoopFuture<Void> {
        let loop = channel.eventLoop
        guard loop.inEventLoop else { return loop.flatSubmit { self.write(buffer) } }
        guard !cutOff.load(ordering: .relaxed) else { return loop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
        writeUnflushed()  // after the frames written before it
        return channel.writeAndFlush(WebSocketFrame(fin: true, opcode: WireFrame.opcode(of: buffer), data: buffer))
    }

    /// Queues a 1008 close after what is already queued and drops the socket a moment later
    /// whether or not the peer read it: a peer that stopped reading must not keep the memory.
    func cutOffSlowReader() {
        guard !cutOff.exchange(true, ordering: .relaxed) else { return }
        slowReaderCutOffs?.increment()
        let channel = self.channel
        let reason = "too slow: more than \(maxQueuedBytes) bytes were waiting; reconnect to catch up"
        if case .sendClose(let answer) = lifecycle.withLock({ $0.close(code: 1008, reason: reason) }) {
            channel.writeAndFlush(Self.closeFrame(answer, allocator: channel.allocator)).whenComplete { _ in channel.close(promise: nil) }
        }
        channel.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
    }

    // MARK: Lifecycle

    /// The channel became active; false when it already was.
    func opened() -> Bool { lifecycle.withLock { $0.open() } }

    /// Whether frames from the peer are served (not once closing began).
    var acceptsFrames: Bool { lifecycle.withLock { $0.isOpen } }

    /// The channel is gone.
    func channelClosed() {
        lifecycle.withLock { $0.channelClosed() }
        // The context would keep the torn-down pipeline alive.
        if channel.eventLoop.inEventLoop {
            output.value.pastEncoder = nil
            output.value.held = nil
            output.value.unflushed = nil
        }
    }

    /// The peer sent a close frame: answered when the peer started closing, the end of the
    /// handshake when the server did.
    func peerClosed(payload: some Collection<UInt8>) {
        carryOut(lifecycle.withLock { $0.peerClosed(payload: payload) })
    }

    /// Closes at once with `code` (the frame only for the record): a peer that stopped answering.
    func drop(code: WebSocketErrorCode, reason: String) {
        carryOut(lifecycle.withLock { $0.drop(code: UInt16(webSocketErrorCode: code), reason: reason) })
    }

    @discardableResult
    private func carryOut(_ action: WebSocketLifecycle.Action) -> EventLoopFuture<Void> {
        let channel = self.channel
        switch action {
        case .none:
            return channel.closeFuture
        case .closeChannel:
            channel.close(promise: nil)
            return channel.closeFuture
        case .sendCloseAndDrop(let answer):
            _ = writeClose(Self.closeFrame(answer, allocator: channel.allocator))
            channel.close(promise: nil)
            return channel.closeFuture
        case .sendClose(let answer):
            // Closed whether or not the close frame could be written (after a protocol error NIO
            // may already have shut the output): a socket is never left open behind a failed write.
            return writeClose(Self.closeFrame(answer, allocator: channel.allocator)).recover { _ in }.flatMap {
                Self.linger(channel)
            }.recover { _ in }
        }
    }

    /// Writes a close frame behind every frame handed to the socket before it, tokens held for
    /// the flush included.
    private func writeClose(_ frame: WebSocketFrame) -> EventLoopFuture<Void> {
        let loop = channel.eventLoop
        guard loop.inEventLoop else { return loop.flatSubmit { self.writeClose(frame) } }
        if joinsTokens { writeHeld() }
        writeUnflushed()
        output.value.closeWritten = true
        return channel.writeAndFlush(frame)
    }

    func send(_ bytes: [UInt8]) {
        send(channel.allocator.buffer(bytes: bytes))
    }

    /// Starts the closing handshake with `code`; the channel closes once the frame is written.
    /// A close frame with its status code and reason.
    static func closeFrame(code: WebSocketErrorCode, reason: String, allocator: ByteBufferAllocator) -> WebSocketFrame {
        var data = allocator.buffer(capacity: 2 + reason.utf8.count)
        data.write(webSocketErrorCode: code)
        data.writeString(reason)
        return WebSocketFrame(fin: true, opcode: .connectionClose, data: data)
    }

    static func closeFrame(_ answer: CloseFrame.Answer, allocator: ByteBufferAllocator) -> WebSocketFrame {
        closeFrame(code: WebSocketErrorCode(codeNumber: Int(answer.code)), reason: answer.reason, allocator: allocator)
    }

    /// Starts the closing handshake with `code` unless the socket is closing already; the future
    /// completes once the channel is closed.
    @discardableResult
    func close(code: WebSocketErrorCode, reason: String) -> EventLoopFuture<Void> {
        carryOut(lifecycle.withLock { $0.close(code: UInt16(webSocketErrorCode: code), reason: reason) })
    }

    /// How long a closing socket waits for its peer to close its side.
    static let lingerTime = TimeAmount.seconds(2)

    /// Closes politely, as nginx's lingering close does: the output is shut (the close frame, then
    /// FIN), and what the peer still sends is read and dropped until it closes its side or
    /// `lingerTime` passes. Closing with unread input at once would make the kernel answer with a
    /// reset, which can destroy the close frame before the peer reads its code.
    static func linger(_ channel: any Channel) -> EventLoopFuture<Void> {
        channel.close(mode: .output).recover { _ in }.flatMap {
            let deadline = channel.eventLoop.scheduleTask(in: lingerTime) { channel.close(promise: nil) }
            return channel.closeFuture.always { _ in deadline.cancel() }
        }
    }
}

/// Writes one encoded frame to many sockets with one hop per event loop instead of one per
/// socket: the frame is handed to each loop once, and that loop writes it to all of its sockets.
/// Per socket, frames keep the order they were sent in (each loop runs its tasks in order).
enum FanOut {
    /// The members of an audience that one event loop serves.
    struct Group: Sendable {
        let loop: any EventLoop
        let members: [ClientConnection]
    }

    static func groups(_ connections: some Sequence<ClientConnection>) -> [Group] {
        var byLoop: [ObjectIdentifier: (loop: any EventLoop, members: [ClientConnection])] = [:]
        for connection in connections {
            let loop = connection.channel.eventLoop
            byLoop[ObjectIdentifier(loop), default: (loop, [])].members.append(connection)
        }
        return byLoop.values.map { Group(loop: $0.loop, members: $0.members) }
    }

    /// Writes `frame` to the members `audience` admits; `delay`, when given, records how long
    /// each loop took to get to the frame and write it.
    /// `token`: the frame is that token of a stream (`ClientConnection.writeOnLoop`).
    static func send(_ frame: ByteBuffer, to groups: [Group], audience: Audience, delay: Timer? = nil, token: TokenLayout? = nil) {
        // A chat reply has one reader: its frame goes as a single socket's does. Every frame
        // goes behind the tasks queued for its loop, also when published on that loop, so it
        // never overtakes frames handed to the socket from another thread (a resume's replay).
        if groups.count == 1, groups[0].members.count == 1 {
            let only = groups[0].members[0]
            if audience.admits(only) { only.sendBehindQueued(frame, token: token) }
            return
        }
        guard !groups.isEmpty else { return }
        // The WebSocket frame is encoded once and the same bytes written to every socket.
        let encoded = WireFrame.text(frame, allocator: groups[0].members[0].channel.allocator)
        let everyone = audience == .everyone
        let sent = delay == nil ? 0 : NIODeadline.now().uptimeNanoseconds
        for group in groups {
            group.loop.execute {
                for member in group.members where everyone || audience.admits(member) { member.writeOnLoop(frame, encoded: encoded, token: token) }
                delay?.recordNanoseconds(Int64(NIODeadline.now().uptimeNanoseconds - sent))
            }
        }
    }
}

/// The sockets of one event loop with writes not yet flushed. The first write of a tick queues
/// one flush task behind the loop's pending tasks: an idle socket's frame leaves at once (the
/// flush runs right after the write), and frames that queue up behind a busy loop (a burst, a
/// thousand members) leave together, one `writev` per socket instead of one per frame.
final class FlushBatch: Sendable {
    let loop: any EventLoop
    private let due: NIOLoopBoundBox<[ClientConnection]>
    /// The last frame of joined tokens built on this loop, until its flush: the sockets of a room
    /// that lag alike hold the same tokens and share one frame, encoded once.
    private let lastJoined: NIOLoopBoundBox<Joined?>

    private struct Joined {
        var stream: String
        var range: ClosedRange<Int64>
        var payload: ByteBuffer
        var encoded: ByteBuffer
    }

    init(loop: any EventLoop) {
        self.loop = loop
        due = .makeBoxSendingValue([], as: [ClientConnection].self, eventLoop: loop)
        lastJoined = .makeBoxSendingValue(nil, as: Joined?.self, eventLoop: loop)
    }

    /// The frame of `held`'s tokens and its whole WebSocket frame (nil: encode it when needed).
    fileprivate func joined(_ held: HeldTokens, allocator: ByteBufferAllocator) -> (payload: ByteBuffer, encoded: ByteBuffer?) {
        guard !held.more.isEmpty else { return (held.firstFrame, held.firstEncoded) }
        if let last = lastJoined.value, last.range == held.range, last.stream == held.first.stream { return (last.payload, last.encoded) }
        let payload = held.joined(allocator: allocator)
        let encoded = WireFrame.text(payload, allocator: allocator)
        lastJoined.value = Joined(stream: held.first.stream, range: held.range, payload: payload, encoded: encoded)
        return (payload, encoded)
    }

    fileprivate func add(_ connection: ClientConnection) {
        if due.value.isEmpty { loop.execute { self.flush() } }
        due.value.append(connection)
    }

    private func flush() {
        let connections = due.value
        due.value = []
        for connection in connections { connection.flushOnLoop() }
        lastJoined.value = nil
    }
}

/// One `FlushBatch` per event loop of the server's group.
struct FlushBatches: Sendable {
    private let batches: [ObjectIdentifier: FlushBatch]

    init(_ group: any EventLoopGroup) {
        var batches: [ObjectIdentifier: FlushBatch] = [:]
        for loop in group.makeIterator() { batches[ObjectIdentifier(loop)] = FlushBatch(loop: loop) }
        self.batches = batches
    }

    subscript(loop: any EventLoop) -> FlushBatch? { batches[ObjectIdentifier(loop)] }
}

/// One server-to-client WebSocket frame as it goes on the wire (RFC 6455 §5.2: FIN, unmasked).
enum WireFrame {
    /// A protocol message's opcode: text for JSON (which starts with `{`), binary for the rest
    /// (a voiced reply's audio, `AudioFrame`).
    @inline(__always)
    static func opcode(of payload: ByteBuffer) -> WebSocketOpcode {
        AudioFrame.isBinary(firstByte: payload.getInteger(at: payload.readerIndex, as: UInt8.self)) ? .binary : .text
    }

    /// The whole WebSocket frame of one message (text, or binary as `opcode(of:)` says).
    static func text(_ payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        let length = payload.readableBytes
        var frame = allocator.buffer(capacity: length + 10)
        frame.writeInteger(opcode(of: payload) == .binary ? UInt8(0x82) : UInt8(0x81))  // FIN, binary or text
        switch length {
        case 0...125:
            frame.writeInteger(UInt8(length))
        case 126...0xFFFF:
            frame.writeInteger(UInt8(126))
            frame.writeInteger(UInt16(length))
        default:
            frame.writeInteger(UInt8(127))
            frame.writeInteger(UInt64(length))
        }
        frame.writeImmutableBuffer(payload)
        return frame
    }
}
