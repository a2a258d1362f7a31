import ParleyCore

/// A service that serves one group of client frames. Each request runs in its socket's `turn`
/// (see `RequestOrder`) and never throws: every failure becomes an `error` frame.
protocol FrameHandler: Sendable {
    associatedtype Frame: Sendable
    func handle(_ frame: Frame, from connection: ClientConnection, turn: RequestOrder.Turn)
}

/// What a WebSocket's handler needs of the rest of the server: to be counted among its user's
/// sockets, to have its requests served, and to be forgotten when it closes. A protocol so the
/// handler can be tested on an `EmbeddedChannel` with no store and no services behind it.
protocol SocketServices: Sendable {
    /// Counts an opened socket: nil once registered, else why not (its user has as many as
    /// allowed, or signed its session out as it connected).
    func register(_ connection: ClientConnection) -> SocketHub.Refusal?
    /// The socket was welcomed: what waited for its user (scheduled messages) may be sent now.
    func welcomed(_ connection: ClientConnection)
    func handle(_ request: ClientFrame, from connection: ClientConnection, turn: RequestOrder.Turn)
    /// The socket closed: it is in no room and follows no stream any more.
    func unregister(_ connection: ClientConnection)
}

/// The server's services behind one socket: each frame group goes to its service.
struct ServerSocketServices: SocketServices {
    let hub: SocketHub
    let chat: ChatService
    let schedules: ScheduleService
    let rooms: RoomService
    /// A cluster's node without a shared store (tests only): rooms and schedules are refused.
    var roomsRefused = false
    var schedulesRefused = false

    func register(_ connection: ClientConnection) -> SocketHub.Refusal? { hub.register(connection) }

    func welcomed(_ connection: ClientConnection) {
        if !schedulesRefused { schedules.connected(connection) }
    }

    func handle(_ request: ClientFrame, from connection: ClientConnection, turn: RequestOrder.Turn) {
        switch request {
        case .chat(let frame): chat.handle(frame, from: connection, turn: turn)
        case .schedule where schedulesRefused, .room where roomsRefused:
            let message = if case .schedule = request { ClusterRefusal.schedules } else { ClusterRefusal.message }
            turn.runSoon { connection.send(ServerFrame.error(ref: request.id, code: .unavailable, message: message)) }
        case .schedule(let frame): schedules.handle(frame, from: connection, turn: turn)
        case .room(let frame): rooms.handle(frame, from: connection, turn: turn)
        }
    }

    func unregister(_ connection: ClientConnection) {
        let topics = hub.remove(connection)
        rooms.disconnected(connection, from: Set(topics.compactMap(\.room)))
    }
}

/// What a node of a cluster answers what it cannot do across nodes (#22).
enum ClusterRefusal {
    static let message = "rooms need the cluster's shared MongoDB store"
    static let schedules = "scheduled messages need the cluster's shared MongoDB store"
}
