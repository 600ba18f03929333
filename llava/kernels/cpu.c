/* CPU kernels for the engine's decode steps (few rows per step: memory- and call-bound).

   1. int4 weights x float activations (few rows): y[M, N] = x[M, K] @ W^T (+ bias) (+ low-rank correction).
   W holds 4-bit codes in groups of 32 along K with an fp16 scale and zero per (row, group): w = code * scale + zero.
   Rows are repacked in blocks of 16 (the last block padded with zero rows) so that one vector holds 4 codes of each
   of 16 rows (AVX512) or 8 rows (AVX2): products accumulate per row in separate lanes, with no horizontal sums.
     w  [NB, G, 4, 64] bytes: quad q of (block b, group g) holds, for row r < 16 and byte i < 4, at byte 4r + i:
        low nibble = code[16b + r][32g + 8q + i], high nibble = code[16b + r][32g + 8q + 4 + i]
        (AVX2 reads a quad as two halves: rows 0-7, then rows 8-15)
     sz [NB, G, 2, 16] fp16: the block's 16 scales, then its 16 zeros, for each group
     lu [NB, R, 16] fp32: the output side of the low-rank correction, transposed per block
   Activations are quantized on the fly to int8 per group of 32 (scale = absmax / 127, as llama.cpp's Q8 blocks),
   so products are integer multiply-adds (AVX2 vpmaddubsw; AVX512-VNNI vpdpbusd); the relative error this adds is
   ~0.4 %, the order of bf16 activations. Rows of x are independent: a row's result does not depend on the others.
   Threads split the row blocks; weights are read once per call whatever M is (M rows are processed 4 at a time). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

#define GS 32
#define RB 16
#define MB 4 /* rows of x per pass, AVX2 (16 registers) */
#define MB512 8 /* rows of x per pass, AVX512 (32 registers) */
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* x [M, K] -> int8 codes xq [M, K], scales dx [M, G] and xs [M, G] = dx * (sum of the group's codes). */
static inline void quantize_group(const float* xg, int8_t* out, float* d_out, float* s_out) {
    float amax = 0.f;
    for (int i = 0; i < GS; i++) amax = fmaxf(amax, fabsf(xg[i]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < GS; i++) {
        const int v = (int)lrintf(xg[i] * inv);
        out[i] = (int8_t)v;
        sum += v;
    }
    *d_out = d;
    *s_out = d * (float)sum;
}

/* Worksharing (call inside a parallel region, or alone): each (row, group) is independent. */
static void quantize_rows(const float* x, int8_t* xq, float* dx, float* xs, int64_t M, int64_t K) {
    const int64_t G = K / GS;
    #pragma omp for schedule(static)
    for (int64_t mg = 0; mg < M * G; mg++)
        quantize_group(x + mg * GS, xq + mg * GS, dx + mg, xs + mg);
}

static inline int32_t load4(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

/* acc [mb][16] = sum over groups of the block's rows dotted with mb rows of activations */
AVX2 static inline __attribute__((always_inline)) void block_avx2(const uint8_t* wb, const uint16_t* szb, const int8_t* xq, const float* dx,
                            const float* xs, int64_t K, int64_t G, int mb, float* acc) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {
        __m256 accf[MB];
        for (int m = 0; m < MB; m++) accf[m] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            const uint8_t* wg = wb + g * 256 + half * 32;
            __m256i acc16[MB];
            for (int m = 0; m < MB; m++) acc16[m] = _mm256_setzero_si256();
            for (int q = 0; q < 4; q++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(wg + q * 64));
                const __m256i lo = _mm256_and_si256(v, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int m = 0; m < mb; m++) {
                    const int8_t* xg = xq + m * K + g * GS + q * 8;
                    /* codes 0..15 x int8: a pair is at most 2 * 15 * 127, eight pairs summed fit int16 */
                    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xg))),
                                                       _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xg + 4))));
                    acc16[m] = _mm256_add_epi16(acc16[m], p);
                }
            }
            const uint16_t* szg = szb + g * 32 + half * 8;
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)szg));
            const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(szg + 16)));
            for (int m = 0; m < mb; m++) {
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc16[m], ones));
                accf[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_set1_ps(dx[m * G + g])), accf[m]);
                accf[m] = _mm256_fmadd_ps(z, _mm256_set1_ps(xs[m * G + g]), accf[m]);
            }
        }
        for (int m = 0; m < mb; m++) _mm256_storeu_ps(acc + m * RB + half * 8, accf[m]);
    }
}

