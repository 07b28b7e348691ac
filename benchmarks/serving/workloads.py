"""Benchmark workloads: real text cut to lengths drawn from a seed.

Every workload is a list of :class:`BenchRequest` built deterministically from ``seed``. Prompts
are windows of real English prose (the docstrings of a fixed list of Python standard-library
modules, read from the running interpreter's own sources: nothing is downloaded), cut to the drawn
number of tokens of the model's tokenizer.

Length distributions (all lengths in tokens):

- ``sharegpt``: lognormal input and output lengths with the means the PagedAttention paper reports
  for its ShareGPT trace (Kwon et al., "Efficient Memory Management for Large Language Model
  Serving with PagedAttention", SOSP 2023, §6.1 and Fig. 11: 161.31 input and 337.99 output tokens
  on average). The paper gives the means and histograms with long right tails, not a fit, so the
  shapes are our choice: ``sigma`` 1.0 for inputs and 0.8 for outputs (medians of about 98 and 245
  tokens), and ``mu = ln(mean) - sigma**2 / 2`` so that the uncapped means are exactly 161 and 338.
  A drawn pair is then capped so that input + output fits ``max_model_len`` (input at most
  ``max_model_len - 16``, output at most what is left); the JSON results give the means after
  capping.
- ``alpaca``: 19 tokens in, 58 out (the paper's Alpaca means, 19.31 and 58.45, rounded).
- ``shared-prefix``: one 1,000-token system prompt shared by every request, then a short question
  (10 to 40 tokens, uniform) and a short answer (``shared_output_len`` tokens).
- ``parallel-sampling``: ShareGPT-like lengths, ``n = 4`` samples per request (temperature 1.0):
  the 4 samples share the prompt's blocks through block-manager forks.
- ``beam``: ShareGPT-like lengths, beam search of width 4.
- ``decode``: ``concurrency`` requests with a 128-token prompt and 128 output tokens each, all
  arriving at once: the decode rate at a fixed number of running sequences.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

#: Means from the PagedAttention paper (SOSP 2023, §6.1, Fig. 11), in tokens.
SHAREGPT_MEAN_INPUT = 161.0
SHAREGPT_MEAN_OUTPUT = 338.0
SHAREGPT_SIGMA_INPUT = 1.0
SHAREGPT_SIGMA_OUTPUT = 0.8
ALPACA_INPUT = 19
ALPACA_OUTPUT = 58
SHARED_PREFIX_LEN = 1000
DECODE_PROMPT_LEN = 128
DECODE_OUTPUT_LEN = 128

WORKLOADS = ("sharegpt", "alpaca", "shared-prefix", "parallel-sampling", "beam", "decode")

#: Standard-library modules whose docstrings make the prompt corpus (English prose, several
#: hundred thousand characters, shipped with every CPython).
CORPUS_MODULES = (
    "argparse", "asyncio.base_events", "asyncio.tasks", "collections", "concurrent.futures._base",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "heapq", "http.client",
    "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging", "logging.handlers",
    "mailbox", "multiprocessing.pool", "optparse", "pathlib", "pickle", "pydoc", "queue", "random",
    "shutil", "smtplib", "socket", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "tkinter", "turtle", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile",
)


def lognormal_mu(mean: float, sigma: float) -> float:
    """``mu`` of a lognormal with the given ``mean`` and ``sigma``: ``ln(mean) - sigma**2 / 2``."""
    return math.log(mean) - sigma * sigma / 2


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """The docstrings of :data:`CORPUS_MODULES`, in that order, separated by blank lines.

    Read from the interpreter's standard-library sources with :mod:`ast` (modules that are
    missing, e.g. ``tkinter`` on a slim Python, are skipped).
    """
    parts = []
    for name in CORPUS_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
    return "\n\n".join(parts)


@dataclass
class BenchRequest:
    """One request of a workload.

    Attributes:
        prompt_token_ids: the prompt, already tokenized (what the offline benchmark sends).
        prompt: the same prompt as text (what the online benchmark sends).
        output_len: tokens to generate (``max_tokens`` with ``ignore_eos``).
        n: samples per request (parallel sampling).
        beam_width: 0, or the beam width for beam search.
        temperature: 0 is greedy.
        seed: per-request sampling seed.
        group: a label, e.g. ``"cold"``/``"warm"`` for shared-prefix TTFT.
    """

    prompt_token_ids: list[int]
    prompt: str
    output_len: int
    n: int = 1
    beam_width: int = 0
    temperature: float = 0.0
    seed: int | None = None
    group: str = ""


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    params: dict = field(default_factory=dict)

    def summary(self) -> dict:
        ins = [len(r.prompt_token_ids) for r in self.requests]
        outs = [r.output_len for r in self.requests]
        return {
            "name": self.name, "num_requests": len(self.requests), **self.params,
            "mean_input_tokens": float(np.mean(ins)), "mean_output_tokens": float(np.mean(outs)),
            "max_input_tokens": int(max(ins)), "max_output_tokens": int(max(outs)),
            "total_output_tokens": int(sum(o * max(r.n, 1) for o, r in zip(outs, self.requests))),
        }


class TextSource:
    """Cuts windows of the corpus to a given number of tokens of ``tokenizer``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = tokenizer.encode(corpus_text(), add_special_tokens=False)
        if len(self.ids) < 4 * SHARED_PREFIX_LEN:
            raise RuntimeError(f"the prompt corpus is too small ({len(self.ids)} tokens)")

    def window(self, rng: np.random.Generator, length: int) -> tuple[list[int], str]:
        """``length`` consecutive corpus tokens from a random offset, and their text."""
        length = max(1, min(length, len(self.ids)))
        start = int(rng.integers(0, len(self.ids) - length + 1))
        ids = self.ids[start : start + length]
        return ids, self.tokenizer.decode(ids)


