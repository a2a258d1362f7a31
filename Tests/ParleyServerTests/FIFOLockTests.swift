@testable import ParleyServer
import Synchronization
import Testing

@Suite struct FIFOLockTests {
    final class Record<Value: Sendable>: Sendable {
        let value: Mutex<Value>
        init(_ initial: Value) { value = Mutex(initial) }
    }

    @Test func bodiesNeverOverlapAcrossSuspensionPoints() async {
        let lock = FIFOLock()
        let inside = Record((now: 0, most: 0, runs: 0))
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<50 {
                group.addTask {
                    await lock.run {
                        inside.value.withLock {
                            $0.now += 1
                            $0.most = max($0.most, $0.now)
                        }
                        for _ in 0..<3 { await Task.yield() }
                        inside.value.withLock {
                            $0.now -= 1
                            $0.runs += 1
                        }
                    }
                }
            }
        }
        let result = inside.value.withLock { $0 }
        #expect(result.most == 1 && result.runs == 50 && !lock.isBusy)
    }

    @Test func waitersRunInTheOrderTheyCame() async {
        let lock = FIFOLock()
        let order = Record<[Int]>([])
        let (gate, opened) = AsyncStream<Void>.makeStream()
        // The first body holds the lock until the others are queued behind it, in a known order.
        let holder = Task { await lock.run { for await _ in gate { break } } }
        while !lock.isBusy { await Task.yield() }
        var waiters: [Task<Void, Never>] = []
        for n in 1...5 {
            waiters.append(Task { await lock.run { order.value.withLock { $0.append(n) } } })
            while lock.waitingCount < n { await Task.yield() }
        }
        opened.yield()
        await holder.value
        for waiter in waiters { await waiter.value }
        #expect(order.value.withLock { $0 } == [1, 2, 3, 4, 5])
    }
}
