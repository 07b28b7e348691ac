"""Our paged forward pass against transformers' reference models, on tiny random-weight models.

Each model is built from a transformers config, given random weights (all of them, norms and
biases included, at a scale where mistakes show), saved with ``save_pretrained`` and loaded with
our ``load_model``. Several sequences of different lengths run together in one flattened batch on
a small paged KV cache whose blocks are handed out in shuffled order; then one decode step, then a
mixed step (some sequences extend by several tokens, others by one). Every logit must match
transformers' ``model(input_ids).logits`` for the same full sequence within 1e-4 (fp32, CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.profiler import profile
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers import AutoModelForCausalLM

from executor.attention import AttentionMetadata, allocate_kv_cache
from executor.layers import RMSNorm
from executor.linear import ONEDNN_BF16_LINEAR, Linear, bf16_own_kernel
from executor.model import LlamaForCausalLM
from executor.model_config import UnsupportedModelError
from executor.rotary import rope_inv_freq
from executor.model_loader import load_model

TOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 24

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _configs() -> dict[str, object]:
    return {
        "llama": LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "llama-tied-bias": LlamaConfig(
            **_COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
        "llama3-rope": LlamaConfig(
            **_COMMON,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "llama-linear-rope": LlamaConfig(
            **_COMMON, tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        ),
        # head_dim 32 != hidden / heads (16): q/o projections are not square.
        "mistral": MistralConfig(**_COMMON, head_dim=32, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**_COMMON, tie_word_embeddings=True),
        "qwen2-mha": Qwen2Config(**{**_COMMON, "num_key_value_heads": 4}, tie_word_embeddings=False),
    }


CONFIG_NAMES = list(_configs())


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every term matters: N(0, 0.15) matrices, 1 + N(0, 0.1) norms, N(0, 0.1) biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def model_pair(request, tmp_path_factory):
    """(our model, transformers' model, config name) with identical random weights."""
    torch.manual_seed(0)
    config = _configs()[request.param]
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    _randomize(hf, seed=CONFIG_NAMES.index(request.param))
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_model(path, progress=False)
    return ours, hf, request.param


def _empty_caches(model: LlamaForCausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # NaN-filled: reading a slot nobody wrote would poison the output.
    return allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                             fill=float("nan"))


class PagedBatch:
    """Hand-built block tables and metadata for a few sequences on shuffled physical blocks."""

    def __init__(self, num_seqs: int, seed: int = 0, num_blocks: int = NUM_BLOCKS) -> None:
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.blocks: list[list[int]] = [[] for _ in range(num_seqs)]
        self.lens = [0] * num_seqs

    def step(self, new_counts: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Append ``new_counts[i]`` tokens to sequence ``i``; return (positions, metadata)."""
        positions, slots = [], []
        for i, n in enumerate(new_counts):
            for pos in range(self.lens[i], self.lens[i] + n):
                if pos // BLOCK_SIZE >= len(self.blocks[i]):
                    self.blocks[i].append(self.free.pop())
                positions.append(pos)
                slots.append(self.blocks[i][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            self.lens[i] += n
        width = max(len(b) for b in self.blocks)
        table = torch.tensor([b + [0] * (width - len(b)) for b in self.blocks], dtype=torch.int32)
        qsl = torch.tensor([0] + new_counts, dtype=torch.int32).cumsum(0).to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_table=table,
            seq_lens=torch.tensor(self.lens, dtype=torch.int32),
            query_start_loc=qsl,
            max_query_len=max(new_counts),
        )
        return torch.tensor(positions, dtype=torch.int64), meta


def _reference_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


def test_prefill_decode_and_extend_match_transformers(model_pair):
    ours, hf, name = model_pair
    g = torch.Generator().manual_seed(1234)
    prompt_lens = [5, 11, 1, 8]
    seqs = [torch.randint(0, ours.vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
    caches = _empty_caches(ours)
    batch = PagedBatch(len(seqs), seed=7)

    def run(new_tokens: list[list[int]]) -> list[torch.Tensor]:
        positions, meta = batch.step([len(t) for t in new_tokens])
        ids = torch.tensor([tok for toks in new_tokens for tok in toks], dtype=torch.int64)
        with torch.no_grad():
            hidden = ours(ids, positions, caches, meta)
            logits = ours.compute_logits(hidden)
        assert hidden.shape == (len(ids), ours.hidden_size)
        assert logits.shape == (len(ids), ours.vocab_size) and logits.dtype == torch.float32
        return list(logits.split([len(t) for t in new_tokens]))

    # Step 1: prefill of all prompts in one flattened batch.
    out = run(seqs)
    for seq, got in zip(seqs, out):
        ref = _reference_logits(hf, seq)
        assert ref.abs().max() > 1.0, "logits too small for the comparison to mean anything"
        assert (got - ref).abs().max().item() < TOL, (name, (got - ref).abs().max().item())

    # Step 2: decode one more (greedy) token per sequence, reading the paged cache.
    nxt = [[int(o[-1].argmax())] for o in out]
    seqs = [s + t for s, t in zip(seqs, nxt)]
    out = run(nxt)
    for seq, got in zip(seqs, out):
        ref = _reference_logits(hf, seq)[-1:]
        assert (got - ref).abs().max().item() < TOL, (name, (got - ref).abs().max().item())

    # Step 3: mixed batch: chunked-prefill-like extensions of several tokens next to decodes.
    new = [torch.randint(0, ours.vocab_size, (n,), generator=g).tolist() for n in (3, 1, 2, 1)]
    seqs = [s + t for s, t in zip(seqs, new)]
    out = run(new)
    for seq, t, got in zip(seqs, new, out):
        ref = _reference_logits(hf, seq)[-len(t):]
        assert (got - ref).abs().max().item() < TOL, (name, (got - ref).abs().max().item())


def test_batch_composition_does_not_change_results(model_pair):
    """A sequence alone and the same sequence inside a batch give identical hidden states."""
    ours, _, _ = model_pair
    g = torch.Generator().manual_seed(99)
    a = torch.randint(0, ours.vocab_size, (9,), generator=g)
    b = torch.randint(0, ours.vocab_size, (6,), generator=g)

    alone = PagedBatch(1, seed=1)
    pos, meta = alone.step([9])
    with torch.no_grad():
        h_alone = ours(a, pos, _empty_caches(ours), meta)
    both = PagedBatch(2, seed=2)
    pos, meta = both.step([6, 9])
    with torch.no_grad():
        h_both = ours(torch.cat([b, a]), pos, _empty_caches(ours), meta)
    torch.testing.assert_close(h_both[6:], h_alone, rtol=0, atol=1e-5)


def test_model_attributes(model_pair):
    ours, hf, name = model_pair
    cfg = hf.config
    assert ours.num_layers == cfg.num_hidden_layers
    assert ours.num_kv_heads == cfg.num_key_value_heads
    assert ours.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert ours.vocab_size == cfg.vocab_size
    assert ours.max_model_len == cfg.max_position_embeddings
    assert ours.config.model_type == cfg.model_type
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight
    else:
        assert ours.lm_head.weight is not ours.embed_tokens.weight


def test_loaded_model_keeps_only_the_packed_linear_weights(model_pair):
    """load_model frees each linear weight it packed (the tied LM head stays: it is the embedding);
    the state dict still has the real weights, and the fallback paths unpack them."""
    ours, hf, _ = model_pair
    from executor.linear import Linear

    linears = {name: m for name, m in ours.named_modules() if isinstance(m, Linear)}
    for name, m in linears.items():
        assert m.weight.is_meta == (m.weight is not ours.embed_tokens.weight), name
    state = ours.state_dict()
    ref = hf.state_dict()
    for name in ("layers.0.self_attn.qkv_proj.weight", "layers.1.mlp.down_proj.weight"):
        assert not state[name].is_meta
    q = ours.layers[0].self_attn.qkv_proj
    rows = ours.num_heads * ours.head_dim
    torch.testing.assert_close(state["layers.0.self_attn.qkv_proj.weight"][:rows],
                               ref["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["layers.1.mlp.down_proj.weight"], ref["model.layers.1.mlp.down_proj.weight"],
                               rtol=0, atol=0)
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        packed = q(x)
    with torch.enable_grad():  # the F.linear path, on the weight unpacked for the call
        torch.testing.assert_close(q(x), packed, rtol=1e-5, atol=1e-5)
    q.restore_plain_weight()
    assert not q.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(q(x), packed, rtol=0, atol=0)
    assert q.drop_plain_weight() and q.weight.is_meta
    # load_state_dict brings the originals back, with the values it is given.
    ours.load_state_dict({**state, "layers.1.mlp.down_proj.weight": 2 * state["layers.1.mlp.down_proj.weight"]})
    down = ours.layers[1].mlp.down_proj
    assert not down.weight.is_meta and not q.weight.is_meta
    torch.testing.assert_close(down.weight, 2 * ref["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0)
    ours.load_state_dict(state)
    ours.pack_weights(keep_plain=False)  # as the loader left it, for the module's other tests


def test_llama3_rope_scaling_changes_frequencies():
    """Guards the llama3 case above against silently testing plain RoPE."""
    cfgs = _configs()
    plain, _ = rope_inv_freq(cfgs["llama"], 16)
    scaled, _ = rope_inv_freq(cfgs["llama3-rope"], 16)
    assert not torch.allclose(plain, scaled)
    assert torch.equal(plain[0], scaled[0])  # the highest frequency is never scaled


def test_sliding_window_caps_max_model_len():
    cfg = MistralConfig(**{**_COMMON, "max_position_embeddings": 256}, sliding_window=64)
    assert LlamaForCausalLM(cfg).max_model_len == 64
    cfg = Qwen2Config(**_COMMON)  # use_sliding_window=False by default
    assert LlamaForCausalLM(cfg).max_model_len == 256


def test_bfloat16_load(tmp_path):
    cfg = LlamaConfig(**_COMMON)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _randomize(hf, seed=5)
    hf.save_pretrained(tmp_path)
    m = load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    batch = PagedBatch(1)
    pos, meta = batch.step([5])
    caches = allocate_kv_cache(m.num_layers, NUM_BLOCKS, BLOCK_SIZE, m.num_kv_heads, m.head_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = m.compute_logits(m(torch.arange(5), pos, caches, meta))
    assert logits.dtype == torch.bfloat16  # widened by the sampler only where it needs to
    logits = logits.float()
    ref = _reference_logits(hf, list(range(5)))
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps ~3 significant digits


@pytest.mark.skipif(not ONEDNN_BF16_LINEAR, reason="no packed oneDNN bf16 path (see tests/executor/test_linear_bf16.py)")
def test_bfloat16_load_packs_linears_for_onednn(tmp_path):
    """On a CPU with bf16 instructions a bf16 model keeps only packed linear weights, runs every
    linear layer of the forward pass as one packed call (these small steps on our kernel where
    it runs, no torch operator; else oneDNN), and stays close to fp32."""
    cfg = LlamaConfig(**_COMMON, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _randomize(hf, seed=6)
    hf.save_pretrained(tmp_path)
    m16 = load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    m32 = load_model(tmp_path, dtype=torch.float32, progress=False)
    linears = [mod for mod in m16.modules() if isinstance(mod, Linear)]
    assert len(linears) == 4 * m16.num_layers + 1
    for mod in linears:
        assert mod.weight.is_meta and mod.weight.dtype == torch.bfloat16
        assert mod._pack is not None
        assert mod._pack.panels.dtype == torch.bfloat16 if bf16_own_kernel() else mod._pack.dtype == torch.bfloat16

    def logits(model, dtype):
        batch = PagedBatch(2, seed=3)
        caches = allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                                   dtype=dtype)
        out = []
        with torch.inference_mode():
            for counts, ids in (([5, 3], [1, 2, 3, 4, 5, 9, 8, 7]), ([1, 1], [6, 10])):
                pos, meta = batch.step(counts)
                out.append(model.compute_logits(model(torch.tensor(ids), pos, caches, meta)))
        return torch.cat(out)

    with profile() as prof:
        got = logits(m16, torch.bfloat16)
    names = [ev.name for ev in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") == (0 if bf16_own_kernel() else 2 * len(linears))  # two steps
    for op in ("mkldnn::_reorder_linear_weight", "aten::linear", "aten::addmm", "aten::mm"):
        assert op not in names, op
    ref = logits(m32, torch.float32)
    assert got.dtype == torch.bfloat16 and ref.dtype == torch.float32 and ref.abs().max() > 1.0
    got = got.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps ~3 significant digits


def test_bfloat16_rmsnorm_is_transformers_bit_for_bit():
    """The bf16 RMSNorm (fp32 statistic in one call, then the scale in bf16) is LlamaRMSNorm's bits."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(11)
    ours, ref = RMSNorm(576, 1e-5), LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.2 * torch.randn(576, generator=g))
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    for rows in (1, 7, 64):
        x = (3 * torch.randn(rows, 576, generator=g)).to(torch.bfloat16)
        with torch.inference_mode():
            got = ours(x)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, ref(x)), rows


def test_load_rejects_wrong_weights(tmp_path):
    cfg = LlamaConfig(**_COMMON)
    hf = AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(tmp_path, progress=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        load_model(tmp_path, progress=False)


def test_our_kernels_package_is_not_mistaken_for_hf_kernels():
    """transformers probes for a distribution named ``kernels`` (another project); ours must not pass.

    Runs in a fresh interpreter so that ``kernels`` is imported before transformers.
    """
    code = textwrap.dedent(
        """
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
        import kernels  # ours
        assert hasattr(kernels, "paged_extend_attention_torch")
        import transformers
        from transformers.utils.import_utils import is_kernels_available
        assert not is_kernels_available(), "transformers believes our kernels package is huggingface/kernels"
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM as HF
        from executor.model import LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=64)
        HF(cfg)
        LlamaForCausalLM(cfg)
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
