/* CPU kernels for the engine's decode steps (few rows per step: memory- and call-bound).

   1. int4 weights x float activations (few rows).
   y[M, N] = x[M, K] @ W^T (+ bias) (+ low-rank correction), W stored as 4-bit codes in groups of 32 along K with an
   fp16 scale and zero per group: w = code * scale + zero. Byte i of group g of row n holds code[32g + i] in its low
   nibble and code[32g + 16 + i] in its high nibble; scales_zeros is [N, 2, K/32] fp16 (plane 0 scales, 1 zeros).

   Activations are quantized on the fly to int8 per group of 32 (scale = absmax / 127, as llama.cpp's Q8 blocks),
   so each group's dot product is an integer multiply-add (AVX2 vpmaddubsw, or AVX512-VNNI vpdpbusd on two groups
   at once); the relative error this adds is ~0.4 %, the same order as bf16 activations. Rows of x are independent:
   a row's result does not depend on the others. Threads split N; weights are read once per call whatever M is. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

#define GS 32
#define MB 4
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* x [M, K] -> int8 codes xq [M, K], scales dx [M, G] and xs [M, G] = dx * (sum of the group's codes).
   pairs: store each pair of groups (2p, 2p+1) as [g0 0..15, g1 0..15, g0 16..31, g1 16..31], the byte order of
   the AVX512 kernel's 64-byte weight vectors (a last odd group stays in natural order). */
static void quantize_rows(const float* x, int8_t* xq, float* dx, float* xs, int64_t M, int64_t K, int pairs) {
    const int64_t G = K / GS;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            const float* xg = x + m * K + g * GS;
            float amax = 0.f;
            for (int i = 0; i < GS; i++) amax = fmaxf(amax, fabsf(xg[i]));
            const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
            int sum = 0;
            int8_t* out = xq + m * K + g * GS;
            int paired = pairs && (g | 1) < G;
            if (paired) out = xq + m * K + (g & ~(int64_t)1) * GS + (g & 1) * 16;
            for (int i = 0; i < GS; i++) {
                const int v = (int)lrintf(xg[i] * inv);
                if (paired) out[i < 16 ? i : i + 16] = (int8_t)v;
                else out[i] = (int8_t)v;
                sum += v;
            }
            dx[m * G + g] = d;
            xs[m * G + g] = d * (float)sum;
        }
}

/* One group: 32 codes (16 bytes) as [low nibbles | high nibbles] in a 256-bit vector, dotted with 32 int8
   activations; the sum, as 8 int32 lanes converted to float. */
AVX2 static inline __m256 group_dot_avx2(const uint8_t* wg, const int8_t* xg) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128((const __m128i*)wg);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
    const __m256i xv = _mm256_loadu_si256((const __m256i*)xg);
    /* codes (0..15) x int8 activations: pairs fit int16 without saturation (2 * 15 * 127) */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), _mm256_set1_epi16(1)));
}

AVX2 static void rows_avx2(const uint8_t* wn, const int8_t* xq, const float* sdx, int64_t K, int64_t G, int mb,
                           float* out) {
    for (int m = 0; m < mb; m++) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        const int8_t* xm = xq + m * K;
        const float* sm = sdx + m * G;
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            acc0 = _mm256_fmadd_ps(group_dot_avx2(wn + g * 16, xm + g * GS), _mm256_broadcast_ss(sm + g), acc0);
            acc1 = _mm256_fmadd_ps(group_dot_avx2(wn + (g + 1) * 16, xm + (g + 1) * GS), _mm256_broadcast_ss(sm + g + 1), acc1);
        }
        if (g < G) acc0 = _mm256_fmadd_ps(group_dot_avx2(wn + g * 16, xm + g * GS), _mm256_broadcast_ss(sm + g), acc0);
        out[m] = hsum256(_mm256_add_ps(acc0, acc1));
    }
}

AVX512 static void rows_avx512(const uint8_t* wn, const int8_t* xq, const float* sdx, int64_t K, int64_t G, int mb,
                               float* out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int m = 0; m < mb; m++) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const int8_t* xm = xq + m * K;
        const float* sm = sdx + m * G;
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            const __m256i b = _mm256_loadu_si256((const __m256i*)(wn + g * 16));
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, m4)),
                                                 _mm256_and_si256(_mm256_srli_epi16(b, 4), m4), 1);
            const __m512i xv = _mm512_loadu_si512((const void*)(xm + g * GS));
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
            const __m512 sc = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(sm + g)))));
            if (g & 2) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc0);
        }
        float tail = 0.f;
        if (g < G) tail = hsum256(_mm256_mul_ps(group_dot_avx2(wn + g * 16, xm + g * GS), _mm256_broadcast_ss(sm + g)));
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail;
    }
}

/* Optional low-rank correction of rank R (0: none) for W made of P stacked parts (q/k/v, gate/up) whose rows end at
   part_end[0..P-1]: row n of part p gets + lu[n] . (lv[pR : pR + R] @ x), lu [N, R], lv [P R, K] float32.
   isa: 0 = AVX2, 1 = AVX512-VNNI. Returns 0, or -1 when scratch memory could not be allocated. */
