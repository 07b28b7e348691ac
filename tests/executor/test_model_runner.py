"""The model runner's inputs: a batch of scheduled sequences flattened into token ids, positions
and the attention metadata (slot mapping, padded block table, sequence lengths, query starts)."""

from types import SimpleNamespace

import torch

from executor.model_runner import ModelRunner
from executor.request import Request, SamplingParams


def test_prepare_inputs_maps_each_new_token_to_its_granted_slot():
    model = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=2)
    runner = ModelRunner(model, num_blocks=16, block_size=4)
    # A prefill chunk: tokens 5..7 of a 9-token prompt, in blocks [3, 7] (block 7 holds positions 4..7).
    chunk = Request("a", list(range(100, 109)), SamplingParams(), num_computed_tokens=5, block_table=[3, 7])
    # A decode: token 4 (the last sampled one) of a sequence in blocks [2, 9, 11].
    decode = Request("b", [1, 2, 3, 4], SamplingParams(), output_token_ids=[50], num_computed_tokens=4,
                     block_table=[2, 9, 11])
    inputs = runner.prepare_inputs([(chunk, 3), (decode, 1)])
    assert inputs.input_ids.tolist() == [105, 106, 107, 50]
    assert inputs.positions.tolist() == [5, 6, 7, 4]
    meta = inputs.meta
    assert meta.slot_mapping.tolist() == [7 * 4 + 1, 7 * 4 + 2, 7 * 4 + 3, 9 * 4 + 0]
    assert meta.block_table.dtype is torch.int32 and meta.block_table.tolist() == [[3, 7, 0], [2, 9, 11]]
    assert meta.seq_lens.tolist() == [8, 5]
    assert meta.query_start_loc.tolist() == inputs.query_starts == [0, 3, 4]
    assert meta.max_query_len == 3


def test_the_start_up_log_names_the_cpu_attention_of_each_cache_dtype(caplog):
    """fp32 and bf16 caches run the compiled attention and the log says so; fp16 the torch twins."""
    from executor.attention import COMPILED_CPU_DTYPES
    from kernels import paged_attention_cpu

    model = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=2)
    compiled = paged_attention_cpu.backend() == "compiled"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        caplog.clear()
        with caplog.at_level("INFO", logger="executor.model_runner"):
            ModelRunner(model, num_blocks=4, block_size=4, dtype=dtype)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU attention"))
        expected = "one compiled call" if compiled and dtype in COMPILED_CPU_DTYPES else "plain torch"
        assert line.startswith(f"CPU attention ({str(dtype)[6:]} cache): {expected}"), line
