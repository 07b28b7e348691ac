/* bf16 linear layer y = x @ W^T (+ b) on AMX tiles, or AVX512-BF16 where the CPU has no AMX, for the rows
 * of a decode or a short prefill.
 *
 * Built and loaded by kernels/linear_bf16_cpu.py (see there for the arguments and when it runs).
 *
 *   out[m][n] = bf16(sum over k of x[m][k] * W[n][k]  (+ bias[n]))
 *
 * Products of two bf16 numbers are exact in fp32 and are summed in fp32 by TDPBF16PS (Intel
 * Architecture Instruction Set Extensions Programming Reference, the AMX chapter: pairs of
 * products added into fp32 accumulators, bf16 denormals flushed to zero), or by VDPBF16PS on a CPU
 * without AMX (dp_panels below), then the bias is added and the sum rounded to bf16 once (round to
 * nearest even, VCVTNEPS2BF16).
 *
 * The weight is packed once (linear_bf16_pack) into panels of NP = 32 output columns, each
 * [K2][NP][2]: row kk of a panel holds, for each column, the pair W[n][2kk], W[n][2kk + 1] (the
 * pair layout of AMX's B operand), K2 = ceil(K / 2) rounded up to a multiple of KT = 16 pairs (one
 * tile's depth) and the padding zero. One panel row is 128 bytes: the same row of two B tiles of 16
 * columns each, read with a row stride of 128 bytes.
 *
 * The A tiles (16 rows x 32 values) read x in place where K is a multiple of 32, else a zero-padded
 * [Mp][2 * K2] copy of it (a last partial 16-row tile always from a copy padded with zero rows); each
 * block of 32 rows x 32 columns accumulates in four 16 x 16 fp32 tiles over the panel's K2 / 16 tile
 * steps. Threads split the panels (whole output columns each) through OpenMP. A process must ask
 * Linux for the AMX tile state before its first tile instruction (arch_prctl, done once here).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NP 32
#define KT 16
#define MAX_THREADS 256
/* Fewest multiply-adds worth a thread of its own. */
#define MIN_MACS_PER_THREAD (1 << 17)
/* Rows of x per block (a multiple of 32): 256 rows of K = 1536 are 768 KiB, in L2. */
#define MB 256
/* While a panel is multiplied, one cache line in every NEXT_TOUCH_BYTES of the next panel is fetched
 * into L2 (four per 2 KiB tile step). Why sparse (our reading of the measurements): the L2's own
 * prefetcher then streams the rest of each touched 4 KiB page from memory without holding the L1
 * fill buffers that the tile loads wait on. Touching every line was slower (1.08x the time of one
 * in eight), and so was prefetching the next tile step's A and B into L1 (1.1-1.2x the time
 * without it). The 121 linear calls of a SmolLM2-135M step, cold weights, median of 15 alternated
 * runs: 0.86x the time at 1 row, 0.87x at 16, 0.92x at 64, 0.96x at 512. */
#define NEXT_TOUCH_BYTES 512

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct linear_bf16_args {
  int64_t m, k, n;      /* x is [m, k], W is [n, k], out is [m, n] */
  int64_t x_row;        /* elements between rows of x (stride 1 within a row) */
  int64_t out_row;      /* elements between rows of out */
  int64_t threads;      /* at most this many threads */
  const uint16_t *x, *w; /* w: the packed weight */
  const uint16_t *bias; /* [n] bf16 or NULL */
  uint16_t *out;
};

static int64_t pairs_padded(int64_t k) { return ((k + 1) / 2 + KT - 1) / KT * KT; }

/* Pack w [n, k] bf16 (row stride w_row elements) into [ceil(n / NP)][K2][NP][2], zero-padded. */
void linear_bf16_pack(const uint16_t *w, int64_t n, int64_t k, int64_t w_row, uint16_t *packed) {
  const int64_t panels = (n + NP - 1) / NP, k2 = pairs_padded(k);
  for (int64_t p = 0; p < panels; p++)
    for (int64_t kk = 0; kk < k2; kk++) {
      uint16_t *dst = packed + (p * k2 + kk) * NP * 2;
      for (int64_t j = 0; j < NP; j++) {
        const int64_t col = p * NP + j;
        for (int64_t h = 0; h < 2; h++) {
          const int64_t kx = 2 * kk + h;
          dst[2 * j + h] = col < n && kx < k ? w[col * w_row + kx] : 0;
        }
      }
    }
}

