import ParleyCore
import ParleyLLM
import Testing

@Suite struct ServerSentEventsTests {
    func parse(_ chunks: [[UInt8]]) throws -> [SSEEvent] {
        var parser = SSEParser()
        return try chunks.flatMap { try parser.feed($0) }
    }

    @Test func eventsCommentsMultiLineDataAndEveryLineEnding() throws {
        let stream =
            "\u{FEFF}: keep-alive\n\nevent: message_start\ndata: {\"a\":1}\n\ndata: line one\r\ndata:line two\r\rid: 7\ndata\n\ndata: cut off at the end"
        let events = try parse([Array(stream.utf8)])
        #expect(
            events == [
                SSEEvent(event: "message_start", data: #"{"a":1}"#),
                SSEEvent(data: "line one\nline two"),
                SSEEvent(data: "", id: "7"),
            ])
    }

    /// Only the exact names count; one space after the colon is dropped, not two; an id with a
    /// NUL is ignored; bytes that are not UTF-8 in a value are replaced, not fatal.
    @Test func fieldsAreMatchedExactlyAndValuesKeepWhatFollowsOneSpace() throws {
        let stream = Array("dat: x\ndatas: y\nretry: 5\nid: a\u{0}b\ndata:  two spaces\ndata:".utf8) + [0xFF] + Array("\n\n".utf8)
        #expect(try parse([stream]) == [SSEEvent(data: " two spaces\n\u{FFFD}")])
    }

    /// The same bytes, cut anywhere (inside a CRLF, inside a UTF-8 character), give the same events.
    @Test func splitsAnywhereChangeNothing() throws {
        let stream = Array("data: {\"t\":\"héllo 🌊 wörld\"}\r\n\r\n: ping\r\nevent: x\r\ndata: naïve ☕\r\n\r\ndata: [DONE]\n\n".utf8)
        let whole = try parse([stream])
        #expect(whole.count == 3 && whole[0].data.contains("🌊") && whole[1].data == "naïve ☕")
        for cut in 0...stream.count {
            #expect(try parse([Array(stream[..<cut]), Array(stream[cut...])]) == whole, "cut at \(cut)")
        }
        var rng = SplitMix64(seed: 11)
        for _ in 0..<200 {
            var chunks: [[UInt8]] = []
            var rest = stream[...]
            while !rest.isEmpty {
                let size = 1 + Int(rng.next() % 7)
                chunks.append(Array(rest.prefix(size)))
                rest = rest.dropFirst(size)
            }
            #expect(try parse(chunks) == whole)
        }
    }

    @Test func aLineLongerThanTheLimitIsAnErrorNotUnboundedMemory() {
        var parser = SSEParser(maxLineBytes: 16)
        #expect(throws: SSEParser.TooLong.line) { try parser.feed(Array("data: \(String(repeating: "x", count: 32))".utf8)) }
    }

    /// The limit counts a line's bytes across reads: exactly the limit passes, one more does not.
    @Test func theLineLimitIsExactAcrossReads() throws {
        var parser = SSEParser(maxLineBytes: 16)
        _ = try parser.feed(Array("data: 012".utf8))
        #expect(try parser.feed(Array("3456789\n\n".utf8)) == [SSEEvent(data: "0123456789")])
        _ = try parser.feed(Array("data: 012".utf8))
        #expect(throws: SSEParser.TooLong.line) { try parser.feed(Array("34567890".utf8)) }
    }

    /// `data` lines that never end their event gather up to the same limit: the event's data
    /// (joined with "\n") may be exactly that long, one byte more is an error.
    @Test func anEventsDataIsBoundedAsALineIs() throws {
        var parser = SSEParser(maxLineBytes: 16)
        #expect(try parser.feed(Array("data: 0123456\ndata: 01234567\n\n".utf8)) == [SSEEvent(data: "0123456\n01234567")])
        let second = try parser.feed(Array(":hi\nevent: e\ndata\ndata: 0123456789\n\n".utf8))
        #expect(second == [SSEEvent(event: "e", data: "\n0123456789")])
        _ = try parser.feed(Array("data: 01234567\ndata: 0123456".utf8))
        #expect(throws: SSEParser.TooLong.eventData) { try parser.feed(Array("7\n".utf8)) }
    }

    @Test func openAIChunksBecomeTextFinishUsageAndDone() throws {
        let transcript = """
            data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}

            data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}

            : OPENROUTER PROCESSING

            data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo!"},"finish_reason":null}]}

            data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

            data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}

            data: [DONE]


            """
        let parts = try parse([Array(transcript.utf8)]).flatMap { try OpenAIChatDialect.parts(of: $0) }
        #expect(parts == [.text("Hel"), .text("lo!"), .finish("stop"), .usage(input: 12, output: 2), .done])
        #expect(throws: ProviderError("the model provider failed: Rate limit reached")) {
            try OpenAIChatDialect.parts(of: SSEEvent(data: #"{"error":{"message":"Rate limit reached","type":"requests"}}"#))
        }
        #expect(throws: ProviderError.self) { try OpenAIChatDialect.parts(of: SSEEvent(data: "{not json")) }
    }

    @Test func anthropicEventsBecomeTextFinishUsageAndDone() throws {
        let transcript = """
            event: message_start
            data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude","stop_reason":null,"usage":{"input_tokens":25,"output_tokens":1}}}

            event: content_block_start
            data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

            event: ping
            data: {"type": "ping"}

            event: content_block_delta
            data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Bon"}}

            event: content_block_delta
            data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"jour"}}

            event: content_block_stop
            data: {"type":"content_block_stop","index":0}

            event: message_delta
            data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

            event: message_stop
            data: {"type":"message_stop"}


            """
        let parts = try parse([Array(transcript.utf8)]).flatMap { try AnthropicMessagesDialect.parts(of: $0) }
        #expect(parts == [.usage(input: 25, output: nil), .text("Bon"), .text("jour"), .finish("end_turn"), .usage(input: nil, output: 15), .done])
        #expect(throws: ProviderError("the model provider failed: Overloaded")) {
            try AnthropicMessagesDialect.parts(
                of: SSEEvent(event: "error", data: #"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#))
        }
    }
}
