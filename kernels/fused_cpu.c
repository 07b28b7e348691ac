/* The decode step's small elementwise and per-row operators, fused: one call each instead of 2-8
 * torch operators. Built and loaded by kernels/fused_cpu.py (see there for the arguments).
 *
 *   add_rms_norm   s = x + residual (optional); residual = s; out = w * (s * rsqrt(mean(s^2) + eps))
 *   rope_rotate    per head vector h of size D: h = h * cos + roll(h, D/2) * signed_sin, in place
 *   silu_and_mul   out = silu(gate) * up, gate and up the two halves of one row
 *
 * Each comes twice, for fp32 (add_rms_norm, ...) and for bf16 (add_rms_norm_bf16, ...), from one
 * body: a kernel loads its elements as floats (LOAD), computes in fp32, and rounds with ROUND
 * wherever torch's bf16 operators round a result to bf16 (the identity in fp32), so the bf16
 * kernels round at the same points as the torch formulas they replace (see fused_cpu.py).
 *
 * Every result depends only on its own row (or element): each row's sum of squares is added in
 * one fixed order (16 lanes, then the lanes left to right), written out in C so that no compiler
 * may reorder it, and compiled with -ffp-contract=off so no product is fused into an addition.
 * The bits of a row therefore do not depend on how many rows share the call, nor on the SIMD
 * width of the clone that runs.
 *
 * Threads: a call with at least PARALLEL_MIN elements (a prefill, a large batch) splits its rows
 * between `threads` OpenMP threads (torch's libgomp team, as in paged_attention_cpu.c); a row is
 * computed whole by one thread, so the split changes no bits. Smaller calls (a decode of a few
 * rows) stay on the calling thread, where a parallel region would cost more than it saves.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FUSED_CPU_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* exp(x) for SiLU, written so that the compiler can vectorise it (libm's expf is a call per
 * element): x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two so n * ln2_hi
 * is exact), exp(r) by the degree-7 polynomial of Cephes' expf (S. L. Moshier, Cephes Math Library),
 * and 2^n put into the exponent bits. Relative error about 2e-7 (1-2 ulp). x is clamped to
 * [lo, hi] = EXP_BOUNDS, where 2^n stays a normal float. The bounds are read from a volatile: with
 * constants, GCC evaluated the clamped branch of silu_and_mul separately for every lane
 * (g / (1 + exp(80)), a second division per vector, then a select); reading them at run time
 * leaves one division (the same bits, SiLU * up 0.83-0.89x the time for 64-512 bf16 rows).
 * The upper bound is 80, not 88: near 88 that second quotient was subnormal for ordinary g, which
 * cost a microcode assist per vector, and it stays 80 so the bits stay. For silu it changes nothing
 * that matters: at g = -80, g * exp(g) is already below 1e-33. */
static volatile const float EXP_BOUNDS[2] = {-87.3f, 80.0f};

static inline float exp_vectorisable(float x, float lo, float hi) {
  x = x > lo ? x : lo;
  x = x < hi ? x : hi;
  const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer (nearest even) */
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

#define LANES 16
/* Fewest elements (rows x row width) worth a parallel region. */
#define PARALLEL_MIN 32768

/* bf16 is the upper half of an fp32: widening is a shift; narrowing rounds to nearest even as
 * torch's c10::BFloat16 does (a NaN becomes the quiet NaN 0x7FC0). Written branch-free so that the
 * loops vectorise. */
static inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof bits);
  const uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return f != f ? (uint16_t)0x7FC0 : rounded;
}

/* The value a bf16 operator would produce for the fp32 result f, as a float. */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* fp32's load, store and rounding: nothing to do. */
static inline float f32_as_is(float f) { return f; }

/* Defines the three kernels for element type T with suffix SUFFIX: LOAD(T) -> float,
 * STORE(float) -> T, ROUND(float) -> float (the value STORE then LOAD would give). */
