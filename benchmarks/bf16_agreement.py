#!/usr/bin/env python3
"""Greedy agreement of bf16 with fp32: the same fixed prompts, greedy, in both dtypes, token by token.

Runs SmolLM2-135M-Instruct (or ``--model``) in an :class:`executor.engine.Engine` with an
in-process block manager, once with fp32 weights and KV cache and once with bf16 ones (on a CPU
with AMX or AVX512-BF16 the bf16 linear layers run our kernel, with PAGEDSERVE_LINEAR_BF16_CPU=torch
oneDNN's bf16 kernels, on packed weights: see executor/linear.py), on :data:`PROMPTS` (each wrapped in the model's chat template), all prompts
in one batch, ``--max-tokens`` greedy tokens each (``ignore_eos``), and prints:

- the CPU model, torch version, threads, and the path each dtype's linear layers take;
- per prompt: how many tokens match before the first divergence;
- **prefix agreement**: the matching tokens before each prompt's first divergence, summed, over
  all generated tokens (after a divergence the two texts condition on different tokens, so later
  matches say little);
- **position-wise agreement**: the share of positions, over all prompts, where the two dtypes
  chose the same token (divergent continuations often realign);
- how many prompts came out identical;
- the same for bf16 with packed weights against bf16 through ``F.linear`` (its path before the
  packing), which shows whether packing changed any token.

Speed is not measured here (see benchmarks/profile_step.py ``--dtype``).

fp32 is the reference: its rows are batch-invariant (docs/batch-invariance.md), so its tokens
are the ones each prompt would get alone. bf16's are not, so its figures are for this batch.

Usage::

    python benchmarks/bf16_agreement.py                         # 16 prompts x 64 tokens, 2 threads
    python benchmarks/bf16_agreement.py --max-tokens 128 --json /tmp/agreement.json
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the settings classes come from this checkout

from benchmarks.settings import BenchmarkSettings  # noqa: E402
from blockmgr.settings import load, reuse, setting  # noqa: E402
from executor.config import ExecutorSettings, ModelSettings  # noqa: E402

#: The fixed prompt set: short instructions on varied topics, so that the continuations differ.
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of a paperclip.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Give me a recipe for pancakes.",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a black cat.",
    "How many legs does a spider have, and why?",
    "Describe the water cycle in two sentences.",
    "What are prime numbers? Give five examples.",
    "Write a short thank-you note to a teacher.",
)


class AgreementSettings(BenchmarkSettings):
    num_prompts: int = setting(len(PROMPTS), f"how many of the {len(PROMPTS)} fixed prompts to run", ge=1,
                               le=len(PROMPTS))
    max_tokens: int = setting(64, "greedy tokens generated per prompt", ge=1)
    num_threads: int = reuse(ExecutorSettings, "num_threads", default=2,
                             description="torch CPU threads (2: all of the development machine's cores)")
    block_size: int = reuse(ExecutorSettings, "block_size")
    model: str | None = reuse(ModelSettings, "model")
    json_out: str | None = setting(None, "also write the figures to this JSON file", flag="--json")


def cpu_model() -> str:
    """The CPU's model name and its bf16-related flags (``/proc/cpuinfo`` on Linux; else ``platform``'s name)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine()
    name, flags = platform.machine(), set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    bf16 = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(bf16) or 'no AVX-512'})"


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Token agreement of ``other`` with ``reference`` (one token list per prompt, same lengths).

    Returns a dict: ``prefix`` (per prompt, tokens equal before the first divergence),
    ``prefix_share`` (their sum over all tokens), ``position_share`` (equal positions over all
    positions), ``identical`` (prompts equal throughout), ``tokens`` (all reference tokens).

    Raises:
        ValueError: different numbers of prompts, or of tokens for a prompt.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference prompts, {len(other)} others")
    prefix, same, total = [], 0, 0
    for i, (ref, got) in enumerate(zip(reference, other)):
        if len(ref) != len(got):
            raise ValueError(f"prompt {i}: {len(ref)} reference tokens, {len(got)} others")
        first_diff = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
        prefix.append(first_diff)
        same += sum(a == b for a, b in zip(ref, got))
        total += len(ref)
    return {"prefix": prefix, "prefix_share": sum(prefix) / total if total else 1.0,
            "position_share": same / total if total else 1.0,
            "identical": sum(p == len(r) for p, r in zip(prefix, reference)), "tokens": total}


