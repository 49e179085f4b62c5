/* Matrix-vector kernel for int8 weight-only decoding on x86-64 with AVX-512 (qwenlm).
 *
 * Decoding one token reads every weight once, so it is bound by memory bandwidth: these kernels stream
 * the int8 weights and multiplies them in fp32 registers (no activation quantisation, so results
 * equal an fp32 matmul with the dequantised weights up to summation order). Rows are split over the
 * OpenMP threads of PyTorch's own runtime (the same libgomp is loaded).
 */
#include <immintrin.h>
#include <stdint.h>

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k];  w int8 row-major (N, K);  K % 64 == 0 */
void qwenlm_gemv_i8(const float *x, const int8_t *w, const float *scale, float *y, long M, long N, long K,
                    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        for (long m = 0; m < M; m++) {
            const float *xr = x + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (long k = 0; k < K; k += 64) {
                __m512i b = _mm512_loadu_si512((const void *)(wr + k));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k),
                                     _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 0))), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 16),
                                     _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1))), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 32),
                                     _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2))), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 48),
                                     _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3))), a3);
            }
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * scale[n];
        }
    }
}
