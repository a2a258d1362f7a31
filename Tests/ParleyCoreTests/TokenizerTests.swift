@testable import ParleyCore
import Testing

@Suite struct TokenizerTests {
    @Test(arguments: [
        "Hello, world!",
        "  two  spaces and\nnewlines\r\n",
        "supercalifragilistic words split",
        "emoji 👩‍👩‍👧 and accents: café naïve",
        "",
        "日本語のテキスト",
    ])
    func tokensJoinBackToTheText(_ text: String) {
        let tokens = Tokenizer.tokens(text)
        #expect(tokens.joined() == text)
        #expect(Tokenizer.count(text) == tokens.count)
    }

    @Test func wordsTakeOneLeadingSpaceAndPunctuationStandsAlone() {
        #expect(Tokenizer.tokens("Hi there, you.") == ["Hi", " there", ",", " you", "."])
    }

    @Test func longWordsAreSplitAtTheMaximumLength() {
        let tokens = Tokenizer.tokens("abcdefghijklmnopq")
        #expect(tokens == ["abcdefgh", "ijklmnop", "q"])
    }

    @Test func aGraphemeClusterIsNeverSplit() {
        let family = "👩‍👩‍👧"
        #expect(Tokenizer.tokens(family) == [Substring(family)])
    }

    /// The simulated provider counts its reply sentence by sentence; that is exact only because
    /// counting is additive across "…." + " Word…" boundaries. Checked on random sentences.
    @Test func countingIsAdditiveAfterPunctuationBeforeASpaceAndAWord() {
        var rng = SplitMix64(seed: 7)
        let words = ["a", "sea", "Harbour", "extraordinarily", "42", "naïve", "café", "x1y2"]
        for _ in 0..<500 {
            func sentence() -> String {
                let n = 1 + Int(rng.next() % 6)
                return (0..<n).map { _ in words[Int(rng.next() % UInt64(words.count))] }.joined(separator: " ") + (rng.next() % 2 == 0 ? "." : "?")
            }
            let text = sentence()
            let piece = " " + sentence()
            #expect(Tokenizer.count(text + piece) == Tokenizer.count(text) + Tokenizer.count(piece), "\(text)|\(piece)")
        }
    }
}

/// ASCII text is tokenized on its bytes: the same tokens as the character path gives it.
@Suite struct ASCIITokenizerTests {
    @Test func theByteAndCharacterPathsAgreeOnASCIIText() {
        let alphabet = Array("aZ09 .,!?'\r\n\t-xyzQW  \r\r\n\n".utf8)
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for length in 0..<400 {
            var bytes: [UInt8] = []
            for _ in 0..<length {
                state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                bytes.append(alphabet[Int(state >> 33) % alphabet.count])
            }
            let text = String(decoding: bytes, as: UTF8.self)
            var fast: [Substring] = []
            var slow: [Substring] = []
            Tokenizer.forEachASCIIToken(text) { fast.append($0) }
            Tokenizer.forEachTokenByCharacter(text) { slow.append($0) }
            #expect(fast == slow, "\(Array(text.utf8))")
            #expect(fast.joined() == text)
        }
        var crlf: [Substring] = []
        Tokenizer.forEachASCIIToken("a\r\nb") { crlf.append($0) }
        #expect(crlf == ["a", "\r\n", "b"])
    }
}
