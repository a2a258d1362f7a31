import CNats
import NIOCore
import NIOPosix
import Synchronization

/// A failed nats.c call: its status text, what Parley was doing, and for JetStream the API's
/// error code (10071: the subject's last sequence was not the one expected).
public struct NATSError: Error, CustomStringConvertible, Sendable {
    public var status: String
    public var action: String
    public var jetStreamCode: Int?

    public var description: String {
        "NATS: \(action) failed: \(status)" + (jetStreamCode.map { " (JetStream error \($0))" } ?? "")
    }

    /// JetStream refused a publish whose expected last subject sequence did not match (fencing).
    public var isWrongLastSequence: Bool { jetStreamCode == 10071 }
    /// A request reached no subscriber of its subject (the server said so at once).
    public private(set) var isNoResponders = false
    /// A request got no reply in time.
    public private(set) var isTimeout = false

    public init(status: String, action: String, jetStreamCode: Int? = nil) {
        self.status = status
        self.action = action
        self.jetStreamCode = jetStreamCode
    }

    static func check(_ status: natsStatus, _ action: String, jetStream code: jsErrCode = jsErrCode(rawValue: 0)) throws(NATSError) {
        guard status != NATS_OK else { return }
        var detail = String(cString: natsStatus_GetText(status))
        if let last = nats_GetLastError(nil) {
            let text = String(cString: last)
            if !text.isEmpty { detail = text }
        }
        var error = NATSError(status: detail, action: action, jetStreamCode: code.rawValue == 0 ? nil : Int(code.rawValue))
        error.isNoResponders = status == NATS_NO_RESPONDERS
        error.isTimeout = status == NATS_TIMEOUT
        throw error
    }
}

/// One delivered message. `sequence` is its JetStream stream sequence (nil for core NATS);
/// `reply` is where a request wants its answer.
public struct NATSMessage: Sendable, Equatable {
    public var subject: String
    public var payload: [UInt8]
    public var sequence: UInt64?
    public var reply: String?

    public init(subject: String, payload: [UInt8], sequence: UInt64? = nil, reply: String? = nil) {
        self.subject = subject
        self.payload = payload
        self.sequence = sequence
        self.reply = reply
    }

    /// Reads a message nats.c handed over (which the caller still owns).
    init(_ message: OpaquePointer, jetStream: Bool) {
        let length = Int(natsMsg_GetDataLength(message))
        payload = natsMsg_GetData(message).map { Array(UnsafeRawBufferPointer(start: $0, count: length)) } ?? []
        var meta: UnsafeMutablePointer<jsMsgMetaData>?
        if jetStream, natsMsg_GetMetaData(&meta, message) == NATS_OK, let meta {
            sequence = meta.pointee.Sequence.Stream
            jsMsgMetaData_Destroy(meta)
        }
        subject = natsMsg_GetSubject(message).map { String(cString: $0) } ?? ""
        reply = natsMsg_GetReply(message).map { String(cString: $0) }
    }
}

/// A connection to a NATS server through nats.c. Blocking calls (connecting, flushing, a
/// JetStream publish that waits for its ack) run on `threads`, never on an event loop;
/// publishing to core NATS only buffers and may be called anywhere. Subscriptions are served by
/// nats.c's global delivery pool, so a thousand of them do not make a thousand threads.
public final class NATSConnection: @unchecked Sendable {
    // The pointer is owned here and destroyed once; nats.c connections are thread-safe.
    private let connection: OpaquePointer
    let threads: NIOThreadPool
    private let closed = Atomic(false)
    /// Where nats.c's link callbacks find this connection's handler.
    private let link: Int

    private init(_ connection: OpaquePointer, threads: NIOThreadPool, link: Int) {
        self.connection = connection
        self.threads = threads
        self.link = link
    }

