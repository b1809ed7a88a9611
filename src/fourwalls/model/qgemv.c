/* Weight-only int8 matrix product for the few rows of decoding (AVX2 + FMA, OpenMP over output rows).
 *
 * Decoding reads every weight once per token, so it runs at memory speed if the unpacking keeps up. torch's own
 * CPU kernel (_weight_int8pack_mm, bf16 activations) spent 30 ms a token on SmolLM2's int8 weights here, about a
 * fifth of the read bandwidth; this widens each block of weights once for up to 4 rows of x, in fp32 throughout.
 * (An int4 version written the same way was slower than torch's int4 kernel here, so int4 layers use torch's.)
 *
 * y[m, n] = scale[n] * sum_k x[m, k] * q[n, k], q int8 row-major [N, K], K a multiple of 32 (the caller checks).
 * Built and loaded by fourwalls/model/quant.py.
 */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows of x in blocks of up to 4: each block of 32 weights is widened to fp32 once and used for all of them. */
void int8_linear(const float *x, const int8_t *q, const float *scale, float *y, int64_t M, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = q + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t rows = M - m0 < 4 ? M - m0 : 4;
            __m256 acc[4][2];
            for (int r = 0; r < 4; r++)
                acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 32) {
                __m128i b0 = _mm_loadu_si128((const __m128i *)(row + k));
                __m128i b1 = _mm_loadu_si128((const __m128i *)(row + k + 16));
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
                __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
                __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
                for (int r = 0; r < rows; r++) {
                    const float *xm = x + (m0 + r) * K + k;
                    acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[r][1]);
                    acc[r][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), acc[r][1]);
                }
            }
            for (int r = 0; r < rows; r++)
                y[(m0 + r) * N + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) * scale[n];
        }
    }
}