AVX512 static inline __attribute__((always_inline)) void block_avx512(const uint8_t* wb, const uint16_t* szb, const int8_t* xq, const float* dx,
                                const float* xs, int64_t K, int64_t G, int mb, float* acc) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 accf[MB512];
    for (int m = 0; m < MB512; m++) accf[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t* wg = wb + g * 256;
        __m512i acci[MB512];
        for (int m = 0; m < MB512; m++) acci[m] = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) {
            const __m512i v = _mm512_loadu_si512((const void*)(wg + q * 64));
            const __m512i lo = _mm512_and_si512(v, m4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            for (int m = 0; m < mb; m++) {
                const int8_t* xg = xq + m * K + g * GS + q * 8;
                acci[m] = _mm512_dpbusd_epi32(acci[m], lo, _mm512_set1_epi32(load4(xg)));
                acci[m] = _mm512_dpbusd_epi32(acci[m], hi, _mm512_set1_epi32(load4(xg + 4)));
            }
        }
        const uint16_t* szg = szb + g * 32;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)szg));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(szg + 16)));
        for (int m = 0; m < mb; m++) {
            accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci[m]), _mm512_mul_ps(s, _mm512_set1_ps(dx[m * G + g])),
                                      accf[m]);
            accf[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[m * G + g]), accf[m]);
        }
    }
    for (int m = 0; m < mb; m++) _mm512_storeu_ps(acc + m * RB, accf[m]);
}

/* Dispatch with a constant row count, so each variant keeps its accumulators in registers. */
AVX2 static void block_avx2_n(const uint8_t* wb, const uint16_t* szb, const int8_t* xq, const float* dx,
                              const float* xs, int64_t K, int64_t G, int mb, float* acc) {
    switch (mb) {
        case 1: block_avx2(wb, szb, xq, dx, xs, K, G, 1, acc); break;
        case 2: block_avx2(wb, szb, xq, dx, xs, K, G, 2, acc); break;
        case 3: block_avx2(wb, szb, xq, dx, xs, K, G, 3, acc); break;
        default: block_avx2(wb, szb, xq, dx, xs, K, G, 4, acc); break;
    }
}

AVX512 static void block_avx512_n(const uint8_t* wb, const uint16_t* szb, const int8_t* xq, const float* dx,
                                  const float* xs, int64_t K, int64_t G, int mb, float* acc) {
    switch (mb) {
        case 1: block_avx512(wb, szb, xq, dx, xs, K, G, 1, acc); break;
        case 2: block_avx512(wb, szb, xq, dx, xs, K, G, 2, acc); break;
        case 3: block_avx512(wb, szb, xq, dx, xs, K, G, 3, acc); break;
        case 4: block_avx512(wb, szb, xq, dx, xs, K, G, 4, acc); break;
        case 5: block_avx512(wb, szb, xq, dx, xs, K, G, 5, acc); break;
        case 6: block_avx512(wb, szb, xq, dx, xs, K, G, 6, acc); break;
        case 7: block_avx512(wb, szb, xq, dx, xs, K, G, 7, acc); break;
        default: block_avx512(wb, szb, xq, dx, xs, K, G, 8, acc); break;
    }
}

