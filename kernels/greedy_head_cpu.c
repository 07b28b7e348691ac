/* Greedy decoding's next token straight from the final hidden states, for an fp32 LM head: the
 * argmax of the fp32 logits, found without computing most of them (see greedy_head_cpu.py).
 *
 * The answer is exactly argmax_rows(linear_cpu(h, W)): the first index of the largest of the
 * logits x_v = the fmaf chain over ascending k of h[k] * W[v][k] from 0 (linear_cpu.c's order).
 * Where it cannot promise that (see screen_row), a row is left to the caller (token -1), who
 * computes the whole row of logits as before.
 *
 * Per row h (K values) the caller passes approximate logits a_v: the product of h' and W', h and
 * W rounded to bf16 (to nearest even), summed in fp32 in any order and rounded to bf16 once
 * (kernels/linear_bf16_cpu.c). With s_v that sum before its rounding, Dh = h - h', DW_v = W_v - W'_v,
 * and the forward error bounds of Higham, "Accuracy and Stability of Numerical Algorithms" (2nd ed.,
 * 2002), ch. 2-3 (a sum of n terms in any order is off by at most gamma_n = n u / (1 - n u) times
 * the sum of their magnitudes; a rounding to nearest by at most u times the rounded value):
 *
 *   |x_v - h.W_v|    <= g_exact ||h|| ||W_v|| <= g_exact ||h|| (||W'_v|| + ||DW_v||)   (the fmaf chain)
 *   |h.W_v - h'.W'_v| = |h.DW_v + Dh.W'_v| <= ||h|| ||DW_v|| + ||Dh|| ||W'_v||   (exact identity, Cauchy-Schwarz)
 *   |h'.W'_v - s_v|  <= g_approx ||h'|| ||W'_v||
 *   |s_v - a_v|      <= u_bf16 |a_v|
 *
 * so |x_v - a_v| <= b_v = c1 ||DW_v|| + c2 ||W'_v|| + c3 |a_v| + abs_err, with per row
 * c1 = (1 + g_exact) ||h||, c2 = ||Dh|| + g_exact ||h|| + g_approx ||h'||, c3 = u_bf16 (each taken
 * 1% larger, which also covers the norms' own rounding); abs_err covers the denormals the bf16
 * kernel flushes. A bf16 value below 2^-126, which that kernel takes as zero, is taken as zero here
 * too (and the caller flushes W' the same way), so DW and Dh hold what the flushing lost.
 * Every x_v lies in [a_v - b_v, a_v + b_v], the largest logit is at least L = max_v (a_v - b_v), and
 * only a token with a_v + b_v >= L can be the argmax (for every token t, x_v = max >= x_t >= a_t - b_t).
 * The row is scanned twice (L, then the tokens that pass), the few that pass get their exact fp32
 * logit from linear_cpu's pack, and the first largest of those wins: the same token as over all
 * logits, since every token at the maximum passed.
 *
 * The scans compute b_v and a_v -+ b_v in fp32, whose rounding the threshold allows for: each
 * computed value is off by at most 4 * 2^-24 (|a_v| + b_v), and with M = max_v (||W'_v|| + ||DW_v||)
 * (w_norm_max) both |a_v| and b_v are below 1.05 (||h|| + ||Dh||) M; the threshold is lowered by
 * 32 * 2^-24 (||h|| + ||Dh||) M, more than the two scans need, and rounded down, which can only let
 * more tokens through.
 *
 * Rows are split between OpenMP threads; each row is one thread's, so the split changes nothing.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
#define omp_get_thread_num() 0
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(GREEDY_HEAD_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

#define NP 32    /* output columns per panel of linear_cpu's packed weight */
#define LANES 16
#define GROUP 8  /* candidates whose fp32 chains run interleaved */
/* Beyond this ||h|| * max ||W'_v|| an fp32 sum could overflow (or a bf16 product reach inf): the
 * row is left to the caller. */
#define MAGNITUDE_LIMIT 1e30