def sharegpt_lengths(rng: np.random.Generator, num: int, max_model_len: int) -> list[tuple[int, int]]:
    """``num`` (input, output) pairs, lognormal (see the module docstring), capped by ``max_model_len``."""
    ins = rng.lognormal(lognormal_mu(SHAREGPT_MEAN_INPUT, SHAREGPT_SIGMA_INPUT), SHAREGPT_SIGMA_INPUT, num)
    outs = rng.lognormal(lognormal_mu(SHAREGPT_MEAN_OUTPUT, SHAREGPT_SIGMA_OUTPUT), SHAREGPT_SIGMA_OUTPUT, num)
    pairs = []
    for i, o in zip(ins, outs):
        i = int(min(max(4, round(i)), max_model_len - 16))
        o = int(min(max(1, round(o)), max_model_len - i))
        pairs.append((i, o))
    return pairs


def make_workload(name: str, tokenizer, *, num_requests: int = 16, seed: int = 0, max_model_len: int = 1024,
                  concurrency: int = 16, shared_output_len: int = 32, source: TextSource | None = None) -> Workload:
    """Build workload ``name`` (one of :data:`WORKLOADS`).

    Args:
        tokenizer: the model's tokenizer (a ``transformers`` tokenizer).
        num_requests: requests to draw (``decode`` uses ``concurrency`` instead).
        seed: seeds the length draws, the text windows and the sampling seeds.
        max_model_len: caps input + output (tokens).
        concurrency: requests of the ``decode`` workload.
        shared_output_len: output tokens of each ``shared-prefix`` request.

    Raises:
        ValueError: unknown workload name.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    rng = np.random.default_rng(seed)
    src = source or TextSource(tokenizer)
    reqs: list[BenchRequest] = []
    params: dict = {"seed": seed}
    if name in ("sharegpt", "parallel-sampling", "beam"):
        params.update(max_model_len=max_model_len, mean_input_target=SHAREGPT_MEAN_INPUT,
                      mean_output_target=SHAREGPT_MEAN_OUTPUT, sigma_input=SHAREGPT_SIGMA_INPUT,
                      sigma_output=SHAREGPT_SIGMA_OUTPUT)
        for k, (i, o) in enumerate(sharegpt_lengths(rng, num_requests, max_model_len)):
            ids, text = src.window(rng, i)
            if name == "sharegpt":
                reqs.append(BenchRequest(ids, text, o))
            elif name == "parallel-sampling":
                reqs.append(BenchRequest(ids, text, o, n=4, temperature=1.0, seed=seed * 100_003 + k))
            else:
                reqs.append(BenchRequest(ids, text, o, beam_width=4))
        if name == "parallel-sampling":
            params["n"] = 4
        if name == "beam":
            params["beam_width"] = 4
    elif name == "alpaca":
        params.update(input_len=ALPACA_INPUT, output_len=ALPACA_OUTPUT)
        for _ in range(num_requests):
            ids, text = src.window(rng, ALPACA_INPUT)
            reqs.append(BenchRequest(ids, text, ALPACA_OUTPUT))
    elif name == "shared-prefix":
        prefix_ids, _ = src.window(rng, SHARED_PREFIX_LEN)
        params.update(prefix_len=SHARED_PREFIX_LEN, question_len="10-40", output_len=shared_output_len)
        for _ in range(num_requests):
            q_ids, _ = src.window(rng, int(rng.integers(10, 41)))
            ids = prefix_ids + q_ids
            reqs.append(BenchRequest(ids, tokenizer.decode(ids), shared_output_len))
    elif name == "decode":
        params.update(concurrency=concurrency, input_len=DECODE_PROMPT_LEN, output_len=DECODE_OUTPUT_LEN)
        for _ in range(concurrency):
            ids, text = src.window(rng, DECODE_PROMPT_LEN)
            reqs.append(BenchRequest(ids, text, DECODE_OUTPUT_LEN))
    return Workload(name, reqs, params)
