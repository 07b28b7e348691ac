"""kernels.greedy_head_cpu: the screened argmax is the fp32 LM head's argmax bit for bit
(``argmax_rows(linear_cpu.linear(h, W))``, the first of equal maxima), its error bound holds, rows
it cannot vouch for are left over, and it screens out nearly every token of logit-sized rows.

The screen's own tests feed it approximate logits computed by torch (bf16 inputs, fp32 sums, bf16
output, the bf16 kernel's rounding points), so they run on any CPU with a C compiler; the
:class:`GreedyHead` tests need the bf16 kernel (AVX512-BF16 or AMX)."""

import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import greedy_head_cpu, linear_cpu
from kernels.argmax_cpu import argmax_rows
from kernels.c_build import compile_library
from kernels.greedy_head_cpu import Bound, GreedyHead, bf16_weight, screen

pytestmark = pytest.mark.skipif(greedy_head_cpu.library() is None or linear_cpu.library() is None,
                                reason="no working C compiler")
needs_bf16_kernel = pytest.mark.skipif(not greedy_head_cpu.available(), reason="no AVX512-BF16 or AMX here")


class Head:
    """A weight with everything the screen reads: the fp32 pack, W' and the norms."""

    def __init__(self, w: torch.Tensor):
        self.w = w.contiguous()
        self.pack = linear_cpu.PackedWeight(self.w)
        self.wb, self.norm, self.dnorm, largest = bf16_weight(self.w)
        self.bound = Bound.for_weight(w.shape[1], largest, self.norm, self.dnorm)

    def approx(self, h: torch.Tensor) -> torch.Tensor:
        return (h.to(torch.bfloat16).float() @ self.wb.float().T).to(torch.bfloat16)

    def reference(self, h: torch.Tensor) -> list[int]:
        return argmax_rows(linear_cpu.linear(h, self.pack))

    def screen(self, h: torch.Tensor, **kwargs) -> tuple[list[int], list[int]]:
        return screen(h, self.approx(h), self.norm, self.dnorm, self.pack, self.bound, **kwargs)


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 300), k=st.integers(1, 80), duplicates=st.integers(0, 5),
       w_scale=st.sampled_from([1e-3, 0.05, 1.0, 30.0]), h_scale=st.sampled_from([1e-4, 1.0, 50.0]),
       seed=st.integers(0, 2**31 - 1))
def test_the_fp32_argmax_bit_for_bit(rows, n, k, duplicates, w_scale, h_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * w_scale
    for _ in range(duplicates):  # equal rows: equal logits, the first index must win
        i, j = torch.randint(0, n, (2,), generator=g).tolist()
        w[j] = w[i]
    head = Head(w)
    h = torch.randn(rows, k, generator=g) * h_scale
    tokens, exact = head.screen(h)
    assert tokens == head.reference(h)
    assert all(1 <= e <= n for e in exact)


def test_ties_and_one_ulp_apart_take_the_first_maximum():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=g) * 0.05
    h = torch.randn(3, 64, generator=g)
    w[700] = h[0] * 0.2  # the clear winner of row 0 ...
    w[300] = w[700]  # ... tied with an earlier copy: 300 must win
    w[900] = w[700]
    w[500] = h[1] * 0.2
    w[100] = torch.nextafter(w[500], torch.full_like(w[500], -1.0))  # a hair smaller, earlier
    w[800] = h[2] * 0.2
    w[801] = torch.nextafter(w[800], torch.full_like(w[800], 1.0)) * 1.0  # a hair larger, later
    head = Head(w)
    tokens, exact = head.screen(h)
    assert tokens == head.reference(h)
    assert tokens[0] == 300
    assert min(exact) >= 2  # the ties were computed exactly, not guessed


