import ParleyCore

/// One server-sent event: its `event` type (nil means "message"), its data lines joined by
/// newlines, and its `id` when given.
public struct SSEEvent: Sendable, Equatable {
    public var event: String?
    public var data: String
    public var id: String?

    public init(event: String? = nil, data: String, id: String? = nil) {
        self.event = event
        self.data = data
        self.id = id
    }
}

/// An incremental `text/event-stream` parser (the WHATWG rules), fed bytes as they arrive.
///
/// Reads may split anything: a line, a CRLF pair, a multi-byte UTF-8 character. Bytes are kept
/// until a line is complete and only whole lines are decoded, so none of those splits changes
/// what comes out. Lines end with LF, CR or CRLF; a line starting with `:` is a comment (the
/// keep-alives providers send); an empty line dispatches the event if it has data. An event cut
/// off by the end of the stream is dropped, as the standard says.
public struct SSEParser: Sendable {
    private var line: [UInt8] = []
    /// The last byte seen was a CR: an LF right after it ends the same line.
    private var afterCR = false
    private var atStart = true
    private var data: [String] = []
    private var hasData = false
    private var event: String?
    private var id: String?
    /// Longest line accepted; a longer one is an error, not unbounded memory.
    public let maxLineBytes: Int

    public struct LineTooLong: Error, Equatable {}

    public init(maxLineBytes: Int = 1 << 20) {
        self.maxLineBytes = maxLineBytes
    }

    /// Parses `bytes` and returns the events they completed, in order.
    public mutating func feed(_ bytes: some Sequence<UInt8>) throws(LineTooLong) -> [SSEEvent] {
        var out: [SSEEvent] = []
        for byte in bytes {
            if afterCR {
                afterCR = false
                if byte == UInt8(ascii: "\n") { continue }
            }
            switch byte {
            case UInt8(ascii: "\n"):
                endLine(&out)
            case UInt8(ascii: "\r"):
                afterCR = true
                endLine(&out)
            default:
                guard line.count < maxLineBytes else { throw LineTooLong() }
                line.append(byte)
            }
        }
        return out
    }

    private mutating func endLine(_ out: inout [SSEEvent]) {
        defer { line.removeAll(keepingCapacity: true) }
        if atStart {
            atStart = false
            if line.starts(with: [0xEF, 0xBB, 0xBF]) { line.removeFirst(3) }  // a byte order mark
        }
        guard !line.isEmpty else {
            if hasData { out.append(SSEEvent(event: event, data: data.joined(separator: "\n"), id: id)) }
            data.removeAll()
            hasData = false
            event = nil
            return
        }
        guard line[0] != UInt8(ascii: ":") else { return }  // a comment
        let text = String(decoding: line, as: UTF8.self)
        let field: Substring
        var value: Substring
        if let colon = text.firstIndex(of: ":") {
            field = text[..<colon]
            value = text[text.index(after: colon)...]
            if value.first == " " { value = value.dropFirst() }
        } else {
            field = text[...]
            value = ""
        }
        switch field {
        case "data":
            data.append(String(value))
            hasData = true
        case "event":
            event = String(value)
        case "id":
            if !value.contains("\0") { id = String(value) }
        default:
            break  // `retry` and unknown fields do not concern a one-shot request
        }
    }
}
