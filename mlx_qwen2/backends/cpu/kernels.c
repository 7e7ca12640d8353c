/* Few-row products for MLX's CPU backend: y = x @ W.T for 1..MAX_ROWS rows of x (float32), W float32,
 * bfloat16, float16 or packed affine 2-, 4- or 8-bit (MLX's layout: field j of a row at bits j * bits of
 * its little-endian uint32 words, a scale and a bias per group of `group` fields).
 *
 * A batch decoding multiplies a few rows by every matrix of the model. OpenBLAS packs the matrix for such
 * a product and then computes, and MLX's quantized kernel runs on one thread; here the threads stream W
 * once between them: NB rows at a time are made float32 (16-bit: widened; quantized:
 * q * scale + bias, in the order of the byte's fields), then multiplied by every row of x, MT rows at a
 * time, NB x MT vector accumulators in registers. For quantized W, x is first permuted into the order the
 * fields come out of each LANES bytes (plane p of a chunk holds fields p, p + f, p + 2f, ..., f = 8 / bits),
 * so no field is ever moved. Sums are float32, as BLAS's are; the order of the additions differs.
 *
 * W's blocks of rows go in chunks to whichever thread is free (see products()); one thread runs without
 * OpenMP (so a forked child, where libgomp's threads are gone, still works). norm_products() and
 * residual_product() put a decoder layer's norms, biases, residuals and SiLU around the products. Built at first use by kernels.py with the machine's compiler
 * (-O3 -march=native -fopenmp); compiled vector types (AVX-512, AVX2 or NEON alike), with an intrinsic on
 * x86 only where GCC compiles the vector-type spelling into scalar code (widening bytes and float16: see
 * widen_bytes). Knows nothing of MLX. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* The register tile: NB rows of W by MT rows of x, LANES floats a vector. NB x MT accumulators plus NB
 * vectors of W must fit in the vector registers, or the tile spills to memory every step (~10 GFLOPS):
 * AVX-512 has 32 registers of 16 floats, AVX2 16 of 8. */
#ifndef LANES
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#endif
#ifndef NB
#define NB 4 /* rows of W made float32 at a time */
#endif
#ifndef MT
#if defined(__AVX512F__)
#define MT 4 /* rows of x multiplied at a time */
#else
#define MT 3
#endif
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

enum { F32 = 0, BF16 = 1, F16 = 2, QUANTIZED = 3 };

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Keeps a vector in a register: without it GCC folds the loads of x into every multiply-add as a memory
 * operand, a load per multiply-add instead of one per vector (the loop then waits on loads). */
#if (defined(__AVX512F__) && LANES == 16) || (defined(__AVX__) && !defined(__AVX512F__) && LANES == 8)
#define KEEP(v) __asm__("" : "+v"(v)) /* the vector is one register wide */
#else
#define KEEP(v) (void)0
#endif

static inline float sum(vf v) { /* halves added pairwise: independent steps, not LANES - 1 dependent adds */
    float lanes[LANES];
    memcpy(lanes, &v, sizeof v);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    return lanes[0];
}

static inline float scalar(const void *p, int dtype, size_t i) {
    if (dtype == F32) return ((const float *)p)[i];
    if (dtype == BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return (float)((const _Float16 *)p)[i];
}

/* y[m][j] = x[m] . w[j] for m < rows (at most MT), j < NB; K a multiple of LANES. */
static inline __attribute__((always_inline)) void tile(int rows, int K, const float *x, const float *w[NB],
                                                       float *y, int ldy) {
    vf acc[MT][NB] = {{{0}}};
    for (int k = 0; k < K; k += LANES) {
        vf xv[MT];
        for (int m = 0; m < rows; m++) {
            xv[m] = load(x + (size_t)m * K + k);
            KEEP(xv[m]);
        }
        for (int j = 0; j < NB; j++) {
            vf wv = load(w[j] + k);
            KEEP(wv);
            for (int m = 0; m < rows; m++) acc[m][j] += xv[m] * wv;
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < NB; j++) y[(size_t)m * ldy + j] = sum(acc[m][j]);
}

#if MT > 4
#error "MT is at most 4"
#endif
/* The tile for r rows of x, r <= MT: a constant in each case, so every loop over rows unrolls. */
static void tiles(int r, int K, const float *x, const float *w[NB], float *y, int ldy) {
    switch (r) {
    case 1: tile(1, K, x, w, y, ldy); break;
    case 2: tile(2, K, x, w, y, ldy); break;
#if MT >= 3
    case 3: tile(3, K, x, w, y, ldy); break;
#endif
#if MT >= 4
    case 4: tile(4, K, x, w, y, ldy); break;
#endif
    }
}

/* Row n of a 16-bit W as float32 into out (K values). */
static void widen(const void *w, int dtype, size_t n, int K, float *out) {
    if (dtype == BF16) {
        const uint16_t *row = (const uint16_t *)w + n * K;
        for (int k = 0; k < K; k += LANES) {
            vh h;
            memcpy(&h, row + k, sizeof h);
            vu u = __builtin_convertvector(h, vu) << 16;
            memcpy(out + k, &u, sizeof u);
        }
    } else {
        const _Float16 *row = (const _Float16 *)w + n * K;
#if defined(__AVX512F__) && LANES == 16
        for (int k = 0; k < K; k += LANES) /* vcvtph2ps: GCC leaves the loop below scalar */
            _mm512_storeu_ps(out + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k))));
#elif defined(__F16C__) && LANES == 8
        for (int k = 0; k < K; k += LANES)
            _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k))));