    /// Connects to `url` (`nats://host:port`). `pingInterval` bounds how long a dead server
    /// goes unnoticed (two pings missed); the connection reconnects on its own after that.
    /// With `noEcho`, the server does not send this connection the messages it published itself
    /// (a node that delivered its own frames locally does not want them back).
    public static func connect(
        url: String, name: String = "parley", pingInterval: Duration = .seconds(2), timeout: Duration = .seconds(5), noEcho: Bool = false,
        threads: NIOThreadPool
    ) async throws -> NATSConnection {
        try await threads.runIfActive {
            // Each subscription keeps one delivery thread (its order), but the pool need not be
            // one thread for all: nats.c's default. It only grows, so asking again is harmless.
            try NATSError.check(nats_SetMessageDeliveryPoolSize(Int32(max(2, System.coreCount))), "sizing the delivery pool")
            var options: OpaquePointer?
            try NATSError.check(natsOptions_Create(&options), "creating connection options")
            defer { natsOptions_Destroy(options) }
            try NATSError.check(natsOptions_SetURL(options, url), "setting the URL \(url)")
            try NATSError.check(natsOptions_SetName(options, name), "naming the connection")
            try NATSError.check(natsOptions_SetTimeout(options, Self.milliseconds(timeout)), "setting the connect timeout")
            try NATSError.check(natsOptions_SetPingInterval(options, Self.milliseconds(pingInterval)), "setting the ping interval")
            try NATSError.check(natsOptions_SetMaxPingsOut(options, 2), "setting the pings out")
            try NATSError.check(natsOptions_SetMaxReconnect(options, -1), "allowing reconnects")
            try NATSError.check(natsOptions_UseGlobalMessageDelivery(options, true), "using the global delivery pool")
            try NATSError.check(natsOptions_SetNoEcho(options, noEcho), "setting no-echo")
            let link = LinkHandlers.register()
            let closure = UnsafeMutableRawPointer(bitPattern: link)
            try NATSError.check(natsOptions_SetDisconnectedCB(options, linkLost, closure), "observing disconnects")
            try NATSError.check(natsOptions_SetReconnectedCB(options, linkRestored, closure), "observing reconnects")
            var connection: OpaquePointer?
            do {
                try NATSError.check(natsConnection_Connect(&connection, options), "connecting to \(url)")
            } catch {
                LinkHandlers.forget(link)
                throw error
            }
            return NATSConnection(connection!, threads: threads, link: link)
        }
    }

    /// Calls `handler` (on a nats.c thread, one call at a time) when the link to the server is
    /// lost (nats.c then keeps what is published in its reconnect buffer and reconnects) and when
    /// it is back (subscriptions renewed, that buffer sent).
    public func observeLink(_ handler: @escaping @Sendable (NATSLinkEvent) -> Void) {
        LinkHandlers.set(link, handler)
    }

    static func milliseconds(_ duration: Duration) -> Int64 { TimeAmount(duration).nanoseconds / 1_000_000 }

    /// Publishes to core NATS (buffered; `flush` waits until the server has it).
    public func publish(_ subject: String, _ payload: [UInt8]) throws(NATSError) {
        let status = payload.withUnsafeBytes { natsConnection_Publish(connection, subject, $0.baseAddress, Int32($0.count)) }
        try NATSError.check(status, "publishing to \(subject)")
    }

    /// Waits until the server has processed everything published so far.
    public func flush(timeout: Duration = .seconds(5)) async throws {
        // The closure holds `self`, so the connection outlives the call.
        try await threads.runIfActive { [self] in
            try NATSError.check(natsConnection_FlushTimeout(connection, Self.milliseconds(timeout)), "flushing")
        }
    }

    /// Messages on `subject` (wildcards allowed), at most `buffer` waiting to be read: beyond
    /// that a message is dropped and counted in the subscription's `dropped`.
    public func subscribe(_ subject: String, buffer: Int = 10_000) throws(NATSError) -> NATSSubscription {
        try NATSSubscription.make(Delivery(buffer: buffer, jetStream: false), action: "subscribing to \(subject)") { subscription, context in
            (natsConnection_Subscribe(&subscription, connection, subject, deliver, context), jsErrCode(rawValue: 0))
        }
    }

