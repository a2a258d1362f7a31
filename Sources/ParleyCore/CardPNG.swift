/// Character cards embedded in PNG images: the card is base64 JSON in a `tEXt` (or uncompressed
/// `iTXt`) chunk with the keyword `ccv3` (V3) or `chara` (V2); V3 wins when both are there.
public enum CardPNG {
    static let signature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]

    public static func isPNG(_ bytes: some Collection<UInt8>) -> Bool { bytes.starts(with: signature) }

    /// The card JSON a PNG carries.
    public static func card(in bytes: [UInt8]) throws(ValidationError) -> JSONValue {
        let texts = try textChunks(in: bytes)
        guard let encoded = texts["ccv3"] ?? texts["chara"] else {
            throw ValidationError("the PNG carries no character card (no 'chara' or 'ccv3' text chunk)")
        }
        let trimmed = encoded.filter { !$0.isWhitespace }
        guard let decoded = Data(base64Encoded: trimmed) else { throw ValidationError("the PNG's card is not valid base64") }
        do {
            // As strict as a card sent as JSON (`HTTPRequest.json`): a member named twice is refused.
            return try JSONValue.parse(decoded, refusingRepeatedKeys: true)
        } catch {
            throw ValidationError("the PNG's card is not valid JSON: \(error.explanation)")
        }
    }

    /// Keyword → text of every `tEXt` and uncompressed `iTXt` chunk, each chunk's CRC checked.
    static func textChunks(in bytes: [UInt8]) throws(ValidationError) -> [String: String] {
        guard isPNG(bytes) else { throw ValidationError("not a PNG image") }
        var texts: [String: String] = [:]
        var at = signature.count
        while at < bytes.count {
            guard bytes.count - at >= 12 else { throw ValidationError("the PNG is truncated") }
            let length = Int(bytes[at]) << 24 | Int(bytes[at + 1]) << 16 | Int(bytes[at + 2]) << 8 | Int(bytes[at + 3])
            guard length <= 0x7FFF_FFFF, bytes.count - at - 12 >= length else { throw ValidationError("the PNG is truncated") }
            let type = bytes[(at + 4)..<(at + 8)]
            let data = bytes[(at + 8)..<(at + 8 + length)]
            let stored = bytes[(at + 8 + length)..<(at + 12 + length)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            guard crc32(bytes[(at + 4)..<(at + 8 + length)]) == stored else {
                throw ValidationError("the PNG is corrupt (a chunk's CRC does not match)")
            }
            if type.elementsEqual("tEXt".utf8), let zero = data.firstIndex(of: 0) {
                texts[latin1(data[..<zero])] = latin1(data[(zero + 1)...])
            } else if type.elementsEqual("iTXt".utf8), let zero = data.firstIndex(of: 0), zero + 2 < data.endIndex,
                data[zero + 1] == 0
            {  // compression flag 0: the text is stored as is
                // keyword \0 flag method language \0 translated keyword \0 text (UTF-8)
                let afterMethod = zero + 3
                if let languageEnd = data[afterMethod...].firstIndex(of: 0), let translatedEnd = data[(languageEnd + 1)...].firstIndex(of: 0) {
                    texts[latin1(data[..<zero])] = String(decoding: data[(translatedEnd + 1)...], as: UTF8.self)
                }
            }
            if type.elementsEqual("IEND".utf8) { break }
            at += 12 + length
        }
        return texts
    }

    static func latin1(_ bytes: ArraySlice<UInt8>) -> String {
        String(String.UnicodeScalarView(bytes.map { Unicode.Scalar($0) }))
    }

    private static let table: [UInt32] = (0..<256).map { n in
        (0..<8).reduce(UInt32(n)) { c, _ in c & 1 == 1 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
    }

    /// CRC-32 as PNG defines it (ISO 3309).
    static func crc32(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        ~bytes.reduce(UInt32.max) { table[Int(($0 ^ UInt32($1)) & 0xFF)] ^ ($0 >> 8) }
    }

    /// A minimal valid PNG (one transparent pixel) carrying `chunks` as `tEXt` before IEND: how
    /// tests and tools make a card image.
    public static func make(text chunks: [(keyword: String, text: String)]) -> [UInt8] {
        func chunk(_ type: String, _ data: [UInt8]) -> [UInt8] {
            let body = Array(type.utf8) + data
            let crc = crc32(body[...])
            return withUnsafeBytes(of: UInt32(data.count).bigEndian, Array.init) + body + withUnsafeBytes(of: crc.bigEndian, Array.init)
        }
        let header: [UInt8] = [0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0]  // 1×1, 8-bit RGBA
        // zlib stream of one scanline (filter 0 + 4 zero bytes), stored uncompressed.
        let idat: [UInt8] = [0x78, 0x01, 0x01, 0x05, 0x00, 0xFA, 0xFF, 0, 0, 0, 0, 0, 0x00, 0x05, 0x00, 0x01]
        var out = signature + chunk("IHDR", header)
        for (keyword, text) in chunks { out += chunk("tEXt", Array(keyword.utf8) + [0] + Array(text.utf8)) }
        return out + chunk("IDAT", idat) + chunk("IEND", [])
    }
}