#else
        for (int k = 0; k < K; k++) out[k] = (float)row[k];
#endif
    }
}

/* LANES bytes, each in a 32-bit lane. GCC (12) compiles __builtin_convertvector of a byte vector lane by
 * lane through scalar registers, and every other spelling in vector types through the stack (a stalled
 * store-to-load): ~1 cycle a weight in a one-row product. So on x86 the one instruction that does it
 * (vpmovzxbd), as an intrinsic; elsewhere the conversion. */
#if defined(__AVX512F__) && LANES == 16
static inline vu widen_bytes(const uint8_t *p) {
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    vu out;
    memcpy(&out, &u, sizeof out);
    return out;
}
#elif defined(__AVX2__) && LANES == 8
static inline vu widen_bytes(const uint8_t *p) {
    const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    vu out;
    memcpy(&out, &u, sizeof out);
    return out;
}
#else
static inline vu widen_bytes(const uint8_t *p) {
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vu);
}
#endif

/* Row n of a quantized W as float32 into out, each chunk of LANES bytes as its f planes one after another. */
static inline __attribute__((always_inline)) void dequantize_bits(const uint8_t *w, const void *scales,
                                                                  const void *biases, int sdtype, size_t n,
                                                                  int K, int group, int bits, float *out) {
    const int fields = 8 / bits, span = LANES * fields, groups = K / group, chunks = group / span;
    const uint32_t mask = (1u << bits) - 1;
    const uint8_t *bytes = w + n * (size_t)(K / fields);
    for (int g = 0; g < groups; g++) {
        const float s = scalar(scales, sdtype, n * groups + g), b = scalar(biases, sdtype, n * groups + g);
        for (int c = g * chunks; c < (g + 1) * chunks; c++) {
            const vu u = widen_bytes(bytes + (size_t)c * LANES);
            for (int p = 0; p < fields; p++) {
                vf q = __builtin_convertvector((u >> (unsigned)(bits * p)) & mask, vf);
                store(out + c * span + p * LANES, q * s + b);
            }
        }
    }
}

static void dequantize(const uint8_t *w, const void *scales, const void *biases, int sdtype, size_t n, int K,
                       int group, int bits, float *out) {
    if (bits == 8) dequantize_bits(w, scales, biases, sdtype, n, K, group, 8, out);
    else if (bits == 4) dequantize_bits(w, scales, biases, sdtype, n, K, group, 4, out);
    else dequantize_bits(w, scales, biases, sdtype, n, K, group, 2, out);
}

/* Floats a vector: the tile's width, which the sizes product() takes are multiples of. */
int lanes(void) { return LANES; }

/* Whether product() takes these operands: the caller falls back to MLX's own product otherwise. */
int supported(int rows, int K, int kind, int group, int bits) {
    if (rows < 1 || K < LANES || K % LANES) return 0;
    if (kind != QUANTIZED) return kind == F32 || kind == BF16 || kind == F16;
    if (bits != 2 && bits != 4 && bits != 8) return 0;
    int span = LANES * (8 / bits);
    return group > 0 && K % group == 0 && group % span == 0;
}

/* One matrix of a product: W (N x K) of `kind`; scales and biases (N x K / group) of `sdtype` for a
 * quantized W; an optional bias (N) of `bias_kind` added to the result. */
struct matrix {
    int kind, N;
    const void *w, *scales, *biases;
    int sdtype, group, bits;
    const void *bias;
    int bias_kind;
};

struct job {
    int rows, K;
    const float *x; /* permuted for a quantized W of 2 or 4 bits */
    const struct matrix *m;
    float *y;
};

