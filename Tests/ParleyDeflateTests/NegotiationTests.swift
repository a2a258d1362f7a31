import ParleyDeflate
import Testing

@Suite struct NegotiationTests {
    let settings = DeflateSettings(windowBits: 12)

    func agree(_ offers: String...) -> DeflateAgreement? {
        PerMessageDeflate.negotiate(offers: offers, settings: settings)
    }

    @Test func aPlainOfferGetsTheServersWindowAndNoClientContextTakeover() throws {
        let agreement = try #require(agree("permessage-deflate"))
        #expect(agreement.serverWindowBits == 12)
        #expect(!agreement.serverNoContextTakeover)
        #expect(agreement.responseHeader == "permessage-deflate; client_no_context_takeover; server_max_window_bits=12")
    }

    @Test func aFullWindowIsNotAnnounced() throws {
        let agreement = try #require(PerMessageDeflate.negotiate(offers: ["permessage-deflate"], settings: DeflateSettings(windowBits: 15)))
        #expect(agreement.responseHeader == "permessage-deflate; client_no_context_takeover")
    }

    @Test func serverNoContextTakeoverIsHonouredAndEchoed() throws {
        let agreement = try #require(agree("permessage-deflate; server_no_context_takeover"))
        #expect(agreement.serverNoContextTakeover)
        #expect(agreement.responseHeader.contains("server_no_context_takeover"))
    }

    @Test func theServerWindowIsTheSmallerOfOfferAndSettings() throws {
        #expect(try #require(agree("permessage-deflate; server_max_window_bits=10")).serverWindowBits == 10)
        #expect(try #require(agree("permessage-deflate; server_max_window_bits=15")).serverWindowBits == 12)
        #expect(try #require(agree("permessage-deflate; server_max_window_bits=\"9\"")).serverWindowBits == 9)
    }

    @Test func anEightBitWindowIsDeclinedAndTheNextOfferTaken() throws {
        #expect(agree("permessage-deflate; server_max_window_bits=8") == nil)
        let agreement = try #require(agree("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_no_context_takeover"))
        #expect(agreement.serverNoContextTakeover && agreement.serverWindowBits == 12)
    }

    @Test func clientMaxWindowBitsMayComeWithOrWithoutAValue() {
        #expect(agree("permessage-deflate; client_max_window_bits") != nil)
        #expect(agree("permessage-deflate; client_max_window_bits=9") != nil)
        #expect(agree("permessage-deflate; client_max_window_bits=16") == nil)
    }

    @Test(arguments: [
        "permessage-deflate; bogus",  // unknown parameter
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",  // repeated
        "permessage-deflate; server_no_context_takeover=1",  // value where none belongs
        "permessage-deflate; client_no_context_takeover=yes",
        "permessage-deflate; server_max_window_bits",  // value required
        "permessage-deflate; server_max_window_bits=010",  // leading zero
        "permessage-deflate; server_max_window_bits=+9",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=\"1 0\"",  // a quoted non-token
        "permessage-deflate; =9",
        "x-webkit-deflate-frame",  // another extension
    ])
    func badOrForeignOffersAreDeclined(offer: String) {
        #expect(agree(offer) == nil)
    }

    @Test func offersSpreadOverHeaderLinesAreReadInOrder() throws {
        let agreement = try #require(agree("x-foo; a=\"b,c\"", "permessage-deflate; bogus", "permessage-deflate; server_max_window_bits=11"))
        #expect(agreement.serverWindowBits == 11)
    }

    @Test func spacingAndCaseAreTolerated() throws {
        let agreement = try #require(agree("  Permessage-Deflate ;Server_No_Context_Takeover ;  client_max_window_bits  "))
        #expect(agreement.serverNoContextTakeover)
    }
}
