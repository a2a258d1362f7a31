import ParleyCore
import Testing

@Suite struct CloseFrameTests {
    private func payload(_ code: UInt16, _ reason: [UInt8] = []) -> [UInt8] {
        [UInt8(code >> 8), UInt8(code & 0xFF)] + reason
    }

    @Test func validCodesAreEchoed() {
        for code: UInt16 in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            #expect(CloseFrame.answer(to: payload(code, Array("bye".utf8))) == .init(code: code, reason: ""))
        }
    }

    @Test func noStatusIsAnswered1000() {
        #expect(CloseFrame.answer(to: [UInt8]()).code == 1000)
    }

    @Test func codesAPeerMustNotSendAreProtocolErrors() {
        for code: UInt16 in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            #expect(CloseFrame.answer(to: payload(code)).code == 1002, "\(code)")
        }
    }

    @Test func oneBytePayloadIsAProtocolError() {
        #expect(CloseFrame.answer(to: [0x03]).code == 1002)
    }

    @Test func aReasonThatIsNotUTF8Is1007() {
        #expect(CloseFrame.answer(to: payload(1000, [0xED, 0xA0, 0x80])).code == 1007)
        #expect(CloseFrame.answer(to: payload(1000, [0xC3])).code == 1007)
        #expect(CloseFrame.answer(to: payload(1000, Array("ça".utf8))).code == 1000)
    }

    @Test func worksOnASlice() {
        let bytes: [UInt8] = [0xFF] + payload(1001)
        #expect(CloseFrame.answer(to: bytes[1...]).code == 1001)
    }
}
