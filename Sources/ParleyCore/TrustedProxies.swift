import Foundation

/// The proxies (a load balancer) whose `X-Forwarded-For` Parley believes, as CIDR blocks; the
/// client's address is then the one the nearest untrusted hop reported, so the per-address
/// limits and the audit log's hashed address are the user's, not the balancer's.
public struct TrustedProxies: Sendable, Equatable {
    /// An address block: `bits` leading bits of `prefix` (16 bytes; IPv4 as IPv4-mapped IPv6).
    public struct Block: Sendable, Equatable {
        var prefix: [UInt8]
        var bits: Int

        func contains(_ address: [UInt8]) -> Bool {
            var left = bits
            for i in 0..<16 where left > 0 {
                let take = min(8, left)
                let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - take))
                if address[i] & mask != prefix[i] & mask { return false }
                left -= take
            }
            return true
        }
    }

    public let blocks: [Block]

    public static let none = TrustedProxies(blocks: [])

    init(blocks: [Block]) { self.blocks = blocks }

    public struct Invalid: Error, Equatable, CustomStringConvertible {
        public var entry: String
        public init(entry: String) { self.entry = entry }
        public var description: String { "'\(entry)' is not an IP address or CIDR block (such as 10.0.0.0/8 or fd00::/8)" }
    }

    /// `list`: comma-separated addresses and CIDR blocks (`10.0.0.0/8, 192.168.1.7, ::1/128`).
    public init(parsing list: String) throws(Invalid) {
        var blocks: [Block] = []
        for raw in list.split(separator: ",") {
            let entry = raw.trimmingCharacters(in: .whitespaces)
            guard !entry.isEmpty else { continue }
            let parts = entry.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count <= 2, let address = Self.address(String(parts[0])) else { throw Invalid(entry: entry) }
            let isV4 = !parts[0].contains(":")
            var bits = 128
            if parts.count == 2 {
                guard let given = Int(parts[1]), given >= 0, given <= (isV4 ? 32 : 128) else { throw Invalid(entry: entry) }
                bits = isV4 ? 96 + given : given
            }
            blocks.append(Block(prefix: address, bits: bits))
        }
        self.blocks = blocks
    }

    public func trusts(_ address: String) -> Bool {
        guard let bytes = Self.address(address) else { return false }
        return blocks.contains { $0.contains(bytes) }
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy; then, reading
    /// `X-Forwarded-For` from the nearest hop back, the first address not trusted (or the
    /// farthest one, when all are). A malformed entry stops the walk at the last address trusted
    /// so far: a client cannot forge its way past a proxy that appended what it saw.
    public func client(peer: String?, forwardedFor headers: [String]) -> String? {
        guard let peer, !blocks.isEmpty, trusts(peer) else { return peer }
        let hops = headers.flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces) }
        var client = peer
        for hop in hops.reversed() {
            guard Self.address(hop) != nil else { break }
            client = hop
            if !trusts(hop) { break }
        }
        return client
    }

    /// 16 bytes for an IPv4 (as `::ffff:a.b.c.d`) or IPv6 address in text, nil if it is neither.
    static func address(_ text: String) -> [UInt8]? {
        if !text.contains(":") {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var bytes = [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF]
            for part in parts {
                guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isASCIIDigit), let value = UInt8(part) else { return nil }
                bytes.append(value)
            }
            return bytes
        }
        // IPv6: up to eight groups, one `::` for a run of zeros, an IPv4 tail allowed; no zone.
        guard !text.contains("%") else { return nil }
        let halves = text.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func groups(_ part: String) -> [UInt8]? {
            guard !part.isEmpty else { return [] }
            var out: [UInt8] = []
            let pieces = part.split(separator: ":", omittingEmptySubsequences: false)
            for (i, piece) in pieces.enumerated() {
                if i == pieces.count - 1, piece.contains(".") {
                    guard let v4 = address(String(piece)) else { return nil }
                    out += v4.suffix(4)
                    continue
                }
                guard !piece.isEmpty, piece.count <= 4, let value = UInt16(piece, radix: 16) else { return nil }
                out += [UInt8(value >> 8), UInt8(value & 0xFF)]
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        if halves.count == 1 { return head.count == 16 ? head : nil }
        guard let tail = groups(halves[1]), head.count + tail.count <= 14 else { return nil }
        return head + [UInt8](repeating: 0, count: 16 - head.count - tail.count) + tail
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { isASCII && isNumber }
}
