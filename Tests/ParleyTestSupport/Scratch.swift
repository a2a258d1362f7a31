import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Files the tests write (data directories, SQLite files, sidecar logs) go under one directory
/// of this test process, removed when it exits; one a killed run left behind is removed by the
/// next. (Each run left some hundred megabytes in the system's temporary directory.)
public enum Scratch {
    private static let prefix = "parley-tests-"

    /// This process's directory, made (and its dead predecessors' removed) on first use.
    private static let root: String = {
        let temporary = FileManager.default.temporaryDirectory.path
        for name in (try? FileManager.default.contentsOfDirectory(atPath: temporary)) ?? [] where name.hasPrefix(prefix) {
            if let pid = Int32(name.dropFirst(prefix.count)), kill(pid, 0) != 0, errno == ESRCH {
                try? FileManager.default.removeItem(atPath: temporary + "/" + name)
            }
        }
        let root = temporary + "/" + prefix + "\(getpid())"
        try! FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        atexit { try? FileManager.default.removeItem(atPath: Scratch.root) }
        return root
    }()

    /// A new path named after `label`, not yet made.
    public static func path(_ label: String, suffix: String = "") -> String {
        root + "/\(label)-\(UUID().uuidString)\(suffix)"
    }

    /// A new, empty directory named after `label`.
    public static func directory(_ label: String) -> String {
        let path = path(label)
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}
