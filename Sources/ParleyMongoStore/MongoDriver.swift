#if canImport(Glibc)
import Glibc
#endif

/// Process-wide facts about the MongoDB C driver.
public enum MongoDriver {
    /// Debian's libmongoc initialises itself when it is loaded, before `main`, and keeps its
    /// statistics in a shared-memory segment named after the pid (`/dev/shm/mongoc-<pid>`) for the
    /// mongoc-stat tool. A process killed with SIGKILL never removes it, and a later process that
    /// is given the same pid finds the name taken and warns on stderr (outside the JSON log).
    /// Removing the name at start-up keeps the mapping the driver already holds and leaves nothing
    /// behind however the process ends. Parley exports its own metrics; nothing reads the segment.
    public static func releaseStatisticsSegment() {
        _ = shm_unlink("/mongoc-\(getpid())")
    }
}