struct gh_args {
  int64_t m, k, n;        /* h is [m, k], W is [n, k], the approximate logits [m, n] */
  const float *h;         /* fp32, row stride h_row */
  int64_t h_row;
  const uint16_t *approx; /* bf16 bit patterns, row stride approx_row */
  int64_t approx_row;
  const float *w_norm;    /* [n]: ||W'_v||, rounded up */
  const float *dw_norm;   /* [n]: ||W_v - W'_v||, rounded up */
  double w_norm_max;      /* at least max_v (w_norm[v] + dw_norm[v]) */
  const float *w;         /* linear_cpu's packed W: [ceil(n / NP)][k][NP] */
  double g_exact, g_approx, u_bf16, abs_err; /* the bound's constants (see above) */
  int64_t max_exact;      /* more candidates than this in a row: left to the caller */
  int64_t threads;
  int64_t *tokens;        /* out: [m], a token or -1 */
  int64_t *exact;         /* out: [m], the logits computed exactly (0 for a row left over) */
};

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

INLINE vf load_bf16(const uint16_t *x) {
  vh h;
  memcpy(&h, x, sizeof h);
  return (vf)(__builtin_convertvector(h, vi) << 16);
}

INLINE vf load_f32(const float *x) {
  vf v;
  memcpy(&v, x, sizeof v);
  return v;
}

INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* f rounded to bf16 (to nearest, ties to even, as torch rounds), back in fp32; f finite. */
INLINE float round_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  memcpy(&f, &bits, sizeof f);
  return f;
}

INLINE float up(double x) { /* the smallest float >= x */
  float f = (float)x;
  return (double)f < x ? nextafterf(f, INFINITY) : f;
}

INLINE float down(double x) { /* the largest float <= x */
  float f = (float)x;
  return (double)f > x ? nextafterf(f, -INFINITY) : f;
}

/* The fp32 logits of up to GROUP candidate columns v[0 .. count-1] of linear_cpu's pack, each the
 * fmaf chain over ascending k from 0 (linear_cpu.c's order, so the same bits): the chains are
 * independent, so they are interleaved rather than run one after another on fmaf's latency. */
INLINE void exact_logits(const struct gh_args *a, const float *h, const int64_t *v, int count, float *out) {
  const int64_t K = a->k;
  const float *col[GROUP];
  for (int j = 0; j < GROUP; j++) {
    const int64_t c = v[j < count ? j : 0];
    col[j] = a->w + (c / NP) * K * NP + c % NP;
  }
  float acc[GROUP] = {0};
  for (int64_t i = 0; i < K; i++) {
    const float x = h[i];
    for (int j = 0; j < GROUP; j++) acc[j] = fmaf(x, col[j][i * NP], acc[j]);
  }
  for (int j = 0; j < count; j++) out[j] = acc[j];
}

/* b_v without abs_err, 16 tokens at a time. */
#define BOUND(av, v) (c1 * load_f32(a->dw_norm + (v)) + c2 * load_f32(a->w_norm + (v)) + c3 * (vf)((vi)(av) & 0x7fffffff))

/* The row's token, or -1 (left to the caller); *exact: the logits computed exactly. cand: room
 * for max_exact token ids. */
