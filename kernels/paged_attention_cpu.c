/* Paged attention on the CPU (fp32 or bf16 tensors, fp32 arithmetic), one call per model layer.
 *
 * Built and loaded by kernels/paged_attention_cpu.py; `struct pa_args` below must match its ctypes
 * Structure field for field.
 *
 * One call
 *   1. checks the step's batch layout (query_start_loc, seq_lens, the block ids it will read, the
 *      slots it will write) and returns a PA_* code naming the first bad entry, before writing;
 *   2. writes the step's new K/V into the paged cache at slot_mapping (a negative slot is padding);
 *   3. computes causal attention for every new token of every sequence: sequence s has
 *      q_len = query_start_loc[s+1] - query_start_loc[s] new tokens, at positions
 *      seq_lens[s] - q_len .. seq_lens[s] - 1, and each attends to the keys at positions 0 .. its
 *      own, read through row s of the block table. Query head h reads KV head h / G (grouped-query
 *      attention, G = num_heads / num_kv_heads). Output rows past query_start_loc[num_seqs] are 0.
 *
 * Why a token's bits do not depend on the batch or the threads: every output row (one token, one
 * query head) is computed by the same sequence of floating-point operations, whatever else the
 * call holds (decodes of other sequences, the rest of a prefill, other chunks of a chunked prefill):
 *   - keys are taken in chunks of CHUNK = 64 positions (0-63, 64-127, ...) in order, and online
 *     softmax (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018) carries a
 *     running maximum m, denominator l and output acc[D] from one chunk to the next;
 *   - a score is one chain s = fmaf(q[d] * scale, k[d], s) over ascending d from s = 0;
 *   - per chunk: c = the maximum of the row's visible scores (exact in any order),
 *     m' = max(m, c); p_j = exp(s_j - m') for the visible keys, 0 for the others;
 *     l' = l * exp(m - m') + sum(p), the 64 p summed in one fixed tree (exp_sum_chunk);
 *     acc'[d] = acc[d] * exp(m - m'), then acc'[d] = fmaf(p_j, v_j[d], acc'[d]) over the row's
 *     visible keys in ascending order (the first chunk starts from l = 0, acc = 0 instead);
 *   - out[d] = acc[d] / l.
 * exp is computed here (exp_nonpos) from fmaf and exact operations only, and fmaf rounds once
 * (IEEE 754 fusedMultiplyAdd), so neither the register tile, vector lane or scalar tail a value
 * lands in, nor the instruction-set clone (AVX-512, AVX2+FMA, plain x86-64 whose fmaf is a libm
 * call), nor the thread that runs it can change a bit. Keys a token cannot see never enter its
 * output, and cache entries past a sequence's end (stale, or NaN) are never read at all.
 * Compile with -ffp-contract=off (no other fusing of products into sums).
 *
 * bf16 (pa_args.bf16 = 1): query, key, value, both caches and out are bf16; each value read is
 * widened to fp32 exactly (its bits shifted up), everything above runs unchanged in fp32, and each
 * output is rounded to bf16 once (to nearest, ties to even, as torch rounds). So a bf16 call gives
 * the fp32 call's outputs on the widened inputs, rounded: the same guarantees, and no bf16 rounding
 * inside the softmax or the sums.
 *
 * Cache layout ("blocked", vLLM's CPU backend keeps keys transposed for the same reason): a block
 * holds each KV head's keys transposed, key_cache [num_blocks, num_kv_heads, head_dim, block_size],
 * and its values head by head, value_cache [num_blocks, num_kv_heads, block_size, head_dim]. The
 * score tiles read 16 or 32 keys per vector at one head-dim index d, so keys stored d-major are
 * copied into a chunk's tile as they lie; with keys stored token-major (the Triton kernels' layout)
 * every chunk had to be transposed in registers, which took a third of a decode step's attention.
 * A KV head's values in a block are one contiguous run, which the hardware prefetcher follows.
 *
 * Work: items of (sequence, KV head, up to ITEM_ROWS query rows: whole tokens times the G query
 * heads of the KV head), so each chunk of keys is gathered once per item and shared by the
 * item's rows. Items are split between threads in contiguous ranges of about equal cost; a thread
 * computes whole rows, so the split changes no bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* One clone per x86-64 level, picked at load time; -DPAGED_ATTENTION_NO_CLONES builds just the
 * one the compiler flags select (the tests use it to compare the levels). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(PAGED_ATTENTION_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

#define CHUNK 64      /* keys per online-softmax step */
#define MR 4          /* rows of a register tile */
#define NR 32         /* keys (scores) or head-dim columns (outputs) of a register tile */
#define ITEM_ROWS 64  /* query rows per work item (at least G: one token) */
#define MAX_THREADS 64
/* Software prefetches: on Intel to L2 (prefetcht1), measured as fast as L3 (t2) and faster than L1
 * (t0), whose fill buffers the bursts of one chunk would tie up; on AMD non-temporal (prefetchnta),
 * which a Zen 5 ran a bf16 decode step's attention with in 0.8-0.9x the time of t1 and 0.93x of
 * t0 (fp32 0.95x; each key and value is read once per item, so nothing is lost by not keeping it).
 * Chosen once per process (prefetch_nta, set at the first call). */
