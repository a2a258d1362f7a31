import NIOCore

/// Where a token frame's parts lie: `{"type":"token","stream":"…","seq":` up to `seqAt`, the seq,
/// `,"text":"`, then the text as the frame escapes it from `textAt` up to the frame's closing `"}`
/// (checked when it is made).
/// A socket that joins tokens (`?coalesce=tokens`) cuts and joins frames along it.
struct TokenLayout: Sendable {
    let stream: String
    let seq: Int64
    let seqAt: Int
    let textAt: Int

    /// Nil when `frame` does not end as a token frame does (its text then cannot be cut out).
    init?(_ frame: ByteBuffer, stream: String, seq: Int64, seqAt: Int, textAt: Int) {
        let count = frame.readableBytes
        guard textAt >= 1, textAt <= count - 2, frame.getInteger(at: frame.readerIndex + textAt - 1, as: UInt8.self) == UInt8(ascii: "\""),
            frame.getInteger(at: frame.readerIndex + count - 2, as: UInt16.self) == Self.closing
        else { return nil }
        self.stream = stream
        self.seq = seq
        self.seqAt = seqAt
        self.textAt = textAt
    }

    /// `"}` read as a big-endian UInt16.
    private static let closing = UInt16(UInt8(ascii: "\"")) << 8 | UInt16(UInt8(ascii: "}"))
}

/// Consecutive tokens of one stream waiting for their socket's flush (`ClientConnection`): one
/// goes as its own frame, several as one `token` frame whose `from` is the first one's seq,
/// `seq` the last one's and `text` their texts joined. They would have left in the same
/// `writev` anyway, or waited behind the last frame of tokens the kernel has not taken yet: a
/// socket that lags behind its stream (a burst, a busy loop, a slow reader) gets fewer, larger
/// frames and no token later than it would have.
struct HeldTokens {
    private(set) var first: TokenLayout
    private(set) var firstFrame: ByteBuffer
    /// The first token's whole WebSocket frame, when the fan-out encoded it once for all sockets.
    private(set) var firstEncoded: ByteBuffer?
    /// The tokens after the first, with where each one's text starts.
    private(set) var more: [(frame: ByteBuffer, textAt: Int)] = []
    /// The bytes of the frames held.
    private(set) var bytes: Int

    init(_ frame: ByteBuffer, encoded: ByteBuffer?, layout: TokenLayout) {
        first = layout
        firstFrame = frame
        firstEncoded = encoded
        bytes = frame.readableBytes
    }

    /// The seq of the last token held (they are consecutive).
    var last: Int64 { first.seq + Int64(more.count) }

    /// Whether `layout`'s token is the next one of the same stream.
    func continues(with layout: TokenLayout) -> Bool {
        layout.seq == last + 1 && layout.stream == first.stream
    }

    mutating func append(_ frame: ByteBuffer, layout: TokenLayout) {
        more.append((frame, layout.textAt))
        bytes += frame.readableBytes
    }

    /// The range of tokens held: what a joined frame of them says.
    var range: ClosedRange<Int64> { first.seq...last }

    /// One `token` frame of every token held: the first one's own when it is alone.
    func joined(allocator: ByteBufferAllocator) -> ByteBuffer {
        guard !more.isEmpty else { return firstFrame }
        let textBytes = more.reduce(firstFrame.readableBytes - first.textAt) { $0 + $1.frame.readableBytes - $1.textAt }
        var frame = allocator.buffer(capacity: first.textAt + textBytes + 40)
        frame.writeImmutableBuffer(firstFrame.getSlice(at: firstFrame.readerIndex, length: first.seqAt)!)
        frame.writeString(String(last))
        frame.writeString(#","from":"#)
        frame.writeString(String(first.seq))
        frame.writeString(#","text":""#)
        Self.writeText(of: firstFrame, from: first.textAt, to: &frame)
        for token in more { Self.writeText(of: token.frame, from: token.textAt, to: &frame) }
        frame.writeString(#""}"#)
        return frame
    }

    /// A token frame's text as the frame escapes it: escaped texts joined are the joined text escaped.
    private static func writeText(of token: ByteBuffer, from textAt: Int, to frame: inout ByteBuffer) {
        frame.writeImmutableBuffer(token.getSlice(at: token.readerIndex + textAt, length: token.readableBytes - textAt - 2)!)
    }
}
