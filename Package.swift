// swift-tools-version:6.0
// Tandem: a distributed trainer for convolutional networks on CPUs (data and model parallel over MPI).
import PackageDescription

let package = Package(
    name: "Tandem",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "trainer", targets: ["trainer"]),
        .library(name: "TandemCore", targets: ["TandemCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
        .package(url: "https://github.com/apple/swift-numerics", from: "1.0.0"),
    ],
    targets: [
        // C libraries, each behind a module map and a shim header.
        .systemLibrary(name: "CBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CMPI", pkgConfig: "ompi", providers: [.apt(["libopenmpi-dev"])]),

        // Float32 hot loops clang vectorises (AVX2 + FMA chosen at run time on x86-64).
        .target(name: "CKernels"),

        // Compute core: tensors, kernels, layers, graph, optimiser. No MPI.
        .target(name: "TandemCore", dependencies: [
            "CBLAS", "CKernels", .product(name: "RealModule", package: "swift-numerics"),
        ]),
        // Dataset readers (IDX, CIFAR) and gzip.
        .target(name: "TandemData", dependencies: ["CZlib"]),
        // The communicator protocol and its in-process backends.
        .target(name: "TandemComm"),
        // The only module that imports the MPI wrapper.
        .target(name: "TandemMPI", dependencies: ["CMPI", "TandemComm"]),
        // Training: configs, data pipeline, loop, metrics, plots, checkpoints.
        .target(name: "TandemTrain", dependencies: [
            "TandemCore", "CKernels", "TandemData", "TandemComm", "Yams",
        ]),
        .executableTarget(name: "trainer", dependencies: [
            "TandemTrain", "TandemMPI", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // Runs every collective under mpirun and checks the values; `--overlap-bench` times Iallreduce overlap.
        .executableTarget(name: "mpi-selftest", dependencies: ["TandemComm", "TandemMPI"]),

        .testTarget(name: "TandemCoreTests", dependencies: ["TandemCore", "CKernels"]),
        .testTarget(name: "TandemDataTests", dependencies: ["TandemData", "CZlib"]),
        .testTarget(name: "TandemCommTests", dependencies: ["TandemComm"]),
        .testTarget(name: "TandemTrainTests", dependencies: ["TandemTrain", "TandemData", "TandemComm", "TandemCore"]),
    ],
    swiftLanguageModes: [.v5]
)
