import Foundation
@testable import ParleyCore
import Testing

/// What `JSONValue.parse` did before `JSONParser`, kept as the reference the parser is checked
/// against: Foundation's JSONDecoder, each value's type guessed in turn.
struct DecodedByFoundation: Decodable {
    let value: JSONValue

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    static func decode(_ text: String) throws -> JSONValue { try JSONDecoder().decode(Self.self, from: Data(text.utf8)).value }

    init(from decoder: any Decoder) throws {
        if let container = try? decoder.container(keyedBy: AnyKey.self) {
            value = .object(try container.allKeys.map { ($0.stringValue, try container.decode(Self.self, forKey: $0).value) })
        } else if var container = try? decoder.unkeyedContainer() {
            var items: [JSONValue] = []
            while !container.isAtEnd { items.append(try container.decode(Self.self).value) }
            value = .array(items)
        } else {
            let single = try decoder.singleValueContainer()
            if single.decodeNil() {
                value = .null
            } else if let b = try? single.decode(Bool.self) {
                value = .bool(b)
            } else if let i = try? single.decode(Int64.self) {
                value = .int(i)
            } else if let d = try? single.decode(Double.self) {
                value = .double(d)
            } else {
                value = .string(try single.decode(String.self))
            }
        }
    }
}

/// The hand-written parser against Foundation's JSONDecoder (what it replaced): the same values
/// for valid texts, an error for every invalid one.
@Suite struct JSONParserTests {
    static let valid = [
        "0", "-0", "1", "-1", "123456789", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
        "999999999999999999", "-999999999999999999", "1000000000000000000", "-1000000000000000000", "99999999999999999999",
        "1.5", "-0.25", "1e3", "1E-3", "2.5e+10", "1.7976931348623157e308", "5e-324",
        "true", "false", "null", "\"\"", " \t\r\n {} \n", "[]", "[[[]]]",
        #""plain""#, #""quote \" backslash \\ slash \/ \b\f\n\r\t""#, #""\u0041\u00e9\u20AC\ud83d\ude00""#, "\"é 😀 \u{2028}\"",
        #"{"a":1,"b":[true,false,null],"c":{"d":"e"},"f":1.5,"g":-7}"#,
        #"{"choices":[{"index":0,"delta":{"content":" Olá"},"finish_reason":null}],"usage":{"prompt_tokens":17}}"#,
        #"[1, "two", {"three": [3.0]}, null]"#, #"{"k":1,"k":2}"#, "\u{FEFF}{}",
    ]

    static let invalid = [
        "", " ", "{", "}", "[", "[1 2]", "{\"a\"}", "{\"a\":}", "{a:1}", "{'a':1}", "01", "-", "+1",
        "1.", ".5", "1e", "1e+", "0x10", "NaN", "Infinity", "-Infinity", "1e400", "tru", "nul", "truex", "\"abc", "\"\\x\"",
        "\"\\u12\"", "\"\\uZZZZ\"", "\"\\ud83d\"", "\"\\ud83d\\u0041\"", "\"\\ude00\"", "\"tab\tinside\"", "\"nl\ninside\"",
        "[1] [2]", "{} x", "{}\u{FEFF}", "[1,,2]", "[,1]", String(repeating: "9", count: 400),
    ]

    @Test(arguments: valid)
    func aValidTextGetsWhatJSONDecoderGot(_ text: String) throws {
        let ours = try JSONValue.parse(Array(text.utf8))
        let foundation = try DecodedByFoundation.decode(text)
        #expect(ours == foundation)
    }

    @Test(arguments: invalid)
    func anInvalidTextIsRefused(_ text: String) {
        #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(Array(text.utf8)) }
        #expect(throws: (any Error).self) { try DecodedByFoundation.decode(text) }
    }

    @Test func bytesThatAreNotUTF8AreRefused() throws {
        for bytes: [UInt8] in [
            [0x22, 0xFF, 0x22], [0x22, 0xC3, 0x22], [0x22, 0xED, 0xA0, 0x80, 0x22], [0x22, 0x5C, 0x6E, 0xC0, 0xAF, 0x22],
            [0x22, 0xEF, 0xBF, 0x41, 0x22], [0x22, 0xF0, 0x9F, 0x98, 0x22],
        ] {
            #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(bytes) }
        }
        // What a repair would put in place of such bytes is itself accepted where it was sent.
        #expect(try JSONValue.parse([0x22, 0xEF, 0xBF, 0xBD, 0x41, 0x22]) == .string("\u{FFFD}A"))
    }

