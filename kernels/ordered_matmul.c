/* Batched fp32 matrix products whose every output is summed in one fixed order.
 *
 * Built and loaded by kernels/ordered_matmul.py (see there for the layout of the arguments).
 *
 *   out[i][m][n] = sum over k = 0, 1, ..., K-1 of a[i][m][k] * b[i][k][n]
 *   rowsum[i][m] = sum over k = 0, 1, ..., K-1 of a[i][m][k]            (optional)
 *
 * with k = k1 * K2 + k2 running over two levels (k1 < K1, k2 < K2) and i over three batch
 * levels. Each output is one chain acc = fmaf(a, b, acc) from acc = 0 in ascending k; each row
 * sum is one chain acc = acc + a. fmaf rounds once, exactly as IEEE 754 fusedMultiplyAdd, so the
 * result of an output depends only on the numbers that enter it: not on M, N or the batch, not
 * on the output's position (register tile, vector lane or scalar tail), and not on which of the
 * clones below runs (AVX-512, AVX2+FMA, or the plain x86-64 one, whose fmaf is a libm call).
 * Compile with -ffp-contract=off so the row sums are not fused either.
 */
#include <math.h>
#include <stdint.h>

/* One clone per x86-64 level, picked at load time; -DORDERED_MATMUL_NO_CLONES builds just the
 * one the compiler flags select (the tests use it to compare the levels). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ORDERED_MATMUL_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Rows and columns of one register tile: 4 x 32 accumulators (8 AVX-512 registers). */
#define MR 4
#define NR 32

enum { B0, B1, B2, M_, K1, K2, N_, NDIMS };

/* One tile: rows m0 .. m0+mr-1 (mr <= MR, a constant after inlining), columns n0 .. n0+NR-1. */
static inline __attribute__((always_inline)) void tile(int mr, int64_t nk1, int64_t nk2, const float *A,
                                                       const int64_t *as, const float *B, const int64_t *bs,
                                                       float *O, const int64_t *os) {
  float acc[MR][NR];
  for (int r = 0; r < mr; r++)
    for (int j = 0; j < NR; j++) acc[r][j] = 0.0f;
  for (int64_t k1 = 0; k1 < nk1; k1++)
    for (int64_t k2 = 0; k2 < nk2; k2++) {
      const float *Bk = B + k1 * bs[3] + k2 * bs[4];
      const float *Ak = A + k1 * as[K1] + k2 * as[K2];
      for (int r = 0; r < mr; r++) {
        const float x = Ak[r * as[M_]];
        for (int j = 0; j < NR; j++) acc[r][j] = fmaf(x, Bk[j], acc[r][j]);
      }
    }
  for (int r = 0; r < mr; r++)
    for (int j = 0; j < NR; j++) O[r * os[3] + j] = acc[r][j];
}

CLONES
void ordered_matmul(const int64_t *shape, const int64_t *as, const int64_t *bs, const int64_t *os,
                    const int64_t *rs, const float *a, const float *b, float *out, float *rowsum) {
  const int64_t M = shape[M_], N = shape[N_], nk1 = shape[K1], nk2 = shape[K2];
  for (int64_t i0 = 0; i0 < shape[B0]; i0++)
    for (int64_t i1 = 0; i1 < shape[B1]; i1++)
      for (int64_t i2 = 0; i2 < shape[B2]; i2++) {
        const float *A = a + i0 * as[B0] + i1 * as[B1] + i2 * as[B2];
        const float *B = b + i0 * bs[0] + i1 * bs[1] + i2 * bs[2];
        float *O = out + i0 * os[0] + i1 * os[1] + i2 * os[2];
        if (rowsum) {
          float *R = rowsum + i0 * rs[0] + i1 * rs[1] + i2 * rs[2];
          for (int64_t m = 0; m < M; m++) {
            float s = 0.0f;
            for (int64_t k1 = 0; k1 < nk1; k1++)
              for (int64_t k2 = 0; k2 < nk2; k2++) s = s + A[m * as[M_] + k1 * as[K1] + k2 * as[K2]];
            R[m * rs[3]] = s;
          }
        }
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const float *Am = A + m0 * as[M_];
          float *Om = O + m0 * os[3];
          int64_t n0 = 0;
          for (; n0 + NR <= N; n0 += NR) {
            switch (M - m0 < MR ? M - m0 : MR) {  /* constant row counts: registers, not memory */
              case 4: tile(4, nk1, nk2, Am, as, B + n0, bs, Om + n0, os); break;
              case 3: tile(3, nk1, nk2, Am, as, B + n0, bs, Om + n0, os); break;
              case 2: tile(2, nk1, nk2, Am, as, B + n0, bs, Om + n0, os); break;
              default: tile(1, nk1, nk2, Am, as, B + n0, bs, Om + n0, os); break;
            }
          }
          for (int64_t r = 0; r < MR && m0 + r < M; r++)  /* columns past the last whole tile */
            for (int64_t n = n0; n < N; n++) {
              float s = 0.0f;
              for (int64_t k1 = 0; k1 < nk1; k1++)
                for (int64_t k2 = 0; k2 < nk2; k2++)
                  s = fmaf(Am[r * as[M_] + k1 * as[K1] + k2 * as[K2]], B[k1 * bs[3] + k2 * bs[4] + n], s);
              Om[r * os[3] + n] = s;
            }
        }
      }
}
