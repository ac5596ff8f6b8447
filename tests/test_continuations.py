"""Answers of several tokens: the tokenization rule, the teacher-forced metric under a patch, generation.

The fast path (``engine.continuation``: the patched prompt computed once, continuation rows against its keys and
values) is compared with a plain reference written here: each pair alone (a batch of one, no padding), prompt +
continuation in one forward, the donor's activation copied at explicit prompt positions by a plain hook, and the
log-probs summed by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from actpatch import DataError, HeadSite, HiddenSite, PromptPair, capture, generate_patched, patch_variants
from actpatch.engine.batch import continuation_ids, tokenize_pairs
from actpatch.engine.continuation import plain_readout
from actpatch.engine.continuation_checks import check_continuation_self_patch
from actpatch.engine.metrics import continuation_scores, task_scores
from actpatch.experiment.contrast import run_pairs
from reference import naive_patch_cont_logits

MULTI = [
    PromptPair("The Getty Center is a museum in the city of", "The Space Needle is in the city of", " Los Angeles",
               " Seattle", positions=(("subject", "Getty Center", "Space Needle"),)),
    PromptPair("The Mona Lisa was painted by", "The Starry Night was painted by the artist", " Leonardo da Vinci",
               (" Vincent van Gogh", " Picasso"), positions=(("subject", "Mona Lisa", "Starry Night"),)),
    PromptPair("The Golden Gate Bridge is in", "The Eiffel Tower is in", (" San Francisco", " California"),
               " Paris", positions=(("subject", "Golden Gate Bridge", "Eiffel Tower"),)),
]
SINGLE = [
    PromptPair("When Mary and John went to the store, John gave a drink to",
               "When Mary and John went to the store, Mary gave a drink to", " Mary", " John",
               positions=(("s2", "John gave", "Mary gave"),)),
    PromptPair("The Louvre is in the city of", "The Brandenburg Gate is in the city of", (" Paris", " France"), " Berlin",
               positions=(("s2", "Louvre", "Brandenburg Gate"),)),
]


def test_tokenization_rule(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert [tok.decode([t]) for t in continuation_ids(tok, "The Getty Center is in", " Los Angeles")] == [" Los", " Angeles"]
    assert continuation_ids(tok, "I like ca", "ts") is None  # " ca" + "ts" merge into " cats": the prompt changes
    assert continuation_ids(tok, "The city of", "") == []
    batch = tokenize_pairs(tok, MULTI)
    assert batch.cont_ids.shape == (3, 3, 4)  # 3 pairs, at most 3 continuations, " Leonardo da Vinci" is 4 tokens
    assert batch.cont_side.tolist() == [[1, -1, 0], [1, -1, -1], [1, 1, -1]]
    assert batch.cont_ids[1, 0].tolist() == tok.encode(" Leonardo da Vinci")
    assert batch.cont_ids[0, 1].tolist() == tok.encode(" Seattle") + [-1] * (4 - len(tok.encode(" Seattle")))
    assert tokenize_pairs(tok, SINGLE).cont_ids is None  # one-token answers: the END path, as before
    bad = {"merge": PromptPair("I like ca", "I like do", "ts", " dogs"),
           "empty": PromptPair("The city of", "The town of", "", " Rome"),
           "same": PromptPair("The city of", "The town of", " New York", (" Rome", " New York")),
           "donor merge": PromptPair("I like do", "I like ca", " dogs", "ts")}
    for name, pair in bad.items():
        with pytest.raises(DataError, match="pair 1"):
            tokenize_pairs(tok, [MULTI[0], pair])
    with pytest.raises(DataError, match="exactly one token"):  # the tasks whose metric is the END logit difference
        tokenize_pairs(tok, MULTI, single_token=True)


def test_cli_refuses_a_boundary_merge_in_one_line(tmp_path, gpt2_dir):
    from actpatch.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"recipient": "I like ca", "donor": "I like do", "answer": "ts", "wrong": " dogs"}) + "\n")
    rc = main(["run", "--pairs-file", str(pairs), "--model", str(gpt2_dir), "--out", str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out").exists()


def _plain(lm, batch, pair_i, variant_site, cont):
    """log P(cont | recipient) and per-position log-softmax under one site, one pair alone (see the module doc)."""
    a, tok = lm.adapter, lm.tokenizer
    pair = batch.pairs[pair_i]
    rec, don = tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"]
    pos = variant_site.pos
    if pos == "END":
        writes = [(len(rec) - 1, len(don) - 1)]
    else:
        writes = [(int(batch.positions[pos][pair_i]), int(batch.side_positions("donor")[pos][pair_i]))]
    if isinstance(variant_site, HiddenSite):
        module, pre, cols = a.block(variant_site.layer), False, slice(None)
    else:
        h = variant_site.head
        module, pre = a.attn_out(variant_site.layer), True
        cols = slice(None) if h is None else slice(h * a.d_head, (h + 1) * a.d_head)
    logits = naive_patch_cont_logits(lm.model, rec, don, module, pre, cols, writes, cont)
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(rec) - 1 + i, t]) for i, t in enumerate(cont)), logp[len(rec) - 1:]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_fast_path_matches_a_plain_reference(tiny_lm, reduce):
    """Pairs of different lengths, named positions, answer sets of several tokens: every metric of the fast path
    equals log-probs summed by hand over one-pair forwards. Tolerance 1e-4: float32, other batch shapes."""
    lm = tiny_lm
    batch = tokenize_pairs(lm.tokenizer, MULTI)
    variants = [[HiddenSite(0, "subject")], [HeadSite(1, 2, "END")], [HeadSite(0, None, "subject")], [HiddenSite(1, "END")]]
    donor, _ = capture(lm, batch.donor_ids, batch, [v[0] for v in variants])
    rec_end = plain_readout(lm, batch).end
    got = {}
    for metric in ("logprob", "logit_diff", "prob_diff"):
        got[metric] = patch_variants(lm, batch, donor, variants, donor_from_batch=True, reduce=lambda ro, m=metric: continuation_scores(
            m, ro.end, ro.tail, batch.cont_ids, batch.cont_side, reduce))[metric]
    kl = patch_variants(lm, batch, donor, variants, tail_kl=True, reduce=lambda ro: continuation_scores(
        "kl", ro.end, ro.tail, batch.cont_ids, batch.cont_side, reduce, rec_end, ro.tail_kl, "continuation"))["kl"]
    for k, (site,) in enumerate(variants):
        for b, pair in enumerate(MULTI):
            answers = [pair.answer] if isinstance(pair.answer, str) else list(pair.answer)
            wrongs = [pair.wrong] if isinstance(pair.wrong, str) else list(pair.wrong)
            lp = {}
            for text in answers + wrongs:
                cont = lm.tokenizer.encode(text)
                total, logp = _plain(lm, batch, b, site, cont)
                lp[text] = (total / len(cont) if reduce == "mean" else total, logp, cont)
            la = math.log(sum(math.exp(lp[t][0]) for t in answers))
            lw = math.log(sum(math.exp(lp[t][0]) for t in wrongs))
            assert got["logprob"][k, b] == pytest.approx(la, abs=1e-4)
            assert got["logit_diff"][k, b] == pytest.approx(la - lw, abs=1e-4)
            assert got["prob_diff"][k, b] == pytest.approx(math.exp(la) - math.exp(lw), abs=1e-4)
            # KL over the first answer's positions, from the unpatched recipient (plain forward, no hook)
            cont = lp[answers[0]][2]
            ids = lm.tokenizer(pair.recipient)["input_ids"] + cont[:-1]
            with torch.no_grad():
                ref = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            start = len(ids) - len(cont)
            patched = lp[answers[0]][1]
            want = sum(float((ref[start + i].exp() * (ref[start + i] - patched[i])).sum()) for i in range(len(cont)))
            assert kl[k, b] == pytest.approx(want / len(cont), abs=1e-4)


def test_single_token_answers_equal_the_end_path(tiny_lm):
    """The continuation path on one-token answers gives today's END numbers (float tolerance 1e-5)."""
    lm = tiny_lm
    end_batch = tokenize_pairs(lm.tokenizer, SINGLE)
    cont_batch = tokenize_pairs(lm.tokenizer, SINGLE, continuations=True)
    assert end_batch.cont_ids is None and cont_batch.cont_ids.shape[2] == 1
    variants = [[HiddenSite(L, p)] for L in range(2) for p in ("s2", "END")] + [[HeadSite(1, 0, "s2")]]
    donor, _ = capture(lm, end_batch.donor_ids, end_batch, [v[0] for v in variants])
    a, w = end_batch.answers()
    for metric in ("logit_diff", "logprob", "prob_diff"):
        old = patch_variants(lm, end_batch, donor, variants, lambda lg, m=metric: task_scores(m, lg, a, w))[metric]
        new = patch_variants(lm, cont_batch, donor, variants, lambda ro, m=metric: continuation_scores(
            m, ro.end, ro.tail, cont_batch.cont_ids, cont_batch.cont_side))[metric]
        assert torch.allclose(old, new, atol=1e-5), (metric, (old - new).abs().max())