static int prefetch_nta = -1;
/* Fewest (row, key) pairs worth a thread of their own: about 2 * 64 * 8192 = 1M multiply-adds. */
#define MIN_COST_PER_THREAD 8192
/* exp's argument is clamped here: exp(-87) = 1.6e-38 is still a normal float, and no fp32 sum that
 * includes the row's maximum (p = 1) can see it. */
#define EXP_FLOOR (-87.0f)

enum {
  PA_OK = 0,
  PA_BAD_QUERY_START_LOC = 1, /* error_index: the sequence */
  PA_BAD_SEQ_LEN = 2,         /* error_index: the sequence (seq_len < q_len or past the table) */
  PA_BAD_BLOCK_ID = 3,        /* error_index: the sequence whose block table row has it */
  PA_BAD_SLOT = 4,            /* error_index: the token */
  PA_NO_MEMORY = 5,
};

struct pa_args {
  int64_t num_tokens, num_seqs, num_heads, num_kv_heads, head_dim;
  int64_t num_blocks, block_size, table_width;
  /* element strides of query, key, value ([token, head, head_dim], stride 1 in head_dim) */
  int64_t q_token, q_head, k_token, k_head, v_token, v_head;
  int64_t threads;
  int64_t error_index; /* written on error */
  int64_t bf16;        /* 0: every tensor below holds fp32; 1: bf16 (uint16_t bit patterns) */
  double scale;
  const void *query, *key, *value;
  void *key_cache;   /* [num_blocks, num_kv_heads, head_dim, block_size], contiguous */
  void *value_cache; /* [num_blocks, num_kv_heads, block_size, head_dim], contiguous */
  void *out;                     /* [num_tokens, num_heads, head_dim], contiguous */
  const int64_t *slot_mapping;    /* [num_tokens] */
  const int32_t *block_table;     /* [num_seqs, table_width], contiguous */
  const int32_t *seq_lens;        /* [num_seqs] */
  const int32_t *query_start_loc; /* [num_seqs + 1] */
};

struct item {
  int64_t seq, kv_head, t0, t1; /* tokens t0 .. t1-1 of the sequence's new ones */
  int64_t cost;                 /* rows x keys seen by the last row: for splitting between threads */
};

struct workspace {
  float *kt;         /* [D][CHUNK]: the chunk's keys, d-major as the cache keeps them */
  float *q;          /* [rows][D]: scaled queries */
  float *s;          /* [rows][CHUNK]: scores, then probabilities */
  float *acc;        /* [rows][D] */
  float *m, *l, *alpha;
  const void **vrow; /* [CHUNK]: each key's value row in the cache (fp32 or bf16) */
};

