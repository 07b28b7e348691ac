/* The decode step's small elementwise and per-row operators, fused: one call each instead of 2-8
 * torch operators. Built and loaded by kernels/fused_cpu.py (see there for the arguments).
 *
 *   add_rms_norm   s = x + residual (optional); residual = s; out = w * (s * rsqrt(mean(s^2) + eps))
 *   rope_rotate    per head vector h of size D: h = h * cos + roll(h, D/2) * signed_sin, in place
 *   silu_and_mul   out = silu(gate) * up, gate and up the two halves of one row
 *
 * Every result depends only on its own row (or element): each row's sum of squares is added in
 * one fixed order (16 lanes, then the lanes left to right), written out in C so that no compiler
 * may reorder it, and compiled with -ffp-contract=off so no product is fused into an addition.
 * The bits of a row therefore do not depend on how many rows share the call, nor on the SIMD
 * width of the clone that runs.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FUSED_CPU_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define LANES 16

/* Sum of squares of v[0..n-1]: lane j adds v[j], v[j + 16], ... in turn; the lanes are then
 * added left to right. */
static inline float sum_of_squares(const float *v, int64_t n) {
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; j++) acc[j] += v[i + j] * v[i + j];
  for (int j = 0; i + j < n; j++) acc[j] += v[i + j] * v[i + j];
  float total = 0.0f;
  for (int j = 0; j < LANES; j++) total += acc[j];
  return total;
}

/* For each of `rows` rows of `n` floats: with `residual` non-NULL, s = x + residual is stored in
 * residual; without, s = x. Then out = w * (s * (1 / sqrt(sum(s^2) / n + eps))). `out` may be `x`. */
CLONES void add_rms_norm(const float *x, int64_t x_stride, float *residual, int64_t r_stride, const float *w,
                         float *out, int64_t out_stride, int64_t rows, int64_t n, float eps) {
  for (int64_t t = 0; t < rows; t++) {
    const float *xr = x + t * x_stride;
    float *o = out + t * out_stride;
    const float *s = xr;
    if (residual != 0) {
      float *r = residual + t * r_stride;
      for (int64_t i = 0; i < n; i++) r[i] = xr[i] + r[i];
      s = r;
    }
    const float scale = 1.0f / sqrtf(sum_of_squares(s, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) o[i] = w[i] * (s[i] * scale);
  }
}

/* Rotates `heads` head vectors of size d (even) at the start of each of `rows` rows, in place:
 * h[i] = h[i] * cos[i] + h[(i + d/2) mod d] * ssin[i], with cos and ssin one row of d per token. */
CLONES void rope_rotate(float *x, int64_t x_stride, int64_t rows, int64_t heads, int64_t d, const float *cos_,
                        const float *ssin, int64_t cs_stride) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < rows; t++) {
    const float *c = cos_ + t * cs_stride;
    const float *s = ssin + t * cs_stride;
    for (int64_t h = 0; h < heads; h++) {
      float *v = x + t * x_stride + h * d;
      for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] + b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

/* exp(x) for SiLU, written so that the compiler can vectorise it (libm's expf is a call per
 * element): x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two so n * ln2_hi
 * is exact), exp(r) by the degree-7 polynomial of Cephes' expf (S. L. Moshier, Cephes Math Library),
 * and 2^n put into the exponent bits. Relative error about 2e-7 (1-2 ulp). x is clamped to
 * [-87.3, 80], where 2^n stays a normal float. The upper bound is 80, not 88: GCC evaluates the
 * clamped branch of silu_and_mul for every lane (g / (1 + exp(80)), then a select), and near 88
 * that quotient is subnormal for ordinary g, which costs a microcode assist per vector (6x slower).
 * For silu it changes nothing that matters: at g = -80, g * exp(g) is already below 1e-33. */
static inline float exp_vectorisable(float x) {
  x = x > -87.3f ? x : -87.3f;
  x = x < 80.0f ? x : 80.0f;
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

/* out[t][i] = silu(g) * u with g = gu[t][i], u = gu[t][n + i], silu(g) = g / (1 + exp(-g)). */
CLONES void silu_and_mul(const float *gu, int64_t gu_stride, float *out, int64_t out_stride, int64_t rows,
                         int64_t n) {
  for (int64_t t = 0; t < rows; t++) {
    const float *g = gu + t * gu_stride;
    const float *u = g + n;
    float *o = out + t * out_stride;
    for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + exp_vectorisable(-g[i])) * u[i];
  }
}
