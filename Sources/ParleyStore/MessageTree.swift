import ParleyCore

/// A conversation's messages as a tree, built from what a store keeps of each, oldest first: its
/// id and its parent as stored: an id, "" for none (the first message, or an alternative to it),
/// or nil when not recorded (messages stored before #24, when a conversation was one line: its
/// parent is the message before it).
public struct MessageTree: Sendable {
    private var parents: [String: String] = [:]
    /// Each message's children, oldest first.
    private var children: [String: [String]] = [:]

    public init(_ nodes: some Sequence<(id: String, parent: String?)>) {
        var previous = ""
        for node in nodes {
            let parent = node.parent ?? previous
            parents[node.id] = parent
            children[parent, default: []].append(node.id)
            previous = node.id
        }
    }

    /// Its parent ("" for a first message); nil when there is no such message.
    public func parent(of id: String) -> String? { parents[id] }

    /// `id` and every message below it (its children, theirs…); empty when there is no such message.
    public func subtree(of id: String) -> [String] {
        guard parents[id] != nil else { return [] }
        var out: [String] = []
        var pending = [id]
        while let next = pending.popLast() {
            out.append(next)
            pending += children[next] ?? []
        }
        return out
    }

    /// Where the path goes once the messages `removed` are gone: through their parent `parent`
    /// when it is still there, else through the newest first message; nil when none is left.
    public func pathAfterRemoving(_ removed: Set<String>, parent: String) -> [String]? {
        if !parent.isEmpty, parents[parent] != nil, !removed.contains(parent) { return path(through: parent, without: removed) }
        guard let first = children[""]?.last(where: { !removed.contains($0) }) else { return nil }
        return path(through: first, without: removed)
    }

    /// The path through `id`: its ancestors (up to the first, or to one the retention purge
    /// deleted), it, then from it on each newest child. Nil when there is no such message.
    public func path(through id: String) -> [String]? { path(through: id, without: []) }

    private func path(through id: String, without removed: Set<String>) -> [String]? {
        guard parents[id] != nil else { return nil }
        var ancestors: [String] = []
        var at = id
        while let parent = parents[at], parents[parent] != nil, ancestors.count < parents.count {
            ancestors.append(parent)
            at = parent
        }
        var path = Array(ancestors.reversed()) + [id]
        at = id
        while let newest = children[at]?.last(where: { !removed.contains($0) }), path.count <= parents.count {
            path.append(newest)
            at = newest
        }
        return path
    }
}

extension MessageTree {
    /// Where each message stands among its parent's children (`siblings`, by parent, oldest
    /// first). A message whose parent was not recorded was the only one.
    public static func alternatives(_ messages: [(id: String, parent: String?)], siblings: [String: [String]]) -> [String: Alternatives] {
        var out: [String: Alternatives] = [:]
        for message in messages {
            guard let parent = message.parent, let group = siblings[parent], let index = group.firstIndex(of: message.id) else {
                out[message.id] = .only(message.id)
                continue
            }
            out[message.id] = Alternatives(siblings: group, index: index)
        }
        return out
    }
}
