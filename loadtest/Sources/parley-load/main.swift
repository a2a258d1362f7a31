// parley-load: Parley's load-test client. Its scenarios (chat, debate, translation, idle,
// schedule) and measurements arrive with the load-test issue; until then it says so and fails,
// so nothing can mistake it for a benchmark.
#if canImport(Glibc)
import Glibc
#else
import Darwin
#endif

let message = Array("parley-load: no scenarios yet; see loadtest/README.md\n".utf8)
_ = message.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
exit(64)