/* The inverse of linear_bf16_pack: w [n, k] contiguous. */
void linear_bf16_unpack(const uint16_t *packed, int64_t n, int64_t k, uint16_t *w) {
  const int64_t k2 = pairs_padded(k);
  for (int64_t col = 0; col < n; col++)
    for (int64_t kx = 0; kx < k; kx++)
      w[col * k + kx] = packed[(((col / NP) * k2 + kx / 2) * NP + col % NP) * 2 + kx % 2];
}

int64_t linear_bf16_panel_width(void) { return NP; }
int64_t linear_bf16_packed_pairs(int64_t k) { return pairs_padded(k); }

/* The instructions linear_bf16 multiplies with (linear_bf16_isa). */
enum { ISA_NONE = 0, ISA_AMX = 1, ISA_AVX512_BF16 = 2 };

static int64_t detect_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")))
    return ISA_NONE;
  if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
      syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0)
    return ISA_AMX;
  return ISA_AVX512_BF16;
#else
  return ISA_NONE;
#endif
}

/* -1 until the first call detects the CPU. isa_best is published before isa_in_use (release /
 * acquire), so whoever sees isa_in_use set sees isa_best too. */
static int64_t isa_in_use = -1, isa_best = -1;

/* ISA_AMX where the CPU has AMX-BF16 and Linux granted this process the AMX tile state, else
 * ISA_AVX512_BF16 where the CPU has AVX512-BF16 (VDPBF16PS), else ISA_NONE (linear_bf16 refuses). */
int64_t linear_bf16_isa(void) {
  int64_t isa = __atomic_load_n(&isa_in_use, __ATOMIC_ACQUIRE);
  if (isa >= 0) return isa;
  isa = detect_isa(); /* the same answer in every thread */
  __atomic_store_n(&isa_best, isa, __ATOMIC_RELAXED);
  int64_t undecided = -1;
  if (!__atomic_compare_exchange_n(&isa_in_use, &undecided, isa, 0, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE))
    return undecided; /* another thread decided (or use_isa chose) first */
  return isa;
}

/* Makes linear_bf16 use `isa` (ISA_AMX or ISA_AVX512_BF16) from now on, in this process: for tests
 * and measurements of the AVX512-BF16 path on a CPU with AMX. Returns the ISA in use afterwards
 * (unchanged when this CPU cannot run `isa`: AMX implies AVX512-BF16, not the reverse). */
int64_t linear_bf16_use_isa(int64_t isa) {
  linear_bf16_isa();
  const int64_t best = __atomic_load_n(&isa_best, __ATOMIC_RELAXED);
  if ((isa == ISA_AMX && best == ISA_AMX) || (isa == ISA_AVX512_BF16 && best != ISA_NONE))
    __atomic_store_n(&isa_in_use, isa, __ATOMIC_RELEASE);
  return __atomic_load_n(&isa_in_use, __ATOMIC_ACQUIRE);
}

/* Kept for callers that only ask whether the kernel runs: nonzero when it does. */
int64_t linear_bf16_available(void) { return linear_bf16_isa() != ISA_NONE; }

#if defined(__x86_64__) && defined(__GNUC__)
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