/* One int4 matrix, as the kernels read it. Low-rank correction of rank R (0: none) for a matrix made of P stacked
   parts (q/k/v, gate/up; each a whole number of blocks) whose rows end at part_end[0..P-1]: row n of part p gets
   + lu[n] . (lv[pR : pR + R] @ x), lu [NB, R, 16], lv [P R, K] float32. */
typedef struct {
    const uint8_t* w;
    const uint16_t* sz;
    const float* bias;
    const float* lu;
    const float* lv;
    const int64_t* part_end;
    int64_t R, P, N, K;
} q4_matrix;

/* Per-call scratch, carved from one caller-owned buffer: int8 activations and their group scales and sums, and
   the low-rank projections t. */
typedef struct {
    int8_t* xq;
    float* dx;
    float* xs;
    float* t;
} q4_scratch;

static q4_scratch carve(void* ws, int64_t M, int64_t K, int64_t PR) {
    q4_scratch s;
    const int64_t G = K / GS;
    s.dx = (float*)ws;
    s.xs = s.dx + M * G;
    s.t = s.xs + M * G;
    s.xq = (int8_t*)(s.t + M * (PR > 0 ? PR : 1));
    return s;
}

/* Bytes of scratch for M rows of K inputs and PR low-rank projections. */
int64_t llava_q4_scratch_bytes(int64_t M, int64_t K, int64_t PR) {
    return (int64_t)sizeof(float) * (2 * M * (K / GS) + M * (PR > 0 ? PR : 1)) + M * K + 64;
}

/* Worksharing part: quantize the activations. */
static void q4_prepare(const q4_matrix* A, const float* x, int64_t M, q4_scratch s) {
    quantize_rows(x, s.xq, s.dx, s.xs, M, A->K);
}

/* Worksharing part: project the activations on the low-rank input side (t [M, P R]). */
AVX2 static void q4_project(const q4_matrix* A, const float* x, int64_t M, q4_scratch s) {
    const int64_t K = A->K, PR = A->R > 0 ? A->P * A->R : 0;
    #pragma omp for schedule(static)
    for (int64_t mj = 0; mj < M * PR; mj++) {
        const float* xm = x + (mj / PR) * K;
        const float* vj = A->lv + (mj % PR) * K;
        float a = 0.f;
        #pragma omp simd reduction(+:a)
        for (int64_t k = 0; k < K; k++) a += xm[k] * vj[k];
        s.t[mj] = a;
    }
}

/* Worksharing part (call inside a parallel region, or alone): y[M, N] (=, or += with accumulate) x @ W^T. */
AVX2 static void q4_blocks(const q4_matrix* A, int64_t M, q4_scratch s, float* y, int accumulate, int isa) {
    const int64_t K = A->K, N = A->N, R = A->R, P = A->P;
    const int64_t G = K / GS, NB = (N + RB - 1) / RB, PR = R > 0 ? P * R : 0;
    const int64_t step = isa == 1 ? MB512 : MB;
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < NB; b++) {
        float acc[MB512 * RB];
        const uint8_t* wb = A->w + b * G * 256;
        const uint16_t* szb = A->sz + b * G * 32;
        int64_t part = 0;
        while (R > 0 && part + 1 < P && b * RB >= A->part_end[part]) part++;
        for (int64_t m0 = 0; m0 < M; m0 += step) {
            const int mb = (int)(M - m0 < step ? M - m0 : step);
            if (isa == 1) block_avx512_n(wb, szb, s.xq + m0 * K, s.dx + m0 * G, s.xs + m0 * G, K, G, mb, acc);
            else block_avx2_n(wb, szb, s.xq + m0 * K, s.dx + m0 * G, s.xs + m0 * G, K, G, mb, acc);
            for (int m = 0; m < mb; m++) {
                float* am = acc + m * RB;
                const float* tm = s.t + (m0 + m) * PR + part * R;
                if (R > 0) {  /* the 16 rows' low-rank terms, 8 lanes at a time */
                    __m256 a0 = _mm256_loadu_ps(am), a1 = _mm256_loadu_ps(am + 8);
                    const float* ub = A->lu + b * R * RB;
                    for (int64_t j = 0; j < R; j++) {
                        const __m256 tj = _mm256_set1_ps(tm[j]);
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(ub + j * RB), tj, a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(ub + j * RB + 8), tj, a1);
                    }
                    _mm256_storeu_ps(am, a0);
                    _mm256_storeu_ps(am + 8, a1);
                }
                float* ym = y + (m0 + m) * N;
                const int64_t n0 = b * RB;
                const int rows = (int)(N - n0 < RB ? N - n0 : RB);
                for (int r = 0; r < rows; r++) {
                    const float v = am[r] + (A->bias ? A->bias[n0 + r] : 0.f);
                    ym[n0 + r] = accumulate ? ym[n0 + r] + v : v;
                }
            }
        }
    }
}

