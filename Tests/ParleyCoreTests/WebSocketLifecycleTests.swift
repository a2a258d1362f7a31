import ParleyCore
import Testing

@Suite struct WebSocketLifecycleTests {
    typealias Answer = CloseFrame.Answer

    func opened() -> WebSocketLifecycle {
        var socket = WebSocketLifecycle()
        let first = socket.open()
        #expect(first)
        return socket
    }

    @Test func opensOnceAndServesFramesOnlyWhileOpen() {
        var socket = WebSocketLifecycle()
        #expect(!socket.isOpen, "not before the channel is active")
        let first = socket.open()
        #expect(first && socket.isOpen)
        let second = socket.open()
        #expect(!second, "a second activation changes nothing")
        _ = socket.close(code: 1001, reason: "server shutting down")
        let reopened = socket.open()
        #expect(!socket.isOpen && !reopened)
    }

    @Test func theFirstReasonToCloseIsTheOnlyCloseFrameSent() {
        var socket = opened()
        var actions = [socket.close(code: 1008, reason: "account deleted")]
        actions.append(socket.close(code: 1001, reason: "server shutting down"))
        actions.append(socket.close(code: 1002, reason: "protocol error"))
        #expect(actions == [.sendClose(Answer(code: 1008, reason: "account deleted")), .none, .none])
        #expect(socket.state == .closing(code: 1008, initiator: .server))
        // The peer's answer completes the handshake: it is not answered again.
        let answered = socket.peerClosed(payload: [0x03, 0xF0])
        #expect(answered == .closeChannel && socket.state == .closed)
        let again = socket.peerClosed(payload: [0x03, 0xE8])
        #expect(again == .none)
    }

    @Test func aPeersCloseIsAnsweredOnceWithItsCodeOrAProtocolError() {
        var socket = opened()
        let echo = socket.peerClosed(payload: [0x03, 0xE9])
        #expect(echo == .sendClose(Answer(code: 1001, reason: "")))
        #expect(socket.state == .closing(code: 1001, initiator: .peer))
        let repeated = socket.peerClosed(payload: [0x03, 0xE9])
        #expect(repeated == .none, "a repeated close is not echoed twice")
        let servers = socket.close(code: 1001, reason: "server shutting down")
        #expect(servers == .none, "nor does the server add one of its own")

        var bad = opened()
        let refused = bad.peerClosed(payload: [0x03, 0xED])
        #expect(refused == .sendClose(Answer(code: 1002, reason: "close code 1005 must not be sent")))
        var empty = opened()
        let normal = empty.peerClosed(payload: [])
        #expect(normal == .sendClose(Answer(code: 1000, reason: "")))
    }

    @Test func aDeadPeerIsDroppedAtOnceAndAClosingOneIsNotSentASecondFrame() {
        var socket = opened()
        let dropped = socket.drop(code: 1011, reason: "keepalive ping timeout")
        #expect(dropped == .sendCloseAndDrop(Answer(code: 1011, reason: "keepalive ping timeout")) && socket.state == .closed)
        let again = socket.drop(code: 1008, reason: "too slow")
        #expect(again == .none)

        var closing = opened()
        _ = closing.close(code: 1001, reason: "server shutting down")
        let cut = closing.drop(code: 1008, reason: "too slow")
        #expect(cut == .closeChannel, "already closing: closed without another frame")
    }

    @Test func aSocketClosedBeforeItOpenedStaysClosed() {
        var socket = WebSocketLifecycle()
        let refused = socket.close(code: 1008, reason: "too many open sockets for this user")
        #expect(refused == .sendClose(Answer(code: 1008, reason: "too many open sockets for this user")))
        let opened = socket.open()
        #expect(!opened)
        socket.channelClosed()
        let late = [socket.close(code: 1000, reason: ""), socket.peerClosed(payload: [])]
        #expect(socket.state == .closed && late == [.none, .none])
    }
}