    /// Messages on `subject` handed to `handler` on a nats.c delivery thread, one at a time and
    /// in order; the handler must not block (it holds up every subscription of that thread).
    public func subscribe(_ subject: String, handler: @escaping @Sendable (NATSMessage) -> Void) throws(NATSError) -> NATSSubscription {
        try NATSSubscription.make(Delivery(jetStream: false, handler: handler), action: "subscribing to \(subject)") { subscription, context in
            (natsConnection_Subscribe(&subscription, connection, subject, deliver, context), jsErrCode(rawValue: 0))
        }
    }

    /// Sends a request and waits up to `timeout` for its first reply. Throws `isNoResponders`
    /// when nobody subscribes to `subject`, `isTimeout` when nobody answered.
    public func request(_ subject: String, _ payload: [UInt8], timeout: Duration = .seconds(2)) async throws -> [UInt8] {
        try await threads.runIfActive { [self] in
            var reply: OpaquePointer?
            let status = payload.withUnsafeBytes {
                natsConnection_Request(&reply, connection, subject, $0.baseAddress, Int32($0.count), Self.milliseconds(timeout))
            }
            try NATSError.check(status, "requesting \(subject)")
            guard let reply else { throw NATSError(status: "no reply", action: "requesting \(subject)") }
            defer { natsMsg_Destroy(reply) }
            return NATSMessage(reply, jetStream: false).payload
        }
    }

    /// The JetStream context of this connection.
    public func jetStream(wait: Duration = .seconds(5)) throws(NATSError) -> JetStream {
        var options = jsOptions()
        try NATSError.check(jsOptions_Init(&options), "preparing JetStream options")
        options.Wait = Self.milliseconds(wait)
        var context: OpaquePointer?
        try NATSError.check(natsConnection_JetStream(&context, connection, &options), "opening JetStream")
        return JetStream(context!, connection: self)
    }

    /// Publishes a request that several subscribers answer, and collects up to `replies` of
    /// their answers, waiting at most `timeout` for them (fewer when some never answer).
    public func gather(_ subject: String, _ payload: [UInt8], replies: Int, timeout: Duration = .seconds(5)) async throws -> [[UInt8]] {
        guard replies > 0 else { return [] }
        var inbox: UnsafeMutablePointer<natsInbox>?
        try NATSError.check(natsInbox_Create(&inbox), "making an inbox")
        defer { natsInbox_Destroy(inbox) }
        let answers = try subscribe(String(cString: inbox!), buffer: replies)
        defer { answers.cancel() }
        let status = payload.withUnsafeBytes { natsConnection_PublishRequest(connection, subject, inbox, $0.baseAddress, Int32($0.count)) }
        try NATSError.check(status, "requesting \(subject)")
        return await withTaskGroup(of: [[UInt8]]?.self) { race in
            race.addTask {
                var collected: [[UInt8]] = []
                for await answer in answers.messages {
                    collected.append(answer.payload)
                    if collected.count == replies { break }
                }
                return collected
            }
            race.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            defer { race.cancelAll() }
            while let result = await race.next() {
                if let result { return result }
                answers.cancel()  // time is up: the collector ends with what it has
            }
            return []
        }
    }

    /// Connected to a server now (not reconnecting, not closed).
    public var isConnected: Bool { natsConnection_Status(connection) == NATS_CONN_STATUS_CONNECTED }

    /// Closes the connection; idempotent. Subscriptions stop delivering.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        LinkHandlers.forget(link)  // closing is not a lost link
        natsConnection_Close(connection)
    }

    deinit {
        close()
        natsConnection_Destroy(connection)
    }
}

public enum NATSLinkEvent: Sendable {
    case lost
    case restored
}

