// TandemData: the IDX format of MNIST, Fashion-MNIST, KMNIST and EMNIST.
//
// An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a 4-byte big-endian magic 0x0000TTDD
// (TT = element type, 0x08 for unsigned byte; DD = number of dimensions), DD big-endian UInt32 sizes,
// then the elements, last dimension fastest. Images are 0x00000803 (N x H x W), labels 0x00000801 (N).

/// Reading and writing IDX image and label files, raw or gzipped.
public enum IDX {
    /// Magic for unsigned-byte, 3-dimensional data (images N x H x W).
    static let imagesMagic: UInt32 = 0x0000_0803
    /// Magic for unsigned-byte, 1-dimensional data (labels N).
    static let labelsMagic: UInt32 = 0x0000_0801

    // MARK: - Reading

    /// Reads an IDX images file (magic 0x00000803), raw or gzipped.
    ///
    /// - Returns: the image count N, height H, width W and the N*H*W pixel bytes (sample-major, rows top to bottom).
    /// - Throws: `DataError` naming `path` for a wrong magic, a zero dimension, a payload larger than 2 GiB,
    ///   or a payload that is shorter (truncated) or longer (trailing data) than the header says.
    public static func readImages(_ path: String) throws -> (count: Int, height: Int, width: Int, pixels: [UInt8]) {
        let (dims, pixels) = try parse(path: path, magic: imagesMagic, fields: ["image count", "rows", "columns"])
        return (dims[0], dims[1], dims[2], pixels)
    }

    /// Reads an IDX labels file (magic 0x00000801), raw or gzipped.
    ///
    /// - Returns: one byte per label; the range is checked by `load`, which knows the number of classes.
    /// - Throws: `DataError` naming `path`, as for `readImages`.
    public static func readLabels(_ path: String) throws -> [UInt8] {
        try parse(path: path, magic: labelsMagic, fields: ["label count"]).payload
    }

    /// Reads an images file and its labels file into one single-channel `ImageSet`.
    ///
    /// - Parameter classes: the number of label classes (1...256); every label must be below it.
    /// - Throws: `DataError` from either reader, or naming the labels file when the counts disagree
    ///   or a label is out of range.
    public static func load(images: String, labels: String, classes: Int = 10) throws -> ImageSet {
        precondition(classes > 0 && classes <= 256, "IDX.load: classes must be in 1...256 (labels are bytes), got \(classes)")
        let image = try readImages(images)
        let label = try readLabels(labels)
        guard label.count == image.count else {
            throw DataError(path: labels, "\(label.count) labels but \(BinaryFile.fileName(images)) has \(image.count) images")
        }
        if let bad = label.firstIndex(where: { Int($0) >= classes }) {
            throw DataError(path: labels, "label \(label[bad]) at index \(bad) is out of range 0..<\(classes)")
        }
        return ImageSet(count: image.count, channels: 1, height: image.height, width: image.width, classes: classes,
                        pixels: image.pixels, labels: label.map { Int32($0) })
    }

    /// Loads the training and test sets from a folder in MNIST / Fashion-MNIST layout.
    ///
    /// Looks for `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
    /// `t10k-labels-idx1-ubyte`, each raw or with `.gz`, also accepting `.` instead of `-` before `idx`
    /// (`train-images.idx3-ubyte`, as some mirrors name them). A raw file wins over a `.gz` one.
    ///
    /// - Throws: `DataError` naming `dir` when it does not exist or lacks one of the files (and which one),
    ///   or any error from `load`.
    public static func loadDirectory(_ dir: String, classes: Int = 10) throws -> (train: ImageSet, test: ImageSet) {
        switch BinaryFile.kind(of: dir) {
        case .missing: throw DataError(path: dir, "dataset folder does not exist")
        case .file: throw DataError(path: dir, "is a file, expected a dataset folder")
        case .directory: break
        }
        let train = try load(images: find(dir, "train", "images", 3), labels: find(dir, "train", "labels", 1), classes: classes)
        let test = try load(images: find(dir, "t10k", "images", 3), labels: find(dir, "t10k", "labels", 1), classes: classes)
        return (train, test)
    }

    // MARK: - Writing

    /// Writes an IDX images file (magic 0x00000803) holding `count` images of `height` x `width` bytes.
    ///
    /// - Parameter gzip: compress the file with gzip (give the path a `.gz` name to match).
    /// - Throws: `DataError` naming `path` when the file cannot be written.
    public static func writeImages(_ path: String, count: Int, height: Int, width: Int, pixels: [UInt8], gzip: Bool) throws {
        let dims = [count, height, width]
        precondition(dims.allSatisfy { $0 > 0 && $0 <= Int(UInt32.max) }, "IDX.writeImages: bad shape \(count)x\(height)x\(width)")
        precondition(pixels.count == count * height * width,
                     "IDX.writeImages: \(pixels.count) pixel bytes for \(count)x\(height)x\(width) images")
        try write(path, magic: imagesMagic, dims: dims, payload: pixels, gzip: gzip)
    }

