import NIOCore
import ParleyDeflate
import Testing

@Suite struct ZlibTests {
    let allocator = ByteBufferAllocator()

    func token(_ seq: Int) -> ByteBuffer {
        ByteBuffer(string: #"{"type":"token","stream":"st_01M82FX49X0000GYMZ901ZQX2H","seq":\#(seq),"text":" word\#(seq % 7)"}"#)
    }

    func inflate(_ inflater: Inflater, _ message: ByteBuffer) throws -> ByteBuffer {
        var out = allocator.buffer(capacity: 0)
        try inflater.inflate(message, final: true, into: &out)
        return out
    }

    @Test func messagesRoundTripAndContextTakeoverShrinksRepeats() throws {
        let deflater = Deflater(windowBits: 12, resetsEachMessage: false)
        let inflater = Inflater(limit: 1 << 16)
        var sizes: [Int] = []
        for seq in 1...50 {
            let compressed = deflater.compress(token(seq), allocator: allocator)
            sizes.append(compressed.readableBytes)
            #expect(try inflate(inflater, compressed) == token(seq))
        }
        // The first frame stands alone; later ones mostly point back at earlier ones.
        #expect(sizes[0] > 60)
        #expect(sizes[10...].allSatisfy { $0 < 25 }, "\(sizes)")
    }

    @Test func withoutContextTakeoverEachMessageStandsAlone() throws {
        let deflater = Deflater(windowBits: 12, resetsEachMessage: true)
        let first = deflater.compress(token(1), allocator: allocator)
        let second = deflater.compress(token(1), allocator: allocator)
        #expect(first == second)
        // A fresh inflater (no window) decodes the second: it refers to nothing before it.
        #expect(try inflate(Inflater(limit: 1024), second) == token(1))
    }

    @Test func theCompressorStaysInsideItsWindow() throws {
        // Random bytes repeated at a distance of 1000: only a window wider than 512 bytes finds
        // the repeat (the peer's inflater may be sized to the announced window).
        var rng = SystemRandomNumberGenerator()
        let block = (0..<1000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let message = ByteBuffer(bytes: block + block)
        let narrow = Deflater(windowBits: 9, resetsEachMessage: false).compress(message, allocator: allocator)
        let wide = Deflater(windowBits: 15, resetsEachMessage: false).compress(message, allocator: allocator)
        #expect(narrow.readableBytes > 1900 && wide.readableBytes < 1100, "\(narrow.readableBytes) vs \(wide.readableBytes)")
        #expect(try inflate(Inflater(limit: 4096, windowBits: 9), narrow) == message)
    }

    @Test func aBombStopsAtTheLimit() throws {
        let zeros = ByteBuffer(repeating: 0, count: 8 << 20)
        let bomb = Deflater(windowBits: 15, resetsEachMessage: true).compress(zeros, allocator: allocator)
        #expect(bomb.readableBytes < 16 * 1024)
        let inflater = Inflater(limit: 64 * 1024)
        var out = allocator.buffer(capacity: 0)
        #expect(throws: InflateError.tooLarge(limit: 64 * 1024)) { try inflater.inflate(bomb, final: true, into: &out) }
        #expect(out.readableBytes <= 64 * 1024 + 1)
    }

    @Test func exactlyTheLimitIsAccepted() throws {
        let message = ByteBuffer(repeating: UInt8(ascii: "a"), count: 4096)
        let compressed = Deflater(windowBits: 12, resetsEachMessage: true).compress(message, allocator: allocator)
        #expect(try inflate(Inflater(limit: 4096), compressed) == message)
        #expect(throws: InflateError.tooLarge(limit: 4095)) { try inflate(Inflater(limit: 4095), compressed) }
    }

    @Test func theLimitIsPerMessage() throws {
        let deflater = Deflater(windowBits: 12, resetsEachMessage: false)
        let inflater = Inflater(limit: 200)
        for seq in 1...20 { _ = try inflate(inflater, deflater.compress(token(seq), allocator: allocator)) }
    }

    @Test func fragmentsSplitAnywhereDecodeTheSame() throws {
        let message = ByteBuffer(string: String(repeating: "Parley streams tokens. ", count: 40))
        let compressed = Deflater(windowBits: 12, resetsEachMessage: true).compress(message, allocator: allocator)
        for cut in 0...compressed.readableBytes {
            let inflater = Inflater(limit: 1 << 16)
            var out = allocator.buffer(capacity: 0)
            try inflater.inflate(compressed.getSlice(at: 0, length: cut)!, final: false, into: &out)
            try inflater.inflate(compressed.getSlice(at: cut, length: compressed.readableBytes - cut)!, final: true, into: &out)
            #expect(out == message, "cut at \(cut)")
        }
    }

    @Test func garbageIsCorruptNotACrash() {
        let inflater = Inflater(limit: 1 << 16)
        var out = allocator.buffer(capacity: 0)
        #expect {
            try inflater.inflate(ByteBuffer(bytes: [0xFF, 0xFF, 0xFF, 0x00, 0x13]), final: true, into: &out)
        } throws: { error in
            guard case .corrupt = error as? InflateError else { return false }
            return true
        }
    }

    @Test func aCompressorsMemoryFollowsItsWindow() {
        func held(_ bits: Int) -> Int {
            let deflater = Deflater(windowBits: bits, resetsEachMessage: false)
            _ = deflater.compress(token(1), allocator: allocator)
            return deflater.heldBytes
        }
        let small = held(9), standard = held(12), full = held(15)
        // zlib holds twice the window plus a window of back-pointers, and a fixed part (hash
        // table and block buffer, small at memory level 1).
        #expect(standard - small == 4 * ((1 << 12) - (1 << 9)))
        #expect(full - standard == 4 * ((1 << 15) - (1 << 12)))
        #expect(standard < 24 * 1024, "\(standard) bytes at 12 bits")
    }
}
