import Foundation
import ParleyCore

/// Where `parley serve` reads its options, later sources winning: a JSON config file
/// (`--config FILE`, or env `PARLEY_CONFIG`), then environment variables `PARLEY_<OPTION>`
/// (`PARLEY_MAX_MESSAGE_BYTES=65536`, `PARLEY_WS_DEFLATE=false`), then the command line. Every
/// option can come from any of them; each source is turned into command-line arguments placed
/// before the real ones, so ArgumentParser validates them all alike (the last value of an option
/// wins).
struct ConfigSources {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// An option of `parley serve`: its long name and whether it is a flag (no value).
    struct Known {
        var name: String
        var isFlag: Bool
    }

    let known: [String: Known]

    /// The options of `Serve` (and the option groups it includes), read from their property
    /// wrappers: ArgumentParser names a property `maxMessageBytes` `--max-message-bytes`.
    static func of(_ definitions: [any Any]) -> ConfigSources {
        var known: [String: Known] = [:]
        for definition in definitions {
            for child in Mirror(reflecting: definition).children {
                guard let label = child.label, label.hasPrefix("_") else { continue }
                let kind = String(describing: type(of: child.value))
                guard kind.hasPrefix("Option<") || kind.hasPrefix("Flag<") else { continue }
                let name = kebab(String(label.dropFirst()))
                known[name] = Known(name: name, isFlag: kind.hasPrefix("Flag<"))
            }
        }
        return ConfigSources(known: known)
    }

    static func kebab(_ camel: String) -> String {
        var out = ""
        var previous: Character?
        for character in camel {
            if character.isUppercase, let previous, previous.isLowercase || previous.isNumber { out.append("-") }
            out.append(Character(character.lowercased()))
            previous = character
        }
        return out
    }

    static func environmentName(_ option: String) -> String {
        "PARLEY_" + option.uppercased().replacing("-", with: "_")
    }

    /// The arguments of `serve` with the config file's and the environment's options before them.
    /// `invertible` tells whether a flag has a `--no-` form, for a `false` value. An empty
    /// variable counts as unset.
    func expand(_ arguments: [String], environment: [String: String], invertible: (String) -> Bool) throws(Failure) -> Expanded {
        var path = environment["PARLEY_CONFIG"].flatMap { $0.isEmpty ? nil : $0 }
        if let index = arguments.lastIndex(where: { $0 == "--config" || $0.hasPrefix("--config=") }) {
            if arguments[index] == "--config" {
                guard index + 1 < arguments.count else { throw Failure(description: "--config needs a file") }
                path = arguments[index + 1]
            } else {
                path = String(arguments[index].dropFirst("--config=".count))
            }
        }
        var fromFile: [String] = []
        if let path { fromFile = try file(path, invertible: invertible) }
        var fromEnvironment: [String] = []
        // A flag the environment turns off that has no --no- form: the file's --flag must go.
        var switchedOff: Set<String> = []
        for option in known.values.sorted(by: { $0.name < $1.name }) where option.name != "config" {
            let variable = Self.environmentName(option.name)
            guard let value = environment[variable], !value.isEmpty else { continue }
            if option.isFlag {
                guard let on = Self.boolean(value) else {
                    throw Failure(description: "\(variable)=\(value): a flag's value is true or false (or 1/0, yes/no)")
                }
                fromEnvironment += flag(option.name, on, invertible: invertible)
                if !on { switchedOff.insert("--\(option.name)") }
            } else {
                fromEnvironment.append(Self.valued(option.name, value))
            }
        }
        fromFile.removeAll { switchedOff.contains($0) }
        var origins: [String] = []
        if let path, !fromFile.isEmpty { origins.append("from \(path): " + Self.options(in: fromFile).joined(separator: " ")) }
        if !fromEnvironment.isEmpty { origins.append("from the environment: " + Self.options(in: fromEnvironment).joined(separator: " ")) }
        return Expanded(arguments: fromFile + fromEnvironment + arguments, origins: origins)
    }

    /// The arguments to parse, and where the ones not typed on the command line came from.
    struct Expanded {
        var arguments: [String]
        var origins: [String]
    }

    private static func options(in arguments: [String]) -> [String] {
        arguments.filter { $0.hasPrefix("--") }.map { String($0.prefix { $0 != "=" }) }
    }

    /// An option with its value as one argument: a value that starts with "-" (a negative
    /// number) would otherwise be read as the next option, and the option as missing its value.
    private static func valued(_ name: String, _ value: String) -> String { "--\(name)=\(value)" }

    private func file(_ path: String, invertible: (String) -> Bool) throws(Failure) -> [String] {
        guard let data = FileManager.default.contents(atPath: path) else { throw Failure(description: "\(path): cannot be read") }
        // An option named twice is refused, not settled by its first value: an operator who adds
        // a line at the end expects it to count, as most configuration formats would.
        let parsed: JSONValue
        do {
            parsed = try JSONValue.parse(Array(data), refusingRepeatedKeys: true)
        } catch {
            throw Failure(description: "\(path): not valid JSON: \(error.explanation)")
        }
        guard case .object(let members) = parsed else {
            throw Failure(description: "\(path): must be a JSON object of option names (without the leading --) to values")
        }
        var out: [String] = []
        var named: Set<String> = []
        for (key, value) in members {
            let name = key.hasPrefix("--") ? String(key.dropFirst(2)) : key
            guard let option = known[name], name != "config" else {
                let near = known.keys.filter { Self.distance($0, name) <= 2 }.sorted()
                throw Failure(
                    description: "\(path): unknown option '\(key)'" + (near.isEmpty ? "" : " (did you mean \(near.joined(separator: ", "))?)"))
            }
            guard named.insert(name).inserted else { throw Failure(description: "\(path): option '\(name)' is given twice") }
            switch (option.isFlag, value) {
            case (_, .null):
                continue
            case (true, .bool(let on)):
                out += flag(name, on, invertible: invertible)
            case (true, _):
                throw Failure(description: "\(path): '\(key)' is a flag: give true or false")
            case (false, .string(let text)):
                out.append(Self.valued(name, text))
            case (false, .int(let number)):
                out.append(Self.valued(name, String(number)))
            case (false, .double(let number)):
                out.append(Self.valued(name, String(number)))
            case (false, .array(let items)):
                let texts = items.compactMap { if case .string(let text) = $0 { text } else { nil } }
                guard texts.count == items.count else { throw Failure(description: "\(path): '\(key)' as a list holds strings only") }
                out.append(Self.valued(name, texts.joined(separator: ",")))
            case (false, _):
                throw Failure(description: "\(path): '\(key)' needs a string, a number or a list of strings")
            }
        }
        return out
    }

    private func flag(_ name: String, _ on: Bool, invertible: (String) -> Bool) -> [String] {
        if on { return ["--\(name)"] }
        if invertible(name) { return ["--no-\(name)"] }
        return []  // off is every such flag's default
    }

    /// Levenshtein distance, for suggesting the option a misspelt key meant.
    static func distance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        var previous = Array(0...b.count)
        for (i, x) in a.enumerated() {
            var current = [i + 1]
            for (j, y) in b.enumerated() {
                current.append(Swift.min(previous[j + 1] + 1, current[j] + 1, previous[j] + (x == y ? 0 : 1)))
            }
            previous = current
        }
        return previous[b.count]
    }

    static func boolean(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "1", "true", "yes", "on": true
        case "0", "false", "no", "off": false
        default: nil
        }
    }
}
