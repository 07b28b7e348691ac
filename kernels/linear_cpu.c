/* fp32 linear layer y = x @ W^T (+ b) whose every output is summed in one fixed order.
 *
 * Built and loaded by kernels/linear_cpu.py (see there for the arguments and the packed layout).
 *
 *   out[m][n] = (sum over k = 0, 1, ..., K-1 of x[m][k] * W[n][k])  (+ bias[n])
 *
 * Each output is one chain acc = fmaf(x[m][k], W[n][k], acc) from acc = 0 in ascending k, then one
 * addition of the bias. fmaf rounds once (IEEE 754 fusedMultiplyAdd), so an output's bits depend
 * only on the numbers that enter it: not on M or N, not on the row's position in the batch or the
 * column's in its register tile, vector lane or panel, not on how the work is split between threads,
 * and not on which level's code below runs (AVX-512, AVX2+FMA, or plain x86-64, whose fmaf is a libm
 * call). Compile with -ffp-contract=off so the bias addition is not fused into the chain.
 *
 * The weight is packed once (linear_cpu_pack) into panels of NP output columns, [ceil(N/NP)][K][NP],
 * the last panel padded with zeros: a panel is one contiguous stream that the register tile reads
 * row k after row k, and a thread's range of panels is one contiguous stream too. A register tile
 * holds MR rows x NP columns of accumulators and broadcasts x[m][k] against the panel's row k.
 * Threads split the panels (whole output columns each), through OpenMP (torch's own runtime where
 * torch uses libgomp, so no second thread pool competes with it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Output columns per panel (2 AVX-512 or 4 AVX2 registers per row of a tile). */
#define NP 32
#define MAX_THREADS 256
/* Values of k per block (a 16 KiB block of a panel). */
#define KB 128
/* Rows of x per row block: about this many floats (512 KiB, in L2 with room to spare). */
#define X_BLOCK_FLOATS (128 * 1024)
/* x is copied tile by tile when it has more tiles than this (see DEFINE_LEVEL), on Intel. On AMD
 * never: a Zen 5 ran SmolLM2's four layer shapes at 512 rows in 0.87x the time reading x in place
 * (7.6 against 8.7 ms, 2 threads; copying cost up to a fifth of a 576-column product, and even the
 * largest, 3,072 columns, ran 0.95x the time without it). */
#define PACK_X_TILES 8
/* Most rows in a register tile. */
#define MR_MAX 12
/* Fewest multiply-adds worth a thread of its own (about 20 us of work). */
#define MIN_FMAS_PER_THREAD (1 << 17)

struct linear_args {
  int64_t m, k, n;      /* x is [m, k], W is [n, k], out is [m, n] */
  int64_t x_row;        /* elements between rows of x (stride 1 within a row) */
  int64_t out_row;      /* elements between rows of out */
  int64_t threads;      /* at most this many threads */
  const float *x, *w;   /* w: the packed weight */
  const float *bias;    /* [n] or NULL */
  float *out;
};

/* One tile: rows m0 .. m0+mr-1 of x (mr a constant after inlining; x[m0 + r][k] at
 * X[r * xr + k * xk]), one panel of NP columns, over k0 .. k1-1. The chain's partial sums wait in O
 * between k blocks (a float store and load are exact), so the tile goes on from O unless k0 is 0,
 * and the bias is added once the chain is complete. Only the first ncols columns are stored (the
 * rest of the panel is padding). Meanwhile it prefetches pf_lines cache lines from pf into L2,
 * spread evenly over its k. */
