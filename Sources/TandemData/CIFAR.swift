// TandemData: the binary versions of CIFAR-10 and CIFAR-100.
//
// Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009); format described at
// https://www.cs.toronto.edu/~kriz/cifar.html. Each record is the label byte(s) then 3072 pixel bytes:
// the red plane, green plane and blue plane, each 32x32 row-major, which is already CHW, so records copy
// straight into NCHW. CIFAR-10 records are <label><pixels> (3073 bytes); CIFAR-100 records are
// <coarse label><fine label><pixels> (3074 bytes).

/// Reading and writing CIFAR-10 / CIFAR-100 binary batch files.
public enum CIFAR {
    /// Which dataset a file holds and, for CIFAR-100, which of its two labels to use.
    public enum Variant: Sendable {
        /// CIFAR-10: 10 classes, one label byte per record.
        case cifar10
        /// CIFAR-100 with its 100 fine labels (the second label byte).
        case cifar100Fine
        /// CIFAR-100 with its 20 coarse superclass labels (the first label byte).
        case cifar100Coarse

        /// Number of classes of the label this variant uses.
        var classes: Int {
            switch self {
            case .cifar10: 10
            case .cifar100Fine: 100
            case .cifar100Coarse: 20
            }
        }

        /// Label bytes at the start of each record.
        var labelBytes: Int { self == .cifar10 ? 1 : 2 }

        /// Bytes per record: labels then one 3x32x32 image.
        var recordSize: Int { labelBytes + CIFAR.imageBytes }

        /// Name for messages.
        var name: String { self == .cifar10 ? "CIFAR-10" : "CIFAR-100" }

        /// Each label byte in a record: its name in messages and how many classes it has.
        var labelFields: [(name: String, classes: Int)] {
            self == .cifar10 ? [("label", 10)] : [("coarse label", 20), ("fine label", 100)]
        }

        /// The record offset of the label this variant returns.
        var labelOffset: Int { self == .cifar100Fine ? 1 : 0 }

        /// Training files, in the order they are concatenated, then the test file.
        var fileNames: (train: [String], test: String) {
            self == .cifar10 ? ((1...5).map { "data_batch_\($0).bin" }, "test_batch.bin") : (["train.bin"], "test.bin")
        }

        /// The folder the official archive unpacks to.
        var archiveFolder: String { self == .cifar10 ? "cifar-10-batches-bin" : "cifar-100-binary" }
    }

    /// Channels, height and width of every CIFAR image.
    static let channels = 3, side = 32
    /// Pixel bytes per record: 3 x 32 x 32.
    static let imageBytes = channels * side * side

    // MARK: - Reading

    /// Reads CIFAR binary files (raw or gzipped) and concatenates their records in order.
    ///
    /// - Returns: a 3x32x32 NCHW `ImageSet` with `variant`'s labels and class count (10, 100 or 20).
    /// - Throws: `DataError` naming the file when it is missing, empty, not a whole number of records,
    ///   holds a label out of range (for CIFAR-100 both labels are checked), or the total passes 2 GiB.
    public static func read(files: [String], variant: Variant) throws -> ImageSet {
        precondition(!files.isEmpty, "CIFAR.read: no files given")
        let record = variant.recordSize
        var pixels: [UInt8] = []
        var labels: [Int32] = []
        for path in files {
            let (bytes, gzipped) = try Gzip.readFile(path)
            let after = gzipped ? " after gunzip" : ""
            let layout = "\(record)-byte \(variant.name) record (\(variant.labelBytes) label "
                + "byte\(variant.labelBytes == 1 ? "" : "s") + \(imageBytes) pixel bytes)"
            guard !bytes.isEmpty else { throw DataError(path: path, "file is empty\(after), expected \(layout)s") }
            guard bytes.count % record == 0 else {
                throw DataError(path: path, "size \(bytes.count) bytes\(after) is not a multiple of the \(layout)")
            }
            let records = bytes.count / record
            // records * imageBytes < bytes.count <= 2 GiB, so only the running total can pass the limit.
            guard pixels.count + records * imageBytes <= BinaryFile.maxBytes else {
                throw DataError(path: path, "the files up to this one hold more than 2 GiB of pixels")
            }
            for index in 0..<records {
                for (offset, field) in variant.labelFields.enumerated() {
                    let value = bytes[index * record + offset]
                    if Int(value) >= field.classes {
                        throw DataError(path: path, "\(field.name) \(value) in record \(index) is out of range 0..<\(field.classes)")
                    }
                }
            }

            pixels.reserveCapacity(pixels.count + records * imageBytes)
            labels.reserveCapacity(labels.count + records)
            bytes.withUnsafeBufferPointer { source in
                for index in 0..<records {
                    let start = index * record
                    labels.append(Int32(source[start + variant.labelOffset]))
                    pixels.append(contentsOf: UnsafeBufferPointer(rebasing: source[(start + variant.labelBytes)..<(start + record)]))
                }
            }
        }
        return ImageSet(count: labels.count, channels: channels, height: side, width: side, classes: variant.classes,
                        pixels: pixels, labels: labels)
    }

