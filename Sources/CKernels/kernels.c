// See include/CKernels.h. Plain loops written for clang's vectoriser; no errno-setting libm calls in
// them (__builtin_elementwise_sqrt is the bare square root instruction).
#include "CKernels.h"
#include <stdlib.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__clang__)
#define TANDEM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TANDEM_CLONES
#endif

static inline long lmax(long a, long b) { return a > b ? a : b; }
static inline long lmin(long a, long b) { return a < b ? a : b; }

// s^-beta: two square roots for AlexNet's beta = 0.75, powf otherwise.
static inline float pow_minus_three_quarters(float s) {
    float r = __builtin_elementwise_sqrt(s);
    return 1.0f / (r * __builtin_elementwise_sqrt(r));
}

float powf(float, float);

TANDEM_CLONES
void tandem_lrn_forward_f32(float *restrict y, float *restrict scale, const float *restrict x, long n, long channels,
                            long plane, long before, long after, long groups, float a, float beta, float k) {
    const long groupSize = channels / groups;
    const int quarter = beta == 0.75f;
    for (long b = 0; b < n; b++) {
        const float *xs = x + b * channels * plane;
        float *ss = scale + b * channels * plane, *ys = y + b * channels * plane;
        for (long c = 0; c < channels; c++) {
            const long g0 = c / groupSize * groupSize;
            const long lo = lmax(g0, c - before), hi = lmin(g0 + groupSize - 1, c + after);
            float *s = ss + c * plane, *yr = ys + c * plane;
            const float *xr = xs + c * plane;
            for (long i = 0; i < plane; i++) s[i] = 0;
            for (long cc = lo; cc <= hi; cc++) {
                const float *xc = xs + cc * plane;
                for (long i = 0; i < plane; i++) s[i] += xc[i] * xc[i];
            }
            if (quarter) {
                for (long i = 0; i < plane; i++) {
                    float v = k + a * s[i];
                    s[i] = v;
                    yr[i] = xr[i] * pow_minus_three_quarters(v);
                }
            } else {
                for (long i = 0; i < plane; i++) {
                    float v = k + a * s[i];
                    s[i] = v;
                    yr[i] = xr[i] * powf(v, -beta);
                }
            }
        }
    }
}

TANDEM_CLONES
void tandem_lrn_backward_f32(float *restrict dx, float *restrict ratio, const float *restrict dy, const float *restrict x,
                             const float *restrict y, const float *restrict scale, long n, long channels, long plane,
                             long before, long after, long groups, float factor, float beta) {
    const long groupSize = channels / groups, m = channels * plane;
    const int quarter = beta == 0.75f;
    for (long b = 0; b < n; b++) {
        const long off = b * m;
        for (long i = 0; i < m; i++) ratio[i] = dy[off + i] * y[off + i] / scale[off + i];
        for (long c = 0; c < channels; c++) {
            // c lies in the window of c' (in the same group) when c' - before <= c <= c' + after.
            const long g0 = c / groupSize * groupSize;
            const long lo = lmax(g0, c - after), hi = lmin(g0 + groupSize - 1, c + before);
            float *d = dx + off + c * plane;
            const float *xr = x + off + c * plane, *sr = scale + off + c * plane, *gr = dy + off + c * plane;
            for (long i = 0; i < plane; i++) d[i] = 0;
            for (long cc = lo; cc <= hi; cc++) {
                const float *r = ratio + cc * plane;
                for (long i = 0; i < plane; i++) d[i] += r[i];
            }
            if (quarter) {
                for (long i = 0; i < plane; i++) d[i] = gr[i] * pow_minus_three_quarters(sr[i]) - factor * xr[i] * d[i];
            } else {
                for (long i = 0; i < plane; i++) d[i] = gr[i] * powf(sr[i], -beta) - factor * xr[i] * d[i];
            }
        }
    }
}

// One border output, its window clipped to the row.
static inline void max_clipped(float *d, int32_t *g, const float *src, long ow, long h0, long h1,
                               long inW, long kW, long sW, long pW) {
    const long w0 = lmax(ow * sW - pW, 0), w1 = lmin(ow * sW - pW + kW, inW);
    long best = h0 * inW + w0;
    float m = src[best];
    for (long ih = h0; ih < h1; ih++)
        for (long iw = w0; iw < w1; iw++) {
            const long i = ih * inW + iw;
            const float v = src[i];
            const int better = v > m;
            m = better ? v : m;
            best = better ? i : best;
        }
    d[ow] = m;
    g[ow] = (int32_t)best;
}

typedef float f8 __attribute__((ext_vector_type(8)));
typedef int32_t i8 __attribute__((ext_vector_type(8)));
typedef float f4 __attribute__((ext_vector_type(4)));
typedef int32_t i4 __attribute__((ext_vector_type(4)));

// A statement expression, not a function: returning an 8-float vector from a function changes the ABI
// in the builds without AVX.
#define load_f8(p) ({ f8 v_; __builtin_memcpy(&v_, (p), sizeof v_); v_; })

// 16-wide vectors for the AVX-512 tiles (tandem_cv_wide). Only where the 8-wide tiles run as an AVX2 +
// FMA clone (Linux, clang): elsewhere they multiply and add in two roundings, and the 16-wide tiles,
// which fuse them, would not give their bits.
#if defined(__x86_64__) && defined(__linux__) && defined(__clang__)
#define TANDEM_WIDE 1
#include <immintrin.h>   // col2im_wide's masked loads
#define TANDEM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
typedef float f16 __attribute__((ext_vector_type(16)));
#define load_f16(p) ({ f16 v_; __builtin_memcpy(&v_, (p), sizeof v_); v_; })
#else
#define TANDEM_WIDE 0
#endif

// W window elements, one per output column ow..ow+W-1, at p[0], p[s], ..., p[(W-1)s]; reads nothing
// outside p[0 ... (W-1)s]. Strides 1 and 2 by whole-vector loads and a shuffle.
#define LOAD_STRIDED(W, fW, p, s, out) do { \
    if ((s) == 1) { __builtin_memcpy(&(out), (p), sizeof(fW)); } \
    else if ((s) == 2) { \
        fW lo_, hi_; __builtin_memcpy(&lo_, (p), sizeof(fW)); __builtin_memcpy(&hi_, (p) + (W) - 1, sizeof(fW)); \
        SHUFFLE_EVEN_ODD_##W(lo_, hi_, out); \
    } else { for (int l_ = 0; l_ < (W); l_++) (out)[l_] = (p)[l_ * (s)]; } \
} while (0)
#define SHUFFLE_EVEN_ODD_8(a, b, out) ((out) = __builtin_shufflevector(a, b, 0, 2, 4, 6, 9, 11, 13, 15))
#define SHUFFLE_EVEN_ODD_4(a, b, out) ((out) = __builtin_shufflevector(a, b, 0, 2, 5, 7))

// W outputs of one row at columns ow..ow+W-1, all windows inside the row: the window elements in
// reading order, the first maximum kept (strict >).
#define MAX_BLOCK(W, fW, iW) \
static inline void max_block_##W(float *d, int32_t *g, const float *src, long ow, long h0, long h1, \
                                 long inW, long kW, long sW, long pW) { \
    iW lane; for (int l = 0; l < (W); l++) lane[l] = l * (int32_t)sW; \
    const long c0 = ow * sW - pW; \
    fW m; LOAD_STRIDED(W, fW, src + h0 * inW + c0, sW, m); \
    iW best = (int32_t)(h0 * inW + c0) + lane; \
    for (long ih = h0; ih < h1; ih++) \
        for (long kw = 0; kw < kW; kw++) { \
            const long i = ih * inW + c0 + kw; \
            fW v; LOAD_STRIDED(W, fW, src + i, sW, v); \
            const iW better = v > m; \
            m = (fW)((better & (iW)v) | (~better & (iW)m)); \
            best = (better & ((int32_t)i + lane)) | (~better & best); \
        } \
    __builtin_memcpy(d + ow, &m, sizeof(fW)); \
    __builtin_memcpy(g + ow, &best, sizeof(iW)); \
}
MAX_BLOCK(8, f8, i8)
MAX_BLOCK(4, f4, i4)