/* Blocks [first, last) of NB rows of W: each made float32 (unless it is) and multiplied by every row of x. */
static int run_blocks(const struct job *j, int first, int last) {
    const struct matrix *mat = j->m;
    const int K = j->K, N = mat->N, rows = j->rows, kind = mat->kind;
    float *rowsbuf = kind == F32 ? NULL : malloc((size_t)NB * K * sizeof(float));
    float *out = malloc((size_t)MT * NB * sizeof(float));
    if ((kind != F32 && !rowsbuf) || !out) {
        free(rowsbuf);
        free(out);
        return 1;
    }
    for (int b = first; b < last; b++) {
        const int n0 = b * NB, count = N - n0 < NB ? N - n0 : NB;
        const float *wr[NB];
        for (int r = 0; r < NB; r++) {
            const size_t n = (size_t)n0 + (r < count ? r : count - 1); /* a short last block repeats a row */
            if (kind == F32) {
                wr[r] = (const float *)mat->w + n * K;
            } else if (r < count) {
                float *dst = rowsbuf + (size_t)r * K;
                if (kind == QUANTIZED)
                    dequantize(mat->w, mat->scales, mat->biases, mat->sdtype, n, K, mat->group, mat->bits, dst);
                else
                    widen(mat->w, kind, n, K, dst);
                wr[r] = dst;
            } else {
                wr[r] = wr[r - 1];
            }
        }
        for (int m0 = 0; m0 < rows; m0 += MT) {
            const int r = rows - m0 < MT ? rows - m0 : MT;
            tiles(r, K, j->x + (size_t)m0 * K, wr, out, NB);
            for (int m = 0; m < r; m++) {
                float *y = j->y + (size_t)(m0 + m) * N + n0;
                for (int c = 0; c < count; c++)
                    y[c] = out[m * NB + c] + (mat->bias ? scalar(mat->bias, mat->bias_kind, (size_t)n0 + c) : 0.0f);
            }
        }
    }
    free(rowsbuf);
    free(out);
    return 0;
}

/* x (rows x K) with each chunk of LANES * f inputs in the order a chunk of bytes of 2- or 4-bit fields
 * comes out in (f = 8 / bits), or NULL where memory ran out. */
static float *permute(int rows, int K, const float *x, int bits) {
    const int fields = 8 / bits, span = LANES * fields;
    float *permuted = malloc((size_t)rows * K * sizeof(float));
    if (!permuted) return NULL;
    for (int m = 0; m < rows; m++)
        for (int c = 0; c < K / span; c++)
            for (int p = 0; p < fields; p++)
                for (int i = 0; i < LANES; i++)
                    permuted[(size_t)m * K + c * span + p * LANES + i] = x[(size_t)m * K + c * span + p + fields * i];
    return permuted;
}

#define MAX_MATRICES 4
#ifndef CHUNK
#define CHUNK 16 /* blocks of NB rows of W a thread takes at a time */
#endif

/* ys[i] (rows x N_i) = x (rows x K) @ W_i.T (+ bias_i) for `count` matrices sharing x, their blocks of
 * rows shared out over the threads as one range, in chunks. Returns 0, or -1
 * where memory ran out (the ys then partly written). */
int products(int rows, int K, const float *x, int count, const struct matrix *ms, float *const *ys,
                    int threads) {
    struct job jobs[MAX_MATRICES];
    float *permuted[9] = {0}; /* by bits */
    int starts[MAX_MATRICES + 1] = {0}, failed = 0;
    if (count < 1 || count > MAX_MATRICES) return -1;
    for (int i = 0; i < count; i++) {
        const float *xs = x;
        const int bits = ms[i].bits;
        if (ms[i].kind == QUANTIZED && bits != 8) {
            if (!permuted[bits] && !(permuted[bits] = permute(rows, K, x, bits))) failed = 1;
            xs = permuted[bits];
        }
        jobs[i] = (struct job){rows, K, xs, &ms[i], ys[i]};
        starts[i + 1] = starts[i] + (ms[i].N + NB - 1) / NB;
    }
    const int blocks = starts[count], chunks = failed ? 0 : (blocks + CHUNK - 1) / CHUNK;
    /* Chunks of CHUNK blocks handed to whichever thread is free: a thread the machine takes away for a
     * moment (another process, MLX's own threads) delays only its chunk, not a fixed half of the product.
     * No OpenMP team for one thread: also what a forked child uses (libgomp's threads are not forked). */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed) if (threads > 1)
    for (int c = 0; c < chunks; c++) {
        const int first = c * CHUNK, last = first + CHUNK < blocks ? first + CHUNK : blocks;
        for (int i = 0; i < count; i++) {
            const int lo = first > starts[i] ? first : starts[i], hi = last < starts[i + 1] ? last : starts[i + 1];
            if (lo < hi) failed |= run_blocks(&jobs[i], lo - starts[i], hi - starts[i]);
        }
    }
    for (int b = 0; b < 9; b++) free(permuted[b]);
    return failed ? -1 : 0;
}