/* bf16 -> fp32 is exact: the bf16 bits are the fp32's upper half. */
INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* fp32 -> bf16, rounded to nearest with ties to even (torch's rounding); NaN stays a quiet NaN. */
INLINE uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* exp(x) for x <= 0 (clamped at EXP_FLOOR), from fmaf and exact operations only, so every vector
 * width and the scalar code give the same bits. x = n ln2 + r with n = round(x / ln2) (by adding
 * 1.5 * 2^23), |r| <= ln2 / 2 via a two-part ln2 (Cody & Waite), exp(r) by its Taylor polynomial
 * of degree 7 (truncation error r^8 / 8! < 6e-9 relative), times 2^n built in the exponent bits. */
INLINE float exp_nonpos(float x) {
  x = x < EXP_FLOOR ? EXP_FLOOR : x;
  const float shifter = 0x1.8p23f;
  const float t = fmaf(x, 0x1.715476p+0f, shifter); /* 1/ln2 */
  const float n = t - shifter;
  float r = fmaf(n, -0x1.62e4p-1f, x); /* ln2, high part (exact product) */
  r = fmaf(n, -0x1.7f7d1cp-20f, r);    /* ln2, low part */
  float p = 0x1.a01a02p-13f;           /* 1/7! */
  p = fmaf(p, r, 0x1.6c16c2p-10f);     /* 1/6! */
  p = fmaf(p, r, 0x1.111112p-7f);      /* 1/5! */
  p = fmaf(p, r, 0x1.555556p-5f);      /* 1/4! */
  p = fmaf(p, r, 0x1.555556p-3f);      /* 1/3! */
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  int32_t bits;
  memcpy(&bits, &t, sizeof bits);
  /* n + 127 in the exponent field: 2^n, n >= -126. Unsigned: for a NaN x the value is negative, and
   * a left shift of a negative int is undefined in C (the result is unused then: p is NaN). */
  bits = (int32_t)((uint32_t)(bits - 0x4B400000 + 127) << 23);
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

/* Vectors of 16, 8 and 4 floats (GCC's vector extensions: one register each on AVX-512, and split
 * by the compiler on narrower clones). The reductions below are written on them rather than on
 * arrays: a loop that stored a float[16] as one vector and read halves of it back stalled on store
 * forwarding, and a scalar tail ran as one long dependency chain; the two reductions took as long
 * as the chunk's scores in a 512-token prefill. The same operations in the same order, so the same
 * bits. */
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v4i __attribute__((vector_size(16)));

/* mask ? a : b lane by lane (a comparison's lanes are all ones or all zeros); C has no vector ?:. */
#define SELECT(vf, vi, mask, a, b) ((vf)(((mask) & (vi)(a)) | (~(mask) & (vi)(b))))

/* dst = the 16 floats at p (unaligned); the low and the high half of vector v (the compiler keeps
 * both in registers). Macros: a function returning a vector warns of the ABI on the clones without
 * AVX-512, even inlined. */
#define LOAD16(dst, p) memcpy(&(dst), (p), sizeof(v16f))
#define LOW_HALF(dst, v) memcpy(&(dst), &(v), sizeof(dst))
#define HIGH_HALF(dst, v) memcpy(&(dst), (const char *)&(v) + sizeof(dst), sizeof(dst))

/* p[j] = exp(p[j] - m) for the nvis visible keys, 0 for the rest; returns their sum, added in one
 * fixed tree: t[i] = (p[i] + p[i+16]) + (p[i+32] + p[i+48]), then t[i] + t[i+8], then t[i] + t[i+4],
 * then (t[0] + t[2]) + (t[1] + t[3]). */
INLINE float exp_sum_chunk(float *p, int64_t nvis, float m) {
  for (int j = 0; j < CHUNK; j++) p[j] = j < nvis ? exp_nonpos(p[j] - m) : 0.0f;
  v16f q0, q1, q2, q3;
  LOAD16(q0, p);
  LOAD16(q1, p + 16);
  LOAD16(q2, p + 32);
  LOAD16(q3, p + 48);
  const v16f t = (q0 + q1) + (q2 + q3);
  v8f lo8, hi8;
  LOW_HALF(lo8, t);
  HIGH_HALF(hi8, t);
  const v8f t8 = lo8 + hi8;
  v4f lo4, hi4;
  LOW_HALF(lo4, t8);
  HIGH_HALF(hi4, t8);
  const v4f t4 = lo4 + hi4;
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

/* The largest of p[0 .. nvis-1] (nvis >= 1; p has CHUNK floats, all of them loaded), the keys past
 * nvis taken as -inf. max is exact, so the order of the comparisons does not matter (a NaN never
 * wins a `>`; of +0 and -0 either may come out, and every use of the maximum, exp(s - max) and
 * exp(m - max), gives the same bits for both). */
INLINE float max_visible(const float *p, int64_t nvis) {
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const v16f ninf = (v16f){0} - INFINITY;
  v16f best = ninf;
  for (int quarter = 0; quarter < 4; quarter++) {
    v16f v;
    LOAD16(v, p + quarter * 16);
    const v16f w = SELECT(v16f, v16i, lane + quarter * 16 < (int32_t)nvis, v, ninf);
    best = SELECT(v16f, v16i, w > best, w, best);
  }
  v8f lo8, hi8;
  LOW_HALF(lo8, best);
  HIGH_HALF(hi8, best);
  const v8f b8 = SELECT(v8f, v8i, hi8 > lo8, hi8, lo8);
  v4f lo4, hi4;
  LOW_HALF(lo4, b8);
  HIGH_HALF(hi4, b8);
  const v4f b4 = SELECT(v4f, v4i, hi4 > lo4, hi4, lo4);
  const float a = b4[1] > b4[0] ? b4[1] : b4[0], b = b4[3] > b4[2] ? b4[3] : b4[2];
  return b > a ? b : a;
}

/* The cache lines of the next chunk (its keys' and values' runs, block by block), issued a few at a
 * time from the inner loops of this chunk's scores and products (`quota` per iteration, sized so
 * that all are out by about half the chunk). Why not all at once: a burst of the chunk's 256-512
 * prefetches stalled on the core's miss buffers, so memory and arithmetic took turns instead of
 * overlapping. On a Zen 5, a batch-64 decode step's attention (64 x 192 tokens, 30 layers): fp32
 * 13.0 ms against 19.0-19.1 as one burst, bf16 8.6-9.4 against 11.0-11.1; spread evenly over the
 * whole chunk 13.2-17.9 / 9.4, four times as fast 13.9-14.0 / 9.2-9.3. */
#define PF_RUNS (2 * CHUNK) /* a key run and a value run per block: at most CHUNK blocks (size 1) */
struct pf_stream {
  const char *run[PF_RUNS];
  int32_t lines[PF_RUNS];
  int n, r, line, quota, nta;
};

/* Issues the stream's next `count` lines (fewer when it runs out). */
INLINE void pf_issue(struct pf_stream *ps, int count) {
  while (count > 0 && ps->r < ps->n) {
    const char *p = ps->run[ps->r] + 64 * (int64_t)ps->line;
    if (ps->nta)
      __builtin_prefetch(p, 0, 0);
    else
      __builtin_prefetch(p, 0, 2);
    count--;
    if (++ps->line == ps->lines[ps->r]) {
      ps->r++;
      ps->line = 0;
    }
  }
}

/* Scores of rows 0 .. mr-1 (q: [mr][D]) against keys j0 .. j0+NR-1 of the transposed chunk. */
INLINE void score_tile(int mr, int64_t D, const float *q, const float *kt, float *s, struct pf_stream *ps) {
  float acc[MR][NR];
  for (int r = 0; r < mr; r++)
    for (int j = 0; j < NR; j++) acc[r][j] = 0.0f;
  for (int64_t d = 0; d < D; d++) {
    pf_issue(ps, ps->quota);
    const float *kd = kt + d * CHUNK;
    for (int r = 0; r < mr; r++) {
      const float x = q[r * D + d];
      for (int j = 0; j < NR; j++) acc[r][j] = fmaf(x, kd[j], acc[r][j]);
    }
  }
  for (int r = 0; r < mr; r++)
    for (int j = 0; j < NR; j++) s[r * CHUNK + j] = acc[r][j];
}

#define BY_ROWS(mr, call)                     \
  switch (mr) {                               \
    case 4: { const int mr_ = 4; call; } break; \
    case 3: { const int mr_ = 3; call; } break; \
    case 2: { const int mr_ = 2; call; } break; \
    default: { const int mr_ = 1; call; } break; \
  }

INLINE float f32_as_is(float x) { return x; }

/* The probabilities times the values of one chunk, for element type T of the value cache (WIDEN:
 * T -> float, exact): rows r0 .. rows-1 of sc (the chunk's probabilities) into acc, each row's
 * visible keys in ascending order. vrow[k]: key k's value row, T elements. A bf16 row is widened
 * as it is read: no widened copy of the chunk is written and read back. */
#define DEFINE_PV(SUFFIX, T, WIDEN)                                                                    \
  /* acc[r][d0 .. d0+NR-1] += p[r][k] * v_k[...] for keys k = 0 .. nk-1 in order, rows 0 .. mr-1. */ \
  INLINE void pv_tile##SUFFIX(int mr, int64_t nk, int64_t D, const float *p, const void *const *vrow,  \
                              int64_t d0, float *acc, struct pf_stream *ps) {                         \
    float t[MR][NR];                                                                                  \
    for (int r = 0; r < mr; r++)                                                                      \
      for (int j = 0; j < NR; j++) t[r][j] = acc[r * D + d0 + j];                                     \
    for (int64_t k = 0; k < nk; k++) {                                                                \
      pf_issue(ps, ps->quota);                                                                        \
      const T *v = (const T *)vrow[k] + d0;                                                           \
      for (int r = 0; r < mr; r++) {                                                                  \
        const float x = p[r * CHUNK + k];                                                             \
        for (int j = 0; j < NR; j++) t[r][j] = fmaf(x, WIDEN(v[j]), t[r][j]);                         \
      }                                                                                               \
    }                                                                                                 \
    for (int r = 0; r < mr; r++)                                                                      \
      for (int j = 0; j < NR; j++) acc[r * D + d0 + j] = t[r][j];                                     \
  }                                                                                                   \
                                                                                                      \
  INLINE void pv_rows##SUFFIX(const float *sc, const void *const *vrow, float *acc, int64_t r0,       \
                              int64_t rows, int64_t first_pos, int64_t key0, int64_t G, int64_t D,    \
                              struct pf_stream *ps) {                                                 \
    for (int64_t r = r0; r < rows; r += MR) {                                                         \
      const int mr = rows - r < MR ? (int)(rows - r) : MR;                                            \
      /* Keys every row of the tile sees (rows are in token order, so the first sees fewest). */     \
      const int64_t seen = first_pos + r / G + 1 - key0;                                              \
      const int64_t common = seen < CHUNK ? seen : CHUNK;                                             \
      int64_t d0 = 0;                                                                                 \
      for (; d0 + NR <= D; d0 += NR)                                                                  \
        BY_ROWS(mr, pv_tile##SUFFIX(mr_, common, D, sc + r * CHUNK, vrow, d0, acc + r * D, ps));      \
      for (int64_t i = 0; i < mr; i++) /* head-dim columns past the last whole tile */                \
        for (int64_t k = 0; k < common; k++) {                                                        \
          const float x = sc[(r + i) * CHUNK + k];                                                    \
          const T *v = (const T *)vrow[k];                                                            \
          for (int64_t d = d0; d < D; d++) acc[(r + i) * D + d] = fmaf(x, WIDEN(v[d]), acc[(r + i) * D + d]); \
        }                                                                                             \
      for (int64_t i = 0; i < mr; i++) { /* keys only the later rows of the tile see, in order */     \
        const int64_t seen_i = first_pos + (r + i) / G + 1 - key0;                                    \
        const int64_t nvis = seen_i < CHUNK ? seen_i : CHUNK;                                         \
        for (int64_t k = common; k < nvis; k++) {                                                     \
          const float x = sc[(r + i) * CHUNK + k];                                                    \
          const T *v = (const T *)vrow[k];                                                            \
          for (int64_t d = 0; d < D; d++) acc[(r + i) * D + d] = fmaf(x, WIDEN(v[d]), acc[(r + i) * D + d]); \
        }                                                                                             \
      }                                                                                               \
    }                                                                                                 \
  }

DEFINE_PV(_f32, float, f32_as_is)
DEFINE_PV(_bf16, uint16_t, bf16_to_f32)

/* Plans the prefetch of keys key0 .. key0+nk-1 of sequence s, KV head h, ahead of their use (into
 * ps; returns its number of cache lines): a chunk's runs are 4 KB apart or more, so the hardware
 * prefetcher would start each one cold, and a decode step's attention would wait on memory rather
 * than compute. */
INLINE int64_t prefetch_plan(const struct pa_args *a, int64_t s, int64_t h, int64_t key0, int64_t nk,
                             struct pf_stream *ps) {
  const int64_t D = a->head_dim, KVH = a->num_kv_heads, bs = a->block_size, size = a->bf16 ? 2 : 4;
  const int32_t *table = a->block_table + s * a->table_width;
  int64_t total = 0;
  ps->n = ps->r = ps->line = 0;
  for (int64_t j = 0; j < nk;) {
    const int64_t pos = key0 + j, blk = table[pos / bs], o = pos % bs;
    const int64_t len = bs - o < nk - j ? bs - o : nk - j;
    ps->run[ps->n] = (const char *)a->key_cache + (blk * KVH + h) * D * bs * size;
    ps->lines[ps->n] = (int32_t)((D * bs * size + 63) / 64);
    total += ps->lines[ps->n++];
    ps->run[ps->n] = (const char *)a->value_cache + ((blk * KVH + h) * bs + o) * D * size;
    ps->lines[ps->n] = (int32_t)((len * D * size + 63) / 64);
    total += ps->lines[ps->n++];
    j += len;
  }
  return total;
}

/* One work item: rows r = (token t0 + r / G, query head kv_head * G + r % G). `next`: the item
 * this thread runs after it (or NULL), whose first chunk is prefetched during the last one; `nta`:
 * a constant in each caller (prefetch_nta). */
INLINE void attend_item(const struct pa_args *a, const struct item *it, const struct item *next,
                        struct workspace *w, const int nta) {
  struct pf_stream pfs;
  pfs.nta = nta;
  const int64_t D = a->head_dim, KVH = a->num_kv_heads, H = a->num_heads, G = H / KVH, bs = a->block_size;
  const int64_t s = it->seq, h = it->kv_head;
  const int64_t q_start = a->query_start_loc[s], q_len = a->query_start_loc[s + 1] - q_start;
  const int64_t first_pos = a->seq_lens[s] - q_len + it->t0; /* position of the item's first token */
  const int64_t rows = (it->t1 - it->t0) * G, last_pos = first_pos + it->t1 - it->t0 - 1;
  const int32_t *table = a->block_table + s * a->table_width;
  const float scale = (float)a->scale;
  float *kt = w->kt, *q = w->q, *sc = w->s, *acc = w->acc, *m = w->m, *l = w->l, *alpha = w->alpha;
  const void **vrow = w->vrow;

  const int64_t bf16 = a->bf16;
  for (int64_t r = 0; r < rows; r++) {
    const int64_t src = (q_start + it->t0 + r / G) * a->q_token + (h * G + r % G) * a->q_head;
    if (bf16)
      for (int64_t d = 0; d < D; d++) q[r * D + d] = bf16_to_f32(((const uint16_t *)a->query)[src + d]) * scale;
    else
      for (int64_t d = 0; d < D; d++) q[r * D + d] = ((const float *)a->query)[src + d] * scale;
  }
  const int64_t num_chunks = last_pos / CHUNK + 1;
  for (int64_t c = 0; c < num_chunks; c++) {
    const int64_t key0 = c * CHUNK;
    const int64_t nk = last_pos + 1 - key0 < CHUNK ? last_pos + 1 - key0 : CHUNK; /* keys any row sees */
    const int64_t nk_tiles = nk > NR ? 2 : 1;
    /* The next chunk (or the next item's first chunk) is on its way while this one is computed. */
    int64_t pf_seq = s, pf_head = h, pf_key0 = key0 + CHUNK, pf_nk = 0;
    if (c + 1 < num_chunks) {
      pf_nk = last_pos + 1 - pf_key0;
    } else if (next) {
      pf_seq = next->seq, pf_head = next->kv_head, pf_key0 = 0;
      pf_nk = a->seq_lens[pf_seq] - (a->query_start_loc[pf_seq + 1] - a->query_start_loc[pf_seq]) + next->t1;
    }
    pf_nk = pf_nk < CHUNK ? pf_nk : CHUNK;
    /* Rows whose token sees this chunk: from the first token at or after key0. */
    const int64_t r0 = key0 > first_pos ? (key0 - first_pos) * G : 0;
    int64_t lines = 0;
    pfs.n = pfs.r = pfs.line = 0;
    if (pf_nk > 0) lines = prefetch_plan(a, pf_seq, pf_head, pf_key0, pf_nk, &pfs);
    /* Inner iterations that issue: each row tile's score d-steps and product key-steps. */
    const int64_t iters = (rows - r0 + MR - 1) / MR * (nk_tiles * D + D / NR * nk);
    pfs.quota = iters > 0 ? (int)((2 * lines + iters - 1) / iters) : 1;
    if (pfs.quota < 1) pfs.quota = 1;
    /* Gather the chunk block by block: each block's run of keys is copied into kt at one d per
     * row of the tile (widened from bf16), and its value rows pointed at. */
    for (int64_t j = 0; j < nk;) {
      const int64_t pos = key0 + j, blk = table[pos / bs], o = pos % bs;
      const int64_t len = bs - o < nk - j ? bs - o : nk - j;
      const int64_t kbase = (blk * KVH + h) * D * bs + o, vbase = ((blk * KVH + h) * bs + o) * D;
      /* A run of 16 keys (a whole block of the default size) is one vector per d: spelled out
       * so that the compiler emits exactly that rather than a loop of unknown length. */
      if (bf16) {
        const uint16_t *k16 = (const uint16_t *)a->key_cache + kbase, *v16 = (const uint16_t *)a->value_cache + vbase;
        if (len == 16)
          for (int64_t d = 0; d < D; d++)
            for (int i = 0; i < 16; i++) kt[d * CHUNK + j + i] = bf16_to_f32(k16[d * bs + i]);
        else
          for (int64_t d = 0; d < D; d++)
            for (int64_t i = 0; i < len; i++) kt[d * CHUNK + j + i] = bf16_to_f32(k16[d * bs + i]);
        for (int64_t i = 0; i < len; i++) vrow[j + i] = v16 + i * D;
      } else {
        const float *k32 = (const float *)a->key_cache + kbase, *v32 = (const float *)a->value_cache + vbase;
        if (len == 16)
          for (int64_t d = 0; d < D; d++)
            for (int i = 0; i < 16; i++) kt[d * CHUNK + j + i] = k32[d * bs + i];
        else
          for (int64_t d = 0; d < D; d++)
            for (int64_t i = 0; i < len; i++) kt[d * CHUNK + j + i] = k32[d * bs + i];
        for (int64_t i = 0; i < len; i++) vrow[j + i] = v32 + i * D;
      }
      j += len;
    }
    for (int64_t j = nk; j < nk_tiles * NR; j++) /* scores computed but never used: keep them finite */
      for (int64_t d = 0; d < D; d++) kt[d * CHUNK + j] = 0.0f;

    for (int64_t r = r0; r < rows; r += MR) {
      const int mr = rows - r < MR ? (int)(rows - r) : MR;
      for (int64_t jt = 0; jt < nk_tiles; jt++)
        BY_ROWS(mr, score_tile(mr_, D, q + r * D, kt + jt * NR, sc + r * CHUNK + jt * NR, &pfs));
    }
    for (int64_t r = r0; r < rows; r++) {
      float *p = sc + r * CHUNK;
      const int64_t seen = first_pos + r / G + 1 - key0;
      const int64_t nvis = seen < CHUNK ? seen : CHUNK;
      const float mx = max_visible(p, nvis);
      const float m_new = c == 0 || mx > m[r] ? mx : m[r];
      const float sum = exp_sum_chunk(p, nvis, m_new);
      if (c == 0) {
        l[r] = sum;
        for (int64_t d = 0; d < D; d++) acc[r * D + d] = 0.0f;
      } else {
        alpha[r] = exp_nonpos(m[r] - m_new);
        l[r] = l[r] * alpha[r] + sum;
        for (int64_t d = 0; d < D; d++) acc[r * D + d] = acc[r * D + d] * alpha[r];
      }
      m[r] = m_new;
    }
    if (bf16)
      pv_rows_bf16(sc, vrow, acc, r0, rows, first_pos, key0, G, D, &pfs);
    else
      pv_rows_f32(sc, vrow, acc, r0, rows, first_pos, key0, G, D, &pfs);
    pf_issue(&pfs, 1 << 30); /* whatever the tiles left */
  }
  for (int64_t r = 0; r < rows; r++) {
    const int64_t dst = ((q_start + it->t0 + r / G) * H + h * G + r % G) * D;
    if (bf16)
      for (int64_t d = 0; d < D; d++) ((uint16_t *)a->out)[dst + d] = f32_to_bf16(acc[r * D + d] / l[r]);
    else
      for (int64_t d = 0; d < D; d++) ((float *)a->out)[dst + d] = acc[r * D + d] / l[r];
  }
}

/* One instance per prefetch kind: a run-time choice inside the loops cost about 3%. */
CLONES
static void run_items_t1(const struct pa_args *a, const struct item *items, int64_t begin, int64_t end,
                         struct workspace *w) {
  for (int64_t i = begin; i < end; i++) attend_item(a, &items[i], i + 1 < end ? &items[i + 1] : NULL, w, 0);
}

CLONES
static void run_items_nta(const struct pa_args *a, const struct item *items, int64_t begin, int64_t end,
                          struct workspace *w) {
  for (int64_t i = begin; i < end; i++) attend_item(a, &items[i], i + 1 < end ? &items[i + 1] : NULL, w, 1);
}

/* Checks everything the call will read or write through an index; PA_OK or the first problem. */
static int64_t check(struct pa_args *a) {
  const int64_t capacity_blocks = a->table_width;
  const int32_t *qsl = a->query_start_loc;
  if (qsl[0] != 0) {
    a->error_index = 0;
    return PA_BAD_QUERY_START_LOC;
  }
  for (int64_t s = 0; s < a->num_seqs; s++) {
    const int64_t q_len = (int64_t)qsl[s + 1] - qsl[s], len = a->seq_lens[s];
    a->error_index = s;
    if (q_len < 0 || qsl[s + 1] > a->num_tokens) return PA_BAD_QUERY_START_LOC;
    if (len < q_len || len > capacity_blocks * a->block_size) return PA_BAD_SEQ_LEN;
    if (q_len == 0) continue; /* nothing read */
    const int32_t *row = a->block_table + s * a->table_width;
    for (int64_t b = 0; b < (len + a->block_size - 1) / a->block_size; b++)
      if (row[b] < 0 || row[b] >= a->num_blocks) return PA_BAD_BLOCK_ID;
  }
  const int64_t slots = a->num_blocks * a->block_size;
  for (int64_t t = 0; t < a->num_tokens; t++)
    if (a->slot_mapping[t] >= slots) {
      a->error_index = t;
      return PA_BAD_SLOT;
    }
  return PA_OK;
}

/* Stores each new token's K/V at its slot: keys transposed into column `offset` of the block's
 * [head_dim][block_size] tile per KV head, values as rows of the block's [block_size][head_dim] run. */
static void write_cache(const struct pa_args *a) {
  const int64_t D = a->head_dim, KVH = a->num_kv_heads, bs = a->block_size, bf16 = a->bf16;
  for (int64_t t = 0; t < a->num_tokens; t++) {
    const int64_t slot = a->slot_mapping[t];
    if (slot < 0) continue; /* padding */
    const int64_t blk = slot / bs, o = slot % bs;
    for (int64_t h = 0; h < KVH; h++) {
      const int64_t ksrc = t * a->k_token + h * a->k_head, vsrc = t * a->v_token + h * a->v_head;
      const int64_t kdst = (blk * KVH + h) * D * bs + o, vdst = ((blk * KVH + h) * bs + o) * D;
      if (bf16) {
        const uint16_t *k = (const uint16_t *)a->key + ksrc;
        uint16_t *kc = (uint16_t *)a->key_cache + kdst;
        for (int64_t d = 0; d < D; d++) kc[d * bs] = k[d];
        memcpy((uint16_t *)a->value_cache + vdst, (const uint16_t *)a->value + vsrc, D * sizeof(uint16_t));
      } else {
        const float *k = (const float *)a->key + ksrc;
        float *kc = (float *)a->key_cache + kdst;
        for (int64_t d = 0; d < D; d++) kc[d * bs] = k[d];
        memcpy((float *)a->value_cache + vdst, (const float *)a->value + vsrc, D * sizeof(float));
      }
    }
  }
}

/* The entry point: see the top of the file. Returns PA_OK or a PA_* error (nothing written then). */
int64_t paged_attention_cpu(struct pa_args *a) {
  int nta = __atomic_load_n(&prefetch_nta, __ATOMIC_RELAXED);
  if (nta < 0) { /* every thread that races here stores the same value */
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    nta = __builtin_cpu_is("amd") ? 1 : 0;
#else
    nta = 0;
#endif
    __atomic_store_n(&prefetch_nta, nta, __ATOMIC_RELAXED);
  }
  int64_t err = check(a);
  if (err != PA_OK) return err;
  write_cache(a);
  const int64_t D = a->head_dim, G = a->num_heads / a->num_kv_heads;
  const int64_t tokens_per_item = ITEM_ROWS / G > 0 ? ITEM_ROWS / G : 1;
  const int64_t covered = a->query_start_loc[a->num_seqs];
  const int64_t size = a->bf16 ? 2 : 4; /* bf16 +0.0 is all zero bits too */
  memset((char *)a->out + covered * a->num_heads * D * size, 0, (a->num_tokens - covered) * a->num_heads * D * size);

  int64_t num_items = 0;
  for (int64_t s = 0; s < a->num_seqs; s++) {
    const int64_t q_len = a->query_start_loc[s + 1] - a->query_start_loc[s];
    num_items += (q_len + tokens_per_item - 1) / tokens_per_item * a->num_kv_heads;
  }
  if (num_items == 0) return PA_OK;
  struct item *items = malloc(num_items * sizeof *items);
  if (!items) return PA_NO_MEMORY;
  int64_t n = 0, total = 0;
  for (int64_t s = 0; s < a->num_seqs; s++) {
    const int64_t q_start = a->query_start_loc[s], q_len = a->query_start_loc[s + 1] - q_start;
    for (int64_t h = 0; h < a->num_kv_heads; h++)
      for (int64_t t0 = 0; t0 < q_len; t0 += tokens_per_item) {
        const int64_t t1 = t0 + tokens_per_item < q_len ? t0 + tokens_per_item : q_len;
        const int64_t cost = (t1 - t0) * G * (a->seq_lens[s] - q_len + t1);
        items[n++] = (struct item){s, h, t0, t1, cost};
        total += cost;
      }
  }

  int64_t threads = total / MIN_COST_PER_THREAD;
  if (threads > a->threads) threads = a->threads;
  if (threads > num_items) threads = num_items;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads < 1) threads = 1;
  /* Contiguous ranges of about total / threads each. */
  int64_t bounds[MAX_THREADS + 1];
  bounds[0] = 0;
  for (int64_t i = 1, acc = 0, part = 1; i <= num_items && part < threads; i++) {
    acc += items[i - 1].cost;
    while (part < threads && acc * threads >= total * part) bounds[part++] = i;
  }
  bounds[threads] = num_items;

  const int64_t rows = tokens_per_item * G;
  const size_t floats = D * CHUNK + 2 * rows * D + rows * CHUNK + 3 * rows;
  const size_t per_thread = (CHUNK * sizeof(float *) + floats * sizeof(float) + 63) / 64 * 64;
  char *mem = aligned_alloc(64, per_thread * threads);
  if (!mem) {
    free(items);
    return PA_NO_MEMORY;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t tid = 0, team = 1;
#endif
    /* If the runtime gave fewer threads than asked, a thread runs several ranges. */
    for (int64_t part = tid; part < threads; part += team) {
      struct workspace w;
      w.vrow = (const void **)(mem + part * per_thread);
      w.kt = (float *)(w.vrow + CHUNK);
      w.q = w.kt + D * CHUNK;
      w.acc = w.q + rows * D;
      w.s = w.acc + rows * D;
      w.m = w.s + rows * CHUNK;
      w.l = w.m + rows;
      w.alpha = w.l + rows;
      (nta ? run_items_nta : run_items_t1)(a, items, bounds[part], bounds[part + 1], &w);
    }
  }
  free(mem);
  free(items);
  return PA_OK;
}