AVX2 int llava_q4_gemm(const float* x, const uint8_t* w, const uint16_t* sz, const float* bias,
                       const float* lu, const float* lv, int64_t R, const int64_t* part_end, int64_t P,
                       float* y, int64_t M, int64_t N, int64_t K, int isa, int nthreads) {
    const int64_t G = K / GS;
    int8_t* xq = (int8_t*)malloc((size_t)(M * K));
    float* dx = (float*)malloc(sizeof(float) * (size_t)(M * G));
    float* xs = (float*)malloc(sizeof(float) * (size_t)(M * G));
    const int64_t PR = R > 0 ? P * R : 0;
    float* t = (float*)malloc(sizeof(float) * (size_t)(M * (PR > 0 ? PR : 1)));
    if (!xq || !dx || !xs || !t) { free(xq); free(dx); free(xs); free(t); return -1; }
    quantize_rows(x, xq, dx, xs, M, K, isa == 1);
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < PR; j++) {
            const float* xm = x + m * K;
            const float* vj = lv + j * K;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t k = 0; k < K; k++) acc += xm[k] * vj[k];
            t[m * PR + j] = acc;
        }
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* scratch = (float*)malloc(sizeof(float) * (size_t)(2 * G + MB * G));
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        float* s = scratch;
        float* z = scratch + G;
        float* sdx = scratch + 2 * G;
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!scratch) continue;
            const uint16_t* szn = sz + n * 2 * G;
            int64_t g = 0;
            for (; g + 8 <= G; g += 8) {
                _mm256_storeu_ps(s + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(szn + g))));
                _mm256_storeu_ps(z + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(szn + G + g))));
            }
            for (; g < G; g++) { s[g] = _cvtsh_ss(szn[g]); z[g] = _cvtsh_ss(szn[G + g]); }
            const uint8_t* wn = w + n * (K / 2);
            for (int64_t m0 = 0; m0 < M; m0 += MB) {
                const int mb = (int)(M - m0 < MB ? M - m0 : MB);
                float zsum[MB], dots[MB];
                for (int m = 0; m < mb; m++) {
                    const float* dxm = dx + (m0 + m) * G;
                    const float* xsm = xs + (m0 + m) * G;
                    float* sm = sdx + m * G;
                    float zz = 0.f;
                    #pragma omp simd reduction(+:zz)
                    for (int64_t k = 0; k < G; k++) { sm[k] = s[k] * dxm[k]; zz += z[k] * xsm[k]; }
                    zsum[m] = zz;
                }
                if (isa == 1) rows_avx512(wn, xq + m0 * K, sdx, K, G, mb, dots);
                else rows_avx2(wn, xq + m0 * K, sdx, K, G, mb, dots);
                const float b0 = bias ? bias[n] : 0.f;
                int64_t part = 0;
                while (R > 0 && part + 1 < P && n >= part_end[part]) part++;
                for (int m = 0; m < mb; m++) {
                    float low = 0.f;
                    const float* un = lu + n * R;
                    const float* tm = t + (m0 + m) * PR + part * R;
                    #pragma omp simd reduction(+:low)
                    for (int64_t j = 0; j < R; j++) low += un[j] * tm[j];
                    y[(m0 + m) * N + n] = dots[m] + zsum[m] + b0 + low;
                }
            }
        }
        free(scratch);
    }
    free(xq); free(dx); free(xs); free(t);
    return failed ? -1 : 0;
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

/* One decode position per row b: write k_new/v_new [B, nkv, D] at position pos[b] of the row's cache, then
   out[b, h] = softmax(q[b, h] . K[b, h/G, :pos[b]+1] * scale) V[b, h/G, :pos[b]+1] for each of the nq query heads
   (G = nq / nkv query heads share a KV head). q rows have stride q_stride (floats); K/V: [rows, nkv, T, D] at
   row/head strides in elements, float32 or bf16 (kv_bf16). */
AVX2 int llava_decode_attention(const float* q, int64_t q_stride, const float* k_new, const float* v_new,
                                int64_t new_stride, void* K, void* V, int kv_bf16, int64_t row_stride,
                                int64_t head_stride, const int64_t* pos, float* out, int64_t B, int64_t nq,
                                int64_t nkv, int64_t D, float scale, int nthreads) {
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
    const int64_t G = nq / nkv;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) num_threads(nthreads) collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < nq; h++) {
            const int64_t T = pos[b] + 1, kvh = h / G;
            const float* qh = q + b * q_stride + h * D;
            float* p = (float*)malloc(sizeof(float) * (size_t)T);
            if (!p) { failed = 1; continue; }
            float mx = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                const int64_t off = b * row_stride + kvh * head_stride + t * D;
                float dot = 0.f;
                if (kv_bf16) {
                    const uint16_t* kt = (const uint16_t*)K + off;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t d = 0; d < D; d++) dot += qh[d] * bf16_to_f32(kt[d]);
                } else {
                    const float* kt = (const float*)K + off;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t d = 0; d < D; d++) dot += qh[d] * kt[d];
                }
                p[t] = dot * scale;
                if (p[t] > mx) mx = p[t];
            }
            float sum = 0.f;
            for (int64_t t = 0; t < T; t++) { p[t] = expf(p[t] - mx); sum += p[t]; }
            const float inv = 1.f / sum;
            float* o = out + (b * nq + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t t = 0; t < T; t++) {
                const int64_t off = b * row_stride + kvh * head_stride + t * D;
                const float pt = p[t] * inv;
                if (kv_bf16) {
                    const uint16_t* vt = (const uint16_t*)V + off;
                    for (int64_t d = 0; d < D; d++) o[d] += pt * bf16_to_f32(vt[d]);
                } else {
                    const float* vt = (const float*)V + off;
                    for (int64_t d = 0; d < D; d++) o[d] += pt * vt[d];
                }
            }
            free(p);
        }
    return failed ? -1 : 0;
}
