import Testing

@testable import ParleyCore

/// A card's macros as Character Card V3 defines them ("Curly Braced Syntaxes").
@Suite struct MacrosTests {
    let ada = Clone(
        id: "cl_ada", owner: "alice", name: "Ada Lovelace", traits: [], systemPrompt: "", sliders: [:], memory: [], createdAt: 0, updatedAt: 0)

    func expand(_ text: String, user: Persona? = Persona(name: "Ana", description: "A cartographer."), clone: Clone? = nil) -> String {
        PromptAssembler.expand(text, clone ?? ada, user)
    }

    @Test func namesAreFoundInAnyCaseAndOthersStayAsWritten() {
        #expect(expand("{{CHAR}} and {{User}}, {{ user }}; {{Persona}}{{original}}.") == "Ada Lovelace and Ana, Ana; A cartographer..")
        #expect(expand("{{user}}", user: nil) == "User")
        #expect(expand("<BOT> greets <user>.") == "Ada Lovelace greets Ana.")
        #expect(expand("{{setvar::mood::calm}} {{unknown}} {{char") == "{{setvar::mood::calm}} {{unknown}} {{char")
        #expect(expand("{{getvar::{{char}}}}") == "{{getvar::Ada Lovelace}}", "an unknown macro keeps its own, expanded")
        #expect(expand("a { b } {} }} {{") == "a { b } {} }} {{")
    }

    @Test func commentsAndHiddenKeysStandForNothingAndReverseReverses() {
        #expect(expand("Hi{{// a note for {{char}}'s editor}}!{{comment: shown in a client}}{{hidden_key:Rift}}") == "Hi!")
        #expect(expand("{{reverse:Hello, {{user}}}}") == "anA ,olleH")
    }

    @Test func randomIsOneOfItsChoicesEachTimeAndEveryOneComesUp() {
        var seen: Set<String> = []
        for _ in 0..<300 {
            let said = expand("{{random:Hello,Hi {{user}}, Hey\\, you}}")
            #expect(["Hello", "Hi Ana", "Hey, you"].contains(said), "\(said)")
            seen.insert(said)
        }
        #expect(seen.count == 3)
        #expect(Set((0..<100).map { _ in expand("{{random::a, b::c}}") }) == ["a, b", "c"], "SillyTavern's :: form")
        #expect(expand("[{{random:}}]") == "[]" && expand("{{random:one}}") == "one")
    }

    @Test func pickIsTheSameEachTimeForOneCloneAndEachPickHasItsOwn() {
        let text = "{{pick:a,b,c,d,e,f,g,h}}{{pick:a,b,c,d,e,f,g,h}}"
        let first = expand(text)
        #expect((0..<20).allSatisfy { _ in expand(text) == first })
        // Over many clones, each of the eight comes up, and the two picks of one text are not tied.
        var other = ada
        var firsts: Set<Character> = []
        var differ = 0
        for n in 0..<200 {
            other.id = "cl_\(n)"
            let picked = Array(expand(text, clone: other))
            firsts.insert(picked[0])
            if picked[0] != picked[1] { differ += 1 }
        }
        #expect(firsts.count == 8 && differ > 100, "\(firsts) \(differ)")
    }

    @Test func rollIsFromOneToItsSides() {
        var seen: Set<Int> = []
        for _ in 0..<300 {
            let n = Int(expand("{{roll:6}}"))!
            #expect((1...6).contains(n))
            seen.insert(n)
            #expect((1...20).contains(Int(expand("{{roll:D20}}"))!))
        }
        #expect(seen.count == 6)
        #expect(expand("{{roll:0}} {{roll:x}} {{roll:1000000001}}") == "{{roll:0}} {{roll:x}} {{roll:1000000001}}")
        #expect(expand("{{roll:1}}") == "1")
    }

    /// A text of nothing but opening braces, or nested past the limit, costs no more than its
    /// length and keeps what is not a macro.
    @Test func deepOrUnclosedBracesAreLeftAsTheyAre() {
        let deep = String(repeating: "{{reverse:", count: 20) + "ab" + String(repeating: "}}", count: 20)
        let expanded = expand(deep)
        #expect(expanded.contains("ab") || expanded.contains("ba"))
        #expect(expand(String(repeating: "{{", count: 10_000)) == String(repeating: "{{", count: 10_000))
    }
}
