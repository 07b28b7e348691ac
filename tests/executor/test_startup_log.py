"""The executor's start-up log gives the scheduler limits it runs with."""

from executor.server import scheduler_limits


def test_the_scheduler_limits_line_gives_what_the_engine_runs_with(make_engine, smollm):
    engine, _ = make_engine(block_size=16, num_blocks=8, max_num_seqs=7, max_num_batched_tokens=300,
                            max_model_len=512)
    assert scheduler_limits(engine) == ("max_model_len 512 tokens, max_num_seqs 7, "
                                        "max_num_batched_tokens 300 (token budget per step); async scheduling "
                                        "(steady decode steps' block-manager requests sent before the forward pass)")
    # Without --max-model-len the model's own context length is the limit, and the line says it.
    engine, _ = make_engine(block_size=16, num_blocks=8)
    model, _ = smollm
    assert scheduler_limits(engine) == (f"max_model_len {model.max_model_len} tokens, max_num_seqs 64, "
                                        "max_num_batched_tokens 512 (token budget per step); async scheduling "
                                        "(steady decode steps' block-manager requests sent before the forward "
                                        "pass)")  # the CPU default
    engine, _ = make_engine(block_size=16, num_blocks=8, async_scheduling=False)
    assert scheduler_limits(engine).endswith("; steps one at a time (--no-async-scheduling)")


def test_the_token_budget_defaults_by_device_and_dtype():
    import torch

    from executor.config import token_budget

    from executor.linear import ONEDNN_BF16_LINEAR, bf16_own_kernel

    assert token_budget(None, "cpu", torch.float32) == token_budget(None, "cpu", torch.float16) == 512
    assert token_budget(None, "cpu", torch.bfloat16) == (2048 if ONEDNN_BF16_LINEAR and not bf16_own_kernel() else 512)
    assert token_budget(None, "cuda", torch.float32) == token_budget(None, "cuda:1", torch.bfloat16) == 2048
    assert token_budget(300, "cpu", torch.float32) == token_budget(300, "cuda", torch.bfloat16) == 300  # the flag wins