    @Test func numbersKeepTheirKind() throws {
        #expect(try JSONValue.parse(Array("42".utf8)) == .int(42))
        guard case .int = try JSONValue.parse(Array("-9223372036854775808".utf8)) else {
            Issue.record("Int64.min is an int")
            return
        }
        guard case .double(let big) = try JSONValue.parse(Array("9223372036854775808".utf8)) else {
            Issue.record("past Int64")
            return
        }
        #expect(big == 9_223_372_036_854_775_808)
        guard case .double = try JSONValue.parse(Array("1.0".utf8)) else {
            Issue.record("1.0 is a double")
            return
        }
    }

    @Test func aRepeatedKeyKeepsItsFirstValue() throws {
        let value = try JSONValue.parse(Array(#"{"k":1,"j":0,"k":2}"#.utf8))
        #expect(value.serializedString() == #"{"k":1,"j":0}"#)
    }

    /// A JOSE header's reader refuses one instead, nested objects included.
    @Test func aRepeatedKeyCanBeRefused() throws {
        for text in [#"{"k":1,"j":0,"k":2}"#, #"{"a":{"k":1,"k":1}}"#] {
            #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(Array(text.utf8), refusingRepeatedKeys: true) }
        }
        // The error names the key where it comes again, cut short when it is long.
        let long = String(repeating: "x", count: 100)
        let error = #expect(throws: JSONSyntaxError.self) {
            try JSONValue.parse(Array(#"{"\#(long)":1, "\#(long)":2}"#.utf8), refusingRepeatedKeys: true)
        }
        #expect(error == JSONSyntaxError(offset: 107, reason: #"the key "\#(long.prefix(64))…" is repeated"#))
        let distinct = try JSONValue.parse(Array(#"{"alg":"HS256","typ":"JWT","a":{"alg":1}}"#.utf8), refusingRepeatedKeys: true)
        #expect(distinct["alg"] == .string("HS256") && distinct["a"]?["alg"] == .int(1))
    }

    /// Past `JSONParser.scannedMembers` a set finds a repeated key instead of a scan: both ways
    /// keep the first value, and refuse it when asked, whichever earlier key comes again.
    @Test(arguments: [1, 15, 16, 17, 40, 5_000])
    func aRepeatedKeyIsFoundInAnObjectOfAnySize(_ count: Int) throws {
        let members = (0..<count).map { #""k\#($0)":\#($0)"# }
        for repeated in Set([0, count / 2, count - 1]) {
            let text = "{" + (members + [#""k\#(repeated)":-1"#, #""z":0"#]).joined(separator: ",") + "}"
            let value = try JSONValue.parse(Array(text.utf8))
            guard case .object(let pairs) = value else {
                Issue.record("not an object")
                return
            }
            #expect(pairs.count == count + 1, "\(count) keys, k\(repeated) again")
            #expect(value["k\(repeated)"] == .int(Int64(repeated)), "the first value stays")
            #expect(pairs.last?.0 == "z")
            let error = #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(Array(text.utf8), refusingRepeatedKeys: true) }
            #expect(error?.reason == #"the key "k\#(repeated)" is repeated"#)
        }
        let distinct = "{" + members.joined(separator: ",") + "}"
        #expect(try JSONValue.parse(Array(distinct.utf8), refusingRepeatedKeys: true)["k\(count - 1)"] == .int(Int64(count - 1)))
    }

    /// JSONDecoder let these through; RFC 8259 has no trailing comma.
    @Test(arguments: ["[1,]", #"{"a":1,}"#, "[,]"])
    func aTrailingCommaIsRefused(_ text: String) {
        #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(Array(text.utf8)) }
    }

    @Test func nestingStopsAt512Levels() throws {
        let deep = String(repeating: "[", count: 512) + String(repeating: "]", count: 512)
        #expect(throws: Never.self) { try JSONValue.parse(Array(deep.utf8)) }
        let deeper = String(repeating: "[", count: 513) + String(repeating: "]", count: 513)
        #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(Array(deeper.utf8)) }
        let unclosed = String(repeating: "{\"a\":", count: 100_000)
        #expect(throws: JSONSyntaxError.self) { try JSONValue.parse(Array(unclosed.utf8)) }
    }

    @Test func anErrorSaysWhereAndWhy() {
        #expect(throws: JSONSyntaxError(offset: 7, reason: "expected ',' or '}'")) { try JSONValue.parse(Array(#"{"a":1 "b":2}"#.utf8)) }
    }

    /// What a shaped parse must give: the whole value with what `shape` leaves out taken away.
    static func pruned(_ value: JSONValue, _ shape: JSONShape) -> JSONValue {
        guard case .members(let wanted) = shape else { return value }
        switch value {
        case .object(let pairs):
            return .object(pairs.compactMap { key, member in wanted.first { $0.0 == key }.map { (key, pruned(member, $0.1)) } })
        case .array(let items): return .array(items.map { pruned($0, shape) })
        default: return value
        }
    }

    static let shapes: [JSONShape] = [
        .members([]),
        .members([("a", .everything), ("c", .members([("d", .everything)])), ("k", .everything)]),
        .members([("choices", .members([("delta", .members([("content", .everything)])), ("finish_reason", .everything)])), ("usage", .everything)]),
    ]

    @Test(arguments: valid)
    func aShapedParseBuildsWhatItsShapeKeepsOfTheWholeValue(_ text: String) throws {
        let whole = try JSONValue.parse(Array(text.utf8))
        for shape in Self.shapes {
            #expect(try JSONValue.parse(Array(text.utf8), keeping: shape) == Self.pruned(whole, shape), "\(shape)")
        }
    }

    /// A member left out is still checked: whatever makes a text invalid, inside one, fails the
    /// shaped parse with the very error (offset and reason) the whole parse gives.
    @Test func whatAShapeLeavesOutIsCheckedAsStrictly() throws {
        let notUTF8: [[UInt8]] = [[0x22, 0xFF, 0x22], [0x22, 0xED, 0xA0, 0x80, 0x22], [0x22, 0x5C, 0x6E, 0xC0, 0xAF, 0x22]]
        let deep = Array((String(repeating: "[", count: 513) + String(repeating: "]", count: 513)).utf8)
        for inner in Self.invalid.map({ Array($0.utf8) }) + notUTF8 + [deep] {
            let member = Array(#"{"skipped":"#.utf8) + inner + Array("}".utf8)
            let element = Array(#"{"a":1,"skipped":["#.utf8) + inner + Array("]}".utf8)  // valid for an empty inner
            for text in [member, element] {
                var whole: JSONSyntaxError?
                do { _ = try JSONValue.parse(text) } catch { whole = error }
                guard let expected = whole else {
                    #expect(text == element, "\(String(decoding: text, as: UTF8.self)) is invalid")
                    continue
                }
                for shape in Self.shapes {
                    #expect(throws: expected, "\(String(decoding: text, as: UTF8.self))") { try JSONValue.parse(text, keeping: shape) }
                }
            }
        }
    }

    /// A top-level object's member named to stop at ends the read: what follows is not read or
    /// checked. Anywhere else the name is an ordinary key, or string, and a text without it is
    /// read and checked whole.
    @Test func aReadStopsAtTheTopLevelMemberItIsToldTo() throws {
        func read(_ text: String, _ shape: JSONShape = .everything) throws(JSONSyntaxError) -> JSONValue {
            try JSONValue.parse(Array(text.utf8), keeping: shape, stoppingAt: "card")
        }
        #expect(try read(#" {"a": 1, "b": [true], "card": [not json"#) == .object([("a", .int(1)), ("b", .array([.bool(true)]))]))
        #expect(try read(#"{"card": {}} trailing"#) == .object([]))
        #expect(try read(#"{"a": 1, "card" x"#, .members([("b", .everything)])) == .object([]))
        let nested = #"{"a": {"card": 2}, "b": "card", "c": ["card"]}"#
        #expect(try read(nested) == (try JSONValue.parse(Array(nested.utf8))))
        #expect(throws: JSONSyntaxError(offset: 10, reason: "unexpected character")) { try read(#"{"a": [1, }, "card": 1}"#) }
        #expect(throws: JSONSyntaxError(offset: 9, reason: "unexpected text after the value")) { try read(#"{"a": 1} x"#) }
        #expect(throws: JSONSyntaxError(offset: 9, reason: "expected a key in quotes")) { try read(#"{"a": 1, card: 1}"#) }
        #expect(try read("[1]") == .array([.int(1)]))
    }

    @Test func aNonContiguousSequenceParsesToo() throws {
        let bytes = #"{"a":[1,2]}"#.utf8.lazy.map { $0 }
        #expect(try JSONValue.parse(bytes) == .object([("a", .array([.int(1), .int(2)]))]))
    }
}