def test_the_error_bound_holds():
    """|fp32 logit - approximate logit| <= b_v (the C file's formula) on rows of very different
    magnitudes, weights with a wide exponent range, and the real vocabulary's width."""
    g = torch.Generator().manual_seed(1)
    k = 576
    w = torch.randn(4096, k, generator=g) * torch.exp(torch.randn(4096, 1, generator=g) * 2)
    head = Head(w)
    h = torch.randn(16, k, generator=g) * torch.exp(torch.randn(16, k, generator=g))
    x = linear_cpu.linear(h, head.pack).double()
    a = head.approx(h).double()
    hp = h.to(torch.bfloat16).float()
    hn, dn, pn = (t.double().norm(dim=1, keepdim=True) for t in (h, h - hp, hp))
    b = head.bound
    c2 = dn + b.g_exact * hn + b.g_approx * pn
    bound = (1 + b.g_exact) * hn * head.dnorm.double() + c2 * head.norm.double() + b.u_bf16 * a.abs() + b.abs_err
    ratio = ((x - a).abs() / bound).max().item()
    assert ratio <= 1.0
    assert ratio > 0.01  # and is not vacuous


def test_logit_sized_rows_need_few_exact_logits():
    """A vocabulary of 49,152 x 576 (SmolLM2's head) and rows with one likely token: a handful of
    fp32 logits per row instead of 49,152."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(49152, 576, generator=g) * 0.05
    head = Head(w)
    winners = torch.randint(0, 49152, (32,), generator=g)
    h = w[winners] * 20 + torch.randn(32, 576, generator=g) * 0.5
    tokens, exact = head.screen(h)
    assert tokens == head.reference(h) == winners.tolist()
    assert sum(exact) / len(exact) < 20


def test_rows_it_cannot_vouch_for_are_left_over():
    g = torch.Generator().manual_seed(3)
    head = Head(torch.randn(200, 32, generator=g))
    h = torch.randn(5, 32, generator=g)
    h[1, 3] = float("nan")
    h[2, 0] = float("inf")
    h[3] *= 1e30  # past fp32's safe magnitude
    tokens, exact = head.screen(h)
    assert tokens[1:4] == [-1, -1, -1] and exact[1:4] == [0, 0, 0]
    assert tokens[0] == head.reference(h[:1])[0] and tokens[4] == head.reference(h[4:])[0]
    tied = Head(torch.randn(1, 32, generator=g).repeat(200, 1))  # every token ties: 200 candidates
    capped, counts = tied.screen(h[[0, 4]], max_exact=199)
    assert capped == [-1, -1] and counts == [0, 0]
    assert tied.screen(h[[0, 4]], max_exact=200) == ([0, 0], [200, 200])


def test_threads_change_nothing():
    g = torch.Generator().manual_seed(5)
    head = Head(torch.randn(5000, 64, generator=g))
    h = torch.randn(33, 64, generator=g)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(head.screen(h))
    finally:
        torch.set_num_threads(old)
    assert results[0] == results[1] == results[2]
    assert results[0][0] == head.reference(h)


def test_bad_inputs_raise():
    head = Head(torch.randn(50, 16))
    h = torch.randn(2, 16)
    with pytest.raises(ValueError, match="expected hidden"):
        screen(h.double(), head.approx(h), head.norm, head.dnorm, head.pack, head.bound)
    with pytest.raises(ValueError, match="expected hidden"):
        screen(h, head.approx(h)[:, :49], head.norm, head.dnorm, head.pack, head.bound)
    with pytest.raises(ValueError, match="max_exact must be at least 1"):
        screen(h, head.approx(h), head.norm, head.dnorm, head.pack, head.bound, max_exact=0)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="instruction-set levels are x86-64's")
def test_every_instruction_set_level_gives_the_same_tokens(tmp_path, monkeypatch):
    levels = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    g = torch.Generator().manual_seed(6)
    head = Head(torch.randn(1003, 40, generator=g))  # a tail shorter than a vector
    h = torch.randn(6, 40, generator=g)
    expected = head.screen(h)
    assert expected[0] == head.reference(h)
    for level in levels:
        path = compile_library(greedy_head_cpu._SOURCE, tmp_path / level,
                               ("-fopenmp", "-DGREEDY_HEAD_NO_CLONES", f"-march={level}"))
        monkeypatch.setattr(greedy_head_cpu, "library", lambda p=path: greedy_head_cpu.load_library(p))
        assert head.screen(h) == expected, level


@needs_bf16_kernel
def test_greedy_head_gives_the_full_argmax_and_computes_left_over_rows_whole():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(20000, 128, generator=g) * 0.05
    pack = linear_cpu.PackedWeight(w)
    head = GreedyHead(w, pack)
    h = w[torch.randint(0, 20000, (9,), generator=g)] * 10 + torch.randn(9, 128, generator=g) * 0.3
    h[4, 7] = float("nan")
    expected = argmax_rows(linear_cpu.linear(h, pack))
    assert head.tokens(h) == expected
    assert head.rows_left_over == 1
    assert 8 <= head.exact_logits < 8 * 50


@needs_bf16_kernel
def test_greedy_head_refuses_weights_it_cannot_bound():
    w = torch.randn(100, 32)
    pack = linear_cpu.PackedWeight(w)
    with pytest.raises(ValueError, match="not the pack's"):
        GreedyHead(w[:50], pack)
    bad = w.clone()
    bad[3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        GreedyHead(bad, linear_cpu.PackedWeight(bad))


@pytest.mark.parametrize("spread", [2.0**-6, 2.0**-9, 2.0**-12])
def test_near_ties_below_bf16_precision(spread):
    """Tokens whose fp32 logits differ by about bf16's rounding error, so that the approximate
    logits often rank them wrongly: the answer stays the fp32 one only if the bound is wide enough."""
    g = torch.Generator().manual_seed(8)
    k = 256
    h = torch.randn(64, k, generator=g)
    base = torch.randn(k, generator=g)
    w = base + base.abs() * spread * torch.randn(512, k, generator=g)
    head = Head(w)
    approx_ranks_wrong = sum(a != r for a, r in zip(argmax_rows(head.approx(h)), head.reference(h)))
    tokens, _ = head.screen(h)
    assert tokens == head.reference(h)
    assert approx_ranks_wrong > 5  # the bf16 logits alone would have been wrong


def test_the_candidates_are_the_tokens_whose_interval_reaches_the_best_lower_bound():
    """The rule of the C file, recomputed in fp64: a token is computed exactly iff
    a_v + b_v >= max_u (a_u - b_u) (up to the fp32 scans' own rounding, a hair's width here)."""
    g = torch.Generator().manual_seed(9)
    k = 128
    w = torch.randn(k, generator=g) + 0.1 * torch.randn(1500, k, generator=g)  # crowded logits
    head = Head(w)
    h = torch.randn(12, k, generator=g) * torch.linspace(0.5, 20, 12).unsqueeze(1)
    _, exact = head.screen(h)
    a = head.approx(h).double()
    hp = h.to(torch.bfloat16).float()
    hn, dn, pn = (t.double().norm(dim=1, keepdim=True) for t in (h, h - hp, hp))
    b = head.bound
    c2 = dn + b.g_exact * hn + b.g_approx * pn
    terms = (1 + b.g_exact) * hn * head.dnorm.double() + c2 * head.norm.double() + b.u_bf16 * a.abs()
    bound = 1.01 * terms + b.abs_err
    lower = (a - bound).max(dim=1, keepdim=True).values
    reach = a + bound - lower
    hair = 1e-5 * (a.abs().max(dim=1, keepdim=True).values + 1)
    fewest = (reach >= hair).sum(dim=1).tolist()
    most = (reach >= -hair).sum(dim=1).tolist()
    assert all(lo <= e <= hi for lo, e, hi in zip(fewest, exact, most)), (fewest, exact, most)
    assert max(exact) > 5  # rows with real competition