// W outputs of a 2x2 stride-2 pool at columns ow..ow+W-1 of one output row (input rows r0, r1; base: the
// index of r0[0] in its plane, w1: the row length): pairwise maxima and the index of the first maximum
// in reading order (strict comparisons keep the earlier element on ties, as PyTorch does).
#define SHUFFLE_ODD_8(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15)
#define SHUFFLE_EVEN_8(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14)
#define SHUFFLE_ODD_4(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7)
#define SHUFFLE_EVEN_4(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6)
#define MAX2X2_BLOCK(W, fW, iW) \
static inline void max2x2_##W(float *d, int32_t *g, const float *r0, const float *r1, long ow, int32_t base, int32_t w1) { \
    fW t0, t1, u0, u1; \
    __builtin_memcpy(&t0, r0 + 2 * ow, sizeof(fW)); __builtin_memcpy(&t1, r0 + 2 * ow + (W), sizeof(fW)); \
    __builtin_memcpy(&u0, r1 + 2 * ow, sizeof(fW)); __builtin_memcpy(&u1, r1 + 2 * ow + (W), sizeof(fW)); \
    const fW a = SHUFFLE_EVEN_##W(t0, t1), b = SHUFFLE_ODD_##W(t0, t1), c = SHUFFLE_EVEN_##W(u0, u1), e = SHUFFLE_ODD_##W(u0, u1); \
    const iW bWins = b > a, eWins = e > c; \
    const fW top = (fW)((bWins & (iW)b) | (~bWins & (iW)a)), bottom = (fW)((eWins & (iW)e) | (~eWins & (iW)c)); \
    const iW lower = bottom > top; \
    const fW m = (fW)((lower & (iW)bottom) | (~lower & (iW)top)); \
    iW lane; for (int l = 0; l < (W); l++) lane[l] = 2 * l; \
    const iW iTop = bWins & 1, iBottom = (iW)w1 + (eWins & 1); \
    const iW index = (iW)(base + (int32_t)(2 * ow)) + lane + ((lower & iBottom) | (~lower & iTop)); \
    __builtin_memcpy(d + ow, &m, sizeof(fW)); \
    __builtin_memcpy(g + ow, &index, sizeof(iW)); \
}
MAX2X2_BLOCK(8, f8, i8)
MAX2X2_BLOCK(4, f4, i4)

// The 2x2 stride-2 unpadded pool (LeNet), the same values and indices as the general kernel: rows of
// eight or four outputs at a time, the last block of a row overlapping the one before it (it writes
// the same values again) rather than a scalar tail.
TANDEM_CLONES
void tandem_maxpool2x2_forward_f32(float *restrict y, int32_t *restrict argmax, const float *restrict x, long planes, long inH,
                                   long inW, long outH, long outW) {
    const long inPlane = inH * inW, outPlane = outH * outW;
    const int32_t w1 = (int32_t)inW;
    for (long p = 0; p < planes; p++) {
        const float *src = x + p * inPlane;
        for (long oh = 0; oh < outH; oh++) {
            const float *r0 = src + 2 * oh * inW, *r1 = r0 + inW;
            float *d = y + p * outPlane + oh * outW;
            int32_t *g = argmax + p * outPlane + oh * outW;
            const int32_t base = (int32_t)(2 * oh * inW);
            if (outW >= 8) {
                for (long ow = 0; ow < outW; ow += 8) max2x2_8(d, g, r0, r1, lmin(ow, outW - 8), base, w1);
            } else if (outW >= 4) {
                for (long ow = 0; ow < outW; ow += 4) max2x2_4(d, g, r0, r1, lmin(ow, outW - 4), base, w1);
            } else {
                for (long ow = 0; ow < outW; ow++) {
                    const float a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], e = r1[2 * ow + 1];
                    const float top = b > a ? b : a, bottom = e > c ? e : c;
                    const int lower = bottom > top;
                    d[ow] = lower ? bottom : top;
                    g[ow] = base + (int32_t)(2 * ow) + (lower ? (e > c ? w1 + 1 : w1) : (b > a ? 1 : 0));
                }
            }
        }
    }
}

// One output row at a time: the window's rows h0..h1-1 are the same for every column. Columns whose
// window lies wholly inside the row (ow in [full0, full1)) run 8 or 4 at a time in vectors; the
// border columns clip their windows.
TANDEM_CLONES
void tandem_maxpool_forward_f32(float *restrict y, int32_t *restrict argmax, const float *restrict x, long planes,
                                long inH, long inW, long outH, long outW,
                                long kH, long kW, long sH, long sW, long pH, long pW) {
    const long inPlane = inH * inW, outPlane = outH * outW;
    // Columns whose window needs no clipping: ow*sW - pW >= 0 and ow*sW - pW + kW <= inW.
    long full0 = (pW + sW - 1) / sW, full1 = inW + pW - kW < 0 ? 0 : (inW + pW - kW) / sW + 1;
    if (full1 > outW) full1 = outW;
    if (full0 > full1) full0 = full1;
    for (long p = 0; p < planes; p++) {
        const float *src = x + p * inPlane;
        for (long oh = 0; oh < outH; oh++) {
            const long h0 = lmax(oh * sH - pH, 0), h1 = lmin(oh * sH - pH + kH, inH);
            float *d = y + p * outPlane + oh * outW;
            int32_t *g = argmax + p * outPlane + oh * outW;
            for (long ow = 0; ow < full0; ow++) max_clipped(d, g, src, ow, h0, h1, inW, kW, sW, pW);
            for (long ow = full1; ow < outW; ow++) max_clipped(d, g, src, ow, h0, h1, inW, kW, sW, pW);
            // Interior columns W at a time; the last block overlaps the one before it (same results).
            const long count = full1 - full0;
            if (count >= 8) {
                for (long ow = full0; ow < full1; ow += 8)
                    max_block_8(d, g, src, ow + 8 <= full1 ? ow : full1 - 8, h0, h1, inW, kW, sW, pW);
            } else if (count >= 4) {
                for (long ow = full0; ow < full1; ow += 4)
                    max_block_4(d, g, src, ow + 4 <= full1 ? ow : full1 - 4, h0, h1, inW, kW, sW, pW);
            } else {
                for (long ow = full0; ow < full1; ow++) max_clipped(d, g, src, ow, h0, h1, inW, kW, sW, pW);
            }
        }
    }
}

// The output positions o in [0, outSize) whose input position o*stride - pad + offset lies in
// [0, inSize), as [lo, hi).
static inline void valid_range(long outSize, long inSize, long stride, long pad, long offset, long *lo, long *hi) {
    const long lowNum = pad - offset, highNum = inSize - 1 + pad - offset;
    *lo = lowNum <= 0 ? 0 : (lowNum + stride - 1) / stride;
    *hi = highNum < 0 ? 0 : lmin(outSize, highNum / stride + 1);
    if (*hi < *lo) *hi = *lo;
}

TANDEM_CLONES
void tandem_im2col_f32(float *restrict col, const float *restrict x, long g, long n, TandemConvShape s) {
    const long outPlane = s.outH * s.outW, inPlane = s.inH * s.inW, cols = n * outPlane;
    for (long c = 0; c < s.inGroup; c++) {
        const long channel = g * s.inGroup + c;
        for (long ki = 0; ki < s.kH; ki++) {
            long h0, h1;
            valid_range(s.outH, s.inH, s.sH, s.pH, ki, &h0, &h1);
            for (long kj = 0; kj < s.kW; kj++) {
                const long row = (c * s.kH + ki) * s.kW + kj;
                long w0, w1;
                valid_range(s.outW, s.inW, s.sW, s.pW, kj, &w0, &w1);
                for (long b = 0; b < n; b++) {
                    const float *src = x + (b * s.inC + channel) * inPlane;
                    float *dst = col + row * cols + b * outPlane;
                    for (long oh = 0; oh < s.outH; oh++) {
                        float *d = dst + oh * s.outW;
                        if (oh < h0 || oh >= h1) {
                            for (long ow = 0; ow < s.outW; ow++) d[ow] = 0;
                            continue;
                        }
                        const float *srow = src + (oh * s.sH - s.pH + ki) * s.inW - s.pW + kj;
                        for (long ow = 0; ow < w0; ow++) d[ow] = 0;
                        if (s.sW == 1) {
                            for (long ow = w0; ow < w1; ow++) d[ow] = srow[ow];
                        } else {
                            for (long ow = w0; ow < w1; ow++) d[ow] = srow[ow * s.sW];
                        }
                        for (long ow = w1; ow < s.outW; ow++) d[ow] = 0;
                    }
                }
            }
        }
    }
}

#if TANDEM_WIDE
static TANDEM_AVX512 void col2im_wide(float *restrict, const float *restrict, long, long, TandemConvShape);
#endif

TANDEM_CLONES
void tandem_col2im_f32(float *restrict dx, const float *restrict dcol, long g, long n, TandemConvShape s) {
    const long outPlane = s.outH * s.outW, inPlane = s.inH * s.inW, cols = n * outPlane;
#if TANDEM_WIDE
    if (s.sH == 1 && s.sW == 1 && s.inW <= 16 && tandem_cv_wide()) { col2im_wide(dx, dcol, g, n, s); return; }
#endif
    for (long b = 0; b < n; b++) {
        float *d = dx + (b * s.inC + g * s.inGroup) * inPlane;
        for (long i = 0; i < s.inGroup * inPlane; i++) d[i] = 0;
    }
    for (long c = 0; c < s.inGroup; c++) {
        const long channel = g * s.inGroup + c;
        for (long ki = 0; ki < s.kH; ki++) {
            long h0, h1;
            valid_range(s.outH, s.inH, s.sH, s.pH, ki, &h0, &h1);
            for (long kj = 0; kj < s.kW; kj++) {
                const long row = (c * s.kH + ki) * s.kW + kj;
                long w0, w1;
                valid_range(s.outW, s.inW, s.sW, s.pW, kj, &w0, &w1);
                for (long b = 0; b < n; b++) {
                    float *dst = dx + (b * s.inC + channel) * inPlane;
                    const float *src = dcol + row * cols + b * outPlane;
                    for (long oh = h0; oh < h1; oh++) {
                        float *drow = dst + (oh * s.sH - s.pH + ki) * s.inW - s.pW + kj;
                        const float *srow = src + oh * s.outW;
                        if (s.sW == 1) {
                            for (long ow = w0; ow < w1; ow++) drow[ow] += srow[ow];
                        } else {
                            for (long ow = w0; ow < w1; ow++) drow[ow * s.sW] += srow[ow];
                        }
                    }
                }
            }
        }
    }
}