/* isa: 0 = AVX2, 1 = AVX512-VNNI. ws: llava_q4_scratch_bytes(M, K, P R) bytes. */
AVX2 void llava_q4_gemm(const uint8_t* w, const uint16_t* sz, const float* bias, const float* lu, const float* lv,
                        int64_t R, const int64_t* part_end, int64_t P, const float* x, float* y, int64_t M,
                        int64_t N, int64_t K, void* ws, int isa, int nthreads) {
    const q4_matrix A = { w, sz, bias, lu, lv, part_end, R, P, N, K };
    const q4_scratch s = carve(ws, M, K, R > 0 ? P * R : 0);
    #pragma omp parallel num_threads(nthreads)
    {
        q4_prepare(&A, x, M, s);
        q4_project(&A, x, M, s);
        q4_blocks(&A, M, s, y, 0, isa);
    }
}

/* ------------------------------------------------------------------------------------------------------------
   The small per-layer operations of a decode step, fused so that each is one call instead of several tensor ops.
   All activations float32, rows contiguous. */

static inline float bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } v = { (uint32_t)b << 16 };
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16); /* round to nearest even, as torch */
}

/* x[m] += delta[m] (when delta is not NULL), then out[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w */
AVX2 void llava_add_rmsnorm(float* x, const float* delta, const float* w, float* out, int64_t M, int64_t H,
                            float eps) {
    for (int64_t m = 0; m < M; m++) {
        float* xm = x + m * H;
        if (delta) {
            const float* dm = delta + m * H;
            for (int64_t i = 0; i < H; i++) xm[i] += dm[i];
        }
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t i = 0; i < H; i++) ss += xm[i] * xm[i];
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
        float* om = out + m * H;
        for (int64_t i = 0; i < H; i++) om[i] = xm[i] * inv * w[i];
    }
}

/* Rotate the first `heads` heads (of D dims) of each row of x in place, row m at the angles cos[m], sin[m] [D]
   (transformers' rotate_half convention: dim i pairs with i + D/2; cos/sin hold each angle twice). */
AVX2 void llava_rope(float* x, const float* cos, const float* sin, int64_t M, int64_t row_stride, int64_t heads,
                     int64_t D) {
    const int64_t h2 = D / 2;
    for (int64_t m = 0; m < M; m++) {
        const float* c = cos + m * D;
        const float* s = sin + m * D;
        for (int64_t h = 0; h < heads; h++) {
            float* a = x + m * row_stride + h * D;
            float* b = a + h2;
            for (int64_t i = 0; i < h2; i++) {
                const float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i + h2] + x1 * s[i + h2];
            }
        }
    }
}

/* Write k_new/v_new [B, nkv, D] (row stride new_stride) at position pos[b] of each row's cache. K/V:
   [rows, nkv, T, D] at row/head strides in elements, float32 or bf16 (kv_bf16). */
