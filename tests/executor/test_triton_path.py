"""The executor's CUDA path, run end to end without a GPU.

``--attention-backend triton`` makes the engine use what it uses on CUDA: the Triton kernels for the
KV-cache write, decode and extend attention, copy-on-write copies and swaps, dispatched from the
attention metadata the model runner builds. Under ``TRITON_INTERPRET=1`` (set for the whole suite
in tests/conftest.py) those kernels run on CPU tensors, so one workload on a tiny random Llama can
be run on both backends and compared token for token: prefix-cache hits, chunked prefill, decode,
an n=2 fork (copy-on-write of a shared partial block) and preemption by swap and by recompute.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import kernels
from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager
from executor.attention import resolve_backend
from executor.engine import Engine, EngineConfig
from executor.model_loader import load_model
from executor.request import SamplingParams

pytestmark = pytest.mark.skipif(not kernels.triton_interpreted(),
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1 before kernels import)")

BS = 4
TRITON_OPS = ("write_kv_cache", "paged_decode_attention", "paged_extend_attention", "copy_blocks", "swap_blocks")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama (GQA 4/2 heads, head_dim 16, vocab 96) with weights large enough to matter."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    return load_model(path, progress=False)


def _workload() -> list[tuple[str, list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(1, 96, (22,), generator=g).tolist()
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    return [
        ("a", shared + [5, 6, 7], greedy),
        ("b", shared + [9, 10], greedy),  # shares 5 full blocks with "a"
        ("long", torch.randint(1, 96, (45,), generator=g).tolist(), greedy),  # > the step's token budget
        ("fork", shared[:10] + [11], SamplingParams(max_tokens=10, temperature=0.9, seed=42, n=2, ignore_eos=True)),
        ("c", shared[:7], greedy),
        ("d", torch.randint(1, 96, (30,), generator=g).tolist(), greedy),
    ]


def _run(model, backend: str, *, num_blocks: int, num_cpu_blocks: int, staggered: bool):
    bm = InProcessBlockManager(BlockManager(enable_prefix_caching=True))
    config = EngineConfig(block_size=BS, num_blocks=num_blocks, num_cpu_blocks=num_cpu_blocks, max_num_seqs=8,
                          max_num_batched_tokens=24, attention_backend=backend)
    engine = Engine(model, bm, config, eos_token_ids=set())
    outputs: dict[tuple[str, int], list[int]] = {}
    pending = _workload()
    first, pending = (pending[:2], pending[2:]) if staggered else (pending, [])
    for rid, prompt, params in first:
        engine.add_request(rid, prompt, params)
    steps = 0
    while engine.has_work() or pending:
        if pending and steps % 3 == 2:  # later arrivals hit the prefix cache of earlier ones
            engine.add_request(*pending.pop(0))
        for out in engine.step():
            assert out.error is None, out
            outputs.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        steps += 1
    return outputs, bm.stats()["executor-0"], engine


def _counting(monkeypatch) -> dict[str, int]:
    calls = dict.fromkeys(TRITON_OPS, 0)
    for name in TRITON_OPS:
        fn = getattr(kernels, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_the_triton_path_gives_the_cpu_paths_tokens(tiny_model, monkeypatch):
    expected, _, cpu_engine = _run(tiny_model, "torch", num_blocks=64, num_cpu_blocks=0, staggered=True)
    assert cpu_engine.runner.backend == "torch"
    calls = _counting(monkeypatch)
    got, stats, engine = _run(tiny_model, "triton", num_blocks=64, num_cpu_blocks=0, staggered=True)
    assert engine.runner.backend == "triton"
    assert got == expected
    assert len(got) == 7  # five lone requests and two fork children
    assert stats["prefix_cache"]["hits_tokens"] >= 5 * BS, stats["prefix_cache"]  # "b" reused "a"'s blocks
    assert stats["copy_on_write"] > 0
    assert calls["write_kv_cache"] and calls["paged_decode_attention"] and calls["paged_extend_attention"]
    assert calls["copy_blocks"] > 0, "the n=2 fork copied its shared partial block on write"
    assert stats["device"]["used"] == 0


def test_preemption_on_the_triton_path_changes_no_tokens(tiny_model, monkeypatch):
    expected, _, _ = _run(tiny_model, "torch", num_blocks=64, num_cpu_blocks=0, staggered=False)
    calls = _counting(monkeypatch)
    # 18 device blocks cannot hold the batch: sequences are preempted, by swap while the 8-block CPU
    # pool has room and by recompute after.
    got, stats, _ = _run(tiny_model, "triton", num_blocks=18, num_cpu_blocks=8, staggered=False)
    assert got == expected
    assert stats["preemptions"]["swap"] > 0 and stats["preemptions"]["recompute"] > 0, stats["preemptions"]
    assert calls["swap_blocks"] > 0
    assert stats["device"]["used"] == 0 and stats["cpu"]["used"] == 0


def test_backend_choice_and_its_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("auto", cuda) == "triton"
    assert resolve_backend("triton", cpu) == "triton"  # the interpreter is on in this suite
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("torch", cuda)
    with pytest.raises(ValueError, match="expected auto, triton or torch"):
        resolve_backend("cutlass", cpu)