INLINE int64_t screen_row(const struct gh_args *a, const float *h, const uint16_t *x, int64_t *cand, int64_t *exact) {
  const int64_t K = a->k, N = a->n;
  *exact = 0;
  double hh = 0.0, dd = 0.0, pp = 0.0;
  for (int64_t i = 0; i < K; i++) {
    float r = round_bf16(h[i]);
    if (fabsf(r) < 0x1p-126f) r = 0.0f; /* as the bf16 kernel reads it */
    const float d = h[i] - r;            /* exact (Sterbenz), or h[i] itself */
    hh += (double)h[i] * h[i];
    dd += (double)d * d;
    pp += (double)r * r;
  }
  const double hn = sqrt(hh), dn = sqrt(dd), pn = sqrt(pp);
  if (!((hn + dn) * a->w_norm_max <= MAGNITUDE_LIMIT)) return -1; /* also a NaN or inf in h */
  const float c1f = up(1.01 * (1.0 + a->g_exact) * hn);
  const float c2f = up(1.01 * (dn + a->g_exact * hn + a->g_approx * pn));
  const float c3f = up(1.01 * a->u_bf16);
  const vf c1 = (vf){0} + c1f, c2 = (vf){0} + c2f, c3 = (vf){0} + c3f;

  /* Pass 1: L = max (a_v - b_v) (abs_err subtracted below); a NaN leaves the row. */
  vf best = (vf){0} - INFINITY;
  vi nan = (vi){0};
  int64_t v = 0;
  for (; v + LANES <= N; v += LANES) {
    const vf av = load_bf16(x + v);
    const vf t = av - BOUND(av, v);
    nan |= t != t;
    const vi greater = t > best;
    best = (vf)(((vi)t & greater) | ((vi)best & ~greater));
  }
  float lo = -INFINITY;
  int any_nan = 0;
  for (int j = 0; j < LANES; j++) {
    any_nan |= nan[j];
    if (best[j] > lo) lo = best[j];
  }
  for (; v < N; v++) {
    const float av = bf16_to_f32(x[v]);
    const float t = av - (c1f * a->dw_norm[v] + c2f * a->w_norm[v] + c3f * fabsf(av));
    any_nan |= t != t;
    if (t > lo) lo = t;
  }
  if (any_nan || !isfinite(lo)) return -1;
  const double margin = 32.0 * 0x1p-24 * (hn + dn) * a->w_norm_max + 2.0 * a->abs_err;
  const float th = down((double)lo - margin);

  /* Pass 2: the candidates, in ascending order. */
  const vf vth = (vf){0} + th;
  int64_t count = 0;
  for (v = 0; v < N; v += LANES) {
    const int lanes = N - v < LANES ? (int)(N - v) : LANES;
    vi pass = (vi){0};
    if (lanes == LANES) {
      const vf av = load_bf16(x + v);
      pass = av + BOUND(av, v) >= vth;
    } else {
      for (int j = 0; j < lanes; j++) {
        const float av = bf16_to_f32(x[v + j]);
        pass[j] = av + (c1f * a->dw_norm[v + j] + c2f * a->w_norm[v + j] + c3f * fabsf(av)) >= th ? -1 : 0;
      }
    }
    int hit = 0;
    for (int j = 0; j < LANES; j++) hit |= pass[j];
    if (!hit) continue;
    for (int j = 0; j < lanes; j++) {
      if (!pass[j]) continue;
      if (count == a->max_exact) return -1;
      cand[count++] = v + j;
    }
  }
  /* Their fp32 logits; the first largest wins (strictly larger replaces, in ascending order). The
   * token at L passed (a_v + b_v >= a_v - b_v), so count >= 1. */
  int64_t token = -1;
  float top = 0.0f;
  for (int64_t c = 0; c < count; c += GROUP) {
    const int g = count - c < GROUP ? (int)(count - c) : GROUP;
    float e[GROUP];
    exact_logits(a, h, cand + c, g, e);
    for (int j = 0; j < g; j++)
      if (token < 0 || e[j] > top) {
        top = e[j];
        token = cand[c + j];
      }
  }
  *exact = count;
  return token;
}

/* tokens[r] for every row r (see the top of the file); 0, or 1 when memory ran out (nothing done).
 * max_exact >= 1 (the caller checks). */
CLONES int64_t greedy_head_cpu(const struct gh_args *a) {
  const int64_t threads = a->m > 1 ? a->threads : 1, room = a->max_exact > 0 ? a->max_exact : 1;
  int64_t *cand = malloc(sizeof(int64_t) * room * threads);
  if (!cand) return 1;
#pragma omp parallel num_threads(threads)
  {
    int64_t *mine = cand + room * omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a->m; r++)
      a->tokens[r] = screen_row(a, a->h + r * a->h_row, a->approx + r * a->approx_row, mine, &a->exact[r]);
  }
  free(cand);
  return 0;
}
