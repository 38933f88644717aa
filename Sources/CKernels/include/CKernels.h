// Float32 hot loops in C, where clang vectorises what Swift cannot: vector square roots (Swift's
// SIMD squareRoot runs lane by lane through sqrtf) and, on x86-64, AVX2 + FMA code chosen at run time
// (target_clones), so one binary runs at full width on Haswell and later and still runs elsewhere.
// Each function has a generic Swift twin in TandemCore that runs the Double gradient checks; tests
// compare the two.
#ifndef TANDEM_CKERNELS_H
#define TANDEM_CKERNELS_H
#include <stdint.h>

/// Local response normalisation across channels, forward: y and scale (k + alpha/size * window sum
/// of squares), n samples of channels x plane, the window clipped to each of `groups` channel groups.
void tandem_lrn_forward_f32(float *y, float *scale, const float *x, long n, long channels, long plane,
                            long before, long after, long groups, float alphaOverSize, float beta, float k);

/// Backward: dx from dy, x, y, scale; `ratio` is a channels x plane scratch.
void tandem_lrn_backward_f32(float *dx, float *ratio, const float *dy, const float *x, const float *y,
                             const float *scale, long n, long channels, long plane,
                             long before, long after, long groups, float factor, float beta);

/// The 2x2 stride-2 unpadded max pool: the values and argmax indices of tandem_maxpool_forward_f32.
void tandem_maxpool2x2_forward_f32(float *y, int32_t *argmax, const float *x, long planes, long inH, long inW, long outH, long outW);

/// Max pooling forward for any window (overlapping, padded): y and the index in the input plane of
/// the first maximum in reading order; padding never wins.
void tandem_maxpool_forward_f32(float *y, int32_t *argmax, const float *x, long planes,
                                long inH, long inW, long outH, long outW,
                                long kernelH, long kernelW, long strideH, long strideW, long padH, long padW);

/// The shape of one convolution as the C kernels see it (TandemCore's ConvGeometry).
typedef struct {
    long inC, inH, inW, outH, outW, inGroup, kH, kW, sH, sW, pH, pW;
} TandemConvShape;

/// im2col for channel group g over samples 0..<n: col[K, n*outH*outW] with rows (c, ki, kj) and
/// columns (sample, oh, ow), zero where the window covers padding.
void tandem_im2col_f32(float *col, const float *x, long g, long n, TandemConvShape s);

/// col2im for channel group g: writes (not adds) the group's input gradient from dcol, summing the
/// windows that overlap.
void tandem_col2im_f32(float *dx, const float *dcol, long g, long n, TandemConvShape s);

/// Direct convolution, stride 1, one group, for layers with few input channels whose input needs no
/// gradient (a network's first layer): no column matrix, eight output columns and up to eight output
/// channels per step in registers. `xp` receives the zero-padded input, [n, inC, outH + kH - 1,
/// tandem_direct_row(outW) + kW - 1], kept for the weight gradient. relu != 0: writes max(0, output)
/// (a ReLU fused into the convolution).
long tandem_direct_row(long outW);
long tandem_direct_padded_count(long n, TandemConvShape s);
void tandem_direct_conv_forward_f32(float *y, float *xp, const float *x, const float *w, const float *bias,
                                    long n, long outC, TandemConvShape s, int relu);

/// Its weight and bias gradients (added to dw, db; db may be null) from dy and the padded input.
/// `acc` is a scratch of tandem_direct_grad_scratch(outC, s) floats.
long tandem_direct_grad_scratch(long outC, TandemConvShape s);
void tandem_direct_conv_weight_grad_f32(float *dw, float *db, float *acc, const float *dy, const float *xp,
                                        long n, long outC, TandemConvShape s);