/// The link handlers of live connections, by a number that nats.c's callbacks carry as their
/// closure pointer: a callback that nats.c runs after its connection is gone finds none, where a
/// pointer to a freed object would crash.
enum LinkHandlers {
    private static let table = Mutex<(next: Int, handlers: [Int: @Sendable (NATSLinkEvent) -> Void])>((1, [:]))

    static func register() -> Int {
        table.withLock { t in
            defer { t.next += 1 }
            return t.next
        }
    }

    static func set(_ link: Int, _ handler: @escaping @Sendable (NATSLinkEvent) -> Void) {
        table.withLock { $0.handlers[link] = handler }
    }

    static func forget(_ link: Int) { _ = table.withLock { $0.handlers.removeValue(forKey: link) } }

    static func tell(_ closure: UnsafeMutableRawPointer?, _ event: NATSLinkEvent) {
        let link = Int(bitPattern: closure)
        table.withLock { $0.handlers[link] }?(event)
    }
}

private let linkLost: natsConnectionHandler = { _, closure in LinkHandlers.tell(closure, .lost) }
private let linkRestored: natsConnectionHandler = { _, closure in LinkHandlers.tell(closure, .restored) }

/// Where nats.c's delivery threads hand a subscription's messages: a bounded stream, or a handler.
final class Delivery: Sendable {
    let messages: AsyncStream<NATSMessage>
    let continuation: AsyncStream<NATSMessage>.Continuation
    let dropped = Atomic<Int>(0)
    /// A JetStream consumer's messages carry their stream sequence; core ones have none to read.
    let jetStream: Bool
    private let handler: (@Sendable (NATSMessage) -> Void)?

    init(buffer: Int, jetStream: Bool) {
        self.jetStream = jetStream
        handler = nil
        (messages, continuation) = AsyncStream.makeStream(bufferingPolicy: .bufferingOldest(max(1, buffer)))
    }

    /// Hands each message to `handler`; `messages` stays empty.
    init(jetStream: Bool, handler: @escaping @Sendable (NATSMessage) -> Void) {
        self.jetStream = jetStream
        self.handler = handler
        (messages, continuation) = AsyncStream.makeStream(bufferingPolicy: .bufferingOldest(1))
    }

    func take(_ message: OpaquePointer) {
        defer { natsMsg_Destroy(message) }
        let message = NATSMessage(message, jetStream: jetStream)
        if let handler {
            handler(message)
        } else if case .dropped = continuation.yield(message) {
            dropped.add(1, ordering: .relaxed)
        }
    }
}

// C callbacks cannot capture: the subscription's `Delivery` travels as the closure pointer.
private let deliver: natsMsgHandler = { _, _, message, closure in
    guard let message, let closure else { return }
    Unmanaged<Delivery>.fromOpaque(closure).takeUnretainedValue().take(message)
}

private let completed: natsOnCompleteCB = { closure in
    guard let closure else { return }
    let delivery = Unmanaged<Delivery>.fromOpaque(closure).takeRetainedValue()  // the subscription's own reference
    delivery.continuation.finish()
}

/// A subscription: its messages in order, and how many were dropped for want of a reader.
/// `cancel` (or dropping it) unsubscribes; the stream then ends.
public final class NATSSubscription: @unchecked Sendable {
    public var messages: AsyncStream<NATSMessage> { delivery.messages }
    public var dropped: Int { delivery.dropped.load(ordering: .relaxed) }

    private let subscription: OpaquePointer
    private let delivery: Delivery
    private let cancelled = Atomic(false)

