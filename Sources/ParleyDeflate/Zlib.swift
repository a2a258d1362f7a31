import CZlib
import NIOCore

/// Why a compressed message could not be turned back into its payload.
public enum InflateError: Error, Equatable, CustomStringConvertible {
    /// The payload grew past the limit while decompressing (a compression bomb, or just too big).
    case tooLarge(limit: Int)
    /// The bytes are not a valid raw DEFLATE stream.
    case corrupt(String)

    public var description: String {
        switch self {
        case .tooLarge(let limit): "the message decompresses to more than \(limit) bytes"
        case .corrupt(let why): "invalid compressed data (\(why))"
        }
    }
}

/// A `z_stream` and the byte count its allocation hooks keep, at addresses that stay put for as
/// long as zlib holds them; `end` (deflateEnd or inflateEnd) frees zlib's state with it.
private final class ZStream {
    let stream: UnsafeMutablePointer<z_stream>
    let held: UnsafeMutablePointer<Int>
    private let end: (UnsafeMutablePointer<z_stream>) -> Int32

    init(end: @escaping (UnsafeMutablePointer<z_stream>) -> Int32) {
        self.end = end
        stream = .allocate(capacity: 1)
        stream.initialize(to: z_stream())
        held = .allocate(capacity: 1)
        held.initialize(to: 0)
        parley_zstream_prepare(stream, held)
    }

    deinit {
        _ = end(stream)
        stream.deinitialize(count: 1)
        stream.deallocate()
        held.deallocate()
    }
}

/// The tail every message's sync flush ends with; RFC 7692 section 7.2.1 strips it on the wire
/// and section 7.2.2 puts it back before decompressing.
private let syncFlushTail: [UInt8] = [0x00, 0x00, 0xFF, 0xFF]

/// One zlib raw-DEFLATE compressor for one socket's outbound messages (RFC 7692). Owns its
/// `z_stream` and the memory zlib allocates for it; not thread-safe: one event loop uses it.
public final class Deflater {
    private let z = ZStream(end: deflateEnd)
    private var stream: UnsafeMutablePointer<z_stream> { z.stream }
    /// Whether each message starts from an empty window (`server_no_context_takeover`).
    public let resetsEachMessage: Bool

    /// - Parameters:
    ///   - windowBits: 9...15, the LZ77 window as a power of two (zlib cannot do 8 for raw deflate).
    ///   - memoryLevel: 1...9, zlib's hash-table and block-buffer size. 1 costs no ratio on
    ///     messages this small (measured on token frames) and holds 7 KiB less per socket than 4.
    public init(level: Int32 = 6, windowBits: Int, memoryLevel: Int32 = 1, resetsEachMessage: Bool) {
        precondition((9...15).contains(windowBits) && (1...9).contains(memoryLevel) && (0...9).contains(level))
        self.resetsEachMessage = resetsEachMessage
        // Fails only when memory is exhausted, which a server cannot carry on from anyway.
        let rc = parley_deflate_init(z.stream, level, Int32(windowBits), memoryLevel)
        precondition(rc == Z_OK, "deflateInit2 failed: \(rc)")
    }

    /// Bytes zlib currently holds for this compressor.
    public var heldBytes: Int { z.held.pointee }

    /// Compresses one whole message: its DEFLATE blocks ending in a sync flush, without the
    /// flush's 00 00 FF FF tail (RFC 7692 section 7.2.1).
    public func compress(_ message: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: message.readableBytes / 2 + 64)
        message.withUnsafeReadableBytes { input in
            stream.pointee.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
            stream.pointee.avail_in = uInt(input.count)
            repeat {
                out.writeWithUnsafeMutableBytes(minimumWritableBytes: 64) { output in
                    stream.pointee.next_out = output.bindMemory(to: Bytef.self).baseAddress
                    stream.pointee.avail_out = uInt(output.count)
                    // Only Z_OK or Z_BUF_ERROR (no progress possible) with a valid stream.
                    _ = deflate(stream, Z_SYNC_FLUSH)
                    return output.count - Int(stream.pointee.avail_out)
                }
            } while stream.pointee.avail_out == 0
            stream.pointee.next_in = nil
        }
        if out.readableBytes >= 4, out.getBytes(at: out.writerIndex - 4, length: 4) == syncFlushTail {
            out.moveWriterIndex(to: out.writerIndex - 4)
        }
        if resetsEachMessage { deflateReset(stream) }
        return out
    }
}

/// One zlib raw-DEFLATE decompressor for inbound messages, fed fragment by fragment; it keeps
/// its window from one message to the next (context takeover) for as long as it lives. Owns its
/// `z_stream`; decompresses at most `limit` bytes per message, so a bomb costs at most the limit.
public final class Inflater {
    private let z = ZStream(end: inflateEnd)
    private var stream: UnsafeMutablePointer<z_stream> { z.stream }
    public let limit: Int
    /// Bytes produced so far for the current message.
    public private(set) var produced = 0

    /// - Parameter windowBits: the largest window the peer may use; 15 decompresses any.
    public init(limit: Int, windowBits: Int = 15) {
        self.limit = limit
        let rc = parley_inflate_init(z.stream, Int32(windowBits))
        precondition(rc == Z_OK, "inflateInit2 failed: \(rc)")
    }

    public var heldBytes: Int { z.held.pointee }

    /// Decompresses one fragment of the message into `out`; `final` for the last, which gets the
    /// stripped 00 00 FF FF tail back first.
    public func inflate(_ fragment: ByteBuffer, final: Bool, into out: inout ByteBuffer) throws(InflateError) {
        // (withUnsafeReadableBytes rethrows untyped errors, so the failure comes back as a value.)
        if let failure = fragment.withUnsafeReadableBytes({ run($0, into: &out) }) { throw failure }
        if final {
            if let failure = syncFlushTail.withUnsafeBytes({ run($0, into: &out) }) { throw failure }
            produced = 0
        }
    }

    private func run(_ input: UnsafeRawBufferPointer, into out: inout ByteBuffer) -> InflateError? {
        guard !input.isEmpty else { return nil }
        stream.pointee.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
        stream.pointee.avail_in = uInt(input.count)
        defer { stream.pointee.next_in = nil }
        while true {
            // One byte of room past the limit tells "exactly the limit" from "more than it".
            let room = min(limit - produced + 1, 16 * 1024)
            var rc: Int32 = Z_OK
            var full = false
            let wrote = out.writeWithUnsafeMutableBytes(minimumWritableBytes: room) { output in
                stream.pointee.next_out = output.bindMemory(to: Bytef.self).baseAddress
                stream.pointee.avail_out = uInt(room)
                rc = CZlib.inflate(stream, Z_SYNC_FLUSH)
                full = stream.pointee.avail_out == 0
                return room - Int(stream.pointee.avail_out)
            }
            produced += wrote
            guard produced <= limit else { return .tooLarge(limit: limit) }
            switch rc {
            case Z_OK, Z_BUF_ERROR:
                break
            case Z_STREAM_END:
                // The peer ended the message with a final block; what follows (the tail put back
                // after it, or a next message in this fragment) starts a new stream.
                inflateReset(stream)
            default:
                let why = stream.pointee.msg.map { String(cString: $0) } ?? "zlib error \(rc)"
                return .corrupt(why)
            }
            if stream.pointee.avail_in == 0 && !full { return nil }
            if rc == Z_BUF_ERROR && !full { return nil }
        }
    }
}
