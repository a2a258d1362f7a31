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
}