/* fp32 accumulators (+ bias) -> bf16, the first ncols of 32 columns of one row. */
BF16_TARGET static inline void store_row(__m512 lo, __m512 hi, const uint16_t *bias, int64_t ncols, uint16_t *O) {
  if (bias) {
    const __mmask16 mlo = ncols >= 16 ? 0xffff : (__mmask16)((1u << ncols) - 1);
    const __mmask16 mhi = ncols >= 32 ? 0xffff : ncols <= 16 ? 0 : (__mmask16)((1u << (ncols - 16)) - 1);
    /* bf16 -> fp32 is a 16-bit shift. */
    lo = _mm512_add_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mlo, bias)), 16)));
    hi = _mm512_add_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mhi, bias + 16)), 16)));
  }
  const __m256i blo = (__m256i)_mm512_cvtneps_pbh(lo), bhi = (__m256i)_mm512_cvtneps_pbh(hi);
  if (ncols == NP) {
    _mm256_storeu_si256((__m256i *)O, blo);
    _mm256_storeu_si256((__m256i *)(O + 16), bhi);
  } else {
    const __mmask16 mlo = ncols >= 16 ? 0xffff : (__mmask16)((1u << ncols) - 1);
    const __mmask16 mhi = ncols <= 16 ? 0 : (__mmask16)((1u << (ncols - 16)) - 1);
    _mm256_mask_storeu_epi16(O, mlo, blo);
    _mm256_mask_storeu_epi16(O + 16, mhi, bhi);
  }
}

struct tile_config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

/* Tiles 0-3: C (rows r0-15 / 16-31 x columns 0-15 / 16-31, fp32); 4, 5: A (x's two row blocks,
 * 32 bf16 of k); 6, 7: B (16 pairs of k x 16 columns each). Every tile is 16 rows of 64 bytes. */
AMX_TARGET static void amx_configure(void) {
  struct tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

/* Where the A tiles read x: rows below `direct` straight from x (row stride a->x_row), the rest
 * from `copy` (rows direct .. mp-1, row stride 2 * k2, zero-padded). */
struct x_source {
  int64_t direct;
  const uint16_t *copy;
};

/* The 16-row A tile that starts at row r: its first element and its row stride in bytes. */
static inline const uint16_t *a_tile(const struct linear_bf16_args *a, const struct x_source *xs, int64_t k2,
                                     int64_t r, int64_t *stride) {
  if (r + 16 <= xs->direct) {
    *stride = a->x_row * 2;
    return a->x + r * a->x_row;
  }
  *stride = 2 * k2 * 2;
  return xs->copy + (r - xs->direct) * 2 * k2;
}

/* Panels p0 .. p1-1 for every row. Rows go in blocks of MB, panels inside: a block of x (MB x K
 * bf16) stays in L2 while the thread's panels stream past it; within a block, each pair of B tiles
 * serves two row tiles. */
AMX_TARGET static void amx_panels(const struct linear_bf16_args *a, const struct x_source *xs, int64_t p0,
                                  int64_t p1) {
  const int64_t k2 = pairs_padded(a->k);
  float c[32 * 32] __attribute__((aligned(64)));
  amx_configure();
  for (int64_t mb = 0; mb < a->m; mb += MB) {
    const int64_t me = a->m - mb < MB ? a->m : mb + MB;
    for (int64_t p = p0; p < p1; p++) {
      const int64_t n0 = p * NP, ncols = a->n - n0 < NP ? a->n - n0 : NP;
      const uint16_t *W = a->w + p * k2 * NP * 2;
      const uint16_t *bias = a->bias ? a->bias + n0 : 0;
      const char *next = p + 1 < p1 ? (const char *)(W + k2 * NP * 2) : 0;
      for (int64_t m0 = mb; m0 < me; m0 += 32) {
        const int two = me - m0 > 16;
        int64_t ld0, ld1 = 0;
        const uint16_t *X0 = a_tile(a, xs, k2, m0, &ld0), *X1 = two ? a_tile(a, xs, k2, m0 + 16, &ld1) : 0;
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int64_t kk = 0; kk < k2; kk += KT) {
          if (next)
            for (int i = 0; i < 4; i++) _mm_prefetch(next + kk * NP * 2 * 2 + i * NEXT_TOUCH_BYTES, _MM_HINT_T2);
          _tile_loadd(6, W + kk * NP * 2, NP * 2 * 2);
          _tile_loadd(7, W + kk * NP * 2 + 32, NP * 2 * 2);
          _tile_loadd(4, X0 + 2 * kk, ld0);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, X1 + 2 * kk, ld1);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c, 32 * 4);
        _tile_stored(1, c + 16, 32 * 4);
        if (two) {
          _tile_stored(2, c + 16 * 32, 32 * 4);
          _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
        }
        const int64_t rows = me - m0 < 32 ? me - m0 : 32;
        for (int64_t r = 0; r < rows; r++)
          store_row(_mm512_load_ps(c + r * 32), _mm512_load_ps(c + r * 32 + 16), bias, ncols,
                    a->out + (m0 + r) * a->out_row + n0);
      }
    }
  }
  _tile_release();
}