    /// Writes an IDX labels file (magic 0x00000801), one byte per label.
    ///
    /// - Parameter gzip: compress the file with gzip (give the path a `.gz` name to match).
    /// - Throws: `DataError` naming `path` when the file cannot be written.
    public static func writeLabels(_ path: String, labels: [UInt8], gzip: Bool) throws {
        precondition(!labels.isEmpty && labels.count <= Int(UInt32.max), "IDX.writeLabels: bad label count \(labels.count)")
        try write(path, magic: labelsMagic, dims: [labels.count], payload: labels, gzip: gzip)
    }

    // MARK: - Helpers

    /// Reads `path` and checks its IDX header against `magic` and the payload size against the header.
    ///
    /// - Parameter fields: a name per dimension, used in messages ("rows is 0 in the IDX header").
    /// - Returns: the dimensions and the payload with the header removed.
    private static func parse(path: String, magic: UInt32, fields: [String]) throws -> (dims: [Int], payload: [UInt8]) {
        var (bytes, gzipped) = try Gzip.readFile(path)
        let what = magic == imagesMagic ? "images" : "labels"
        let headerSize = 4 + 4 * fields.count
        let after = gzipped ? " after gunzip" : ""

        guard bytes.count >= 4 else {
            throw DataError(path: path, "truncated: \(bytes.count) bytes\(after) is too short for an IDX header (\(headerSize) bytes)")
        }
        let found = bigEndian(bytes, at: 0)
        guard found == magic else {
            var hint = ""
            if found == imagesMagic { hint = "; this looks like an IDX images file" }
            if found == labelsMagic { hint = "; this looks like an IDX labels file" }
            throw DataError(path: path, "bad IDX magic \(hex(found)) (expected \(hex(magic)) for unsigned-byte \(what)\(hint))")
        }
        guard bytes.count >= headerSize else {
            throw DataError(path: path, "truncated: \(bytes.count) bytes\(after) is too short for the \(headerSize)-byte IDX \(what) header")
        }

        var dims: [Int] = []
        var size = 1
        var overflow = false
        for (index, field) in fields.enumerated() {
            let dim = Int(bigEndian(bytes, at: 4 + 4 * index))
            if dim == 0 { throw DataError(path: path, "\(field) is 0 in the IDX header") }
            dims.append(dim)
            let (product, over) = size.multipliedReportingOverflow(by: dim)
            size = product
            overflow = overflow || over
        }
        let shape = dims.map(String.init).joined(separator: "x")
        guard !overflow && size <= BinaryFile.maxBytes else {
            throw DataError(path: path, "header says \(shape) \(what), over the 2 GiB limit")
        }

        let need = headerSize + size
        if bytes.count < need {
            throw DataError(path: path, "truncated: header says \(shape) \(what) = \(need) bytes with the header, "
                + "file has \(bytes.count)\(after)")
        }
        if bytes.count > need {
            throw DataError(path: path, "\(bytes.count - need) bytes of trailing data: header says \(shape) \(what) = "
                + "\(need) bytes with the header, file has \(bytes.count)\(after)")
        }
        bytes.removeFirst(headerSize)
        return (dims, bytes)
    }

    /// Writes an IDX header and payload, optionally gzipped.
    private static func write(_ path: String, magic: UInt32, dims: [Int], payload: [UInt8], gzip: Bool) throws {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(4 + 4 * dims.count + payload.count)
        for value in [magic] + dims.map({ UInt32($0) }) {
            bytes += [UInt8(value >> 24), UInt8((value >> 16) & 0xff), UInt8((value >> 8) & 0xff), UInt8(value & 0xff)]
        }
        bytes += payload
        try BinaryFile.store(gzip ? Gzip.compress(bytes, path: path) : bytes, at: path)
    }

    /// The path of an MNIST-layout file in `dir`, trying `-idxN` and `.idxN` spellings, raw then `.gz`.
    private static func find(_ dir: String, _ split: String, _ kind: String, _ rank: Int) throws -> String {
        let names = ["\(split)-\(kind)-idx\(rank)-ubyte", "\(split)-\(kind).idx\(rank)-ubyte"]
        for name in names {
            for suffix in ["", ".gz"] {
                let path = BinaryFile.join(dir, name + suffix)
                if BinaryFile.kind(of: path) == .file { return path }
            }
        }
        throw DataError(path: dir, "no \(names[0]) or \(names[0]).gz in the dataset folder (also tried \(names[1])[.gz])")
    }

    /// A big-endian UInt32 at `offset` (the caller has checked the bounds).
    private static func bigEndian(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
    }

    /// `0x` and eight upper-case hex digits, as IDX magics are usually written.
    private static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16, uppercase: true)
        return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
    }
}
