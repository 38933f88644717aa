// The reducer the parts of one process meet at (batch-norm statistics): many sums in a row, parts
// that run at different speeds, the same result on every part and in part order.
import Foundation
import Testing
@testable import TandemCore

@Test(arguments: [2, 3])
func partReducerSumsEveryCallOnEveryPartWhileSomeRunAhead(parts: Int) {
    let reducer = PartReducer(parts: parts, capacity: 5)
    let pool = WorkerPool(parts: parts)
    let rounds = 2000
    // Per part and round, the vector it got back; checked after the run.
    let results = UnsafeMutablePointer<Double>.allocate(capacity: parts * rounds * 3)
    defer { results.deallocate(); pool.shutdown() }
    pool.setBody { part in
        var v = [Double](repeating: 0, count: 3)
        var spin = 0
        for r in 0..<rounds {
            // Part-dependent delays, so that one part is often a sum ahead of another.
            if (r + part) % 3 == 0 { for _ in 0..<(part * 200) { spin &+= 1 } }
            v[0] = Double(r * 10 + part); v[1] = Double(part + 1); v[2] = Double(r)
            v.withUnsafeMutableBufferPointer { reducer.sum($0.baseAddress!, count: 3, part: part) }
            for i in 0..<3 { results[(part * rounds + r) * 3 + i] = v[i] }
        }
        if spin == -1 { print(spin) }
    }
    pool.run()
    let partSum = Double(parts * (parts - 1) / 2)
    var wrong = 0
    for part in 0..<parts {
        for r in 0..<rounds {
            let got = (0..<3).map { results[(part * rounds + r) * 3 + $0] }
            let want = [Double(r * 10 * parts) + partSum, partSum + Double(parts), Double(r * parts)]
            if got != want { wrong += 1 }
        }
    }
    #expect(wrong == 0, "\(wrong) of \(parts * rounds) sums were wrong")
}