static inline __attribute__((always_inline)) void tile(int mr, const char *pf, int64_t pf_lines,
                                                       int64_t k0, int64_t k1, int64_t K, const float *X,
                                                       int64_t xr, int64_t xk, const float *W, float *O,
                                                       int64_t os, const float *bias, int64_t ncols) {
  float acc[MR_MAX][NP];
  int64_t credit = 0;
  if (k0 == 0 || ncols < NP) {
    for (int r = 0; r < mr; r++)
      for (int j = 0; j < NP; j++) acc[r][j] = k0 == 0 || j >= ncols ? 0.0f : O[r * os + j];
  } else {
    for (int r = 0; r < mr; r++)
      for (int j = 0; j < NP; j++) acc[r][j] = O[r * os + j];
  }
  for (int64_t k = k0; k < k1; k++) {
    const float *Wk = W + k * NP;
    for (credit += pf_lines; credit >= k1 - k0; credit -= k1 - k0, pf += 64) __builtin_prefetch(pf, 0, 1);
    for (int r = 0; r < mr; r++) {
      const float xv = X[r * xr + k * xk];
      for (int j = 0; j < NP; j++) acc[r][j] = fmaf(xv, Wk[j], acc[r][j]);
    }
  }
  if (k1 == K && bias)
    for (int r = 0; r < mr; r++)
      for (int j = 0; j < NP; j++) acc[r][j] = acc[r][j] + bias[j < ncols ? j : 0];
  if (ncols == NP) {
    for (int r = 0; r < mr; r++)
      for (int j = 0; j < NP; j++) O[r * os + j] = acc[r][j];
  } else {
    for (int r = 0; r < mr; r++)
      for (int64_t j = 0; j < ncols; j++) O[r * os + j] = acc[r][j];
  }
}

/* Panels p0 .. p1-1 for every row, in tiles of up to MR rows, and in blocks of KB values of k: a
 * block of the panel (KB * NP * 4 bytes) stays in L1 while every row tile uses it, and the next
 * block (of this panel, else the next panel's first) is prefetched into L2 meanwhile, each row tile
 * fetching its share. Why shared: when only the first tile prefetched, memory sat idle while the
 * other tiles computed. Why L2: the same sharing into L1 was slower (0.87x the old time at 64 rows,
 * against 0.80x). The 121 linear calls of a SmolLM2-135M step, cold weights, median of 9 alternated
 * runs, 2 threads: 0.86-0.90x the time at 1 row, 0.82x at 16, 0.80x at 64, 0.92x at 512. Rows go in
 * blocks of about X_BLOCK_FLOATS / K, so that the rows of x that every panel reads again stay in L2.
 * With more than PACK_X_TILES tiles (on Intel), x comes copied tile by tile ([tiles][K][MR], xp, by pack_x): a
 * tile's broadcasts then read one contiguous stream instead of MR rows far apart (whose addresses,
 * at a row stride that is a multiple of 4 KiB, would compete for the same L1 sets).
 * Which tiles run as which row count changes no bits: every output is its own chain. */