    /// Subscribes through `create`, which is given the delivery's context for nats.c's callback.
    static func make(
        _ delivery: Delivery, action: String,
        _ create: (inout OpaquePointer?, UnsafeMutableRawPointer) -> (natsStatus, jsErrCode)
    ) throws(NATSError) -> NATSSubscription {
        let context = Unmanaged.passRetained(delivery).toOpaque()
        var subscription: OpaquePointer?
        let (status, code) = create(&subscription, context)
        guard status == NATS_OK, let subscription else {
            Unmanaged<Delivery>.fromOpaque(context).release()
            try NATSError.check(status, action, jetStream: code)
            throw NATSError(status: "no subscription", action: action)
        }
        return NATSSubscription(subscription, delivery: delivery, context: context)
    }

    private init(_ subscription: OpaquePointer, delivery: Delivery, context: UnsafeMutableRawPointer) {
        self.subscription = subscription
        self.delivery = delivery
        // The last callback releases the delivery's reference, once nats.c calls no more.
        if natsSubscription_SetOnCompleteCB(subscription, completed, context) != NATS_OK {
            Unmanaged<Delivery>.fromOpaque(context).release()  // unreachable for a live subscription
        }
    }

    public func cancel() {
        guard !cancelled.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = natsSubscription_Unsubscribe(subscription)
    }

    deinit {
        cancel()
        natsSubscription_Destroy(subscription)
    }
}

/// JetStream through one connection: streams, publishes that wait for their ack (with
/// de-duplication by message id and fencing by the subject's last sequence), and ordered
/// consumers that replay from a sequence and then continue live.
public final class JetStream: @unchecked Sendable {
    private let context: OpaquePointer
    private let connection: NATSConnection

    init(_ context: OpaquePointer, connection: NATSConnection) {
        self.context = context
        self.connection = connection
    }

    deinit { jsCtx_Destroy(context) }

    public struct StreamConfiguration: Sendable {
        public var name: String
        public var subjects: [String]
        /// Messages kept per subject (a stream's resume window); -1: no limit.
        public var maxMessagesPerSubject: Int64 = -1
        public var maxAge: Duration = .zero
        /// How long a message id is remembered for de-duplication.
        public var duplicateWindow: Duration = .seconds(120)
        /// File storage survives a nats-server restart; memory storage does not.
        public var fileStorage = true

        public init(name: String, subjects: [String]) {
            self.name = name
            self.subjects = subjects
        }
    }

    /// Creates the stream, or accepts it as it is when one of that name exists.
    public func addStream(_ configuration: StreamConfiguration) async throws {
        try await connection.threads.runIfActive { [self] in
            var config = jsStreamConfig()
            try NATSError.check(jsStreamConfig_Init(&config), "preparing a stream configuration")
            config.MaxMsgsPerSubject = configuration.maxMessagesPerSubject
            config.MaxAge = TimeAmount(configuration.maxAge).nanoseconds
            config.Duplicates = TimeAmount(configuration.duplicateWindow).nanoseconds
            config.Storage = configuration.fileStorage ? js_FileStorage : js_MemoryStorage
            let subjects = configuration.subjects.map { strdup($0) }
            defer { subjects.forEach { free($0) } }
            var pointers = subjects.map { UnsafePointer<CChar>($0) }
            var code = jsErrCode(rawValue: 0)
            var info: UnsafeMutablePointer<jsStreamInfo>?
            let status = configuration.name.withCString { name in
                pointers.withUnsafeMutableBufferPointer { list in
                    config.Name = name
                    config.Subjects = list.baseAddress
                    config.SubjectsLen = Int32(list.count)
                    return js_AddStream(&info, context, &config, nil, &code)
                }
            }
            if let info { jsStreamInfo_Destroy(info) }
            try NATSError.check(status, "adding stream \(configuration.name)", jetStream: code)
        }
    }

    public struct PublishAck: Sendable, Equatable {
        public var stream: String
        public var sequence: UInt64
        /// The server had this message id already: nothing was stored twice.
        public var duplicate: Bool

        public init(stream: String, sequence: UInt64, duplicate: Bool) {
            self.stream = stream
            self.sequence = sequence
            self.duplicate = duplicate
        }
    }

