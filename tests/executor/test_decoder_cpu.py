"""executor.decoder_cpu: the CPU forward pass's decoder layers in one C call, bit for bit the Python loop's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from executor import decoder_cpu
from executor.attention import allocate_kv_cache
from executor.linear import Linear, bf16_own_kernel
from executor.model_loader import load_model
from kernels import decoder_cpu as decoder_kernel
from kernels import linear_cpu
from tests.executor.test_model import BLOCK_SIZE, NUM_BLOCKS, PagedBatch, _configs, _randomize

pytestmark = pytest.mark.skipif(decoder_kernel.backend() != "compiled" or linear_cpu.backend() != "compiled",
                                reason="the compiled CPU kernels cannot run here (no C compiler)")
REPO = Path(__file__).resolve().parents[2]
#: Cache blocks of _run_steps: room for a prefill-sized step.
STEP_BLOCKS = 96
DTYPES = [torch.float32] + ([torch.bfloat16] if bf16_own_kernel() else [])


@pytest.fixture(scope="module", params=["llama", "llama-tied-bias", "qwen2", "mistral"])
def checkpoint(request, tmp_path_factory):
    config = _configs()[request.param]
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(hf, seed=11)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return path


def _run_steps(model, dtype, compiled: bool, steps) -> list[torch.Tensor]:
    """Hidden states of each step (a mixed prefill / decode batch), through the driver or the loop."""
    caches = allocate_kv_cache(model.num_layers, STEP_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                               dtype=dtype, fill=float("nan"))
    batch = PagedBatch(3, seed=5, num_blocks=STEP_BLOCKS)
    g = torch.Generator().manual_seed(3)
    outs, used = [], []
    real = decoder_cpu.for_step
    try:
        if not compiled:
            decoder_cpu.for_step = lambda *args: None
        for counts in steps:
            positions, meta = batch.step(counts)
            ids = torch.randint(0, model.vocab_size, (sum(counts),), generator=g)
            with torch.inference_mode():
                used.append(real(model, caches, dtype, meta.backend) is not None)
                outs.append(model(ids, positions, caches, meta))
    finally:
        decoder_cpu.for_step = real
    return outs, used


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_as_the_python_loop(checkpoint, dtype):
    model = load_model(checkpoint, dtype=dtype, progress=False)
    # The third step is a prefill-sized one: past the AMX kernel's 256-row blocks.
    steps = [[5, 11, 1], [1, 1, 1], [140, 1, 150], [3, 1, 2], [1, 1, 1]]
    got, used = _run_steps(model, dtype, True, steps)
    want, _ = _run_steps(model, dtype, False, steps)
    assert all(used)
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_with_any_number_of_threads(checkpoint, dtype):
    """The layer loop's kernels split rows, columns and heads between OpenMP threads (a team forms
    only with 2+ threads, which the suite's one torch thread never gives): no bit may change."""
    model = load_model(checkpoint, dtype=dtype, progress=False)
    steps = [[5, 11, 1], [1, 1, 1], [140, 1, 150], [3, 1, 2]]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):  # more threads than cores is fine: only the split changes
            torch.set_num_threads(threads)
            results.append(_run_steps(model, dtype, True, steps)[0])
    finally:
        torch.set_num_threads(before)
    for outs in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs, results[0]))


