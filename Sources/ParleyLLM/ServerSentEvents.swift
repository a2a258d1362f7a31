import NIOCore
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
    /// Bytes of `data` so far: an event's data is bounded as a line is.
    private var dataBytes = 0
    private var hasData = false
    private var event: String?
    private var id: String?
    /// Longest line accepted, and most data one event may gather from its `data` lines; more
    /// is an error, not unbounded memory (an upstream sending `data` lines and never the empty
    /// line that ends an event would otherwise grow one until a timeout).
    public let maxLineBytes: Int

    /// What passed `maxLineBytes`.
    public enum TooLong: Error, Equatable {
        case line
        case eventData
    }

    public init(maxLineBytes: Int = 1 << 20) {
        self.maxLineBytes = maxLineBytes
    }

    /// Parses `bytes` and returns the events they completed, in order.
    public mutating func feed(_ bytes: some Sequence<UInt8>) throws(TooLong) -> [SSEEvent] {
        let contiguous = bytes.withContiguousStorageIfAvailable { buffer in
            Result { () throws(TooLong) in try feed(contiguous: buffer) }
        }
        if let contiguous { return try contiguous.get() }
        return try Array(bytes).withUnsafeBufferPointer { buffer throws(TooLong) in try feed(contiguous: buffer) }
    }

    /// Parses the readable bytes of `buffer` (not consumed) and returns the events they completed.
    public mutating func feed(_ buffer: ByteBuffer) throws(TooLong) -> [SSEEvent] {
        let parsed = buffer.withUnsafeReadableBytes { raw in
            Result { () throws(TooLong) in try feed(contiguous: raw.assumingMemoryBound(to: UInt8.self)) }
        }
        return try parsed.get()
    }

    /// Lines are found by scanning for CR and LF and copied whole, not byte by byte.
    private mutating func feed(contiguous bytes: UnsafeBufferPointer<UInt8>) throws(TooLong) -> [SSEEvent] {
        var out: [SSEEvent] = []
        var index = 0
        while index < bytes.count {
            if afterCR {
                afterCR = false
                if bytes[index] == UInt8(ascii: "\n") {
                    index += 1
                    continue
                }
            }
            var end = index
            while end < bytes.count, bytes[end] != UInt8(ascii: "\n"), bytes[end] != UInt8(ascii: "\r") { end += 1 }
            guard line.count + (end - index) <= maxLineBytes else { throw TooLong.line }
            line.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[index..<end]))
            guard end < bytes.count else { break }
            afterCR = bytes[end] == UInt8(ascii: "\r")
            try endLine(&out)
            index = end + 1
        }
        return out
    }

    private mutating func endLine(_ out: inout [SSEEvent]) throws(TooLong) {
        defer { line.removeAll(keepingCapacity: true) }
        if atStart {
            atStart = false
            if line.starts(with: [0xEF, 0xBB, 0xBF]) { line.removeFirst(3) }  // a byte order mark
        }
        guard !line.isEmpty else {
            if hasData { out.append(SSEEvent(event: event, data: data.count == 1 ? data[0] : data.joined(separator: "\n"), id: id)) }
            data.removeAll()
            dataBytes = 0
            hasData = false
            event = nil
            return
        }
        guard line[0] != UInt8(ascii: ":") else { return }  // a comment
        // Split and matched as bytes (the colon and the names are ASCII, so no UTF-8 sequence
        // spans them): only the value is decoded, once, instead of the line and then a copy of
        // its value (#26: a provider's every token is one such line).
        let colon = line.firstIndex(of: UInt8(ascii: ":")) ?? line.count
        var start = min(colon + 1, line.count)
        if start < line.count, line[start] == UInt8(ascii: " ") { start += 1 }
        let field = line[..<colon]
        func value() -> String { String(decoding: line[start...], as: UTF8.self) }
        if field.elementsEqual("data".utf8) {
            // Each line after the first adds the "\n" that joins it.
            dataBytes += line.count - start + (hasData ? 1 : 0)
            guard dataBytes <= maxLineBytes else { throw TooLong.eventData }
            data.append(value())
            hasData = true
        } else if field.elementsEqual("event".utf8) {
            event = value()
        } else if field.elementsEqual("id".utf8) {
            let id = value()
            if !id.utf8.contains(0) { self.id = id }
        }  // `retry` and unknown fields do not concern a one-shot request
    }
}