#define FUSED_KERNELS(SUFFIX, T, LOAD, STORE, ROUND)                                                  \
                                                                                                      \
  /* Sum of squares of v[0..n-1]: lane j adds v[j], v[j + 16], ... in turn; the lanes are then       \
   * added left to right. */                                                                        \
  static inline float sum_of_squares##SUFFIX(const T *v, int64_t n) {                                 \
    float acc[LANES] = {0};                                                                           \
    int64_t i = 0;                                                                                    \
    for (; i + LANES <= n; i += LANES)                                                                \
      for (int j = 0; j < LANES; j++) {                                                               \
        const float e = LOAD(v[i + j]);                                                               \
        acc[j] += e * e;                                                                              \
      }                                                                                               \
    for (int j = 0; i + j < n; j++) {                                                                 \
      const float e = LOAD(v[i + j]);                                                                 \
      acc[j] += e * e;                                                                                \
    }                                                                                                 \
    float total = 0.0f;                                                                               \
    for (int j = 0; j < LANES; j++) total += acc[j];                                                  \
    return total;                                                                                     \
  }                                                                                                   \
                                                                                                      \
  /* For each of `rows` rows of `n` elements: with `residual` non-NULL, s = x + residual is stored   \
   * in residual; without, s = x. Then out = w * ROUND(s * (1 / sqrt(sum(s^2) / n + eps))). `out`    \
   * may be `x`. */                                                                                 \
  CLONES void add_rms_norm##SUFFIX(const T *x, int64_t x_stride, T *residual, int64_t r_stride,       \
                                   const T *w, T *out, int64_t out_stride, int64_t rows, int64_t n,   \
                                   float eps, int64_t threads) {                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN)")   \
    for (int64_t t = 0; t < rows; t++) {                                                              \
      const T *xr = x + t * x_stride;                                                                 \
      T *o = out + t * out_stride;                                                                    \
      const T *s = xr;                                                                                \
      if (residual != 0) {                                                                            \
        T *r = residual + t * r_stride;                                                               \
        for (int64_t i = 0; i < n; i++) r[i] = STORE(LOAD(xr[i]) + LOAD(r[i]));                       \
        s = r;                                                                                        \
      }                                                                                               \
      const float scale = 1.0f / sqrtf(sum_of_squares##SUFFIX(s, n) / (float)n + eps);                \
      for (int64_t i = 0; i < n; i++) o[i] = STORE(LOAD(w[i]) * ROUND(LOAD(s[i]) * scale));           \
    }                                                                                                 \
  }                                                                                                   \
                                                                                                      \
  /* Rotates `heads` head vectors of size d (even) at the start of each of `rows` rows, in place:    \
   * h[i] = h[i] * cos[i] + h[(i + d/2) mod d] * ssin[i], with cos and ssin one row of d per token;  \
   * each product and the sum rounded as torch's three operators round them. */                     \
  CLONES void rope_rotate##SUFFIX(T *x, int64_t x_stride, int64_t rows, int64_t heads, int64_t d,     \
                                  const T *cos_, const T *ssin, int64_t cs_stride, int64_t threads) { \
    const int64_t half = d / 2;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * heads * d >= PARALLEL_MIN)") \
    for (int64_t t = 0; t < rows; t++) {                                                              \
      const T *c = cos_ + t * cs_stride;                                                              \
      const T *s = ssin + t * cs_stride;                                                              \
      for (int64_t h = 0; h < heads; h++) {                                                           \
        T *v = x + t * x_stride + h * d;                                                              \
        for (int64_t i = 0; i < half; i++) {                                                          \
          const float a = LOAD(v[i]), b = LOAD(v[i + half]);                                          \
          v[i] = STORE(ROUND(a * LOAD(c[i])) + ROUND(b * LOAD(s[i])));                                \
          v[i + half] = STORE(ROUND(b * LOAD(c[i + half])) + ROUND(a * LOAD(s[i + half])));           \
        }                                                                                             \
      }                                                                                               \
    }                                                                                                 \
  }                                                                                                   \
                                                                                                      \
  /* out[t][i] = ROUND(silu(g)) * u, g = gu[t][i], u = gu[t][n + i], silu(g) = g / (1 + exp(-g)). */ \
  CLONES void silu_and_mul##SUFFIX(const T *gu, int64_t gu_stride, T *out, int64_t out_stride,        \
                                   int64_t rows, int64_t n, int64_t threads) {                        \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN)")   \
    for (int64_t t = 0; t < rows; t++) {                                                              \
      const T *g = gu + t * gu_stride;                                                                \
      const T *u = g + n;                                                                             \
      T *o = out + t * out_stride;                                                                    \
      const float lo = EXP_BOUNDS[0], hi = EXP_BOUNDS[1];                                             \
      for (int64_t i = 0; i < n; i++) {                                                               \
        const float gi = LOAD(g[i]);                                                                  \
        o[i] = STORE(ROUND(gi / (1.0f + exp_vectorisable(-gi, lo, hi))) * LOAD(u[i]));                \
      }                                                                                               \
    }                                                                                                 \
  }

FUSED_KERNELS(, float, f32_as_is, f32_as_is, f32_as_is)
FUSED_KERNELS(_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)
