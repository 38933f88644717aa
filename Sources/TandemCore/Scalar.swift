// The element type of Tandem's tensors. Training runs in Float32; the gradient checker runs the very
// same kernels in Float64, where finite differences are trustworthy next to ReLU and max-pool kinks.
import CBLAS
import CKernels
import Foundation
import RealModule

/// A floating-point type the compute core can run on: Float for training, Double for checking.
public protocol Scalar: Real & BinaryFloatingPoint & SIMDScalar & Sendable {
    /// C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C, row-major (CBLAS sgemm/dgemm).
    static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Self, a: UnsafePointer<Self>, lda: Int,
        b: UnsafePointer<Self>, ldb: Int,
        beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)
}

@inline(__always)
private func cblasTrans(_ t: Bool) -> CBLAS_TRANSPOSE { t ? CblasTrans : CblasNoTrans }

extension Float: Scalar {
    @inline(__always)
    public static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_sgemm(CblasRowMajor, cblasTrans(transA), cblasTrans(transB),
                    blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb),
                    beta, c, blasint(ldc))
    }
}

extension Double: Scalar {
    @inline(__always)
    public static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Double, a: UnsafePointer<Double>, lda: Int,
        b: UnsafePointer<Double>, ldb: Int,
        beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dgemm(CblasRowMajor, cblasTrans(transA), cblasTrans(transB),
                    blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb),
                    beta, c, blasint(ldc))
    }
}

/// BLAS threading. Tandem parallelises by splitting the batch across cores, each part with
/// single-threaded BLAS (a 2-thread OpenBLAS LeNet-5 step is slower than a 1-thread one).
public enum BLAS {
    public static func setThreads(_ n: Int) { openblas_set_num_threads(Int32(max(1, n))) }
    public static var threads: Int { Int(openblas_get_num_threads()) }

    /// The kernels OpenBLAS chose as it loaded (`openblas_get_corename`, e.g. "Haswell"): its own
    /// pick for the CPU, or OPENBLAS_CORETYPE's. A user's OPENBLAS_CORETYPE stands (some machines set
    /// it to Haswell on AVX-512 CPUs whose AVX-512 kernels older OpenBLAS gets wrong); `trainer` sets it
    /// itself only where OpenBLAS's own pick lacks AVX2 (`betterCore`).
    public static var core: String { openblas_get_corename().map { String(cString: $0) } ?? "unknown" }

    /// The kernels to run instead of OpenBLAS's own pick, when it took this CPU for one without AVX2:
    /// OpenBLAS 0.3.21 does not know Intel's family 6 model 207 (Emerald Rapids, AVX-512) and runs its
    /// Prescott (SSE3) kernels there, which made a LeNet-5 step 1.3x as long as with SkylakeX's. Nil
    /// when OPENBLAS_CORETYPE is set (the user's choice stands), when OpenBLAS's pick uses AVX2 already,
    /// or when the CPU has no AVX2 + FMA either.
    public static var betterCore: String? {
        guard getenv("OPENBLAS_CORETYPE") == nil, let better = tandem_blas_coretype_for_cpu() else { return nil }
        return withoutAVX2.contains(core.lowercased()) ? String(cString: better) : nil
    }

    /// OpenBLAS's x86 kernel sets that do not use AVX2 (its names, lower-cased).
    static let withoutAVX2: Set<String> = ["katmai", "coppermine", "northwood", "prescott", "banias", "core2", "penryn", "dunnington",
                                           "nehalem", "atom", "opteron", "opteron_sse3", "barcelona", "bobcat", "sandybridge",
                                           "bulldozer", "piledriver", "nano", "unknown"]

    /// Environment variable through which `trainer` tells itself, once started again with
    /// OPENBLAS_CORETYPE set to `betterCore`, what OpenBLAS had picked by itself.
    public static let replacedCoreVariable = "TANDEM_OPENBLAS_PICKED"
}

/// Allocates `count` zeroed elements, 64-byte aligned; the caller owns the memory.
@inlinable
public func allocateZeroed<T>(_ type: T.Type, count: Int) -> UnsafeMutablePointer<T> {
    let bytes = max(1, count) * MemoryLayout<T>.stride
    let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
    raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
    return raw.bindMemory(to: T.self, capacity: max(1, count))
}


/// A Float view of a pointer the caller has checked is Float (`T.self == Float.self`), for the C kernels.
@inline(__always)
func floats<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Float> { UnsafeMutableRawPointer(p).assumingMemoryBound(to: Float.self) }
@inline(__always)
func floats<T>(_ p: UnsafePointer<T>) -> UnsafePointer<Float> { UnsafeRawPointer(p).assumingMemoryBound(to: Float.self) }