/// Direct convolution with output channels in vectors, for layers whose weight matrix is small next
/// to their column matrix (LeNet-5's conv2, the small AlexNet's conv1): stride 1, padding below the
/// kernel size, any groups. Weights transposed and padded by tandem_cv_weights_f32, per group
/// wt[K][OCp] with K = inGroup * kH * kW and OCp = tandem_cv_channels(outC / groups)
/// (tandem_cv_weights_count(outC, s) floats). `xp` receives the zero-padded input of every sample,
/// [n, inC, inH + 2 pH, inW + 2 pW] (tandem_cv_padded_count(n, s) floats), kept for the weight gradient.
/// bias may be null. Writes y, or max(0, y) when relu != 0.
long tandem_cv_channels(long outC);
long tandem_cv_padded_count(long n, TandemConvShape s);
long tandem_cv_weights_count(long outC, TandemConvShape s);
void tandem_cv_weights_f32(float *wt, const float *w, long outC, TandemConvShape s);
/// The weights of a stride-1 convolution's input gradient taken as a convolution of dy (weights flipped
/// in both axes, in- and output channels swapped within each group), in tandem_cv_weights_f32's layout
/// for that transposed shape; `s` and `outC` are the forward convolution's.
void tandem_cv_transposed_weights_f32(float *wt, const float *w, long outC, TandemConvShape s);
void tandem_cv_forward_f32(float *y, float *xp, const float *x, const float *wt, const float *bias,
                           long n, long outC, TandemConvShape s, int relu);
/// Weight and bias gradients (added to dw, db; db may be null) from dy and the kept padded input;
/// `scratch` holds tandem_cv_grad_scratch(outC, s) floats.
long tandem_cv_grad_scratch(long outC, TandemConvShape s);
void tandem_cv_weight_grad_f32(float *dw, float *db, float *scratch, const float *dy, const float *xp,
                               long n, long outC, TandemConvShape s);

/// Batch normalisation over n samples of channels x plane (plane 1: vectors, features contiguous).
/// Sums are accumulated in double: per plane in eight float lanes, then in double across planes.
/// sums[c] = sum of x over channel c.
void tandem_bn_sums_f32(double *sums, const float *x, long n, long channels, long plane);
/// sums[c] = sum of (x - mean[c])^2 over channel c.
void tandem_bn_squared_deviations_f32(double *sums, const float *x, const double *mean, long n, long channels, long plane);
/// y = gamma * (x - mean) * invStd + beta, xhat = (x - mean) * invStd (xhat may be null); with relu,
/// y is the ReLU of that (v > 0 ? v : 0, the fused ReLU after the layer).
void tandem_bn_apply_f32(float *y, float *xhat, const float *x, const double *mean, const double *invStd,
                         const float *gamma, const float *beta, long n, long channels, long plane, int relu);
/// sums[c] = sum of dy, sums[channels + c] = sum of dy * xhat over channel c.
void tandem_bn_gradient_sums_f32(double *sums, const float *dy, const float *xhat, long n, long channels, long plane);
/// dx = gamma * invStd * (dy - sums[c] / count - xhat * sums[channels + c] / count).
void tandem_bn_input_gradient_f32(float *dx, const float *dy, const float *xhat, const float *gamma, const double *invStd,
                                  const double *sums, long count, long n, long channels, long plane);

/// One SGD step on count parameters (PyTorch's formulation): g = grad + l2 * w + l1 * sign(w),
/// v = momentum * v + g, w -= lr * (nesterov ? g + momentum * v : v).
void tandem_sgd_f32(float *w, const float *g, float *v, long count, float lr, float momentum, int nesterov, float l2, float l1);

/// Max pooling backward: dx (planes x inPlane) zeroed, then each output gradient added at its argmax; with
/// y (the pool's output, or NULL), only where y > 0 (the ReLU before the pool, applied here).
void tandem_maxpool_backward_f32(float *dx, const float *dy, const int32_t *argmax, const float *y, long planes, long inPlane,
                                 long outPlane);

/// 1 when every p[i] is finite (no NaN, no Inf), else 0. Branch-free: x * 0 is NaN exactly when x is.
int tandem_all_finite_f32(const float *p, long count);

/// dst[i] = src[0][i] + src[1][i] + ... + src[nsrc-1][i], added in that order (so every rank that
/// sums the same sources gets the same bits); dst may be one of the sources.
void tandem_sum_sources_f32(float *dst, const float *const *src, long nsrc, long count);