def test_not_used_where_the_loop_must_run(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    caches = allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    with torch.inference_mode():
        assert decoder_cpu.for_step(model, caches, torch.float32, "torch") is not None
    with torch.enable_grad():
        assert decoder_cpu.for_step(model, caches, torch.float32, "torch") is None  # autograd
    if bf16_own_kernel():
        m16 = load_model(checkpoint, dtype=torch.bfloat16, progress=False)
        c16 = allocate_kv_cache(m16.num_layers, NUM_BLOCKS, BLOCK_SIZE, m16.num_kv_heads, m16.head_dim,
                                dtype=torch.bfloat16)
        with torch.inference_mode():
            assert decoder_cpu.for_step(m16, c16, torch.bfloat16, "torch") is not None
    # Weights not dropped (they could change under the packs): the loop, which repacks as needed.
    for module in model.modules():
        if isinstance(module, Linear):
            module.restore_plain_weight()
    with torch.inference_mode():
        assert decoder_cpu.for_step(model, caches, torch.float32, "torch") is None
        model.pack_weights(keep_plain=False)
        runner = decoder_cpu.for_step(model, caches, torch.float32, "torch")
        assert runner is not None and runner.generation == Linear.generation
        assert decoder_cpu.for_step(model, caches, torch.float32, "torch") is runner  # cached while nothing changes
        other = [(k.clone(), v.clone()) for k, v in caches]
        assert decoder_cpu.for_step(model, other, torch.float32, "torch") is not runner  # other caches: rebuilt
        # The Triton path (its own cache layout) and caches in the standard layout never take it.
        assert decoder_cpu.for_step(model, other, torch.float32, "triton") is None
        standard = [(k.permute(0, 3, 1, 2).contiguous(), v.permute(0, 2, 1, 3).contiguous()) for k, v in caches]
        assert decoder_cpu.for_step(model, standard, torch.float32, "torch") is None


def test_new_weights_are_used_after_reloading(checkpoint, tmp_path):
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    steps = [[4, 2, 7], [1, 1, 1]]
    before, _ = _run_steps(model, torch.float32, True, steps)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    _randomize(hf, seed=12)
    model.load_weights(hf.state_dict().items() if not hf.config.tie_word_embeddings
                       else [(k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight"])
    model.pack_weights(keep_plain=False)
    after, used = _run_steps(model, torch.float32, True, steps)
    want, _ = _run_steps(model, torch.float32, False, steps)
    assert all(used) and not torch.equal(after[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(after, want))


def test_a_bad_layout_is_refused_before_any_write(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    caches = allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    positions, meta = PagedBatch(1).step([3])
    meta.block_table[0, 0] = NUM_BLOCKS + 5
    snapshot = [k.clone() for k, _ in caches]
    with torch.inference_mode(), pytest.raises(ValueError, match="block id outside the cache"):
        model(torch.tensor([1, 2, 3]), positions, caches, meta)
    assert all(torch.equal(k, s) for (k, _), s in zip(caches, snapshot))


def _struct_fields(source: str, name: str) -> list[str]:
    text = (REPO / "kernels" / source).read_text()
    body = re.search(r"struct " + name + r" \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return re.findall(r"[\w ]+?\**\s*\b(\w+)\s*[,;]", body.replace(",", ";"))


def test_the_driver_structs_match_the_kernels():
    """decoder_cpu.c declares struct linear_args again (the three C files are built apart): the
    same fields in the same order as both linear kernels, and as the one ctypes Structure."""
    fields = _struct_fields("decoder_cpu.c", "linear_args")
    assert fields == _struct_fields("linear_cpu.c", "linear_args") == _struct_fields("linear_bf16_cpu.c",
                                                                                    "linear_bf16_args")
    assert fields == [name for name, _ in decoder_kernel.Layer._fields_[0][1]._fields_]


def test_environment_variable_turns_it_off():
    code = "from kernels import decoder_cpu as d; print(d.backend())"
    env = {**os.environ, decoder_kernel.ENV_VAR: "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "torch"


def test_the_executor_log_says_which_loop_runs(checkpoint, caplog):
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    caches = allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    with caplog.at_level("INFO", logger="pagedserve.executor"), torch.inference_mode():
        decoder_cpu.for_step(model, caches, torch.float32, "torch")
        model.layers[0].mlp.down_proj.restore_plain_weight()
        decoder_cpu.for_step(model, caches, torch.float32, "torch")
    lines = [r.getMessage() for r in caplog.records if "CPU forward pass" in r.getMessage()]
    assert lines == ["CPU forward pass: torch.float32 decoder layers in one C call per step (kernels/decoder_cpu.c)",
                     "CPU forward pass: torch.float32 decoder layers through the Python loop (a linear layer keeps "
                     "its plain weight (packs could go stale))"]