static void write_kv(const float* k_new, const float* v_new, int64_t new_stride, void* K, void* V, int kv_bf16,
                     int64_t row_stride, int64_t head_stride, const int64_t* pos, int64_t B, int64_t nkv, int64_t D) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < nkv; h++) {
            const int64_t off = b * row_stride + h * head_stride + pos[b] * D;
            const float* kn = k_new + b * new_stride + h * D;
            const float* vn = v_new + b * new_stride + h * D;
            if (kv_bf16) {
                for (int64_t d = 0; d < D; d++) {
                    ((uint16_t*)K)[off + d] = f32_to_bf16(kn[d]);
                    ((uint16_t*)V)[off + d] = f32_to_bf16(vn[d]);
                }
            } else {
                for (int64_t d = 0; d < D; d++) { ((float*)K)[off + d] = kn[d]; ((float*)V)[off + d] = vn[d]; }
            }
        }
}

AVX2 static inline __m256 load8_kv(const void* base, int64_t off, int kv_bf16) {
    if (kv_bf16) {
        const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)base + off);
}

/* out = softmax(q . K[:T] * scale) V[:T] for one query head q [D] against one cached KV head (T = pos + 1);
   p: T floats of scratch. */
AVX2 static void attend(const float* q, const void* K, const void* V, int kv_bf16, int64_t base, int64_t T,
                        int64_t D, float scale, float* p, float* out) {
    float mx = -INFINITY;
    const int vec = D % 8 == 0;
    for (int64_t t = 0; t < T; t++) {
        const int64_t off = base + t * D;
        float dot = 0.f;
        if (vec) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8_kv(K, off + d, kv_bf16), acc);
            dot = hsum256(acc);
        } else if (kv_bf16) {
            for (int64_t d = 0; d < D; d++) dot += q[d] * bf16_to_f32(((const uint16_t*)K)[off + d]);
        } else {
            for (int64_t d = 0; d < D; d++) dot += q[d] * ((const float*)K)[off + d];
        }
        p[t] = dot * scale;
        if (p[t] > mx) mx = p[t];
    }
    float sum = 0.f;
    for (int64_t t = 0; t < T; t++) { p[t] = expf(p[t] - mx); sum += p[t]; }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    for (int64_t t = 0; t < T; t++) {
        const int64_t off = base + t * D;
        const float pt = p[t] * inv;
        if (vec) {
            const __m256 pv = _mm256_set1_ps(pt);
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pv, load8_kv(V, off + d, kv_bf16), _mm256_loadu_ps(out + d)));
        } else if (kv_bf16) {
            for (int64_t d = 0; d < D; d++) out[d] += pt * bf16_to_f32(((const uint16_t*)V)[off + d]);
        } else {
            for (int64_t d = 0; d < D; d++) out[d] += pt * ((const float*)V)[off + d];
        }
    }
}

/* The G query heads q [G, D] that share one cached KV head, in one pass over its keys and one over its values
   (G = nq / nkv; D a multiple of 8). p: G * T floats of scratch; out [G, D]. */
AVX2 static void attend_group(const float* q, const void* K, const void* V, int kv_bf16, int64_t base, int64_t T,
                              int64_t D, int64_t G, float scale, float* p, float* out) {
    if (D % 8) {
        for (int64_t g = 0; g < G; g++) attend(q + g * D, K, V, kv_bf16, base, T, D, scale, p, out + g * D);
        return;
    }
    for (int64_t t = 0; t < T; t++) {
        const int64_t off = base + t * D;
        for (int64_t g = 0; g < G; g++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), load8_kv(K, off + d, kv_bf16), acc);
            p[g * T + t] = hsum256(acc) * scale;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float* pg = p + g * T;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < T; t++) mx = pg[t] > mx ? pg[t] : mx;
        for (int64_t t = 0; t < T; t++) { pg[t] = expf(pg[t] - mx); sum += pg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < T; t++) pg[t] *= inv;
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0.f;
    }
    for (int64_t t = 0; t < T; t++) {
        const int64_t off = base + t * D;
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 v = load8_kv(V, off + d, kv_bf16);
            for (int64_t g = 0; g < G; g++) {
                float* o = out + g * D + d;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(p[g * T + t]), v, _mm256_loadu_ps(o)));
            }
        }
    }
}

