/// Who a user is to their clones (SillyTavern's "persona"): the name `{{user}}` stands for in a
/// card and a prompt, and what the clone knows of them. A user without one is "User" and the
/// prompt says nothing about them.
public struct Persona: Sendable, Equatable {
    public static let maxNameLength = 50
    public static let maxDescriptionLength = 2_000
    /// What `{{user}}` stands for when a user set no persona.
    public static let defaultName = "User"

    /// One line, 1–50 characters, trimmed.
    public var name: String
    /// Up to 2,000 characters, trimmed; may be empty.
    public var description: String

    public init(name: String, description: String = "") {
        self.name = name
        self.description = description
    }

    /// A `PUT /v1/me/persona` body: `{"name", "description"?}`.
    public static func parse(_ body: JSONValue) throws(ValidationError) -> Persona {
        var reader = try JSONObjectReader(body)
        let name = try reader.requiredString("name").trimmedWhitespace
        let description = (try reader.string("description") ?? "").trimmedWhitespace
        try reader.rejectUnknown()
        guard !name.isEmpty, name.fits(characters: maxNameLength), !name.contains(where: { $0.isNewline || $0.isControl }) else {
            throw ValidationError("'name' must be one line of 1-\(maxNameLength) characters")
        }
        guard description.fits(characters: maxDescriptionLength) else {
            throw ValidationError("'description' is longer than \(maxDescriptionLength) characters")
        }
        return Persona(name: name, description: description)
    }

    public var json: JSONValue { .object([("name", .string(name)), ("description", .string(description))]) }
}

extension Character {
    fileprivate var isControl: Bool { unicodeScalars.contains { $0.properties.generalCategory == .control } }
}
