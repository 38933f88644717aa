// TandemData: readers for the image datasets Tandem trains on (MNIST-family IDX files, CIFAR binaries).

/// A problem with a dataset file or folder, worded for the person running the trainer.
///
/// The message is one line and starts with the path it is about, then names the field that is wrong
/// and what was expected, e.g. `/x/train-labels-idx1-ubyte: label 12 at index 5 is out of range 0..<10`.
public struct DataError: Error, CustomStringConvertible {
    /// The whole one-line message, path first.
    public let message: String

    /// Creates an error with a ready-made message (which should start with the path it is about).
    public init(_ message: String) {
        self.message = message
    }

    /// Creates an error about `path`: the message is `"<path>: <problem>"`.
    init(path: String, _ problem: String) {
        self.message = "\(path): \(problem)"
    }

    public var description: String { message }
}
