/// The closing handshake of RFC 6455 (sections 5.5.1, 7.1.5, 7.4): what a server answers to a
/// peer's close frame. Pure, so the fuzz target and the unit tests drive it directly.
public enum CloseFrame {
    /// The close frame to send back: its status code and reason.
    public struct Answer: Equatable, Sendable {
        public var code: UInt16
        public var reason: String

        public init(code: UInt16, reason: String) {
            self.code = code
            self.reason = reason
        }
    }

    /// Answers a peer's close payload: an empty payload (no status) or a valid code is echoed
    /// (1000 for no status, as 1005 must never be sent); a 1-byte payload or a code a peer must
    /// not send is a protocol error (1002); a reason that is not UTF-8 is 1007.
    public static func answer(to payload: some Collection<UInt8>) -> Answer {
        if payload.isEmpty { return Answer(code: 1000, reason: "") }
        guard payload.count >= 2 else { return Answer(code: 1002, reason: "a close payload of 1 byte has no status code") }
        let code = UInt16(payload[payload.startIndex]) << 8 | UInt16(payload[payload.index(after: payload.startIndex)])
        guard isSendable(code) else { return Answer(code: 1002, reason: "close code \(code) must not be sent") }
        guard String(validating: payload.dropFirst(2), as: UTF8.self) != nil else {
            return Answer(code: 1007, reason: "the close reason is not valid UTF-8")
        }
        return Answer(code: code, reason: "")
    }

    /// Whether a peer may put `code` in a close frame: the codes IANA registered for endpoints to
    /// send (1000–1003, 1007–1014; 1004 is reserved and 1005, 1006 and 1015 are for reporting
    /// only), and the ranges left to libraries and applications (3000–4999).
    public static func isSendable(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: true
        default: false
        }
    }
}