/* One decode position per row b: write k_new/v_new [B, nkv, D] at position pos[b] of the row's cache, then
   out[b, h] = softmax(q[b, h] . K[b, h/G, :pos[b]+1] * scale) V[b, h/G, :pos[b]+1] for each of the nq query heads
   (G = nq / nkv query heads share a KV head). q rows have stride q_stride (floats); K/V: [rows, nkv, T, D] at
   row/head strides in elements, float32 or bf16 (kv_bf16). */
AVX2 int llava_decode_attention(const float* q, int64_t q_stride, const float* k_new, const float* v_new,
                                int64_t new_stride, void* K, void* V, int kv_bf16, int64_t row_stride,
                                int64_t head_stride, const int64_t* pos, float* out, int64_t B, int64_t nq,
                                int64_t nkv, int64_t D, float scale, int nthreads) {
    write_kv(k_new, v_new, new_stride, K, V, kv_bf16, row_stride, head_stride, pos, B, nkv, D);
    const int64_t G = nq / nkv;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) num_threads(nthreads) collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < nq; h++) {
            float* p = (float*)malloc(sizeof(float) * (size_t)(pos[b] + 1));
            if (!p) { failed = 1; continue; }
            attend(q + b * q_stride + h * D, K, V, kv_bf16, b * row_stride + (h / G) * head_stride, pos[b] + 1, D,
                   scale, p, out + (b * nq + h) * D);
            free(p);
        }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------------------
   3. A whole decoder layer of an int4 model for one decode position per row, in one parallel region: the calls,
   allocations and thread wake-ups of ~10 separate operations per layer cost more than its matrix products for a
   135M model. Same arithmetic as the separate kernels above. */

typedef struct {
    q4_matrix qkv, o, gate_up, down;  /* qkv: [q heads | k heads | v heads] rows; gate_up: [gate | up] rows */
    const float* attn_norm;
    const float* mlp_norm;
} q4_layer;

static void rmsnorm_rows(const float* x, const float* w, float* out, int64_t M, int64_t H, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float* xm = x + m * H;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t i = 0; i < H; i++) ss += xm[i] * xm[i];
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
        float* om = out + m * H;
        for (int64_t i = 0; i < H; i++) om[i] = xm[i] * inv * w[i];
    }
}

/* x [B, H]: the residual stream, updated in place. Scratch (float32): h [B, H], qkv [B, (nq + 2 nkv) D],
   att [B, nq D], gu [B, 2 I], act [B, I]; ws: llava_q4_scratch_bytes for the largest K and P R of the layer;
   scores: nthreads * tmax * (nq / nkv) floats (tmax >= pos[b] + 1). cos/sin [B, D]. */