def use_f_linear(model) -> None:
    """Make every linear layer of ``model`` run ``F.linear`` on its plain weight: bf16's path before packing."""
    import torch.nn.functional as F

    from executor.linear import Linear

    for module in model.modules():
        if isinstance(module, Linear):
            module.restore_plain_weight()
            module._pack = None
            # An instance attribute: the layers call ``.forward`` directly.
            module.forward = lambda x, m=module: F.linear(x, m.weight, m.bias)


def generate(model, prompts: list[list[int]], args, dtype) -> list[list[int]]:
    """Greedy ``args.max_tokens`` tokens for every prompt, all in one batch: the tokens per prompt.

    Raises ``RuntimeError`` if the requests do not finish within twice the steps they need.
    """
    max_tokens = args.max_tokens
    from blockmgr.client import InProcessBlockManager
    from blockmgr.manager import BlockManager
    from executor.engine import Engine, EngineConfig
    from executor.request import SamplingParams

    longest = max(len(p) for p in prompts) + max_tokens
    blocks = len(prompts) * -(-longest // args.block_size) + 8
    engine = Engine(model, InProcessBlockManager(BlockManager(enable_prefix_caching=False)),
                    EngineConfig(block_size=args.block_size, num_blocks=blocks, max_num_seqs=len(prompts),
                                 max_num_batched_tokens=max(2048, sum(len(p) for p in prompts))),
                    eos_token_ids=set(), dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
        tokens[f"p{i}"] = []
    deadline = 2 * len(prompts) * (max_tokens + 1)  # steps; a full batch needs max_tokens + 1
    finished = 0
    for _ in range(deadline):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            finished += out.finished
        if finished == len(prompts):
            break
    else:
        raise RuntimeError(f"{len(prompts) - finished} requests unfinished after {deadline} steps")
    return [tokens[f"p{i}"] for i in range(len(prompts))]


def main(argv=None) -> int:
    args = load(AgreementSettings, argv, "bf16_agreement.py", __doc__.split("\n\n")[0])[0]
    import torch
    from transformers import AutoTokenizer

    from executor.linear import ONEDNN_BF16_LINEAR, linear_path
    from executor.model_loader import default_model_path, load_model, resolve_model_dir

    torch.set_num_threads(args.num_threads)
    model_dir = resolve_model_dir(args.model or default_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    # As the gateway's chat endpoint does: the template's text, then its tokens.
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)
               for text in PROMPTS[: args.num_prompts]]

    runs = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16 F.linear": (torch.bfloat16, True)}
    outputs = {}
    for name, (dtype, plain) in runs.items():
        model = load_model(model_dir, dtype=dtype, progress=False)
        if plain:
            use_f_linear(model)
        outputs[name] = generate(model, prompts, args, dtype)
        del model
    result = agreement(outputs["fp32"], outputs["bf16"])
    same_path = agreement(outputs["bf16 F.linear"], outputs["bf16"])
    info = {
        "cpu": cpu_model(), "torch": torch.__version__, "threads": args.num_threads, "model": str(model_dir),
        "fp32_path": linear_path(torch.float32), "bf16_path": linear_path(torch.bfloat16),
        "onednn_bf16": ONEDNN_BF16_LINEAR, "prompts": len(prompts), "max_tokens": args.max_tokens,
        **result, "bf16_vs_bf16_f_linear": same_path,
    }
    print(f"# bf16 vs fp32 greedy agreement: {info['cpu']}, torch {info['torch']}, {args.num_threads} thread(s), "
          f"{len(prompts)} prompts x {args.max_tokens} tokens in one batch, model {model_dir.name}")
    print(f"# linear layers: fp32 {info['fp32_path']}; bf16 {info['bf16_path']}")
    print("\n| prompt | bf16 tokens equal to fp32's before the first divergence |")
    print("| --- | ---: |")
    for text, p in zip(PROMPTS, result["prefix"]):
        print(f"| {text} | {p} / {args.max_tokens} |")
    print(f"\nbf16 vs fp32: prefix agreement {100 * result['prefix_share']:.1f}% of {result['tokens']} tokens; "
          f"position-wise {100 * result['position_share']:.1f}%; identical prompts {result['identical']} / "
          f"{len(prompts)}")
    print(f"bf16 packed vs bf16 through F.linear (the unpacked path): prefix agreement "
          f"{100 * same_path['prefix_share']:.1f}%; identical prompts {same_path['identical']} / {len(prompts)}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