long tandem_direct_row(long outW) { return (outW + 7) / 8 * 8; }

static inline float plane_sum(const float *p, long m);   // with the batch-norm kernels below

#define DIRECT_GRAD_OB 3   // output channels per block of the weight gradient, at most
long tandem_direct_grad_scratch(long outC, TandemConvShape s) {
    return outC * s.inC * s.kH * s.kW * 8 + DIRECT_GRAD_OB * s.outH * tandem_direct_row(s.outW);
}

long tandem_direct_padded_count(long n, TandemConvShape s) {
    return n * s.inC * (s.outH + s.kH - 1) * (tandem_direct_row(s.outW) + s.kW - 1);
}


// OB output channels of NR output rows' chunk (8 columns) at a time, the accumulators in registers; the
// rows share each weight load and give NR x OB independent sums. Each output sums over c, ki, kj in
// that order at any NR. Always inlined, also in debug builds: inlined into the AVX2 clone it
// multiplies and adds in one rounding (FMA), as the 16-wide blocks do.
#define DIRECT_BLOCK_OF(NAME, VT, LANES, LOAD, ATTR, OB, NR) \
static inline __attribute__((always_inline)) ATTR void NAME##_##OB(float *y, const float *xp, const float *w, const float *bias, long oc, \
                                     long oh, long chunk, TandemConvShape s, long Hp, long Wp, int relu) { \
    const long K = s.inC * s.kH * s.kW, plane = s.outH * s.outW; \
    VT acc[NR][OB]; \
    for (int r = 0; r < (NR); r++) for (int o = 0; o < (OB); o++) acc[r][o] = (VT)(bias ? bias[oc + o] : 0.0f); \
    for (long c = 0; c < s.inC; c++) \
        for (long ki = 0; ki < s.kH; ki++) { \
            const float *row = xp + (c * Hp + oh + ki) * Wp + chunk; \
            const float *wr = w + oc * K + (c * s.kH + ki) * s.kW; \
            for (long kj = 0; kj < s.kW; kj++) { \
                VT xv[NR]; \
                for (int r = 0; r < (NR); r++) xv[r] = LOAD(row + r * Wp + kj); \
                for (int o = 0; o < (OB); o++) { \
                    const float wv = wr[o * K + kj]; \
                    for (int r = 0; r < (NR); r++) acc[r][o] += wv * xv[r]; \
                } \
            } \
        } \
    for (int r = 0; r < (NR); r++) \
        for (int o = 0; o < (OB); o++) { \
            if (relu) acc[r][o] = __builtin_elementwise_max(acc[r][o], (VT)0.0f); \
            float *dst = y + (oc + o) * plane + (oh + r) * s.outW + chunk; \
            if (chunk + (LANES) <= s.outW) __builtin_memcpy(dst, &acc[r][o], sizeof(VT)); \
            else for (long l = 0; l < s.outW - chunk; l++) dst[l] = acc[r][o][l]; \
        } \
}
#define DIRECT_BLOCK(OB) DIRECT_BLOCK_OF(direct_block, f8, 8, load_f8, , OB, 1)
DIRECT_BLOCK(8)
DIRECT_BLOCK(7)
DIRECT_BLOCK(6)
DIRECT_BLOCK(5)
DIRECT_BLOCK(4)
DIRECT_BLOCK(3)
DIRECT_BLOCK(2)
DIRECT_BLOCK(1)

// All outC output channels of one output row chunk through the blocks BLOCK_8 .. BLOCK_1: eight at a
// time, then the rest in one block (LeNet-5's 6 in one).
#define DIRECT_CHANNELS(BLOCK) do { \
    long oc = 0; \
    for (; oc + 8 <= outC; oc += 8) BLOCK##_8(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); \
    switch (outC - oc) { \
    case 7: BLOCK##_7(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    case 6: BLOCK##_6(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    case 5: BLOCK##_5(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    case 4: BLOCK##_4(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    case 3: BLOCK##_3(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    case 2: BLOCK##_2(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    case 1: BLOCK##_1(yb, xb, w, bias, oc, oh, chunk, s, Hp, Wp, relu); break; \
    default: break; \
    } \
} while (0)

#if TANDEM_WIDE
// The same 16 columns at a time with the AVX-512 tiles: each output sums the same products in the same
// order, so the bits are the 8-column blocks'.
#define DIRECT_BLOCK_WIDE(OB) DIRECT_BLOCK_OF(direct_block_wide, f16, 16, load_f16, TANDEM_AVX512, OB, 1)
DIRECT_BLOCK_WIDE(8)
DIRECT_BLOCK_WIDE(7)
DIRECT_BLOCK_WIDE(6)
DIRECT_BLOCK_WIDE(5)
DIRECT_BLOCK_WIDE(4)
DIRECT_BLOCK_WIDE(3)
DIRECT_BLOCK_WIDE(2)
DIRECT_BLOCK_WIDE(1)
// Two rows at a time with 32 registers (up to 16 sums; LeNet-5's conv1: 12 instead of 6).
#define DIRECT_BLOCK_WIDE2(OB) DIRECT_BLOCK_OF(direct_block_wide2, f16, 16, load_f16, TANDEM_AVX512, OB, 2)
DIRECT_BLOCK_WIDE2(8)
DIRECT_BLOCK_WIDE2(7)
DIRECT_BLOCK_WIDE2(6)
DIRECT_BLOCK_WIDE2(5)
DIRECT_BLOCK_WIDE2(4)
DIRECT_BLOCK_WIDE2(3)
DIRECT_BLOCK_WIDE2(2)
DIRECT_BLOCK_WIDE2(1)

// One output row's chunk of 16 columns (within the padded row of tandem_direct_row(outW) columns, whose
// last 8 columns the narrow blocks take when 16 do not fit), all output channels.
static TANDEM_AVX512 void direct_chunk_wide(float *yb, const float *xb, const float *w, const float *bias, long outC, long oh,
                                            long chunk, TandemConvShape s, long Hp, long Wp, int relu) {
    DIRECT_CHANNELS(direct_block_wide);
}
static TANDEM_AVX512 void direct_chunk_wide2(float *yb, const float *xb, const float *w, const float *bias, long outC, long oh,
                                             long chunk, TandemConvShape s, long Hp, long Wp, int relu) {
    DIRECT_CHANNELS(direct_block_wide2);
}

// col2im at stride 1 for rows of at most 16 (LeNet-5's conv2: 14), each input gradient row of four
// samples summed in registers from masked loads of the column rows that reach it, in the order of
// tandem_col2im_f32's loops (taps ki, kj ascending, from 0): the same bits. No stores to reload
// (0.24 ms of scalar read-modify-writes per step there at batch 64, 1 thread).
static TANDEM_AVX512 void col2im_wide(float *restrict dx, const float *restrict dcol, long g, long n, TandemConvShape s) {
    const long outPlane = s.outH * s.outW, inPlane = s.inH * s.inW, cols = n * outPlane;
    const __mmask16 full = (__mmask16)((1u << s.inW) - 1);
    for (long c = 0; c < s.inGroup; c++) {
        const long channel = g * s.inGroup + c;
        for (long ih = 0; ih < s.inH; ih++)
            for (long b0 = 0; b0 < n; b0 += 4) {
                __m512 acc[4];
                for (int j = 0; j < 4; j++) acc[j] = _mm512_setzero_ps();
                for (long ki = 0; ki < s.kH; ki++) {
                    const long oh = ih + s.pH - ki;
                    if (oh < 0 || oh >= s.outH) continue;
                    for (long kj = 0; kj < s.kW; kj++) {
                        // Lanes iw whose column ow = iw + pW - kj lies in [0, outW).
                        const long lo = lmax(0, kj - s.pW), hi = lmin(s.inW, s.outW + kj - s.pW);
                        if (lo >= hi) continue;
                        const __mmask16 m = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
                        const float *src = dcol + ((c * s.kH + ki) * s.kW + kj) * cols + oh * s.outW + s.pW - kj;
                        for (int j = 0; j < 4; j++) {
                            const __mmask16 mj = b0 + j < n ? m : 0;
                            acc[j] = _mm512_add_ps(acc[j], _mm512_maskz_loadu_ps(mj, src + (b0 + j) * outPlane));
                        }
                    }
                }
                for (int j = 0; j < 4 && b0 + j < n; j++)
                    _mm512_mask_storeu_ps(dx + ((b0 + j) * s.inC + channel) * inPlane + ih * s.inW, full, acc[j]);
            }
    }
}
#endif