    /// Publishes and waits for the stream's ack. `messageID` de-duplicates a retry within the
    /// stream's window; `expectedLastSubjectSequence` (non-zero) makes the publish fail with
    /// `isWrongLastSequence` unless that is the subject's last sequence (fencing a stale writer).
    public func publish(
        _ subject: String, _ payload: [UInt8], messageID: String? = nil, expectedLastSubjectSequence: UInt64? = nil
    ) async throws -> PublishAck {
        return try await connection.threads.runIfActive { [self] in
            var options = jsPubOptions()
            try NATSError.check(jsPubOptions_Init(&options), "preparing a publish")
            options.ExpectLastSubjectSeq = expectedLastSubjectSequence ?? 0
            var ack: UnsafeMutablePointer<jsPubAck>?
            var code = jsErrCode(rawValue: 0)
            let status = (messageID ?? "").withCString { id in
                if messageID != nil { options.MsgId = id }
                return payload.withUnsafeBytes { bytes in
                    js_Publish(&ack, context, subject, bytes.baseAddress, Int32(bytes.count), &options, &code)
                }
            }
            try NATSError.check(status, "publishing to \(subject)", jetStream: code)
            guard let ack else { throw NATSError(status: "no acknowledgement", action: "publishing to \(subject)") }
            defer { jsPubAck_Destroy(ack) }
            return PublishAck(stream: String(cString: ack.pointee.Stream), sequence: ack.pointee.Sequence, duplicate: ack.pointee.Duplicate)
        }
    }

    /// An ordered consumer of `subject`: every message from stream sequence `from` on, in
    /// order, then each new one as it is stored, with no gap and no repeat (nats.c recreates
    /// the consumer past the last sequence it delivered when the server restarts).
    public func subscribeOrdered(_ subject: String, from sequence: UInt64, buffer: Int = 10_000) throws(NATSError) -> NATSSubscription {
        try orderedConsumer(subject, from: sequence, Delivery(buffer: buffer, jetStream: true))
    }

    /// The same ordered consumer with its messages handed to `handler` on a nats.c delivery
    /// thread; created on the thread pool (making a consumer is a round trip to the server).
    public func subscribeOrdered(
        _ subject: String, from sequence: UInt64, handler: @escaping @Sendable (NATSMessage) -> Void
    ) async throws -> NATSSubscription {
        try await connection.threads.runIfActive { [self] in
            try orderedConsumer(subject, from: sequence, Delivery(jetStream: true, handler: handler))
        }
    }

    private func orderedConsumer(_ subject: String, from sequence: UInt64, _ delivery: Delivery) throws(NATSError) -> NATSSubscription {
        var options = jsSubOptions()
        try NATSError.check(jsSubOptions_Init(&options), "preparing a consumer")
        options.Ordered = true
        options.Config.DeliverPolicy = js_DeliverByStartSequence
        options.Config.OptStartSeq = max(1, sequence)
        return try NATSSubscription.make(delivery, action: "consuming \(subject)") { subscription, closure in
            var code = jsErrCode(rawValue: 0)
            return (js_Subscribe(&subscription, context, subject, deliver, closure, nil, &options, &code), code)
        }
    }

    /// The last message stored on `subject` in `stream`, nil when there is none.
    public func lastMessage(stream: String, subject: String) async throws -> NATSMessage? {
        try await connection.threads.runIfActive { [self] in
            var message: OpaquePointer?
            var code = jsErrCode(rawValue: 0)
            let status = js_GetLastMsg(&message, context, stream, subject, nil, &code)
            if status == NATS_NOT_FOUND || code == JSNoMessageFoundErr { return nil }
            try NATSError.check(status, "reading the last message of \(subject)", jetStream: code)
            guard let message else { return nil }
            defer { natsMsg_Destroy(message) }
            var read = NATSMessage(message, jetStream: false)
            read.subject = subject
            return read
        }
    }
}
