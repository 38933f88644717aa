// Bad input under `mpirun -np 2` with the release trainer: every rank says what is wrong in one
// line ("tandem: rank N: ...", naming the file or key) and the job ends with a non-zero status
// within 10 s. Datasets are small IDX files written into a temporary folder.
import Foundation
import Testing
import TandemData

/// An IDX dataset of 64 train and 16 test 28x28 images, labels 0...9; `damage` can change a file's
/// bytes before it is written (by its name, e.g. "train-labels-idx1-ubyte").
func smallIDXDataset(gzip: Bool, labels trainLabels: [UInt8]? = nil, trainImages: Int = 64) throws -> String {
    let folder = temporaryFolder()
    let ext = gzip ? ".gz" : ""
    func pixels(_ n: Int) -> [UInt8] { (0..<(n * 28 * 28)).map { UInt8(truncatingIfNeeded: $0 &* 31) } }
    try IDX.writeImages(folder + "/train-images-idx3-ubyte" + ext, count: trainImages, height: 28, width: 28, pixels: pixels(trainImages), gzip: gzip)
    try IDX.writeLabels(folder + "/train-labels-idx1-ubyte" + ext, labels: trainLabels ?? (0..<64).map { UInt8($0 % 10) }, gzip: gzip)
    try IDX.writeImages(folder + "/t10k-images-idx3-ubyte" + ext, count: 16, height: 28, width: 28, pixels: pixels(16), gzip: gzip)
    try IDX.writeLabels(folder + "/t10k-labels-idx1-ubyte" + ext, labels: (0..<16).map { UInt8($0 % 10) }, gzip: gzip)
    return folder
}

/// smallConfig's text with `old` replaced by `new` (the replacement must happen), written to a file.
func editedConfig(_ old: String, _ new: String, batchNorm: Bool = false) throws -> String {
    let path = try smallConfig(batchNorm: batchNorm)
    let text = try String(contentsOfFile: path, encoding: .utf8)
    precondition(text.contains(old), "editedConfig: '\(old)' is not in the config")
    let edited = path.replacingOccurrences(of: "small.yaml", with: "edited.yaml")
    try text.replacingOccurrences(of: old, with: new).write(toFile: edited, atomically: true, encoding: .utf8)
    return edited
}

@Suite(.serialized, .enabled(if: hasMPI && hasData, "needs .build/release/trainer (launch/test builds it), mpirun and Fashion-MNIST"))
struct BadInputProcessTests {
    /// Runs `mpirun -np 2 trainer args` and checks status, time and one line per rank containing `fragment`.
    func expectEveryRankSays(_ fragment: String, _ args: [String], _ label: String) throws {
        let r = try mpirun(2, args + ["--quiet"], timeout: 30)
        #expect(r.status != 0, "\(label): status 0")
        #expect(r.seconds < 10, "\(label): took \(r.seconds) s")
        let lines = r.error.split(separator: "\n").filter { $0.hasPrefix("tandem: rank ") }
        for rank in 0..<2 {
            let mine = lines.filter { $0.hasPrefix("tandem: rank \(rank): ") }
            #expect(mine.count == 1 && mine.allSatisfy { $0.contains(fragment) }, "\(label): rank \(rank) should say '\(fragment)' once:\n\(r.error)")
        }
    }

    @Test func badDatasets() throws {
        let config = try smallConfig()
        let truncated = try smallIDXDataset(gzip: true)
        let gz = truncated + "/train-images-idx3-ubyte.gz"
        let whole = try Data(contentsOf: URL(fileURLWithPath: gz))
        try whole.prefix(whole.count / 2).write(to: URL(fileURLWithPath: gz))
        let magic = try smallIDXDataset(gzip: false)
        let raw = magic + "/t10k-labels-idx1-ubyte"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: raw)))
        bytes[2] = 0x0d
        try Data(bytes).write(to: URL(fileURLWithPath: raw))
        let cases: [(String, String, String)] = [
            ("missing folder", "/no/such/folder", "/no/such/folder"),
            ("truncated gzip", truncated, "train-images-idx3-ubyte.gz"),
            ("wrong IDX magic", magic, "t10k-labels-idx1-ubyte"),
            ("label out of range", try smallIDXDataset(gzip: true, labels: (0..<64).map { $0 == 7 ? 200 : UInt8($0 % 10) }), "train-labels-idx1-ubyte.gz"),
            ("count mismatch", try smallIDXDataset(gzip: false, trainImages: 63), "train-"),
        ]
        for (label, folder, fragment) in cases {
            try expectEveryRankSays(fragment, ["--config", config, "--data", folder, "--out", temporaryFolder()], label)
        }
    }

    @Test func badConfigs() throws {
        let file = temporaryFolder() + "/a-file"
        try "x".write(toFile: file, atomically: true, encoding: .utf8)
        let cases: [(String, [String], String)] = [
            ("unknown key", ["--config", try editedConfig("  log_every_steps: 1\n", "  log_every_steps: 1\n  bogus_key: 3\n")], "bogus_key"),
            ("wrong type", ["--config", try editedConfig("  batch_size: 64\n", "  batch_size: sixty-four\n")], "batch_size"),
            ("zero size", ["--config", try editedConfig("type: conv, out: 6,", "type: conv, out: 0,")], "out"),
            ("negative size", ["--config", try editedConfig("  train_limit: 4096\n", "  train_limit: -5\n")], "train_limit"),
            ("kernel larger than its input", ["--config", try editedConfig("out: 16, kernel: 5}", "out: 16, kernel: 30}")], "conv2"),
            ("towers that do not divide the channels", ["--config", try editedConfig("  threads: 1\n", "  threads: 1\n  towers: 4\n")], "towers"),
            ("world size that does not fit", ["--config", try smallConfig(batch: 31)], "not divisible by the 2 replicas"),
            ("non-positive batch size", ["--config", try smallConfig(), "--batch-size", "0"], "--batch-size must be positive"),
            ("a head that is no fraction", ["--config", try smallConfig(), "--dynamic", "--head", "1.5"], "--head must be a fraction in (0, 1]"),
            ("batch size 0 in the config", ["--config", try editedConfig("  batch_size: 64\n", "  batch_size: 0\n")], "batch_size"),
        ]
        for (label, args, fragment) in cases {
            try expectEveryRankSays(fragment, args + ["--out", temporaryFolder()], label)
        }
        try expectEveryRankSays(file + "/out", ["--config", try smallConfig(), "--out", file + "/out"], "output folder under a regular file")
    }
}