TANDEM_CLONES
void tandem_direct_conv_forward_f32(float *restrict y, float *restrict xp, const float *restrict x, const float *restrict w,
                                    const float *restrict bias, long n, long outC, TandemConvShape s, int relu) {
    const long row = tandem_direct_row(s.outW), Hp = s.outH + s.kH - 1, Wp = row + s.kW - 1, inPlane = s.inH * s.inW;
    const long outPlane = s.outH * s.outW;
    const int wide = tandem_cv_wide();
    (void)wide;
    for (long b = 0; b < n; b++) {
        // The padded copy of this sample's input.
        float *xb = xp + b * s.inC * Hp * Wp;
        for (long i = 0; i < s.inC * Hp * Wp; i++) xb[i] = 0;
        for (long c = 0; c < s.inC; c++)
            for (long ih = 0; ih < s.inH; ih++) {
                const float *src = x + (b * s.inC + c) * inPlane + ih * s.inW;
                float *dst = xb + (c * Hp + ih + s.pH) * Wp + s.pW;
                for (long iw = 0; iw < s.inW; iw++) dst[iw] = src[iw];
            }
        float *yb = y + b * outC * outPlane;
        for (long oh = 0; oh < s.outH;) {
            // With the wide blocks rows go in pairs (an odd last row alone).
            long nr = 1;
#if TANDEM_WIDE
            if (wide && oh + 1 < s.outH) nr = 2;
#endif
            for (long chunk = 0; chunk < s.outW; chunk += 8) {
#if TANDEM_WIDE
                if (wide && chunk + 16 <= row) {
                    if (nr == 2) direct_chunk_wide2(yb, xb, w, bias, outC, oh, chunk, s, Hp, Wp, relu);
                    else direct_chunk_wide(yb, xb, w, bias, outC, oh, chunk, s, Hp, Wp, relu);
                    chunk += 8;
                    continue;
                }
#endif
                for (long r = 0; r < nr; r++) {
                    const long row_oh = oh + r;
                    { const long oh = row_oh; DIRECT_CHANNELS(direct_block); }
                }
            }
            oh += nr;
        }
    }
}

// The kW vector sums of OB output channels' (oc, c, ki) over one sample's plane: sum[o][kj] += dy[oc + o, oh, ow] *
// xp[c, oh + ki, ow + kj], eight columns at a time from dyp, the planes' dy copied into rows of W8 (a multiple
// of 8) with zeros past outW, so no chunk needs a tail. With KW known at compile time the sums stay in
// registers; the OB channels share each load of xp and give OB x KW independent sums (one channel's KW
// sums alone wait on the FMA latency). Each sum adds over oh, then the chunks, in order, at any OB.
#define WEIGHT_SUMS_BODY(KW, OB) { \
    f8 sum[OB][8]; \
    for (int o = 0; o < (OB); o++) for (long kj = 0; kj < (KW); kj++) sum[o][kj] = load_f8(a + o * aStride + kj * 8); \
    for (long oh = 0; oh < outH; oh++) { \
        const float *row = rows + oh * Wp, *g = dyp + oh * W8; \
        for (long chunk = 0; chunk < W8; chunk += 8) { \
            f8 gv[OB]; \
            for (int o = 0; o < (OB); o++) gv[o] = load_f8(g + o * dStride + chunk); \
            for (long kj = 0; kj < (KW); kj++) { \
                const f8 xv = load_f8(row + chunk + kj); \
                for (int o = 0; o < (OB); o++) sum[o][kj] += gv[o] * xv; \
            } \
        } \
    } \
    for (int o = 0; o < (OB); o++) for (long kj = 0; kj < (KW); kj++) __builtin_memcpy(a + o * aStride + kj * 8, &sum[o][kj], sizeof(f8)); \
}
#define WEIGHT_SUMS_OF(NAME, ATTR, OB) \
static inline __attribute__((always_inline)) ATTR void NAME##_##OB(float *a, long aStride, const float *rows, const float *dyp, long dStride, \
                                                                 long outH, long W8, long Wp, long kW) { \
    switch (kW) { \
    case 3: WEIGHT_SUMS_BODY(3, OB) break; \
    case 5: WEIGHT_SUMS_BODY(5, OB) break; \
    default: WEIGHT_SUMS_BODY(kW, OB) break; \
    } \
}
WEIGHT_SUMS_OF(weight_sums, , 2)
WEIGHT_SUMS_OF(weight_sums, , 1)

// One sample's sums for all output channels, OBMAX at a time (the last block takes the rest).
#define WEIGHT_GRAD_SAMPLE(SUMS, OBMAX) do { \
    for (long oc = 0; oc < outC;) { \
        const long ob = lmin(OBMAX, outC - oc); \
        for (long o = 0; o < ob; o++) { \
            const float *src = dy + (b * outC + oc + o) * outPlane; \
            for (long oh = 0; oh < s.outH; oh++) \
                for (long ow = 0; ow < s.outW; ow++) dyp[o * dStride + oh * W8 + ow] = src[oh * s.outW + ow]; \
        } \
        for (long c = 0; c < s.inC; c++) \
            for (long ki = 0; ki < s.kH; ki++) { \
                float *a = acc + (oc * K + (c * s.kH + ki) * s.kW) * 8; \
                const float *rows = xb + (c * Hp + ki) * Wp; \
                switch (ob) { \
                case 3: SUMS##_3(a, K * 8, rows, dyp, dStride, s.outH, W8, Wp, s.kW); break; \
                case 2: SUMS##_2(a, K * 8, rows, dyp, dStride, s.outH, W8, Wp, s.kW); break; \
                default: SUMS##_1(a, K * 8, rows, dyp, dStride, s.outH, W8, Wp, s.kW); break; \
                } \
            } \
        oc += ob; \
    } \
} while (0)
// The narrow path's blocks are at most 2 (16 registers): a block of 3 there would be a bug.
#define weight_sums_3(...) __builtin_trap()
_Static_assert(DIRECT_GRAD_OB >= 3, "tandem_direct_grad_scratch holds DIRECT_GRAD_OB dy planes, the wide blocks' 3");

#if TANDEM_WIDE
// With 32 registers, three channels' sums (15 for 5 taps) in the same 8-float vectors: the same bits.
WEIGHT_SUMS_OF(weight_sums_wide, TANDEM_AVX512, 3)
WEIGHT_SUMS_OF(weight_sums_wide, TANDEM_AVX512, 2)
WEIGHT_SUMS_OF(weight_sums_wide, TANDEM_AVX512, 1)
static TANDEM_AVX512 void direct_weight_grad_sample_wide(float *acc, float *dyp, const float *dy, const float *xb, long b, long outC,
                                                         TandemConvShape s, long Hp, long Wp, long W8, long K, long outPlane,
                                                         long dStride) {
    WEIGHT_GRAD_SAMPLE(weight_sums_wide, 3);
}
#endif

// dw[oc, c, ki, kj] = sum over samples and output positions of dy[oc, oh, ow] * xp[c, oh + ki, ow + kj]:
// per sample (its dy and padded input stay in L1), each (oc, c, ki) keeps kW vector sums in registers
// across the plane, carried from sample to sample in `acc`; the lanes are summed at the end.
TANDEM_CLONES
void tandem_direct_conv_weight_grad_f32(float *restrict dw, float *restrict db, float *restrict acc, const float *restrict dy,
                                        const float *restrict xp, long n, long outC, TandemConvShape s) {
    const long Hp = s.outH + s.kH - 1, Wp = tandem_direct_row(s.outW) + s.kW - 1, outPlane = s.outH * s.outW;
    const long K = s.inC * s.kH * s.kW;
    const long W8 = tandem_direct_row(s.outW), dStride = s.outH * W8;
    float *dyp = acc + outC * K * 8;
    const int wide = tandem_cv_wide();
    (void)wide;
    for (long i = 0; i < outC * K * 8; i++) acc[i] = 0;
    for (long i = 0; i < DIRECT_GRAD_OB * dStride; i++) dyp[i] = 0;
    for (long b = 0; b < n; b++) {
        const float *xb = xp + b * s.inC * Hp * Wp;
#if TANDEM_WIDE
        if (wide) { direct_weight_grad_sample_wide(acc, dyp, dy, xb, b, outC, s, Hp, Wp, W8, K, outPlane, dStride); continue; }
#endif
        WEIGHT_GRAD_SAMPLE(weight_sums, 2);
    }
    for (long i = 0; i < outC * K; i++) {
        float t = 0;
        for (int l = 0; l < 8; l++) t += acc[i * 8 + l];
        dw[i] += t;
    }
    if (db)
        for (long oc = 0; oc < outC; oc++) {
            // Per plane in eight float lanes, across planes in double: a single float sum over
            // 100,000 values (LeNet-5's conv1 at batch 128) would lose digits.
            double t = 0;
            for (long b = 0; b < n; b++) t += (double)plane_sum(dy + (b * outC + oc) * outPlane, outPlane);
            db[oc] += (float)t;
        }
}

