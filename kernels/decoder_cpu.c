/* Every decoder layer of one CPU forward pass in one call: the same kernel calls, in the same order
 * and on the same arguments, as the Python layer loop of executor/layers.py makes one by one.
 *
 * Built and loaded by kernels/decoder_cpu.py (see there for when it runs and the arguments).
 *
 * A decode step of a small model issues about 270 kernel calls (per layer: two residual-add +
 * RMSNorms, four linear layers, RoPE, attention, SiLU * up), and from Python each costs ~10 us of
 * interpreter, ctypes and tensor bookkeeping beside its work. This driver takes the kernels' entry
 * points (function pointers from their own libraries: no kernel is compiled twice) and runs the
 * layers from C, on buffers the caller allocated for the step. It does no arithmetic of its own, so
 * a forward pass through it has the bits of the Python loop (tests/kernels/test_decoder_cpu.py).
 *
 * Per layer, with E the residual stream (the embedding output at first), D the previous layer's
 * MLP output, N / O normalised rows:
 *   layer 0: N = RMSNorm(E)                    else: E = D + E; N = D = RMSNorm(E)  (in place)
 *   QKV = N W_qkv^T (+ b); RoPE on QKV's query and key heads (in place)
 *   A = attention(QKV's q, k, v), writing k, v into the layer's cache
 *   O = A W_o^T (+ b); E = O + E; O = RMSNorm(E)  (in place)
 *   GU = O W_gate_up^T (+ b); ACT = silu(gate) * up; D = ACT W_down^T (+ b)
 * The final residual add and norm are the caller's.
 */
#include <stdint.h>

/* The argument struct of linear_cpu and linear_bf16 (both kernels lay it out so). */
struct linear_args {
  int64_t m, k, n, x_row, out_row, threads;
  const void *x, *w, *bias;
  void *out;
};

typedef int64_t (*linear_fn)(struct linear_args *);
typedef void (*norm_fn)(const void *x, int64_t x_stride, void *residual, int64_t r_stride, const void *w, void *out,
                        int64_t out_stride, int64_t rows, int64_t n, float eps, int64_t threads);
typedef void (*rope_fn)(void *x, int64_t x_stride, int64_t rows, int64_t heads, int64_t d, const void *cos_,
                        const void *ssin, int64_t cs_stride, int64_t threads);
typedef void (*silu_fn)(const void *gu, int64_t gu_stride, void *out, int64_t out_stride, int64_t rows, int64_t n,
                        int64_t threads);
typedef int64_t (*attention_fn)(void *pa_args);

/* One layer's weights and cache; the linear args' k, n, w and bias are set once, the rest per call. */
struct layer {
  struct linear_args qkv, o, gate_up, down;
  const void *norm1, *norm2; /* [hidden] RMSNorm weights */
  void *key_cache, *value_cache;
};

struct decoder_args {
  int64_t num_layers, tokens, threads;
  int64_t hidden, heads, kv_heads, head_dim, inter; /* qkv width: (heads + 2 kv_heads) * head_dim */
  float eps;
  struct layer *layers;
  linear_fn linear;
  norm_fn norm;
  rope_fn rope;
  silu_fn silu;
  attention_fn attention;
  /* The attention's argument struct, set for this step by the caller but for its caches, which
   * this driver writes at these byte offsets for each layer. */
  void *attention_args;
  int64_t key_cache_offset, value_cache_offset;
  /* Buffers of `tokens` rows (contiguous): E [hidden] holds the embedding output and becomes the
   * residual stream; N, O, D [hidden]; QKV [(heads + 2 kv_heads) * head_dim]; A [heads * head_dim]
   * (where the attention args point its output); GU [2 inter]; ACT [inter]. */
  void *e, *n, *qkv, *a, *o, *gu, *act, *d;
  const void *cos_, *ssin; /* RoPE tables, [tokens][head_dim] rows cs_stride apart */
  int64_t cs_stride;
  int64_t failed_layer;   /* written when a kernel fails */
};

static int64_t run_linear(const struct decoder_args *a, struct linear_args *l, const void *x, void *out) {
  l->m = a->tokens;
  l->x_row = l->k;
  l->out_row = l->n;
  l->threads = a->threads;
  l->x = x;
  l->out = out;
  return a->linear(l);
}

/* Returns 0; or, with failed_layer set: 1000 + the linear kernel's code (out of memory), or the
 * attention's PA_* code (a bad step layout, checked before the first layer writes its cache). */
int64_t decoder_forward(struct decoder_args *a) {
  const int64_t T = a->tokens, H = a->hidden, qkv_width = (a->heads + 2 * a->kv_heads) * a->head_dim;
  for (int64_t i = 0; i < a->num_layers; i++) {
    struct layer *l = &a->layers[i];
    a->failed_layer = i;
    void *normed;
    if (i == 0) {
      a->norm(a->e, H, 0, 0, l->norm1, a->n, H, T, H, a->eps, a->threads);
      normed = a->n;
    } else {
      a->norm(a->d, H, a->e, H, l->norm1, a->d, H, T, H, a->eps, a->threads);
      normed = a->d;
    }
    int64_t err = run_linear(a, &l->qkv, normed, a->qkv);
    if (err) return 1000 + err;
    a->rope(a->qkv, qkv_width, T, a->heads + a->kv_heads, a->head_dim, a->cos_, a->ssin, a->cs_stride, a->threads);
    *(void **)((char *)a->attention_args + a->key_cache_offset) = l->key_cache;
    *(void **)((char *)a->attention_args + a->value_cache_offset) = l->value_cache;
    err = a->attention(a->attention_args);
    if (err) return err;
    if ((err = run_linear(a, &l->o, a->a, a->o))) return 1000 + err;
    a->norm(a->o, H, a->e, H, l->norm2, a->o, H, T, H, a->eps, a->threads);
    if ((err = run_linear(a, &l->gate_up, a->o, a->gu))) return 1000 + err;
    a->silu(a->gu, 2 * a->inter, a->act, a->inter, T, a->inter, a->threads);
    if ((err = run_linear(a, &l->down, a->act, a->d))) return 1000 + err;
  }
  a->failed_layer = -1;
  return 0;
}
