"""The agreement figures of benchmarks/bf16_agreement.py, on hand-made token lists."""

import pytest

from benchmarks.bf16_agreement import PROMPTS, agreement, cpu_model


def test_agreement_counts_the_prefix_and_every_equal_position():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    got = [[1, 2, 3, 4], [5, 0, 7, 8], [0, 9, 9, 9]]
    result = agreement(ref, got)
    assert result["prefix"] == [4, 1, 0]
    assert result["prefix_share"] == pytest.approx(5 / 12)
    assert result["position_share"] == pytest.approx(10 / 12)  # realigned after the divergence
    assert result["identical"] == 1 and result["tokens"] == 12
    assert agreement(ref, ref)["prefix_share"] == agreement(ref, ref)["position_share"] == 1.0


def test_agreement_rejects_lists_of_other_shapes():
    with pytest.raises(ValueError, match="2 reference prompts, 1 others"):
        agreement([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="prompt 0: 2 reference tokens, 1 others"):
        agreement([[1, 2]], [[1]])


def test_prompt_set_and_cpu_description():
    assert len(PROMPTS) == 16 and len(set(PROMPTS)) == 16
    assert cpu_model()