/* Without AMX (AMD Zen 4/5, Intel Cooper Lake): the same packed panels through VDPBF16PS (Intel SDM,
 * "VDPBF16PS": in each fp32 lane, acc += the two products of a pair of bf16 values, denormal
 * inputs taken as zero, rounded to nearest even). One panel row [32 columns][2] is two vectors of
 * 16 column pairs, so a register tile of R rows x 32 columns takes, per pair of k, two loads of the
 * weight and one broadcast of each row's pair of x. Each output is summed pair after pair of k in
 * ascending order whatever its row, the number of rows or the threads (rows stay batch-invariant;
 * the AMX path sums in another order, so the two differ in the last bits). */
#define DP_ROWS 12 /* 24 accumulators, two weight vectors and a broadcast: 27 of the 32 registers */

/* The pair x[2kk], x[2kk + 1] of one row as a 32-bit lane (the high half 0 past k). */
static inline int32_t x_pair(const uint16_t *row, int64_t kk, int64_t k) {
  const uint32_t lo = row[2 * kk], hi = 2 * kk + 1 < k ? row[2 * kk + 1] : 0;
  return (int32_t)(lo | hi << 16);
}

BF16_TARGET static inline __attribute__((always_inline)) void dp_tile(const struct linear_bf16_args *a, int R,
                                                                        int64_t m0, const uint16_t *W, int64_t n0,
                                                                        int64_t ncols) {
  __m512 acc[DP_ROWS][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint16_t *X = a->x + m0 * a->x_row;
  const int64_t k = a->k, full = k / 2, pairs = (k + 1) / 2;
  for (int64_t kk = 0; kk < full; kk++) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(W + kk * NP * 2);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(W + kk * NP * 2 + 32);
    for (int r = 0; r < R; r++) {
      int32_t pair;
      memcpy(&pair, X + r * a->x_row + 2 * kk, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  for (int64_t kk = full; kk < pairs; kk++) { /* an odd k's last value, with a zero partner */
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(W + kk * NP * 2);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(W + kk * NP * 2 + 32);
    for (int r = 0; r < R; r++) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(x_pair(X + r * a->x_row, kk, k));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  const uint16_t *bias = a->bias ? a->bias + n0 : 0;
  for (int r = 0; r < R; r++) store_row(acc[r][0], acc[r][1], bias, ncols, a->out + (m0 + r) * a->out_row + n0);
}

/* Panels p0 .. p1-1 for every row: rows in blocks of MB (x's block stays in L2), panels inside,
 * tiles of DP_ROWS rows inside (the panel stays in L1 or L2 while the block's tiles pass over it). */
BF16_TARGET static void dp_panels(const struct linear_bf16_args *a, int64_t p0, int64_t p1) {
  const int64_t k2 = pairs_padded(a->k);
  for (int64_t mb = 0; mb < a->m; mb += MB) {
    const int64_t me = a->m - mb < MB ? a->m : mb + MB;
    for (int64_t p = p0; p < p1; p++) {
      const int64_t n0 = p * NP, ncols = a->n - n0 < NP ? a->n - n0 : NP;
      const uint16_t *W = a->w + p * k2 * NP * 2;
      for (int64_t m0 = mb; m0 < me; m0 += DP_ROWS) {
        const int rows = me - m0 < DP_ROWS ? (int)(me - m0) : DP_ROWS;
        /* One instance per row count, so that each keeps its accumulators in registers. */
        switch (rows) {
#define DP_CASE(R) case R: dp_tile(a, R, m0, W, n0, ncols); break;
          DP_CASE(1) DP_CASE(2) DP_CASE(3) DP_CASE(4) DP_CASE(5) DP_CASE(6)
          DP_CASE(7) DP_CASE(8) DP_CASE(9) DP_CASE(10) DP_CASE(11) DP_CASE(12)
#undef DP_CASE
        }
      }
    }
  }
}

/* Rows r0 .. r1-1 of x into xp, as its rows r0 - first .. ([][2 * k2], zero beyond k and beyond m). */
static void copy_x(const struct linear_bf16_args *a, uint16_t *xp, int64_t first, int64_t r0, int64_t r1) {
  const int64_t width = 2 * pairs_padded(a->k);
  for (int64_t r = r0; r < r1; r++) {
    uint16_t *dst = xp + (r - first) * width;
    if (r < a->m) {
      memcpy(dst, a->x + r * a->x_row, a->k * 2);
      memset(dst + a->k, 0, (width - a->k) * 2);
    } else {
      memset(dst, 0, width * 2);
    }
  }
}

/* Runs the product on up to a->threads threads. Returns 0; 1 when neither AMX nor AVX512-BF16 is
 * available here (nothing is computed); 2 when memory for the copy of x (AMX only) ran out. */
int64_t linear_bf16(const struct linear_bf16_args *a) {
  const int64_t isa = linear_bf16_isa();
  if (isa == ISA_NONE) return 1;
  const int64_t panels = (a->n + NP - 1) / NP;
  if (a->m <= 0 || panels <= 0) return 0;
  int64_t threads = a->m * panels * NP * a->k / MIN_MACS_PER_THREAD;
  if (threads > a->threads) threads = a->threads;
  if (threads > panels) threads = panels;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads < 1) threads = 1;
  /* AVX512-BF16 reads x in place. AMX's tiles read it in place where its rows need no padding in k
   * (K a multiple of 32, as in every layer of SmolLM2), all but a last partial 16-row tile, which is
   * copied with zero rows below (copying all of x cost about a tenth of a 512-row product);
   * otherwise all of x is copied. A 32-row block reads its second A tile only when it has rows. */
  const int amx = isa == ISA_AMX;
  const int64_t mp = amx ? (a->m + 15) / 16 * 16 : 0;
  const int64_t direct = amx && a->k == 2 * pairs_padded(a->k) ? a->m / 16 * 16 : 0;
  /* The copy lives in a buffer kept between calls, one per calling thread: a fresh one above
   * malloc's mmap threshold (128 KiB: 64 rows of K = 1536) would be new zero-filled pages, faulted
   * in on every call. The team below reaches it through `copy` (its own thread-locals are empty). */
  static __thread uint16_t *buffer = 0;
  static __thread size_t buffer_bytes = 0;
  const size_t need = amx ? ((size_t)(mp - direct) * 2 * pairs_padded(a->k) * 2 + 63) / 64 * 64 : 0;
  if (need > 0 && need > buffer_bytes) {
    free(buffer);
    buffer_bytes = 0;
    buffer = aligned_alloc(64, need);
    if (!buffer) return 2;
    buffer_bytes = need;
  }
  uint16_t *const copy = buffer;
  const struct x_source xs = {direct, copy};
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t tid = 0, team = 1;
#endif
    if (amx) { /* the same branch in every thread of the team, so all reach the barrier */
      const int64_t rows = mp - direct;
      copy_x(a, copy, direct, direct + rows * tid / team, direct + rows * (tid + 1) / team);
#ifdef _OPENMP
#pragma omp barrier
#endif
    }
    /* If the runtime gave fewer threads than asked, a thread runs several ranges. */
    for (int64_t part = tid; part < threads; part += team) {
      const int64_t p0 = panels * part / threads, p1 = panels * (part + 1) / threads;
      if (amx)
        amx_panels(a, &xs, p0, p1);
      else
        dp_panels(a, p0, p1);
    }
  }
  return 0;
}
#else
int64_t linear_bf16(const struct linear_bf16_args *a) {
  (void)a;
  return 1;
}
#endif