/* y (rows x N) = x (rows x K) @ W.T, W (N x K) of `kind`; scales and biases (N x K / group) of `sdtype` for a
 * quantized W. Returns 0, or -1 where memory ran out (y then unwritten). */
int product(int rows, int N, int K, const float *x, int kind, const void *w, const void *scales,
            const void *biases, int sdtype, int group, int bits, float *y, int threads) {
    const struct matrix m = {kind, N, w, scales, biases, sdtype, group, bits, NULL, 0};
    return products(rows, K, x, 1, &m, &y, threads);
}

/* e^x for x <= 88 (e^-87 and below as 0): 2^n times a polynomial on [-ln2 / 2, ln2 / 2] (Cephes' expf,
 * within 2 ulp of float32's e^x). */
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf pick(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); } /* mask ? a : b */

static inline vf vexp(vf x) {
    const vi zero = x < -87.0f; /* lanes whose e^x is taken as 0 */
    x = pick(x < -87.0f, (vf){0} - 87.0f, x);
    x = pick(x > 88.0f, (vf){0} + 88.0f, x);
    const vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);
    n += (vi)(__builtin_convertvector(n, vf) > t); /* floor: truncation rounded down where t < 0 */
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = 1.9875691500e-4f + (vf){0};
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const vf e = p * r * r + r + 1.0f;
    const vf two_n = (vf)((n + 127) << 23);
    return pick(zero, (vf){0}, e * two_n);
}

/* out (rows x K) = x / sqrt(mean(x^2) + eps) * weight, per row; weight (K) of `kind`. */
static void rms_norm(int rows, int K, const float *x, const void *weight, int kind, float eps, float *out) {
    for (int m = 0; m < rows; m++) {
        const float *row = x + (size_t)m * K;
        vf acc = {0};
        for (int k = 0; k < K; k += LANES) {
            const vf v = load(row + k);
            acc += v * v;
        }
        const float inv = 1.0f / sqrtf(sum(acc) / (float)K + eps);
        for (int k = 0; k < K; k++) out[(size_t)m * K + k] = row[k] * inv * scalar(weight, kind, k);
    }
}

/* ys[i] = rms_norm(x) @ W_i.T (+ bias_i) for `count` matrices: the start of an attention block (q, k, v)
 * or of an MLP (gate, up). Returns 0, or -1 where memory ran out. */
int norm_products(int rows, int K, const float *x, const void *norm, int norm_kind, float eps, int count,
                  const struct matrix *ms, float *const *ys, int threads) {
    float *normed = malloc((size_t)rows * K * sizeof(float));
    if (!normed) return -1;
    rms_norm(rows, K, x, norm, norm_kind, eps, normed);
    const int status = products(rows, K, normed, count, ms, ys, threads);
    free(normed);
    return status;
}

/* y (rows x N) = residual + a @ W.T, a = x, or silu(gate) * x where gate is given (both rows x K): the end
 * of an attention block (o_proj) or of an MLP (down_proj); without a residual, a @ W.T (an expert's
 * down_proj). SiLU as x / (1 + e^-x). Returns 0, or -1. */
int residual_product(int rows, int K, const float *gate, const float *x, const float *residual,
                     const struct matrix *m, float *y, int threads) {
    float *a = NULL;
    if (gate) {
        const size_t size = (size_t)rows * K;
        if (!(a = malloc(size * sizeof(float)))) return -1;
#pragma omp parallel for num_threads(threads) if (threads > 1 && size >= 1 << 14)
        for (size_t i = 0; i < size; i += LANES) {
            const vf g = load(gate + i);
            store(a + i, g / (1.0f + vexp(-g)) * load(x + i));
        }
    }
    const int status = products(rows, K, a ? a : x, 1, m, &y, threads);
    free(a);
    if (status == 0 && residual)
        for (size_t i = 0; i < (size_t)rows * m->N; i++) y[i] += residual[i];
    return status;
}

/* y = e^x for n floats (as vexp: e^x for x <= 88, 0 below -87): attention's exponentials in prefill, where
 * MLX's CPU e^x takes one element at a time off Apple Silicon. Returns 0. */
int exp_array(size_t n, const float *x, float *y, int threads) {
    const size_t whole = n / LANES * LANES;
#pragma omp parallel for num_threads(threads) if (threads > 1 && n >= 1 << 15)
    for (size_t i = 0; i < whole; i += LANES) store(y + i, vexp(load(x + i)));
    if (whole < n) {
        float tail[LANES] = {0};
        memcpy(tail, x + whole, (n - whole) * sizeof(float));
        store(tail, vexp(load(tail)));
        memcpy(y + whole, tail, (n - whole) * sizeof(float));
    }
    return 0;
}
