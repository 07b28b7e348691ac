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
#include <pthread.h>
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

struct job {
  const int64_t *shape, *as, *bs, *os, *rs;
  const float *a, *b;
  float *out, *rowsum;
  int64_t begin, end; /* units: (batch entry, block of MR rows), batch-major */
};

CLONES
static void run_units(const struct job *j) {
  const int64_t *shape = j->shape, *as = j->as, *bs = j->bs, *os = j->os, *rs = j->rs;
  const int64_t M = shape[M_], N = shape[N_], nk1 = shape[K1], nk2 = shape[K2];
  const int64_t tiles = (M + MR - 1) / MR;
  for (int64_t u = j->begin; u < j->end; u++) {
    const int64_t item = u / tiles, m0 = (u % tiles) * MR;
    const int64_t i2 = item % shape[B2], i1 = item / shape[B2] % shape[B1], i0 = item / shape[B2] / shape[B1];
    const int64_t mr = M - m0 < MR ? M - m0 : MR;
    const float *A = j->a + i0 * as[B0] + i1 * as[B1] + i2 * as[B2] + m0 * as[M_];
    const float *B = j->b + i0 * bs[0] + i1 * bs[1] + i2 * bs[2];
    float *O = j->out + i0 * os[0] + i1 * os[1] + i2 * os[2] + m0 * os[3];
    if (j->rowsum) {
      float *R = j->rowsum + i0 * rs[0] + i1 * rs[1] + i2 * rs[2] + m0 * rs[3];
      for (int64_t r = 0; r < mr; r++) {
        float s = 0.0f;
        for (int64_t k1 = 0; k1 < nk1; k1++)
          for (int64_t k2 = 0; k2 < nk2; k2++) s = s + A[r * as[M_] + k1 * as[K1] + k2 * as[K2]];
        R[r * rs[3]] = s;
      }
    }
    int64_t n0 = 0;
    for (; n0 + NR <= N; n0 += NR) {
      switch (mr) { /* constant row counts: accumulators in registers, not memory */
        case 4: tile(4, nk1, nk2, A, as, B + n0, bs, O + n0, os); break;
        case 3: tile(3, nk1, nk2, A, as, B + n0, bs, O + n0, os); break;
        case 2: tile(2, nk1, nk2, A, as, B + n0, bs, O + n0, os); break;
        default: tile(1, nk1, nk2, A, as, B + n0, bs, O + n0, os); break;
      }
    }
    for (int64_t r = 0; r < mr; r++) /* columns past the last whole tile */
      for (int64_t n = n0; n < N; n++) {
        float s = 0.0f;
        for (int64_t k1 = 0; k1 < nk1; k1++)
          for (int64_t k2 = 0; k2 < nk2; k2++)
            s = fmaf(A[r * as[M_] + k1 * as[K1] + k2 * as[K2]], B[k1 * bs[3] + k2 * bs[4] + n], s);
        O[r * os[3] + n] = s;
      }
  }
}

static void *worker(void *arg) {
  run_units((const struct job *)arg);
  return 0;
}

/* Fewest multiply-adds worth a thread of its own (about 0.1 ms of work). */
#define MIN_FMAS_PER_THREAD (1 << 20)

/* Runs the product on up to `threads` threads, each on a contiguous range of row blocks: a thread
 * computes whole outputs, so how the work is split changes no bits. */
void ordered_matmul(const int64_t *shape, const int64_t *as, const int64_t *bs, const int64_t *os,
                    const int64_t *rs, const float *a, const float *b, float *out, float *rowsum,
                    int64_t threads) {
  const int64_t units = shape[B0] * shape[B1] * shape[B2] * ((shape[M_] + MR - 1) / MR);
  const int64_t fmas = units * MR * shape[N_] * shape[K1] * shape[K2];
  int64_t t = fmas / MIN_FMAS_PER_THREAD;
  if (t > threads) t = threads;
  if (t > units) t = units;
  if (t > 64) t = 64;
  if (t < 1) t = 1;
  struct job jobs[64];
  pthread_t ids[64];
  int started[64] = {0};
  for (int64_t i = 0; i < t; i++) {
    jobs[i] = (struct job){shape, as, bs, os, rs, a, b, out, rowsum, units * i / t, units * (i + 1) / t};
    if (i > 0) started[i] = pthread_create(&ids[i], 0, worker, &jobs[i]) == 0;
  }
  run_units(&jobs[0]);
  for (int64_t i = 1; i < t; i++) {
    if (started[i])
      pthread_join(ids[i], 0);
    else
      run_units(&jobs[i]); /* no thread could be started: do its share here */
  }
}