    /// Loads the training and test sets from a folder holding the official binary files.
    ///
    /// CIFAR-10 needs `data_batch_1.bin` ... `data_batch_5.bin` (train, in that order) and `test_batch.bin`;
    /// CIFAR-100 needs `train.bin` and `test.bin`. Each may also be gzipped (`.gz`). The files may sit in `dir`
    /// itself or in the archive's own subfolder (`cifar-10-batches-bin` / `cifar-100-binary`).
    ///
    /// - Throws: `DataError` naming the folder and the missing file, or any error from `read`.
    public static func loadDirectory(_ dir: String, variant: Variant) throws -> (train: ImageSet, test: ImageSet) {
        switch BinaryFile.kind(of: dir) {
        case .missing: throw DataError(path: dir, "dataset folder does not exist")
        case .file: throw DataError(path: dir, "is a file, expected a dataset folder")
        case .directory: break
        }
        let names = variant.fileNames
        let folders = [dir, BinaryFile.join(dir, variant.archiveFolder)]
        guard let folder = folders.first(where: { locate($0, names.train[0]) != nil }) else {
            throw DataError(path: dir, "no \(names.train[0]) (or .gz) here or in \(variant.archiveFolder)/ "
                + "for \(variant.name)")
        }
        func path(_ name: String) throws -> String {
            guard let found = locate(folder, name) else {
                throw DataError(path: folder, "no \(name) (or .gz); \(variant.name) needs "
                    + (names.train + [names.test]).joined(separator: ", "))
            }
            return found
        }
        let train = try read(files: names.train.map(path), variant: variant)
        let test = try read(files: [path(names.test)], variant: variant)
        return (train, test)
    }

    // MARK: - Writing

    /// Writes `set` as one raw CIFAR binary file (used by tests and tools).
    ///
    /// `set` must be 3x32x32 with labels in range for `variant`. CIFAR-100 records need both labels, but a set
    /// carries only one: `.cifar100Fine` writes coarse = fine % 20 and `.cifar100Coarse` writes fine = 0, both
    /// placeholders in range, not the real superclass mapping.
    ///
    /// - Throws: `DataError` naming `path` when the file cannot be written.
    public static func write(_ path: String, set: ImageSet, variant: Variant) throws {
        precondition(set.channels == channels && set.height == side && set.width == side,
                     "CIFAR.write: images must be 3x32x32, got \(set.channels)x\(set.height)x\(set.width)")
        precondition(set.count > 0, "CIFAR.write: empty set")
        precondition(set.labels.allSatisfy { $0 >= 0 && Int($0) < variant.classes },
                     "CIFAR.write: a label is outside 0..<\(variant.classes)")
        var bytes: [UInt8] = []
        bytes.reserveCapacity(set.count * variant.recordSize)
        for index in 0..<set.count {
            let label = UInt8(set.labels[index])
            switch variant {
            case .cifar10: bytes.append(label)
            case .cifar100Fine: bytes += [label % 20, label]
            case .cifar100Coarse: bytes += [label, 0]
            }
            bytes += set.pixels[(index * imageBytes)..<((index + 1) * imageBytes)]
        }
        try BinaryFile.store(bytes, at: path)
    }

    /// `dir/name` if it is a file, else `dir/name.gz` if that is, else nil.
    private static func locate(_ dir: String, _ name: String) -> String? {
        let plain = BinaryFile.join(dir, name)
        if BinaryFile.kind(of: plain) == .file { return plain }
        let gz = plain + ".gz"
        return BinaryFile.kind(of: gz) == .file ? gz : nil
    }
}