// Flags in memory shared between processes (the shared-memory gradient allreduce): 64-bit loads
// with acquire and stores with release ordering, and the spin-wait hint.
static inline uint64_t tandem_load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void tandem_store_release_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/// parallel.dynamic's claim of samples from a pool shared by the ranks of one machine. `*counter` holds
/// (tag << 32) | next: the step `tag` and the first of its `batch` samples nobody has claimed; a counter
/// still tagged with an earlier step reads as next = 0 (the first claim of a step resets it, and by
/// then every rank has made its last claim of the earlier step). A claim takes ceil(left / (2 * ranks))
/// samples, held within [min_chunk, max_chunk] (guided self-scheduling: large claims while much is
/// left, small ones at the end). A rank's first claim of a step passes `head` > 0 (at least min_chunk)
/// and takes up to `head` samples in one chunk (which runs as fast as a fixed share), but none of the
/// last `reserve` (the batch less every rank's head), which stay for the chunks: every rank that comes
/// in time gets its head, one that comes late (fewer than min_chunk samples before the reserve)
/// claims as the others do then. Every claim is held to what is left,
/// and one that would leave fewer than min_chunk samples takes them too (so a claim can reach
/// max_chunk + min_chunk - 1, or its head + min_chunk - 1); each is made with a compare-and-swap.
/// Returns the claim's size (its first sample in *first), or 0 when the step's samples are all claimed.
static inline long tandem_claim_samples(uint64_t *counter, uint32_t tag, long batch, long ranks, long min_chunk, long max_chunk, long head,
                                        long reserve, long *first) {
    uint64_t old = __atomic_load_n(counter, __ATOMIC_ACQUIRE);
    for (;;) {
        long next = (uint32_t)(old >> 32) == tag ? (long)(old & 0xffffffffu) : 0;
        long left = batch - next;
        if (left <= 0) return 0;
        long size = (left + 2 * ranks - 1) / (2 * ranks);
        if (size > max_chunk) size = max_chunk;
        if (size < min_chunk) size = min_chunk;
        if (head > 0) {
            // In time (at least the smallest chunk before the reserve): the head, or what is left
            // before the reserve; late: a chunk like the others'.
            long h = left - reserve;
            if (h > head) h = head;
            if (h >= min_chunk) size = h;
        }
        // Never leave fewer than the smallest chunk (with batch norm a chunk of 1-7 samples would
        // normalise over too few): such a remainder goes with this claim.
        if (size > left || left - size < min_chunk) size = left;
        uint64_t claimed = ((uint64_t)tag << 32) | (uint64_t)(next + size);
        if (__atomic_compare_exchange_n(counter, &old, claimed, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *first = next;
            return size;
        }
    }
}
static inline void tandem_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/// 1 when the convolutions can run their 16-wide AVX-512 tiles: built for x86-64 Linux by clang, a CPU
/// with x86-64-v4 (AVX-512 F, BW, DQ, VL), and TANDEM_NO_AVX512=1 not in the environment. Networks
/// built then also take a convolution's input gradient as a convolution of dy where it fits.
int tandem_wide_kernels_available(void);

/// Fully connected forward y[m][n] = x[m][k] W[n][k]^T (+ bias[n]) with the 16-wide lanes, nothing packed:
/// returns 1, or 0 (nothing written) where they are not available. Each output is one dot product whose
/// bits do not depend on m (the same for a sample in a chunk of any size).
int tandem_linear_forward_f32(float *y, const float *x, const float *w, const float *bias, long m, long n, long k);

/// Fully connected input gradient dx[m][k] = dy[m][n] W[n][k] with the 16-wide lanes, nothing packed:
/// returns 1, or 0 (nothing written) where they are not available; bits independent of m as above.
int tandem_linear_input_grad_f32(float *dx, const float *dy, const float *w, long m, long n, long k);

/// The OpenBLAS kernels (an OPENBLAS_CORETYPE name) this CPU's vector units run: "SkylakeX" with
/// x86-64-v4 (AVX-512 F, BW, DQ, VL), "Haswell" with x86-64-v3 (AVX2, FMA), otherwise NULL.
const char *tandem_blas_coretype_for_cpu(void);

/// C[m][n] = A^T B for A stored k x m (row stride lda) and B k x n (ldb), k <= 16, with the 16-wide
/// tiles: returns 1, or 0 (nothing written) where they are not available or k is out of range. Each
/// output sums its k products in order, fused; for a convolution's input gradient with at most 16
/// output channels per group (LeNet-5's conv2), where OpenBLAS's Haswell kernels are slow at k = 16.
int tandem_gemm_tn_smallk_f32(float *c, const float *a, const float *b, long m, long n, long k, long lda, long ldb, long ldc);

/// Whether the convolution kernels use their 16-wide tiles (by default where available; they give the
/// same bits as the 8-wide ones): sets it, returns what it now is. For tests.
int tandem_cv_set_wide(int on);
/// Whether they do (1) or not (0).
int tandem_cv_wide(void);

#endif
