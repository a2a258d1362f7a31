import ParleyCore
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
