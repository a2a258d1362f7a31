import ParleyCore
import Testing

@Suite struct TrustedProxiesTests {
    let proxies = try! TrustedProxies(parsing: "10.0.0.0/8, 192.168.1.7 ,fd00::/8,::1")

    @Test func addressesAndBlocksOfBothFamiliesAreTrustedByPrefix() throws {
        #expect(proxies.trusts("10.200.3.4") && proxies.trusts("192.168.1.7") && proxies.trusts("fd12:3456::1") && proxies.trusts("::1"))
        #expect(!proxies.trusts("11.0.0.1") && !proxies.trusts("192.168.1.8") && !proxies.trusts("fe80::1") && !proxies.trusts("::2"))
        #expect(!proxies.trusts("not an address") && !proxies.trusts("10.0.0.256") && !proxies.trusts("1::2::3"))
        #expect(try TrustedProxies(parsing: "::ffff:10.0.0.0/104").trusts("10.1.2.3"), "an IPv4-mapped block covers IPv4")
        let everyIPv4 = try TrustedProxies(parsing: "0.0.0.0/0")
        #expect(everyIPv4.trusts("203.0.113.9") && !everyIPv4.trusts("2001:db8::1"))
    }

    @Test func badEntriesAreRefusedByName() throws {
        for entry in ["10.0.0.0/33", "10.0.0/8", "fd00::/129", "nope", "10.0.0.1/x", "1.2.3.4/8/9"] {
            #expect(throws: TrustedProxies.Invalid(entry: entry)) { try TrustedProxies(parsing: "127.0.0.1, " + entry) }
        }
        #expect(try TrustedProxies(parsing: " , ").blocks.isEmpty)
    }

    @Test func theClientIsTheNearestUntrustedHop() {
        // An untrusted peer's header is not believed.
        #expect(proxies.client(peer: "203.0.113.9", forwardedFor: ["198.51.100.1"]) == "203.0.113.9")
        // A trusted peer: the rightmost untrusted address, across several headers.
        #expect(proxies.client(peer: "10.0.0.2", forwardedFor: ["198.51.100.1"]) == "198.51.100.1")
        #expect(proxies.client(peer: "10.0.0.2", forwardedFor: ["1.1.1.1, 198.51.100.1", "10.3.3.3"]) == "198.51.100.1")
        // What a client wrote before the proxies' own entries does not move it.
        #expect(proxies.client(peer: "10.0.0.2", forwardedFor: ["forged, 203.0.113.7"]) == "203.0.113.7")
        // A malformed hop behind trusted ones stops the walk at the last trusted address.
        #expect(proxies.client(peer: "10.0.0.2", forwardedFor: ["203.0.113.7, garbage, 10.4.4.4"]) == "10.4.4.4")
        // All trusted: the farthest; no header: the peer.
        #expect(proxies.client(peer: "::1", forwardedFor: ["fd00::5, 10.1.1.1"]) == "fd00::5")
        #expect(proxies.client(peer: "10.0.0.2", forwardedFor: []) == "10.0.0.2")
        #expect(TrustedProxies.none.client(peer: "10.0.0.2", forwardedFor: ["198.51.100.1"]) == "10.0.0.2")
    }
}