// MARK: direct convolution, output channels in vectors

// For layers whose weight matrix is small next to their column matrix (LeNet-5's conv2: 16 x 150
// weights, each input value copied 25 times by im2col): stride 1, one group, any padding below the
// kernel size. Eight output channels per vector and a tile of output positions in registers; each
// window tap is broadcast from the zero-padded input, [inC, inH + 2 pH, inW + 2 pW] per sample. The
// weights come transposed, wt[K][OCp] with OCp = outC rounded up to 8 (zeros past outC).

long tandem_cv_channels(long outC) { return (outC + 7) / 8 * 8; }
static inline long round12(long v) { return (v + 11) / 12 * 12; }
static inline long cv_hp(TandemConvShape s) { return s.inH + 2 * s.pH; }
static inline long cv_wp(TandemConvShape s) { return s.inW + 2 * s.pW; }
long tandem_cv_padded_count(long n, TandemConvShape s) { return n * s.inC * cv_hp(s) * cv_wp(s); }
static inline long cv_groups(TandemConvShape s) { return s.inC / s.inGroup; }
long tandem_cv_grad_scratch(long outC, TandemConvShape s) {
    return (s.outH * s.outW + round12(s.inGroup * s.kH * s.kW)) * tandem_cv_channels(outC / cv_groups(s));
}
long tandem_cv_weights_count(long outC, TandemConvShape s) {
    return cv_groups(s) * s.inGroup * s.kH * s.kW * tandem_cv_channels(outC / cv_groups(s));
}

void tandem_cv_weights_f32(float *restrict wt, const float *restrict w, long outC, TandemConvShape s) {
    const long G = cv_groups(s), outGroup = outC / G, OCp = tandem_cv_channels(outGroup), K = s.inGroup * s.kH * s.kW;
    for (long g = 0; g < G; g++)
        for (long k = 0; k < K; k++)
            for (long oc = 0; oc < OCp; oc++) wt[(g * K + k) * OCp + oc] = oc < outGroup ? w[(g * outGroup + oc) * K + k] : 0;
}

#if TANDEM_WIDE
// R rows of C's block of w <= 16 columns from the k vectors of B's block held in registers: each output
// sums its k products in the order p = 0, 1, ..., k - 1, each a fused multiply-add.
#define SMALLK_ROWS(R) \
static inline __attribute__((always_inline)) TANDEM_AVX512 void smallk_rows_##R(float *c, const float *a, const f16 *bv, long i, long k, \
                                                                             long lda, long ldc, long w) { \
    f16 acc[R]; \
    for (int r = 0; r < (R); r++) acc[r] = (f16)0.0f; \
    for (long p = 0; p < k; p++) \
        for (int r = 0; r < (R); r++) acc[r] += (f16)(a[p * lda + i + r]) * bv[p]; \
    for (int r = 0; r < (R); r++) { \
        if (w == 16) __builtin_memcpy(c + (i + r) * ldc, &acc[r], sizeof(f16)); \
        else { float o_[16]; __builtin_memcpy(o_, &acc[r], sizeof o_); for (long l = 0; l < w; l++) c[(i + r) * ldc + l] = o_[l]; } \
    } \
}
SMALLK_ROWS(8)
SMALLK_ROWS(1)

static TANDEM_AVX512 void gemm_tn_smallk_wide(float *restrict c, const float *restrict a, const float *restrict b, long m, long n,
                                              long k, long lda, long ldb, long ldc) {
    f16 bv[16];
    for (long j = 0; j < n; j += 16) {
        const long w = lmin(16, n - j);
        for (long p = 0; p < k; p++) {
            if (w == 16) { __builtin_memcpy(&bv[p], b + p * ldb + j, sizeof(f16)); continue; }
            float lanes[16] = {0};
            for (long l = 0; l < w; l++) lanes[l] = b[p * ldb + j + l];
            __builtin_memcpy(&bv[p], lanes, sizeof(f16));
        }
        long i = 0;
        for (; i + 8 <= m; i += 8) smallk_rows_8(c + j, a, bv, i, k, lda, ldc, w);
        for (; i < m; i++) smallk_rows_1(c + j, a, bv, i, k, lda, ldc, w);
    }
}
#endif

int tandem_gemm_tn_smallk_f32(float *restrict c, const float *restrict a, const float *restrict b, long m, long n, long k, long lda,
                              long ldb, long ldc) {
#if TANDEM_WIDE
    if (k >= 1 && k <= 16 && tandem_wide_kernels_available()) {
        gemm_tn_smallk_wide(c, a, b, m, n, k, lda, ldb, ldc);
        return 1;
    }
#endif
    (void)c; (void)a; (void)b; (void)m; (void)n; (void)k; (void)lda; (void)ldb; (void)ldc;
    return 0;
}

#if TANDEM_WIDE
// Fully connected forward in 16 lanes: each output y[b][j] is one dot product of x's row b and W's row j,
// lane l summing the products l, l + 16, ... (the tail masked to zeros) in fused multiply-adds, then the
// lanes summed by _mm512_reduce_add_ps; RB (1-4) samples x 4 outputs per tile, W streamed once per RB
// samples. Nothing is packed. A sample's outputs have the same bits whatever m is, so chunks of any size
// agree. Rows of RB samples, RB a constant where it is inlined: a chunk of 1-3 samples (the end of a
// parallel.dynamic step) multiplies only its own rows (LeNet-5's fc1, hot in cache, one thread: 1, 2 and
// 3 samples 2.4, 2.7 and 3.2 us, against 3.6, 4.1 and 4.2 when every tile took 4 rows; W's 192 KB read
// from L2 bounds the single sample).
static inline __attribute__((always_inline)) TANDEM_AVX512 void linear_forward_rows(float *restrict y, const float *restrict x,
                                                                                 const float *restrict w, const float *restrict bias,
                                                                                 long b0, long n, long k, const int RB) {
    const long kv = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - kv)) - 1);
    const float *xr[4];
    for (int i = 0; i < RB; i++) xr[i] = x + (b0 + i) * k;
    for (long j0 = 0; j0 < n; j0 += 4) {
        const long rj = lmin(4, n - j0);
        const float *wr[4];
        for (int j = 0; j < 4; j++) wr[j] = w + (j0 + (j < rj ? j : 0)) * k;
        __m512 acc[4][4];
        for (int i = 0; i < RB; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
        for (long p = 0; p < kv; p += 16) {
            __m512 xv[4], wv[4];
            for (int i = 0; i < RB; i++) xv[i] = _mm512_loadu_ps(xr[i] + p);
            for (int j = 0; j < 4; j++) wv[j] = _mm512_loadu_ps(wr[j] + p);
            for (int i = 0; i < RB; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv[j], acc[i][j]);
        }
        if (tail) {
            __m512 xv[4], wv[4];
            for (int i = 0; i < RB; i++) xv[i] = _mm512_maskz_loadu_ps(tail, xr[i] + kv);
            for (int j = 0; j < 4; j++) wv[j] = _mm512_maskz_loadu_ps(tail, wr[j] + kv);
            for (int i = 0; i < RB; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv[j], acc[i][j]);
        }
        for (int i = 0; i < RB; i++)
            for (long j = 0; j < rj; j++)
                y[(b0 + i) * n + j0 + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j0 + j] : 0.0f);
    }
}

static TANDEM_AVX512 void linear_forward_wide(float *restrict y, const float *restrict x, const float *restrict w,
                                              const float *restrict bias, long m, long n, long k) {
    long b0 = 0;
    for (; b0 + 4 <= m; b0 += 4) linear_forward_rows(y, x, w, bias, b0, n, k, 4);
    switch (m - b0) {
    case 3: linear_forward_rows(y, x, w, bias, b0, n, k, 3); break;
    case 2: linear_forward_rows(y, x, w, bias, b0, n, k, 2); break;
    case 1: linear_forward_rows(y, x, w, bias, b0, n, k, 1); break;
    default: break;
    }
}

