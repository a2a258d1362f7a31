/// The life of one WebSocket after its upgrade (RFC 6455 section 7), with no I/O: the socket's
/// handler and its connection report what happened, and carry out the action they get back.
///
///     opening ──open──▶ open ──close──▶ closing(server) ──peer's close──▶ closed
///                         │                                 (or the channel goes)
///                         └──peer's close──▶ closing(peer): answered, then closed
///
/// Whoever starts it and however many reasons to close arrive at once (a protocol error, the
/// server shutting down, an account deleted, a reader too slow, a dead peer), exactly one close
/// frame is sent, and frames that arrive once closing began are not served.
public struct WebSocketLifecycle: Sendable, Equatable {
    public enum Side: Sendable, Equatable {
        case server, peer
    }

    public enum State: Sendable, Equatable {
        /// The handler is in place; the channel is not active yet.
        case opening
        case open
        /// A close frame was sent (with this code); `initiator` started the closing handshake.
        case closing(code: UInt16, initiator: Side)
        case closed
    }

    public enum Action: Sendable, Equatable {
        /// Nothing to do: the socket is closing or closed already.
        case none
        /// Send this close frame, then shut the output and let the peer close its side (a
        /// lingering close, so the peer reads the code instead of a reset).
        case sendClose(CloseFrame.Answer)
        /// Send this close frame and close the channel at once: the peer is gone or must not keep
        /// the memory it holds.
        case sendCloseAndDrop(CloseFrame.Answer)
        /// Close the channel now: the closing handshake is complete.
        case closeChannel
    }

    public private(set) var state: State = .opening

    public init() {}

    /// The channel became active; false when it was opened (or closed) already.
    public mutating func open() -> Bool {
        guard state == .opening else { return false }
        state = .open
        return true
    }

    /// Whether a data or ping frame from the peer is served.
    public var isOpen: Bool { state == .open }

    /// The server closes the socket with `code`: only the first reason is sent.
    public mutating func close(code: UInt16, reason: String) -> Action {
        switch state {
        case .opening, .open:
            state = .closing(code: code, initiator: .server)
            return .sendClose(CloseFrame.Answer(code: code, reason: reason))
        case .closing, .closed:
            return .none
        }
    }

    /// The server closes the socket without waiting for the peer (it stopped answering pings, or
    /// it stopped reading): the frame is sent for the record and the channel closed at once.
    public mutating func drop(code: UInt16, reason: String) -> Action {
        switch state {
        case .opening, .open:
            state = .closed
            return .sendCloseAndDrop(CloseFrame.Answer(code: code, reason: reason))
        case .closing:
            state = .closed
            return .closeChannel
        case .closed:
            return .none
        }
    }

    /// The peer sent a close frame with `payload`: answered (its code echoed, or a protocol error)
    /// when the peer started the handshake; the end of the handshake when the server did.
    public mutating func peerClosed(payload: some Collection<UInt8>) -> Action {
        switch state {
        case .opening, .open:
            let answer = CloseFrame.answer(to: payload)
            state = .closing(code: answer.code, initiator: .peer)
            return .sendClose(answer)
        case .closing(_, .server):
            state = .closed
            return .closeChannel
        case .closing(_, .peer), .closed:
            return .none  // a second close from the peer is not answered again
        }
    }

    /// The channel is gone (closed by either side, or the connection broke).
    public mutating func channelClosed() {
        state = .closed
    }
}
