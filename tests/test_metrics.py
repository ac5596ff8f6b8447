"""Metrics on hand-computed logits (exact up to float32 exp/log rounding, stated per test)."""

from __future__ import annotations

import math

import torch

from actpatch.engine.metrics import ioi_scores, logit_diff, normalised_effect, prob_ratio, token_prob, top1_is

# vocab of 4; row 0 prefers token 1 (IO), row 1 prefers token 2 (S)
LOGITS = torch.tensor([[0.0, 3.0, 1.0, -1.0], [0.0, 1.0, 2.5, 0.5]])
IO = torch.tensor([1, 1])
S = torch.tensor([2, 2])


def test_logit_diff_exact():
    assert torch.equal(logit_diff(LOGITS, IO, S), torch.tensor([2.0, -1.5]))


def test_logit_diff_broadcasts_over_variants():
    stacked = torch.stack([LOGITS, LOGITS.flip(-1)])  # (K=2, B=2, V)
    ld = logit_diff(stacked, IO, S)
    assert ld.shape == (2, 2)
    assert torch.equal(ld[0], torch.tensor([2.0, -1.5]))
    assert torch.equal(ld[1], torch.tensor([1.0 - 3.0, 2.5 - 1.0]))  # flipped rows: [-1, 1, 3, 0], [0.5, 2.5, 1, 0]


def test_probabilities_match_hand_softmax():
    z0 = math.exp(0) + math.exp(3) + math.exp(1) + math.exp(-1)
    expected = torch.tensor([math.exp(3) / z0, math.exp(1) / z0])
    # float32 exp/logsumexp rounding: 1e-6 relative
    torch.testing.assert_close(token_prob(LOGITS[:1].expand(2, 4), torch.tensor([1, 2])), expected, rtol=1e-6, atol=0)


def test_prob_ratio_is_exp_logit_diff():
    p_io, p_s = token_prob(LOGITS, IO), token_prob(LOGITS, S)
    # ratio of two softmax probabilities vs exp of the difference: equal up to float32 rounding (1e-6 relative)
    torch.testing.assert_close(prob_ratio(LOGITS, IO, S), p_io / p_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(prob_ratio(LOGITS, IO, S), torch.exp(torch.tensor([2.0, -1.5])), rtol=1e-6, atol=0)


def test_top1_and_scores():
    assert torch.equal(top1_is(LOGITS, IO), torch.tensor([1.0, 0.0]))
    s = ioi_scores(LOGITS, IO, S)
    assert torch.equal(s["correct"], torch.tensor([1.0, 0.0]))
    assert set(s) == {"logit_diff", "p_io", "p_s", "correct", "top1"}


def test_metrics_in_float32_even_for_half_logits():
    assert logit_diff(LOGITS.to(torch.bfloat16), IO, S).dtype == torch.float32


def test_normalised_effect_anchors():
    assert float(normalised_effect(4.0, 4.0, -2.0)) == 0.0   # unchanged
    assert float(normalised_effect(-2.0, 4.0, -2.0)) == 1.0  # donor behaviour
    assert float(normalised_effect(1.0, 4.0, -2.0)) == 0.5