// Fully connected input gradient in 16 lanes: dx[b][c] = sum over j = 0, 1, ..., n - 1 of dy[b][j] W[j][c],
// in that order, fused; 6 samples x 64 columns per tile, W's rows read in place (nothing packed). A
// sample's gradient has the same bits whatever m is.
static TANDEM_AVX512 void linear_input_grad_wide(float *restrict dx, const float *restrict dy, const float *restrict w,
                                                 long m, long n, long k) {
    for (long b0 = 0; b0 < m; b0 += 6) {
        const long rb = lmin(6, m - b0);
        const float *dr[6];
        for (int i = 0; i < 6; i++) dr[i] = dy + (b0 + (i < rb ? i : 0)) * n;
        for (long c0 = 0; c0 < k; c0 += 64) {
            __mmask16 mask[4];
            for (int v = 0; v < 4; v++) {
                const long left = k - c0 - 16 * v;
                mask[v] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            }
            __m512 acc[6][4];
            for (int i = 0; i < 6; i++)
                for (int v = 0; v < 4; v++) acc[i][v] = _mm512_setzero_ps();
            for (long j = 0; j < n; j++) {
                __m512 wv[4];
                for (int v = 0; v < 4; v++) wv[v] = _mm512_maskz_loadu_ps(mask[v], w + j * k + c0 + 16 * v);
                for (int i = 0; i < 6; i++) {
                    const __m512 d = _mm512_set1_ps(dr[i][j]);
                    for (int v = 0; v < 4; v++) acc[i][v] = _mm512_fmadd_ps(d, wv[v], acc[i][v]);
                }
            }
            for (long i = 0; i < rb; i++)
                for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(dx + (b0 + i) * k + c0 + 16 * v, mask[v], acc[i][v]);
        }
    }
}
#endif

int tandem_linear_forward_f32(float *restrict y, const float *restrict x, const float *restrict w, const float *restrict bias,
                              long m, long n, long k) {
#if TANDEM_WIDE
    if (tandem_wide_kernels_available()) {
        linear_forward_wide(y, x, w, bias, m, n, k);
        return 1;
    }
#endif
    (void)y; (void)x; (void)w; (void)bias; (void)m; (void)n; (void)k;
    return 0;
}

int tandem_linear_input_grad_f32(float *restrict dx, const float *restrict dy, const float *restrict w, long m, long n, long k) {
#if TANDEM_WIDE
    if (tandem_wide_kernels_available()) {
        linear_input_grad_wide(dx, dy, w, m, n, k);
        return 1;
    }
#endif
    (void)dx; (void)dy; (void)w; (void)m; (void)n; (void)k;
    return 0;
}

void tandem_cv_transposed_weights_f32(float *restrict wt, const float *restrict w, long outC, TandemConvShape s) {
    const long G = cv_groups(s), outGroup = outC / G, KK = s.kH * s.kW, Kt = outGroup * KK, OCp = tandem_cv_channels(s.inGroup);
    for (long g = 0; g < G; g++)
        for (long oc = 0; oc < outGroup; oc++)
            for (long ki = 0; ki < s.kH; ki++)
                for (long kj = 0; kj < s.kW; kj++) {
                    float *dst = wt + (g * Kt + (oc * s.kH + ki) * s.kW + kj) * OCp;
                    const float *src = w + (g * outGroup + oc) * s.inGroup * KK + (s.kH - 1 - ki) * s.kW + (s.kW - 1 - kj);
                    for (long c = 0; c < OCp; c++) dst[c] = c < s.inGroup ? src[c * KK] : 0;
                }
}

// off[k]: tap k = (c, ki, kj) of a group in its padded input, zero from K to round12(K); pos[p]: the window corner of
// output position p = (oh, ow), then the last one repeated 12 times (tiles past the end read it).
static void cv_tables(int32_t *off, int32_t *pos, TandemConvShape s) {
    const long Hp = cv_hp(s), Wp = cv_wp(s), K = s.inGroup * s.kH * s.kW, P = s.outH * s.outW;
    for (long c = 0; c < s.inGroup; c++)
        for (long ki = 0; ki < s.kH; ki++)
            for (long kj = 0; kj < s.kW; kj++) off[(c * s.kH + ki) * s.kW + kj] = (int32_t)((c * Hp + ki) * Wp + kj);
    for (long k = K; k < round12(K); k++) off[k] = 0;
    for (long p = 0; p < P; p++) pos[p] = (int32_t)(p / s.outW * Wp + p % s.outW);
    for (long p = P; p < P + 12; p++) pos[p] = pos[P - 1];
}

// V vectors of output channels (8 V from cb) x NP output positions (from p0; `count` of them stored).
// NAME_V_NP: vectors of type VT (LANES floats, loaded by LOAD), compiled with the attributes ATTR.
#define CV_FORWARD_TILE_OF(NAME, VT, LANES, LOAD, ATTR, V, NP) \
static inline __attribute__((always_inline)) ATTR void NAME##_##V##_##NP(float *y, const float *xb, const float *wt, const float *bias, const int32_t *off, \
                                         const int32_t *pos, long p0, long count, long K, long OCp, long cb, long outC, long plane, \
                                         int relu) { \
    VT acc[NP][V]; \
    const float *xj[NP]; \
    for (int j = 0; j < (NP); j++) xj[j] = xb + pos[p0 + j]; \
    for (int v = 0; v < (V); v++) { const VT b_ = LOAD(bias + cb + (LANES) * v); for (int j = 0; j < (NP); j++) acc[j][v] = b_; } \
    for (long k = 0; k < K; k++) { \
        const float *wk = wt + k * OCp + cb; \
        const long o = off[k]; \
        VT w_[V]; \
        for (int v = 0; v < (V); v++) w_[v] = LOAD(wk + (LANES) * v); \
        for (int j = 0; j < (NP); j++) { \
            const VT x_ = (VT)(xj[j][o]); \
            for (int v = 0; v < (V); v++) acc[j][v] += w_[v] * x_; \
        } \
    } \
    if (relu) \
        for (int j = 0; j < (NP); j++) \
            for (int v = 0; v < (V); v++) acc[j][v] = __builtin_elementwise_max(acc[j][v], (VT)0.0f); \
    float out[NP][(LANES) * (V)]; \
    __builtin_memcpy(out, acc, sizeof out); \
    for (long l = 0; l < (LANES) * (V) && cb + l < outC; l++) { \
        float *dst = y + (cb + l) * plane + p0; \
        for (long j = 0; j < count; j++) dst[j] = out[j][l]; \
    } \
}
#define CV_FORWARD_TILE(V, NP) CV_FORWARD_TILE_OF(cv_forward, f8, 8, load_f8, , V, NP)
CV_FORWARD_TILE(2, 6)
CV_FORWARD_TILE(1, 7)

// The same tiles 16 channels wide, for AVX-512 (32 registers): each output lane sums the same
// products in the same order as the 8-wide tiles, so both give the same bits.
#if TANDEM_WIDE
#define CV_FORWARD_WIDE_TILE(V, NP) CV_FORWARD_TILE_OF(cv_forward_wide, f16, 16, load_f16, TANDEM_AVX512, V, NP)
CV_FORWARD_WIDE_TILE(2, 7)
CV_FORWARD_WIDE_TILE(1, 10)

// One sample's group through the wide tiles (32, then 16, then 8 channels at a time).
static TANDEM_AVX512 void cv_forward_group_wide(float *yg, const float *xg, const float *wg, const float *bg, const int32_t *off,
                                                const int32_t *pos, long P, long K, long OCp, long outGroup, int relu) {
    for (long cb = 0; cb < OCp;) {
        if (OCp - cb >= 32) {
            for (long p0 = 0; p0 < P; p0 += 7) cv_forward_wide_2_7(yg, xg, wg, bg, off, pos, p0, lmin(7, P - p0), K, OCp, cb, outGroup, P, relu);
            cb += 32;
        } else if (OCp - cb >= 16) {
            for (long p0 = 0; p0 < P; p0 += 10) cv_forward_wide_1_10(yg, xg, wg, bg, off, pos, p0, lmin(10, P - p0), K, OCp, cb, outGroup, P, relu);
            cb += 16;
        } else {
            for (long p0 = 0; p0 < P; p0 += 7) cv_forward_1_7(yg, xg, wg, bg, off, pos, p0, lmin(7, P - p0), K, OCp, cb, outGroup, P, relu);
            cb += 8;
        }
    }
}
#endif

// Whether the CPU runs the wide tiles: AVX-512 F, BW, DQ and VL, and everything the AVX2 + FMA clone of
// the 8-wide tiles needs (x86-64-v4 includes v3), so that both fuse their multiply-adds; and
// TANDEM_NO_AVX512=1 is not in the environment. Asked once (-1 until then).
static int wide_available_state = -1;
int tandem_wide_kernels_available(void) {
    int w = __atomic_load_n(&wide_available_state, __ATOMIC_RELAXED);
    if (w < 0) {
#if TANDEM_WIDE
        __builtin_cpu_init();
        const char *off = getenv("TANDEM_NO_AVX512");
        w = __builtin_cpu_supports("x86-64-v4") && !(off && off[0] == '1');
#else
        w = 0;
#endif
        __atomic_store_n(&wide_available_state, w, __ATOMIC_RELAXED);
    }
    return w;
}

const char *tandem_blas_coretype_for_cpu(void) {
#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "SkylakeX";
    if (__builtin_cpu_supports("x86-64-v3")) return "Haswell";
#endif
    return 0;
}

