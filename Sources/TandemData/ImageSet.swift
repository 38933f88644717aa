// TandemData: readers for the image datasets Tandem trains on (MNIST-family IDX files, CIFAR binaries).
//
// Shape letters used throughout: N samples, C channels, H height, W width.

/// A labelled set of images kept as bytes, the way the dataset files store them.
///
/// Pixels are sample-major NCHW, one byte per pixel (0...255): sample `n`, channel `c`, row `y`, column `x`
/// is at `((n * channels + c) * height + y) * width + x`. Converting to floats (and normalising) is left to
/// the training pipeline so that a whole dataset costs one byte per pixel in memory.
public struct ImageSet: Sendable {
    /// Number of samples N.
    public let count: Int
    /// Channels per image C (1 for MNIST-family, 3 for CIFAR).
    public let channels: Int
    /// Image height H in pixels.
    public let height: Int
    /// Image width W in pixels.
    public let width: Int
    /// Number of label classes: 10 for MNIST-family and CIFAR-10, 100 (fine) or 20 (coarse) for CIFAR-100.
    public let classes: Int
    /// `count * channels * height * width` bytes, sample-major NCHW.
    public var pixels: [UInt8]
    /// `count` labels, each in `0..<classes`.
    public var labels: [Int32]

    /// Creates a set from pixels and labels whose sizes must agree with the shape.
    ///
    /// Sizes and label ranges are checked with preconditions: the readers validate files before they get here,
    /// so a violation is a programming error, not a bad file.
    public init(count: Int, channels: Int, height: Int, width: Int, classes: Int, pixels: [UInt8], labels: [Int32]) {
        precondition(count >= 0 && channels > 0 && height > 0 && width > 0,
                     "ImageSet: bad shape \(count)x\(channels)x\(height)x\(width)")
        precondition(classes > 0, "ImageSet: classes must be positive, got \(classes)")
        let (sample, overflow1) = channels.multipliedReportingOverflow(by: height)
        let (sample2, overflow2) = sample.multipliedReportingOverflow(by: width)
        let (total, overflow3) = sample2.multipliedReportingOverflow(by: count)
        precondition(!overflow1 && !overflow2 && !overflow3, "ImageSet: shape \(count)x\(channels)x\(height)x\(width) overflows Int")
        precondition(pixels.count == total,
                     "ImageSet: \(pixels.count) pixel bytes for shape \(count)x\(channels)x\(height)x\(width) (expected \(total))")
        precondition(labels.count == count, "ImageSet: \(labels.count) labels for \(count) samples")
        precondition(labels.allSatisfy { $0 >= 0 && Int($0) < classes }, "ImageSet: a label is outside 0..<\(classes)")
        self.count = count
        self.channels = channels
        self.height = height
        self.width = width
        self.classes = classes
        self.pixels = pixels
        self.labels = labels
    }

    /// Bytes per sample: `channels * height * width`.
    public var sampleSize: Int { channels * height * width }
}