def test_identity_patch_keeps_every_continuation(tiny_lm):
    lm = tiny_lm
    batch = tokenize_pairs(lm.tokenizer, MULTI)
    sites = [HeadSite(L) for L in range(2)] + [HiddenSite(L) for L in range(2)]
    rec_cache, _ = capture(lm, batch.recipient_ids, batch, sites)
    check = check_continuation_self_patch(lm, batch, rec_cache, plain_readout(lm, batch), [0, 1])
    assert check.passed and check.max_abs_diff <= 1e-4, check.detail


def test_generate_patched_matches_a_plain_loop(tiny_lm):
    """Greedy tokens under a patch equal a loop of full forwards with the donor written at the prompt's END only."""
    lm, tok = tiny_lm, tiny_lm.tokenizer
    site = HiddenSite(0, "END")
    got = generate_patched(lm, MULTI[:2], [site], 5, decode=False)
    for b, pair in enumerate(MULTI[:2]):
        rec, don = tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"]
        ids = list(rec)
        for _ in range(5):
            logits = naive_patch_cont_logits(lm.model, rec, don, lm.adapter.block(0), False, slice(None),
                                             [(len(rec) - 1, len(don) - 1)], ids[len(rec):] + [0])
            ids.append(int(logits[-1].argmax()))
        assert got[b] == ids[len(rec):]
    assert generate_patched(lm, MULTI[:1], [], 3) == [tok.decode(t) for t in generate_patched(lm, MULTI[:1], [], 3, decode=False)]


def test_run_pairs_with_multi_token_answers_on_the_bundled_model(lm, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"recipient": p.recipient, "donor": p.donor, "answer": p.answer,
                                         "wrong": p.wrong, "positions": {n: [r, d] for n, r, d in p.positions}}) + "\n"
                             for p in MULTI[:2]))
    result = run_pairs(lm=lm, pairs_file=str(pairs), sites=("hidden",), layers=(0, 29), positions=("subject", "END"),
                       progress=False, generate=3)
    assert result.passed, {n: c["detail"] for n, c in result.sanity.items() if not c["passed"]}
    assert "continuation_self_patch_identity" in result.sanity
    assert result.baseline["n_multi_token"] == 2
    assert result.baseline["recipient"]["mean_logit_diff"] > 0  # the model knows Los Angeles and Leonardo da Vinci
    assert len(result.cells) == 4 and len(result.generations) == 2 * 3
    assert all(g["recipient_says"] for g in result.generations)
