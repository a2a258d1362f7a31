import Foundation
import ParleyCore
import Testing

@Suite struct JSONTests {
    @Test(arguments: ["plain", "quote \" backslash \\ slash /", "control \u{01}\u{1F} tab\t nl\n cr\r", "unicode é 😀 \u{2028}"])
    func stringsSurviveARoundTripThroughFoundation(_ text: String) throws {
        let bytes = JSONValue.object([("s", .string(text))]).serialized()
        let decoded = try JSONDecoder().decode([String: String].self, from: Data(bytes))
        #expect(decoded["s"] == text)
    }

    @Test func parseAndSerializeKeepValues() throws {
        let text = #"{"a":1,"b":[true,false,null],"c":{"d":"e"},"f":1.5,"g":-7}"#
        let value = try JSONValue.parse(Array(text.utf8))
        #expect(value["a"] == .int(1))
        #expect(value["f"] == .double(1.5))
        #expect(try JSONValue.parse(value.serialized()) == value)
    }

    @Test func objectWriterKeepsInsertionOrder() {
        let value = JSONValue.object([("z", .int(1)), ("a", .int(2))])
        #expect(value.serializedString() == #"{"z":1,"a":2}"#)
    }
}
