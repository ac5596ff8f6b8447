"""Metrics over answer sets and KL, against the plain formulas written out with Python floats per row.

Tolerances: the references use math.exp/math.log in float64 on the same float32 logits, so the float32
results agree to float32 rounding of a few exp/log steps; 1e-6 absolute (values are of order 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from actpatch.errors import DataError
from actpatch.engine.metrics import kl_from, logit_diff, prob_diff, set_logit_diff, set_logprob, set_logsumexp

# vocab of 5, two rows
LOGITS = torch.tensor([[0.0, 3.0, 1.0, -1.0, 2.0], [0.5, 1.0, 2.5, 0.5, -2.0]])
# row 0: answer set {1, 4}, wrong set {2}; row 1: answer set {3}, wrong set {0, 2} (padding entries point at 0)
ANSWER = torch.tensor([[1, 4], [3, 0]])
ANSWER_MASK = torch.tensor([[True, True], [True, False]])
WRONG = torch.tensor([[2, 0], [0, 2]])
WRONG_MASK = torch.tensor([[True, False], [True, True]])
SETS = {0: ([1, 4], [2]), 1: ([3], [0, 2])}


def _row(r: int) -> list[float]:
    return [float(x) for x in LOGITS[r]]


def _lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_set_logit_diff_is_the_log_ratio_of_set_probabilities():
    got = set_logit_diff(LOGITS, ANSWER, ANSWER_MASK, WRONG, WRONG_MASK)
    for r, (ans, wrong) in SETS.items():
        z = _row(r)
        probs = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        expected = math.log(sum(probs[t] for t in ans) / sum(probs[t] for t in wrong))
        assert got[r].item() == pytest.approx(expected, abs=1e-6)


def test_padding_entries_are_ignored():
    """A padding id that points at a large logit must not count: moving the padding id changes nothing."""
    other = ANSWER.clone()
    other[1, 1] = 2  # row 1's padding now points at its largest logit
    torch.testing.assert_close(set_logsumexp(LOGITS, other, ANSWER_MASK), set_logsumexp(LOGITS, ANSWER, ANSWER_MASK),
                               rtol=0, atol=0)  # the masked entry is -inf before the logsumexp: exact


def test_sets_of_one_token_equal_the_single_token_logit_diff():
    ids, mask = torch.tensor([[1], [1]]), torch.ones(2, 1, dtype=torch.bool)
    wrong = torch.tensor([[2], [2]])
    # logsumexp of one finite value returns it unchanged: exact
    torch.testing.assert_close(set_logit_diff(LOGITS, ids, mask, wrong, mask),
                               logit_diff(LOGITS, torch.tensor([1, 1]), torch.tensor([2, 2])), rtol=0, atol=0)


def test_set_logprob_and_prob_diff_match_hand_softmax():
    lp = set_logprob(LOGITS, ANSWER, ANSWER_MASK)
    pd = prob_diff(LOGITS, ANSWER, ANSWER_MASK, WRONG, WRONG_MASK)
    for r, (ans, wrong) in SETS.items():
        z = _row(r)
        assert lp[r].item() == pytest.approx(_lse([z[t] for t in ans]) - _lse(z), abs=1e-6)
        total = sum(math.exp(v) for v in z)
        expected = sum(math.exp(z[t]) for t in ans) / total - sum(math.exp(z[t]) for t in wrong) / total
        assert pd[r].item() == pytest.approx(expected, abs=1e-6)


def test_set_metrics_broadcast_over_variants():
    stacked = torch.stack([LOGITS, LOGITS.flip(-1), 2 * LOGITS])  # (K=3, B=2, V)
    got = set_logit_diff(stacked, ANSWER, ANSWER_MASK, WRONG, WRONG_MASK)
    assert got.shape == (3, 2)
    for k in range(3):  # each variant alone, row by row: the same numbers (same float32 ops per row: exact)
        torch.testing.assert_close(got[k], set_logit_diff(stacked[k], ANSWER, ANSWER_MASK, WRONG, WRONG_MASK),
                                   rtol=0, atol=0)


def test_kl_matches_the_plain_sum_and_is_zero_for_the_same_logits():
    # not a permutation of the reference's logits: for those (the flip, say) KL happens to be symmetric, and a
    # KL taken the wrong way round would pass
    other = torch.tensor([[1.0, 0.0, 2.0, 0.5, -1.0], [3.0, 0.0, 0.5, -1.0, 1.0]])
    patched = torch.stack([LOGITS, other])  # (K=2, B=2, V)
    kl = kl_from(LOGITS, patched)
    assert kl.shape == (2, 2)
    assert torch.allclose(kl[0], torch.zeros(2), atol=1e-7)  # the same distribution: rounding only
    for r in range(2):
        p = [math.exp(v - _lse(_row(r))) for v in _row(r)]
        q_logits = [float(x) for x in other[r]]
        q = [math.exp(v - _lse(q_logits)) for v in q_logits]
        expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        assert kl[1, r].item() == pytest.approx(expected, abs=1e-6)
        assert expected > 0.1  # the check compares a real divergence, not two zeros
        reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        assert abs(reverse - expected) > 1e-3  # and the two directions differ here


def test_half_precision_logits_are_computed_in_float32():
    got = set_logit_diff(LOGITS.half(), ANSWER, ANSWER_MASK, WRONG, WRONG_MASK)
    assert got.dtype == torch.float32
    # the logits themselves are exact in float16 (small multiples of 0.5): only float32 rounding, 1e-6
    torch.testing.assert_close(got, set_logit_diff(LOGITS, ANSWER, ANSWER_MASK, WRONG, WRONG_MASK), rtol=0, atol=1e-6)


def test_an_empty_set_is_a_clear_error():
    mask = ANSWER_MASK.clone()
    mask[1] = False
    with pytest.raises(DataError, match=r"rows \[1\] have an empty set"):
        set_logsumexp(LOGITS, ANSWER, mask)


def test_a_set_without_a_matching_mask_is_a_clear_error():
    with pytest.raises(DataError, match="mask of the same shape"):
        set_logsumexp(LOGITS, ANSWER, ANSWER_MASK[:, :1])


def test_task_scores_against_per_row_formulas():
    """``task_scores`` (what `actpatch run` records): every metric and companion from -1-padded sets, and KL measured
    from the recipient (KL(recipient || patched), which differs from the other direction for these rows)."""
    from actpatch.engine.metrics import task_scores

    answer = torch.where(ANSWER_MASK, ANSWER, -1)  # (B, K) ids, -1 = padding, as PairBatch.answers() gives them
    wrong = torch.where(WRONG_MASK, WRONG, -1)
    recipient = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0, 0.0]])
    for metric in ("logit_diff", "prob_diff", "logprob", "kl"):
        scores = task_scores(metric, LOGITS, answer, wrong, recipient)
        assert set(scores) == {metric, "logit_diff", "p_answer", "p_wrong"}
        for r, (a, w) in SETS.items():
            z = sum(math.exp(x) for x in _row(r))
            p_a, p_w = sum(math.exp(_row(r)[i]) for i in a) / z, sum(math.exp(_row(r)[i]) for i in w) / z
            ref = [math.exp(x) for x in recipient[r].tolist()]
            ref = [x / sum(ref) for x in ref]
            want = {"logit_diff": math.log(p_a / p_w), "prob_diff": p_a - p_w, "logprob": math.log(p_a),
                    "kl": sum(q * math.log(q / (math.exp(x) / z)) for q, x in zip(ref, _row(r)))}
            assert abs(float(scores[metric][r]) - want[metric]) < 1e-5, (metric, r)
            assert abs(float(scores["p_answer"][r]) - p_a) < 1e-6 and abs(float(scores["p_wrong"][r]) - p_w) < 1e-6
    kl = task_scores("kl", LOGITS, answer, wrong, recipient)["kl"]
    other_way = kl_from(LOGITS, recipient)
    assert (kl - other_way).abs().min() > 0.1  # the two directions differ here: the test above can tell them apart
    with pytest.raises(DataError, match="reads answer tokens, but these pairs have none"):
        task_scores("prob_diff", LOGITS, torch.full((2, 1), -1), torch.full((2, 1), -1))
