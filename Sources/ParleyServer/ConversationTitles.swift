import NIOCore
import ParleyCore
import ParleyLLM
import ParleyStore

/// A new conversation's title (#24): once its first reply is stored, the clone's model writes a
/// few words for it, metered as feature `title` like any generation (its prompt charged first,
/// its output settled). The first line of the user's message, cleaned, stays the title when the
/// model fails, writes nothing usable or the user cannot pay; a title the user set meanwhile is
/// never replaced. The user's sockets get `conversation.title`.
struct ConversationTitles: Sendable {
    let streams: StreamRunner
    let store: any Store
    let ids: IDGenerator
    let configuration: ServerConfiguration
    /// At most this many tokens of title.
    static let maxTokens = 16

    func title(_ conversation: Conversation, clone: Clone, message: Message, reply: Message) async {
        let messages = [
            PromptMessage(role: .system, text: "You name conversations. Answer with a title of at most six words and nothing else."),
            PromptMessage(
                role: .user, text: "Name this conversation.\n\nUser: \(message.text.prefix(1_000))\n\(clone.name): \(reply.text.prefix(1_000))"),
        ]
        let request = CompletionRequest(model: configuration.model(for: clone), messages: messages, maxOutputTokens: Self.maxTokens)
        // Nil when the user cannot pay or the model failed: the first line stays.
        guard
            let text = await streams.generateQuietly(
                request, payer: conversation.owner, conversation: conversation.id, feature: .title, stream: ids.make(.stream))
        else { return }
        let title = Self.clean(text)
        guard !title.isEmpty,
            // Only while it still has the title it was given: a rename wins.
            (try? await store.conversation(id: conversation.id, owner: conversation.owner))??.title == conversation.title,
            let renamed = try? await store.renameConversation(id: conversation.id, owner: conversation.owner, title: title)
        else { return }
        streams.broker.publish(
            ByteBufferAllocator().buffer(bytes: ServerFrame.conversationTitle(conversation: renamed.id, title: renamed.title)),
            to: .user(conversation.owner))
    }

    /// A title from free text: its first line, without markdown marks or quotes around it,
    /// spaces collapsed, a closing "." or ":" dropped, at most 60 characters cut at a word. ASCII
    /// text (the usual message) in one pass over its bytes: Character by Character (a grapheme
    /// break and a property lookup each) it took ~15 µs of a new conversation's request (#26).
    static func clean(_ text: String) -> String {
        guard text.utf8.allSatisfy({ $0 < 0x80 }) else { return cleanByCharacter(text) }
        var title: [UInt8] = []
        var (lineStarted, space, lastWord) = (false, false, 0)
        for byte in text.utf8 {
            if byte == 0x20 || (0x09...0x0D).contains(byte) {
                if lineStarted, (0x0A...0x0D).contains(byte) { break }
                space = !title.isEmpty
                continue
            }
            lineStarted = true
            if asciiMarks.contains(byte) { continue }
            if space {
                title.append(0x20)
                (space, lastWord) = (false, title.count)
            }
            title.append(byte)
        }
        if let last = title.last, last == UInt8(ascii: ".") || last == UInt8(ascii: ":"), title.count - lastWord > 1 { title.removeLast() }
        guard title.count > 60 else { return String(decoding: title, as: UTF8.self) }
        var cut = title[..<59]
        if let space = cut.lastIndex(of: 0x20) { cut = cut[..<space] }
        return String(decoding: cut, as: UTF8.self) + "…"
    }

    /// Marks a title leaves out; those that are ASCII, as bytes.
    private static let marks = "#*`_>\"“”"
    private static let asciiMarks = marks.utf8.filter { $0 < 0x80 }

    /// `clean` for any text (and the reference its ASCII pass is tested against).
    static func cleanByCharacter(_ text: String) -> String {
        let line = text.trimmedWhitespace.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        let unmarked = line.filter { !marks.contains($0) }
        var words = unmarked.split(whereSeparator: \.isWhitespace).map(String.init)
        if let last = words.last, last.count > 1, [".", ":"].contains(last.last) { words[words.count - 1] = String(last.dropLast()) }
        var title = words.joined(separator: " ")
        guard title.count > 60 else { return title }
        title = String(title.prefix(59))
        if let space = title.lastIndex(of: " ") { title = String(title[..<space]) }
        return title + "…"
    }
}