AVX2 void llava_q4_decode_layer(const q4_layer* L, float* x, int64_t B, int64_t H, int64_t nq, int64_t nkv,
                                int64_t D, int64_t I, float eps, const float* cos, const float* sin,
                                const int64_t* pos, void* K, void* V, int kv_bf16, int64_t row_stride,
                                int64_t head_stride, float* h, float* qkv, float* att, float* gu, float* act,
                                void* ws, float* scores, int64_t tmax, int isa, int nthreads) {
    const int64_t W = (nq + 2 * nkv) * D, G = nq / nkv;
    const float scale = 1.f / sqrtf((float)D);
    #pragma omp parallel num_threads(nthreads)
    {
        q4_scratch s;
        #pragma omp single
        rmsnorm_rows(x, L->attn_norm, h, B, H, eps);
        s = carve(ws, B, L->qkv.K, L->qkv.R > 0 ? L->qkv.P * L->qkv.R : 0);
        q4_prepare(&L->qkv, h, B, s);
        q4_project(&L->qkv, h, B, s);
        q4_blocks(&L->qkv, B, s, qkv, 0, isa);
        #pragma omp single
        {
            for (int64_t b = 0; b < B; b++)
                for (int64_t hh = 0; hh < nq + nkv; hh++) {
                    float* a = qkv + b * W + hh * D;
                    float* c = a + D / 2;
                    const float* cb = cos + b * D;
                    const float* sb = sin + b * D;
                    for (int64_t i = 0; i < D / 2; i++) {
                        const float x1 = a[i], x2 = c[i];
                        a[i] = x1 * cb[i] - x2 * sb[i];
                        c[i] = x2 * cb[i + D / 2] + x1 * sb[i + D / 2];
                    }
                }
            write_kv(qkv + nq * D, qkv + (nq + nkv) * D, W, K, V, kv_bf16, row_stride, head_stride, pos, B, nkv, D);
        }
        float* p = scores + (int64_t)omp_get_thread_num() * tmax * G;
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t kh = 0; kh < nkv; kh++)
                attend_group(qkv + b * W + kh * G * D, K, V, kv_bf16, b * row_stride + kh * head_stride, pos[b] + 1,
                             D, G, scale, p, att + (b * nq + kh * G) * D);
        s = carve(ws, B, L->o.K, L->o.R > 0 ? L->o.P * L->o.R : 0);
        q4_prepare(&L->o, att, B, s);
        q4_project(&L->o, att, B, s);
        q4_blocks(&L->o, B, s, x, 1, isa);
        #pragma omp single
        rmsnorm_rows(x, L->mlp_norm, h, B, H, eps);
        s = carve(ws, B, L->gate_up.K, L->gate_up.R > 0 ? L->gate_up.P * L->gate_up.R : 0);
        q4_prepare(&L->gate_up, h, B, s);
        q4_project(&L->gate_up, h, B, s);
        q4_blocks(&L->gate_up, B, s, gu, 0, isa);
        #pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * I; bi++) {
            const int64_t b = bi / I, i = bi % I;
            const float g = gu[b * 2 * I + i];
            act[bi] = g / (1.f + expf(-g)) * gu[b * 2 * I + I + i];
        }
        s = carve(ws, B, L->down.K, L->down.R > 0 ? L->down.P * L->down.R : 0);
        q4_prepare(&L->down, act, B, s);
        q4_project(&L->down, act, B, s);
        q4_blocks(&L->down, B, s, x, 1, isa);
    }
}

/* All L decoder layers of a decode step in one call (layer l's K/V at K + l * layer_stride elements), then the
   final RMSNorm of x into h: the step's only Python left is the embedding lookup and the LM head. */
AVX2 void llava_q4_decode_layers(const q4_layer* layers, int64_t L, float* x, int64_t B, int64_t H, int64_t nq,
                                 int64_t nkv, int64_t D, int64_t I, float eps, const float* cos, const float* sin,
                                 const int64_t* pos, void* K, void* V, int kv_bf16, int64_t layer_stride,
                                 int64_t row_stride, int64_t head_stride, const float* final_norm, float* h,
                                 float* qkv, float* att, float* gu, float* act, void* ws, float* scores, int64_t tmax,
                                 int isa, int nthreads) {
    const size_t esize = kv_bf16 ? 2 : 4;
    for (int64_t l = 0; l < L; l++)
        llava_q4_decode_layer(layers + l, x, B, H, nq, nkv, D, I, eps, cos, sin, pos,
                              (char*)K + (size_t)(l * layer_stride) * esize, (char*)V + (size_t)(l * layer_stride) * esize,
                              kv_bf16, row_stride, head_stride, h, qkv, att, gu, act, ws, scores, tmax, isa, nthreads);
    rmsnorm_rows(x, final_norm, h, B, H, eps);
}