#define TILE(mr, ...) tile(mr, pf, pf_lines, __VA_ARGS__)
#define DEFINE_LEVEL(name, attr, MR)                                                                       \
  attr static void name##_panels(const struct linear_args *a, const float *xp, int64_t p0, int64_t p1) {   \
    const int64_t M = a->m, K = a->k, N = a->n, os = a->out_row;                                          \
    const int64_t xr = xp ? 1 : a->x_row, xk = xp ? MR : 1;                                                \
    int64_t mc = X_BLOCK_FLOATS / K / MR * MR;                                                             \
    if (mc < MR) mc = MR;                                                                                  \
    for (int64_t mb = 0; mb < M; mb += mc) {                                                               \
      const int64_t me = M - mb < mc ? M : mb + mc;                                                        \
      for (int64_t p = p0; p < p1; p++) {                                                                  \
        const float *W = a->w + p * K * NP;                                                                \
        const int64_t n0 = p * NP, ncols = N - n0 < NP ? N - n0 : NP;                                      \
        const float *bias = a->bias ? a->bias + n0 : 0;                                                    \
        for (int64_t k0 = 0; k0 < K; k0 += KB) {                                                           \
          const int64_t k1 = K - k0 < KB ? K : k0 + KB;                                                    \
          for (int64_t m0 = mb; m0 < me; m0 += MR) {                                                       \
            const float *X = xp ? xp + m0 * K : a->x + m0 * a->x_row;                                      \
            float *O = a->out + m0 * os + n0;                                                              \
            const float *next = k1 < K ? W + k1 * NP : p + 1 < p1 ? W + K * NP : 0;                        \
            const int64_t next_rows = k1 < K ? (K - k1 < KB ? K - k1 : KB) : (K < KB ? K : KB);            \
            const int64_t lines = next ? next_rows * NP * 4 / 64 : 0, tiles = (me - mb + MR - 1) / MR;    \
            const int64_t t = (m0 - mb) / MR, first = lines * t / tiles;                                  \
            const char *pf = next ? (const char *)next + 64 * first : 0;                                  \
            const int64_t pf_lines = lines * (t + 1) / tiles - first;                                     \
            switch (me - m0 < MR ? me - m0 : MR) { /* constant row counts: accumulators in registers */  \
              case 12: TILE(12, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                       \
              case 11: TILE(11, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                       \
              case 10: TILE(10, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                       \
              case 9: TILE(9, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 8: TILE(8, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 7: TILE(7, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 6: TILE(6, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 5: TILE(5, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 4: TILE(4, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 3: TILE(3, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              case 2: TILE(2, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                         \
              default: TILE(1, k0, k1, K, X, xr, xk, W, O, os, bias, ncols); break;                        \
            }                                                                                              \
          }                                                                                                \
        }                                                                                                  \
      }                                                                                                    \
    }                                                                                                      \
  }                                                                                                        \
  /* Tiles t0 .. t1-1 of x into xp: xp[(t * K + k) * MR + r] = x[t * MR + r][k]. */                       \
  attr static void name##_pack_x(const struct linear_args *a, float *xp, int64_t t0, int64_t t1) {         \
    const int64_t M = a->m, K = a->k;                                                                      \
    for (int64_t t = t0; t < t1; t++) {                                                                    \
      const int64_t mr = M - t * MR < MR ? M - t * MR : MR;                                                \
      for (int64_t r = 0; r < mr; r++) {                                                                   \
        const float *src = a->x + (t * MR + r) * a->x_row;                                                 \
        float *dst = xp + t * K * MR + r;                                                                  \
        for (int64_t k = 0; k < K; k++) dst[k * MR] = src[k];                                              \
      }                                                                                                    \
    }                                                                                                      \
  }                                                                                                        \
  static const struct level name = {name##_panels, name##_pack_x, MR};

struct level {
  void (*panels)(const struct linear_args *, const float *, int64_t, int64_t);
  void (*pack_x)(const struct linear_args *, float *, int64_t, int64_t);
  int64_t mr;
};

/* One build per x86-64 level, picked at load time: AVX-512 has 32 vector registers (12 x 2 of them
 * accumulate), AVX2 16 (3 x 4). -DLINEAR_CPU_NO_CLONES builds just the one the compiler flags select
 * (the tests use it to compare the levels). The tile size changes no bits, only speed. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(LINEAR_CPU_NO_CLONES)
DEFINE_LEVEL(level_v4, __attribute__((target("arch=x86-64-v4"))), 12)
DEFINE_LEVEL(level_v3, __attribute__((target("arch=x86-64-v3"))), 3)
DEFINE_LEVEL(level_base, , 4)
static const struct level *pick(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return &level_v4;
  if (__builtin_cpu_supports("x86-64-v3")) return &level_v3;
  return &level_base;
}
#else
#if defined(__AVX512F__)
DEFINE_LEVEL(level_only, , 12)
#elif defined(__AVX2__)
DEFINE_LEVEL(level_only, , 3)
#else
DEFINE_LEVEL(level_only, , 4)
#endif
static const struct level *pick(void) { return &level_only; }
#endif

/* Pack w [n, k] (row stride w_row elements) into panels [ceil(n / NP)][k][NP], zero-padded. */
void linear_cpu_pack(const float *w, int64_t n, int64_t k, int64_t w_row, float *packed) {
  const int64_t panels = (n + NP - 1) / NP;
  for (int64_t p = 0; p < panels; p++)
    for (int64_t kk = 0; kk < k; kk++) {
      float *dst = packed + (p * k + kk) * NP;
      for (int64_t j = 0; j < NP; j++) {
        const int64_t col = p * NP + j;
        dst[j] = col < n ? w[col * w_row + kk] : 0.0f;
      }
    }
}

/* The inverse of linear_cpu_pack: w [n, k] contiguous. */
void linear_cpu_unpack(const float *packed, int64_t n, int64_t k, float *w) {
  for (int64_t col = 0; col < n; col++)
    for (int64_t kk = 0; kk < k; kk++) w[col * k + kk] = packed[((col / NP) * k + kk) * NP + col % NP];
}

int64_t linear_cpu_panel_width(void) { return NP; }

/* x is copied for calls of more tiles than this; -1 until the first call decides (by vendor). Read
 * and written atomically: a test may set it while another thread multiplies. */
static int64_t pack_x_tiles = -1;

static int64_t default_pack_x_tiles(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("amd")) return INT64_MAX;
#endif
  return PACK_X_TILES;
}

/* Copy x when a call has more than `tiles` register tiles of rows (a negative value: this CPU's
 * default, see PACK_X_TILES); returns the threshold in use. For tests, which run both paths on any
 * CPU: which path runs changes no bits. */
int64_t linear_cpu_pack_x_tiles(int64_t tiles) {
  const int64_t value = tiles < 0 ? default_pack_x_tiles() : tiles;
  __atomic_store_n(&pack_x_tiles, value, __ATOMIC_RELAXED);
  return value;
}

/* Runs the product on up to a->threads threads, each on a contiguous range of panels (after each
 * copied a share of x's tiles, when there are more than pack_x_tiles). Returns 0, or 1 when memory
 * for the copy of x ran out (nothing is computed then). */
int64_t linear_cpu(const struct linear_args *a) {
  static const struct level *lv = 0;
  if (!lv) lv = pick(); /* idempotent: a race writes the same pointer */
  int64_t copy_above = __atomic_load_n(&pack_x_tiles, __ATOMIC_RELAXED);
  if (copy_above < 0) { /* first call: decide, unless a setter got there first */
    int64_t undecided = -1;
    copy_above = default_pack_x_tiles();
    __atomic_compare_exchange_n(&pack_x_tiles, &undecided, copy_above, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  }
  const int64_t panels = (a->n + NP - 1) / NP, tiles = (a->m + lv->mr - 1) / lv->mr;
  if (a->m <= 0 || panels <= 0) return 0;
  int64_t threads = a->m * panels * NP * a->k / MIN_FMAS_PER_THREAD;
  if (threads > a->threads) threads = a->threads;
  if (threads > panels) threads = panels;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads < 1) threads = 1;
  float *xp = 0;
  if (tiles > copy_above) {
    xp = aligned_alloc(64, ((size_t)tiles * lv->mr * a->k * sizeof(float) + 63) / 64 * 64);
    if (!xp) return 1;
  }
  if (threads == 1) {
    if (xp) lv->pack_x(a, xp, 0, tiles);
    lv->panels(a, xp, 0, panels);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
      const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
      if (xp) {
        lv->pack_x(a, xp, tiles * tid / team, tiles * (tid + 1) / team);
#pragma omp barrier
      }
      /* If the runtime gave fewer threads than asked, a thread runs several ranges. */
      for (int64_t part = tid; part < threads; part += team)
        lv->panels(a, xp, panels * part / threads, panels * (part + 1) / threads);
    }
#else
    if (xp) lv->pack_x(a, xp, 0, tiles);
    lv->panels(a, xp, 0, panels);
#endif
  }
  free(xp);
  return 0;
}
