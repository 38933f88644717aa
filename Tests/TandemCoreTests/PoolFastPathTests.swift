// The vectorised Float 2x2 max pool (eight or four outputs at a time, a row's last block overlapping
// the one before, one at a time below four) against the scalar path in Double: same maxima, same
// argmax, first maximum winning on ties (ReLU zeros). LeNet-5's pools: 28 and 10 columns.
import Testing
@testable import TandemCore

@Test(arguments: [(16, 20), (6, 14), (2, 2), (8, 9), (28, 28), (11, 10), (4, 35), (3, 7)])
func floatTwoByTwoPoolMatchesTheGenericPath(height: Int, width: Int) {
    let s = PoolGeometry(input: Shape(3, height, width), window: Window(kernelH: 2, kernelW: 2, strideH: 2, strideW: 2))
    let n = 2, count = n * 3 * height * width, out = n * 3 * s.outPlane
    var rng = SeededGenerator(seed: 7)
    // Half the inputs are exactly zero, as after a ReLU, so that ties are common.
    let values = (0..<count).map { _ in rng.uniform() < 0.5 ? 0.0 : rng.uniform() * 2 - 1 }
    let xf = values.map { Float($0) }, xd = values
    var yf = [Float](repeating: .nan, count: out), yd = [Double](repeating: .nan, count: out)
    var af = [Int32](repeating: -1, count: out), ad = [Int32](repeating: -1, count: out)
    maxPoolForward(&yf, argmax: &af, xf, n: n, s)
    maxPool2x2(&yd, argmax: &ad, xd, planes: n * 3, s)
    #expect(af == ad)
    #expect(zip(yf, yd).allSatisfy { Double($0) == Double(Float($1)) })
}
