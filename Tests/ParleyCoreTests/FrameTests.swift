import Foundation
import ParleyCore
import Testing

@Suite struct FrameTests {
    func parse(_ text: String, limits: FrameLimits = FrameLimits()) throws(FrameError) -> ClientFrame {
        try ClientFrame.parse(Array(text.utf8), limits: limits)
    }

    func failure(_ text: String, limits: FrameLimits = FrameLimits()) -> FrameError? {
        do {
            _ = try parse(text, limits: limits)
            return nil
        } catch {
            return error
        }
    }

    @Test func parsesEveryClientFrame() throws {
        #expect(
            try parse(#"{"type":"chat.send","id":"c1","clone":"cl_1","text":"hi"}"#)
                == .chat(.send(id: "c1", clone: "cl_1", conversation: nil, text: "hi")))
        #expect(
            try parse(#"{"type":"chat.send","id":"c1","clone":"cl_1","conversation":"cv_1","text":"hi"}"#)
                == .chat(.send(id: "c1", clone: "cl_1", conversation: "cv_1", text: "hi")))
        #expect(try parse(#"{"type":"chat.cancel","id":"c2","stream":"st_1"}"#) == .chat(.cancel(id: "c2", stream: "st_1")))
        #expect(
            try parse(#"{"type":"stream.resume","id":"c3","stream":"st_1","after":12}"#)
                == .chat(.resume(id: "c3", stream: "st_1", after: 12)))
        #expect(try parse(#"{"type":"schedule.cancel","id":"s1","schedule":"sc_1"}"#) == .schedule(.cancel(id: "s1", schedule: "sc_1")))
        #expect(
            try parse(#"{"type":"room.join","id":"j1","room":"rm_1","language":"pt-br"}"#)
                == .room(.join(id: "j1", room: "rm_1", language: LanguageTag("pt-BR"))))
        #expect(try parse(#"{"type":"room.leave","id":"l1","room":"rm_1"}"#) == .room(.leave(id: "l1", room: "rm_1")))
        #expect(try parse(#"{"type":"room.say","id":"s2","room":"rm_1","text":"hi"}"#) == .room(.say(id: "s2", room: "rm_1", text: "hi")))
        #expect(
            try parse(#"{"type":"room.control","id":"c4","room":"rm_1","action":"mute","target":"cl_1"}"#)
                == .room(.control(id: "c4", room: "rm_1", action: .mute, target: "cl_1")))
        #expect(try parse(#"{"type":"room.join","id":"j2","room":"rm_1"}"#).id == "j2")
    }

    @Test func malformedFramesAreBadRequestsWithTheIdWhenReadable() {
        #expect(failure("{nope") == FrameError(ref: nil, code: .badRequest, message: "malformed JSON: expected a key in quotes at byte 1"))
        // Named twice, a member would mean one thing here and another to a reader keeping the last.
        #expect(
            failure(#"{"type":"chat.send","id":"a","type":"room.leave"}"#)
                == FrameError(ref: nil, code: .badRequest, message: #"malformed JSON: the key "type" is repeated at byte 29"#))
        #expect(failure("[1,2]")?.code == .badRequest)
        #expect(failure(#"{"id":"x"}"#) == FrameError(ref: "x", code: .badRequest, message: "missing field 'type'"))
        #expect(failure(#"{"type":"chat.send"}"#)?.message == "missing field 'id'")
        #expect(failure(#"{"type":"dance","id":"d1"}"#) == FrameError(ref: "d1", code: .badRequest, message: "unknown frame type 'dance'"))
        #expect(failure(#"{"type":"chat.send","id":"c1","text":"hi"}"#) == FrameError(ref: "c1", code: .badRequest, message: "missing field 'clone'"))
        #expect(failure(#"{"type":"chat.send","id":"c1","clone":"x","text":"  "}"#)?.message == "'text' must not be empty")
        #expect(failure(#"{"type":"chat.send","id":"c1","clone":5,"text":"hi"}"#)?.message == "'clone' must be a string, not number")
        #expect(failure(#"{"type":"stream.resume","id":"r","stream":"s","after":-1}"#)?.message == "'after' must be 0 or more")
        #expect(failure(#"{"type":"stream.resume","id":"r","stream":"s","after":"3"}"#)?.code == .badRequest)
    }

    @Test func unknownFieldsAreRejectedSoTyposDoNotChangeMeaning() {
        #expect(
            failure(#"{"type":"chat.send","id":"c1","clone":"x","conversaton":"cv","text":"hi"}"#)
                == FrameError(ref: "c1", code: .badRequest, message: "unknown field 'conversaton'"))
    }

    @Test func overlongTextIsTooLarge() {
        var limits = FrameLimits()
        limits.maxTextLength = 5
        #expect(failure(#"{"type":"chat.send","id":"c1","clone":"x","text":"123456"}"#, limits: limits)?.code == .tooLarge)
        #expect((try? parse(#"{"type":"chat.send","id":"c1","clone":"x","text":"12345"}"#, limits: limits)) != nil)
    }

    @Test func tokenFramesAreValidJSONWithEscapedText() throws {
        let bytes = ServerFrame.token(stream: "st_1", seq: 42, text: "say \"hi\"\n\u{1}")
        let value = try JSONValue.parse(bytes)
        #expect(
            value == .object([("type", .string("token")), ("stream", .string("st_1")), ("seq", .int(42)), ("text", .string("say \"hi\"\n\u{1}"))]))
    }

    @Test func streamEndCarriesReasonUsageAndMessage() throws {
        let value = try JSONValue.parse(
            ServerFrame.streamEnd(
                stream: "s", reason: .insufficientCredits, usage: Usage(inputTokens: 3, outputTokens: 4), message: "m", cost: 11, balance: 0))
        #expect(value["cost"] == .int(11))
        #expect(value["balance"] == .int(0))
        #expect(value["reason"] == .string("insufficient_credits"))
        #expect(value["usage"]?["output_tokens"] == .int(4))
        #expect(value["message"] == .string("m"))
    }
}