// Whether the tiles now run wide: available, and not turned off by tandem_cv_set_wide (-1: not set yet,
// then the same as available; set only from -1 or by tandem_cv_set_wide, so that a first call racing
// with tandem_cv_set_wide cannot undo it).
static int cv_wide_state = -1;
int tandem_cv_wide(void) {
    int w = __atomic_load_n(&cv_wide_state, __ATOMIC_RELAXED);
    if (w < 0) {
        int expected = -1;
        w = tandem_wide_kernels_available();
        if (!__atomic_compare_exchange_n(&cv_wide_state, &expected, w, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) w = expected;
    }
    return w;
}
int tandem_cv_set_wide(int on) {
    const int w = on && tandem_wide_kernels_available();
    __atomic_store_n(&cv_wide_state, w, __ATOMIC_RELAXED);
    return w;
}

TANDEM_CLONES
void tandem_cv_forward_f32(float *restrict y, float *restrict xp, const float *restrict x, const float *restrict wt,
                           const float *restrict bias, long n, long outC, TandemConvShape s, int relu) {
    const long Hp = cv_hp(s), Wp = cv_wp(s), padded = s.inC * Hp * Wp, inPlane = s.inH * s.inW;
    const long G = cv_groups(s), outGroup = outC / G, K = s.inGroup * s.kH * s.kW, OCp = tandem_cv_channels(outGroup);
    const long P = s.outH * s.outW;
    int32_t off[round12(K)], pos[P + 12];
    cv_tables(off, pos, s);
    const int wide = tandem_cv_wide();
    (void)wide;
    float b[G * OCp];
    for (long g = 0; g < G; g++)
        for (long oc = 0; oc < OCp; oc++) b[g * OCp + oc] = bias && oc < outGroup ? bias[g * outGroup + oc] : 0;
    for (long i = 0; i < n; i++) {
        float *xb = xp + i * padded;
        __builtin_memset(xb, 0, sizeof(float) * padded);
        for (long c = 0; c < s.inC; c++)
            for (long ih = 0; ih < s.inH; ih++)
                __builtin_memcpy(xb + (c * Hp + ih + s.pH) * Wp + s.pW, x + (i * s.inC + c) * inPlane + ih * s.inW, sizeof(float) * s.inW);
        for (long g = 0; g < G; g++) {
            const float *xg = xb + g * s.inGroup * Hp * Wp, *wg = wt + g * K * OCp, *bg = b + g * OCp;
            float *yg = y + (i * outC + g * outGroup) * P;
#if TANDEM_WIDE
            if (wide) { cv_forward_group_wide(yg, xg, wg, bg, off, pos, P, K, OCp, outGroup, relu); continue; }
#endif
            for (long cb = 0; cb < OCp;) {
                if (OCp - cb >= 16) {
                    for (long p0 = 0; p0 < P; p0 += 6) cv_forward_2_6(yg, xg, wg, bg, off, pos, p0, lmin(6, P - p0), K, OCp, cb, outGroup, P, relu);
                    cb += 16;
                } else {
                    for (long p0 = 0; p0 < P; p0 += 7) cv_forward_1_7(yg, xg, wg, bg, off, pos, p0, lmin(7, P - p0), K, OCp, cb, outGroup, P, relu);
                    cb += 8;
                }
            }
        }
    }
}

// The weight-gradient sums of taps k0..<k0+NT for output channels cb..<cb + 8 V over one sample:
// acc[k][oc] += sum over positions p of dyT[p][oc] * xb[pos[p] + off[k]].
#define CV_GRAD_TILE_OF(NAME, VT, LANES, LOAD, ATTR, V, NT) \
static inline __attribute__((always_inline)) ATTR void NAME##_##V##_##NT(float *acc, const float *xb, const float *dyT, const int32_t *off, const int32_t *pos, \
                                      long P, long k0, long OCp, long cb) { \
    VT a[NT][V]; \
    long o[NT]; \
    for (int t = 0; t < (NT); t++) { \
        o[t] = off[k0 + t]; \
        for (int v = 0; v < (V); v++) a[t][v] = LOAD(acc + (k0 + t) * OCp + cb + (LANES) * v); \
    } \
    for (long p = 0; p < P; p++) { \
        const float *xq = xb + pos[p]; \
        VT d[V]; \
        for (int v = 0; v < (V); v++) d[v] = LOAD(dyT + p * OCp + cb + (LANES) * v); \
        for (int t = 0; t < (NT); t++) { \
            const VT x_ = (VT)(xq[o[t]]); \
            for (int v = 0; v < (V); v++) a[t][v] += d[v] * x_; \
        } \
    } \
    for (int t = 0; t < (NT); t++) \
        for (int v = 0; v < (V); v++) __builtin_memcpy(acc + (k0 + t) * OCp + cb + (LANES) * v, &a[t][v], sizeof(VT)); \
}
#define CV_GRAD_TILE(V, NT) CV_GRAD_TILE_OF(cv_grad, f8, 8, load_f8, , V, NT)
CV_GRAD_TILE(2, 6)
CV_GRAD_TILE(1, 12)

#if TANDEM_WIDE
#define CV_GRAD_WIDE_TILE(V, NT) CV_GRAD_TILE_OF(cv_grad_wide, f16, 16, load_f16, TANDEM_AVX512, V, NT)
CV_GRAD_WIDE_TILE(2, 6)
CV_GRAD_WIDE_TILE(1, 12)

static TANDEM_AVX512 void cv_grad_sample_wide(float *acc, const float *xg, const float *dyT, const int32_t *off, const int32_t *pos,
                                              long P, long K, long OCp) {
    for (long cb = 0; cb < OCp;) {
        if (OCp - cb >= 32) {
            for (long k0 = 0; k0 < K; k0 += 6) cv_grad_wide_2_6(acc, xg, dyT, off, pos, P, k0, OCp, cb);
            cb += 32;
        } else if (OCp - cb >= 16) {
            for (long k0 = 0; k0 < K; k0 += 12) cv_grad_wide_1_12(acc, xg, dyT, off, pos, P, k0, OCp, cb);
            cb += 16;
        } else {
            for (long k0 = 0; k0 < K; k0 += 12) cv_grad_1_12(acc, xg, dyT, off, pos, P, k0, OCp, cb);
            cb += 8;
        }
    }
}
#endif

TANDEM_CLONES
void tandem_cv_weight_grad_f32(float *restrict dw, float *restrict db, float *restrict scratch, const float *restrict dy,
                               const float *restrict xp, long n, long outC, TandemConvShape s) {
    const long Hp = cv_hp(s), Wp = cv_wp(s), padded = s.inC * Hp * Wp, K = s.inGroup * s.kH * s.kW, Kp = round12(K);
    const long G = cv_groups(s), outGroup = outC / G, OCp = tandem_cv_channels(outGroup), P = s.outH * s.outW;
    int32_t off[Kp], pos[P + 12];
    cv_tables(off, pos, s);
    const int wide = tandem_cv_wide();
    (void)wide;
    float *dyT = scratch, *acc = scratch + P * OCp;
    double bsum[OCp];
    for (long g = 0; g < G; g++) {
        for (long i = 0; i < (P + Kp) * OCp; i++) scratch[i] = 0;
        for (long oc = 0; oc < OCp; oc++) bsum[oc] = 0;
        for (long i = 0; i < n; i++) {
            const float *xg = xp + i * padded + g * s.inGroup * Hp * Wp, *dyg = dy + (i * outC + g * outGroup) * P;
            for (long oc = 0; oc < outGroup; oc++) {
                for (long p = 0; p < P; p++) dyT[p * OCp + oc] = dyg[oc * P + p];
                bsum[oc] += (double)plane_sum(dyg + oc * P, P);
            }
#if TANDEM_WIDE
            if (wide) { cv_grad_sample_wide(acc, xg, dyT, off, pos, P, K, OCp); continue; }
#endif
            for (long cb = 0; cb < OCp;) {
                if (OCp - cb >= 16) {
                    for (long k0 = 0; k0 < K; k0 += 6) cv_grad_2_6(acc, xg, dyT, off, pos, P, k0, OCp, cb);
                    cb += 16;
                } else {
                    for (long k0 = 0; k0 < K; k0 += 12) cv_grad_1_12(acc, xg, dyT, off, pos, P, k0, OCp, cb);
                    cb += 8;
                }
            }
        }
        for (long oc = 0; oc < outGroup; oc++) {
            for (long k = 0; k < K; k++) dw[(g * outGroup + oc) * K + k] += acc[k * OCp + oc];
            if (db) db[g * outGroup + oc] += (float)bsum[oc];
        }
    }
}

// MARK: batch normalisation

// Sum of p[0..<m] and of p[i] * q[i] (q may be null), and of (p[i] - mean)^2, in eight float lanes.
// A macro, not a function: passing an 8-float vector to a function changes the ABI without AVX.
#define lane_sum(v) ({ const f8 u_ = (v); ((u_[0] + u_[1]) + (u_[2] + u_[3])) + ((u_[4] + u_[5]) + (u_[6] + u_[7])); })

