// TandemDataTests: the real Fashion-MNIST files, when the machine has them.

import Foundation
import Testing
import TandemData

/// Where the container keeps Fashion-MNIST (Xiao et al. 2017), in the original gzipped IDX layout.
let fashionMNISTFolder = "/usr/share/datasets/fashion-mnist"

@Suite("Fashion-MNIST")
struct FashionMNISTTests {
    @Test("loads 60000 + 10000 28x28 images, 10 balanced classes",
          .enabled(if: FileManager.default.fileExists(atPath: fashionMNISTFolder), "no \(fashionMNISTFolder)"))
    func load() throws {
        let clock = ContinuousClock()
        let start = clock.now
        let (train, test) = try IDX.loadDirectory(fashionMNISTFolder)
        let elapsed = clock.now - start
        print("Fashion-MNIST loaded in \(elapsed)")

        #expect(train.count == 60000 && test.count == 10000)
        for set in [train, test] {
            #expect(set.channels == 1 && set.height == 28 && set.width == 28 && set.classes == 10)
            #expect(set.pixels.count == set.count * 784)
            #expect(set.pixels.contains(255) && set.pixels.contains(0))
        }
        // The dataset is balanced: 6000 training and 1000 test images per class.
        var trainCounts = [Int](repeating: 0, count: 10), testCounts = [Int](repeating: 0, count: 10)
        for label in train.labels { trainCounts[Int(label)] += 1 }
        for label in test.labels { testCounts[Int(label)] += 1 }
        #expect(trainCounts == [Int](repeating: 6000, count: 10))
        #expect(testCounts == [Int](repeating: 1000, count: 10))
    }
}
