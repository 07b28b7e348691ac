/* Greedy decoding's argmax over each row of the logits, for the CPU (see argmax_cpu.py).
 *
 * The answer is torch.max(x, dim=-1).indices' exactly: the first index of the row's maximum, where
 * equal values (+0 and -0 included) keep the earlier index and a NaN beats every number (the
 * first NaN wins). torch's kernel walks a row one element at a time (about 1.3 ms for 64 rows of
 * 49,152 bf16 logits with 2 threads, 2.5 ms with one); here each of 16 lanes keeps its own running
 * maximum and the index where it was first reached (a compare and two selects per vector, written
 * with GCC's vector extensions), and the lanes are merged at the end of the row (largest value,
 * then smallest index).
 * A row holding a NaN is walked again for its first NaN, which never happens in a healthy model.
 *
 * Rows are split between OpenMP threads when there are enough of them; each row is one thread's,
 * so the split changes no result.
 */
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(ARGMAX_CPU_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define LANES 16
/* Fewest elements (rows x row width) worth a parallel region. */
#define PARALLEL_MIN 65536

/* GCC vector extensions: one AVX-512 register, two AVX2 ones or four SSE ones, as the clone has. */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

static inline vf load_f32(const float *x) {
  vf v;
  __builtin_memcpy(&v, x, sizeof v);
  return v;
}

/* bf16 is the upper half of an fp32: widening is a shift. */
static inline vf load_bf16(const uint16_t *x) {
  vh h;
  __builtin_memcpy(&h, x, sizeof h);
  return (vf)(__builtin_convertvector(h, vi) << 16);
}

static inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float f32_to_f32(float f) { return f; }

/* Each lane j keeps the largest value among elements j, j + 16, ... and the first index where it
 * was reached (a strict comparison: an equal value later keeps the earlier index, a NaN never
 * replaces); the lanes then give the row's largest value and, among equal lanes, the smallest
 * index, which is the row's first maximum. */
#define DEFINE_ARGMAX(SUFFIX, T, LOADV, LOAD1)                                                      \
  static inline __attribute__((always_inline)) int64_t row_argmax##SUFFIX(const T *x, int64_t n) { \
    int64_t i = 0, best = 0;                                                                       \
    float best_v = LOAD1(x[0]);                                                                    \
    int nan_seen = 0;                                                                              \
    if (n >= LANES) {                                                                              \
      vi lane_i, idx;                                                                              \
      for (int j = 0; j < LANES; j++) idx[j] = j;                                                  \
      vf lane_v = LOADV(x);                                                                        \
      vi nan = lane_v != lane_v;                                                                   \
      lane_i = idx;                                                                                \
      for (i = LANES; i + LANES <= n; i += LANES) {                                                \
        const vf v = LOADV(x + i);                                                                 \
        idx += LANES;                                                                              \
        const vi greater = v > lane_v;                                                             \
        lane_v = (vf)(((vi)v & greater) | ((vi)lane_v & ~greater));                                \
        lane_i = (idx & greater) | (lane_i & ~greater);                                            \
        nan |= v != v;                                                                             \
      }                                                                                            \
      best_v = lane_v[0];                                                                          \
      best = lane_i[0];                                                                            \
      for (int j = 0; j < LANES; j++) {                                                            \
        nan_seen |= nan[j];                                                                        \
        if (lane_v[j] > best_v || (lane_v[j] == best_v && lane_i[j] < best)) {                     \
          best_v = lane_v[j];                                                                      \
          best = lane_i[j];                                                                        \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    for (; i < n; i++) { /* the tail, or a whole row shorter than LANES */                         \
      const float v = LOAD1(x[i]);                                                                 \
      nan_seen |= v != v;                                                                          \
      if (v > best_v) {                                                                            \
        best_v = v;                                                                                \
        best = i;                                                                                  \
      }                                                                                            \
    }                                                                                              \
    if (nan_seen || best_v != best_v) {                                                            \
      for (i = 0; i < n; i++) {                                                                    \
        const float v = LOAD1(x[i]);                                                               \
        if (v != v) return i;                                                                      \
      }                                                                                            \
    }                                                                                              \
    return best;                                                                                   \
  }                                                                                                \
                                                                                                   \
  /* out[r] = the first maximum's index in row r of x (rows x n, n < 2^31, row stride `stride`). */ \
  CLONES void argmax_rows##SUFFIX(const T *x, int64_t stride, int64_t rows, int64_t n, int64_t *out, \
                                  int64_t threads) {                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN)") \
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax##SUFFIX(x + r * stride, n);             \
  }

DEFINE_ARGMAX(, float, load_f32, f32_to_f32)
DEFINE_ARGMAX(_bf16, uint16_t, load_bf16, bf16_to_f32)