static inline float plane_sum(const float *p, long m) {
    f8 acc = (f8)0.0f;
    long i = 0;
    for (; i + 8 <= m; i += 8) acc += load_f8(p + i);
    float t = lane_sum(acc);
    for (; i < m; i++) t += p[i];
    return t;
}

static inline float plane_dot(const float *p, const float *q, long m) {
    f8 acc = (f8)0.0f;
    long i = 0;
    for (; i + 8 <= m; i += 8) acc += load_f8(p + i) * load_f8(q + i);
    float t = lane_sum(acc);
    for (; i < m; i++) t += p[i] * q[i];
    return t;
}

static inline float plane_squared_deviation(const float *p, float mean, long m) {
    f8 acc = (f8)0.0f;
    long i = 0;
    for (; i + 8 <= m; i += 8) { f8 d = load_f8(p + i) - mean; acc += d * d; }
    float t = lane_sum(acc);
    for (; i < m; i++) { float d = p[i] - mean; t += d * d; }
    return t;
}

TANDEM_CLONES
void tandem_bn_sums_f32(double *restrict sums, const float *restrict x, long n, long channels, long plane) {
    for (long c = 0; c < channels; c++) sums[c] = 0;
    if (plane == 1) {
        for (long b = 0; b < n; b++) for (long c = 0; c < channels; c++) sums[c] += (double)x[b * channels + c];
        return;
    }
    for (long b = 0; b < n; b++)
        for (long c = 0; c < channels; c++) sums[c] += (double)plane_sum(x + (b * channels + c) * plane, plane);
}

TANDEM_CLONES
void tandem_bn_squared_deviations_f32(double *restrict sums, const float *restrict x, const double *restrict mean,
                                      long n, long channels, long plane) {
    for (long c = 0; c < channels; c++) sums[c] = 0;
    if (plane == 1) {
        for (long b = 0; b < n; b++)
            for (long c = 0; c < channels; c++) { double d = (double)x[b * channels + c] - mean[c]; sums[c] += d * d; }
        return;
    }
    for (long b = 0; b < n; b++)
        for (long c = 0; c < channels; c++)
            sums[c] += (double)plane_squared_deviation(x + (b * channels + c) * plane, (float)mean[c], plane);
}

TANDEM_CLONES
void tandem_bn_apply_f32(float *restrict y, float *restrict xhat, const float *restrict x, const double *restrict mean,
                         const double *restrict invStd, const float *restrict gamma, const float *restrict beta,
                         long n, long channels, long plane, int relu) {
    for (long b = 0; b < n; b++)
        for (long c = 0; c < channels; c++) {
            const float m = (float)mean[c], s = (float)invStd[c], g = gamma[c], bt = beta[c];
            const long o = (b * channels + c) * plane;
            const float *xr = x + o;
            float *yr = y + o;
            // With relu, the ReLU after the layer as ActivationLayer computes it (v > 0 ? v : 0).
            if (xhat) {
                float *hr = xhat + o;
                if (relu) for (long i = 0; i < plane; i++) { float h = (xr[i] - m) * s; hr[i] = h; float v = g * h + bt; yr[i] = v > 0 ? v : 0.0f; }
                else for (long i = 0; i < plane; i++) { float h = (xr[i] - m) * s; hr[i] = h; yr[i] = g * h + bt; }
            } else {
                const float scale = g * s, shift = bt - g * m * s;
                if (relu) for (long i = 0; i < plane; i++) { float v = xr[i] * scale + shift; yr[i] = v > 0 ? v : 0.0f; }
                else for (long i = 0; i < plane; i++) yr[i] = xr[i] * scale + shift;
            }
        }
}

TANDEM_CLONES
void tandem_bn_gradient_sums_f32(double *restrict sums, const float *restrict dy, const float *restrict xhat,
                                 long n, long channels, long plane) {
    for (long c = 0; c < 2 * channels; c++) sums[c] = 0;
    if (plane == 1) {
        for (long b = 0; b < n; b++)
            for (long c = 0; c < channels; c++) {
                const float g = dy[b * channels + c];
                sums[c] += (double)g;
                sums[channels + c] += (double)(g * xhat[b * channels + c]);
            }
        return;
    }
    for (long b = 0; b < n; b++)
        for (long c = 0; c < channels; c++) {
            const long o = (b * channels + c) * plane;
            sums[c] += (double)plane_sum(dy + o, plane);
            sums[channels + c] += (double)plane_dot(dy + o, xhat + o, plane);
        }
}

TANDEM_CLONES
void tandem_bn_input_gradient_f32(float *restrict dx, const float *restrict dy, const float *restrict xhat,
                                  const float *restrict gamma, const double *restrict invStd, const double *restrict sums,
                                  long count, long n, long channels, long plane) {
    const double inv = 1.0 / (double)count;
    for (long b = 0; b < n; b++)
        for (long c = 0; c < channels; c++) {
            const float k = (float)((double)gamma[c] * invStd[c]);
            const float meanDy = (float)(sums[c] * inv), meanDyXhat = (float)(sums[channels + c] * inv);
            const long o = (b * channels + c) * plane;
            for (long i = 0; i < plane; i++) dx[o + i] = k * (dy[o + i] - meanDy - xhat[o + i] * meanDyXhat);
        }
}

// MARK: optimiser

// The loop-invariant choices are hoisted so that each loop is straight-line and vectorises.
#define SGD_LOOP(GRAD, UPDATE) \
    for (long i = 0; i < count; i++) { \
        const float wi = w[i]; \
        const float grad = GRAD; \
        const float vel = momentum * v[i] + grad; \
        v[i] = vel; \
        w[i] = wi - lr * (UPDATE); \
    }

// No fused multiply-adds: the AVX2 clone and the baseline clone must give the same weights, bit for
// bit, or replicas on different CPUs would drift apart from the same averaged gradients.
TANDEM_CLONES
void tandem_sgd_f32(float *restrict w, const float *restrict g, float *restrict v, long count, float lr, float momentum,
                    int nesterov, float l2, float l1) {
#pragma clang fp contract(off)
    if (l1 != 0) {
        if (nesterov) { SGD_LOOP(g[i] + l2 * wi + l1 * (float)((wi > 0) - (wi < 0)), grad + momentum * vel) }
        else { SGD_LOOP(g[i] + l2 * wi + l1 * (float)((wi > 0) - (wi < 0)), vel) }
    } else if (l2 != 0) {
        if (nesterov) { SGD_LOOP(g[i] + l2 * wi, grad + momentum * vel) }
        else { SGD_LOOP(g[i] + l2 * wi, vel) }
    } else {
        if (nesterov) { SGD_LOOP(g[i], grad + momentum * vel) }
        else { SGD_LOOP(g[i], vel) }
    }
}

// Max pooling backward: dx = 0 but dy at each output's maximum (summed where windows overlap). With y,
// the pool's output, it also applies the ReLU whose output the pool reads (MaxPoolLayer.masksReLU):
// y[o] is the ReLU output at o's maximum, so y[o] > 0 exactly where that ReLU passes its gradient.
TANDEM_CLONES
void tandem_maxpool_backward_f32(float *restrict dx, const float *restrict dy, const int32_t *restrict argmax,
                                 const float *restrict y, long planes, long inPlane, long outPlane) {
    for (long p = 0; p < planes; p++) {
        float *d = dx + p * inPlane;
        const float *g = dy + p * outPlane;
        const int32_t *a = argmax + p * outPlane;
        for (long i = 0; i < inPlane; i++) d[i] = 0;
        if (y) {
            const float *v = y + p * outPlane;
            for (long o = 0; o < outPlane; o++) {
                // A select by mask: as a branch it mispredicts (the ReLU's sign is unpredictable).
                uint32_t gb; __builtin_memcpy(&gb, &g[o], sizeof gb);
                gb &= -(uint32_t)(v[o] > 0);
                float gv; __builtin_memcpy(&gv, &gb, sizeof gv);
                d[a[o]] += gv;
            }
        } else {
            for (long o = 0; o < outPlane; o++) d[a[o]] += g[o];
        }
    }
}

TANDEM_CLONES
int tandem_all_finite_f32(const float *restrict p, long count) {
    f8 acc = (f8)0.0f;
    long i = 0;
    for (; i + 8 <= count; i += 8) acc += load_f8(p + i) * 0.0f;
    float t = lane_sum(acc);
    for (; i < count; i++) t += p[i] * 0.0f;
    return t == 0.0f;
}

TANDEM_CLONES
void tandem_sum_sources_f32(float *dst, const float *const *src, long nsrc, long count) {
    long i = 0;
    for (; i + 8 <= count; i += 8) {
        f8 acc = load_f8(src[0] + i);
        for (long q = 1; q < nsrc; q++) acc += load_f8(src[q] + i);
        __builtin_memcpy(dst + i, &acc, sizeof acc);
    }
    for (; i < count; i++) {
        float t = src[0][i];
        for (long q = 1; q < nsrc; q++) t += src[q][i];
        dst[i] = t;
    }
}
