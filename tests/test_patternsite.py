"""Pattern and values sites against an independent reference: one full forward per patch, in which the model's
own eager attention function is wrapped (monkeypatched on a fresh copy of the model) so that, at one layer, one
head's weights (or values) are replaced by the donor's at explicit indices, and its output recomputed from them.

It shares nothing with the engine's route (hooks on the attention module's result, the v projection and the
output projection's input, the position map, the head-site write). Models run in float64: differences are
rounding. Tiny GPT-2, Llama with grouped-query attention (4 query heads, 2 KV heads) and Gemma 3 (layer 0 slides
over a window of 4 tokens: pairs of different lengths can be mapped there, and only there).
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_model

from actpatch import HiddenSite, PromptPair, RecipientState, capture, count_hooks, run_chunk, tokenize_pairs, wrap_model
from actpatch.engine.planning import shared_prefix
from actpatch.engine.patternsite import PatternSite
from actpatch.errors import SiteError

EQUAL = [
    PromptPair("When Mary and John went to the store, John gave a drink to",
               "When Mary and John went to the store, Mary gave a drink to", " Mary", " John",
               positions=(("S2", "John gave", "Mary gave"),)),
    PromptPair("When Anna and Paul went to the park, Paul gave a book to",
               "When Paul and Anna went to the park, Anna gave a book to", " Anna", " Paul",
               positions=(("S2", "Paul gave", "Anna gave"),)),
]
UNEQUAL = [  # the donor has one more token (" big"); the last 8 tokens align, one of them (the object) differs
    PromptPair("When Mary and John went to the store, John gave a drink to the",
               "When Mary and John went to the big store, John gave a book to the", " girl", " boy",
               positions=(("gave", "John gave", "John gave"), ("a", "gave a", "gave a"), ("object", "a drink", "a book"))),
]
SUFFIX = 8  # " store, John gave a drink to the": named positions and the shared suffix " to the" pair them


def _reference(model, rec: list[int], don: list[int], L: int, h: int, part: str, rows, keys) -> torch.Tensor:
    """Recipient logits (T, V) with head (L, h)'s weights (part "pattern") or values ("values") swapped in.

    ``rows``: [(recipient query row, donor query row)]; ``keys``: {donor key: recipient key}, explicit."""
    mod = sys.modules[type(model).__module__]
    orig = mod.eager_attention_forward
    seen, mode = {}, {"side": "donor"}

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        out, w = orig(module, query, key, value, attention_mask, *args, **kwargs)  # (1, T, H, Dh), (1, H, T, T)
        if module.layer_idx != L:
            return out, w
        G = query.shape[1] // value.shape[1]
        v = value[0, h // G]  # (T, Dh): the KV head that query head h reads
        if mode["side"] == "donor":
            seen.update(w=w[0, h].clone(), v=v.clone())
            return out, w
        out, w_h, v_h = out.clone(), w[0, h].clone(), v.clone()
        if part == "pattern":
            for qr, qd in rows:
                w_h[qr] = 0
                for kd, kr in keys.items():
                    w_h[qr, kr] = seen["w"][qd, kd]
        else:
            for kd, kr in keys.items():
                v_h[kr] = seen["v"][kd]
        for qr, _ in rows:
            out[0, qr, h] = w_h[qr] @ v_h
        return out, w

    mod.eager_attention_forward = wrapped
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([don]))
            if part == "pattern":  # the mapped keys must hold all of the donor rows' weight
                for _, qd in rows:
                    # Llama's and Gemma's eager softmax runs in float32 even in a float64 model
                    assert float(seen["w"][qd, list(keys)].sum()) == pytest.approx(1.0, abs=1e-6)
            mode["side"] = "recipient"
            return model(input_ids=torch.tensor([rec])).logits[0]
    finally:
        mod.eager_attention_forward = orig


def _sharp(family: str):
    """A tiny float64 model whose attention is peaked (queries scaled by 8): random tiny models attend almost
    uniformly, so swapping a pattern would hardly move the logits and a no-op would pass a loose comparison."""
    model = tiny_model(family).to(torch.float64)
    D = model.config.hidden_size
    with torch.no_grad():
        for block in (model.transformer.h if family == "gpt2" else model.model.layers):
            if family == "gpt2":
                block.attn.c_attn.weight[:, :D] *= 8  # Conv1D (D, 3D): the first D output columns are q
                block.attn.c_attn.bias[:D] *= 8
            elif family == "gemma3":  # q_norm follows q_proj; Gemma's norms scale by (1 + w)
                block.self_attn.q_norm.weight.copy_(8 * (1 + block.self_attn.q_norm.weight) - 1)
            else:
                block.self_attn.q_proj.weight *= 8
    return model


def _engine(lm, batch, variants):
    """END logits (K, B, V) in the model's dtype, by the fast path: prefix reuse from the recorded recipient."""
    donor, _ = capture(lm, batch.donor_ids, batch, [s for v in variants for s in v])
    state = RecipientState.record(lm, batch)
    return run_chunk(lm, batch, donor, variants, state, shared=shared_prefix(batch))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_pattern_and_values_sites_match_a_plain_reference(family, gpt2_tokenizer):
    """END logits under pattern and values patches at END, at a named position (S2) and at every position, on two
    layers and two heads (under GQA one head of each KV group): equal to the reference (float64)."""
    model, ref_model = _sharp(family), _sharp(family)
    lm, tok = wrap_model(model, gpt2_tokenizer), gpt2_tokenizer
    batch = tokenize_pairs(tok, EQUAL)
    clean, moved = _engine(lm, batch, [[]])[0], {}  # (B, V)
    sites = [PatternSite(L, h, pos, part) for L, h in ((0, 1), (1, 2)) for pos in ("END", "S2", None)
             for part in ("pattern", "values")]
    got = _engine(lm, batch, [[s] for s in sites])  # (K, B, V)
    for b, pair in enumerate(EQUAL):
        rec, don = tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"]
        n, s2 = len(rec), int(batch.position("S2")[b])
        for k, s in enumerate(sites):
            rows = {"END": [(n - 1, n - 1)], "S2": [(s2, s2)], None: [(q, q) for q in range(n)]}[s.pos]
            want = _reference(ref_model, rec, don, s.layer, s.head, s.part, rows, {t: t for t in range(n)})[n - 1]
            # float64: the engine sums A @ V in its own order, over a padded batch
            torch.testing.assert_close(got[k, b], want, rtol=0, atol=1e-9, msg=f"{family} {s} pair {b}")
            key = (s.layer, s.part)
            moved[key] = max(moved.get(key, 0.0), float((want - clean[b]).abs().max()))
    # every layer's pattern and values patches move the logits by over 100x the tolerance somewhere, so the
    # comparison above is not between no-ops (Gemma 3's layer 0 at END is one: its window of 4 holds no change)
    assert min(moved.values()) > 1e-7, moved
    assert count_hooks(model) == 0


@pytest.mark.parametrize("part", ["pattern", "values"])
def test_pairs_of_different_lengths_map_the_shared_suffix(part, gpt2_tokenizer):
    """Gemma 3's sliding layer: END attends only to its last few tokens, paired by the shared suffix and named
    positions (donor position t is recipient position t - 1 there; one of them is another word). Written there,
    equal to the reference with that map written out; the full-attention layer is refused (" big" is unpaired)."""
    model, ref_model = _sharp("gemma3"), _sharp("gemma3")
    lm, tok = wrap_model(model, gpt2_tokenizer), gpt2_tokenizer
    batch = tokenize_pairs(tok, UNEQUAL)
    rec, don = tok(UNEQUAL[0].recipient)["input_ids"], tok(UNEQUAL[0].donor)["input_ids"]
    nr, nd = len(rec), len(don)
    assert nd == nr + 1 and rec[-2:] == don[-2:] and rec[-3] != don[-3] and rec[-SUFFIX - 1] != don[-SUFFIX - 1]
    keys = {kd: kd - 1 for kd in range(nd - SUFFIX, nd)}
    got = _engine(lm, batch, [[PatternSite(0, 3, "END", part)]])[0, 0]
    want = _reference(ref_model, rec, don, 0, 3, part, [(nr - 1, nd - 1)], keys)[nr - 1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)  # float64 rounding
    assert float((want - _engine(lm, batch, [[]])[0, 0]).abs().max()) > 1e-7  # over 100x the tolerance
    with pytest.raises(SiteError, match="cannot be written on pair 0"):
        _engine(lm, batch, [[PatternSite(1, 0, "END", part)]])
    assert count_hooks(model) == 0


def test_a_heads_own_pattern_changes_nothing(gpt2_tokenizer):
    """Donor == recipient: every pattern and values patch gives the unpatched logits (1e-9, float64)."""
    lm = wrap_model(_sharp("llama"), gpt2_tokenizer)
    same = [PromptPair(p.recipient, p.recipient, p.answer, p.wrong, positions=((p.positions[0][0],) + (p.positions[0][1],) * 2,))
            for p in EQUAL]
    batch = tokenize_pairs(gpt2_tokenizer, same)
    variants = [[PatternSite(L, h, pos, part)] for L in range(3) for h in (0, 3) for pos in (None, "S2")
                for part in ("pattern", "values")]
    got = _engine(lm, batch, variants)
    clean = _engine(lm, batch, [[]])
    torch.testing.assert_close(got, clean.expand_as(got), rtol=0, atol=1e-9)


def test_pattern_sites_refuse_what_they_cannot_do(gpt2_tokenizer):
    lm = wrap_model(tiny_model("gpt2"), gpt2_tokenizer)
    batch = tokenize_pairs(gpt2_tokenizer, EQUAL)
    with pytest.raises(SiteError, match="unpatched values"):
        _engine(lm, batch, [[HiddenSite(0), PatternSite(1, 0, "END")]])
    with pytest.raises(SiteError, match="part must be"):
        _engine(lm, batch, [[PatternSite(1, 0, "END", "keys")]])
    with pytest.raises(SiteError, match="head must be"):
        _engine(lm, batch, [[PatternSite(1, 9, "END")]])
    with pytest.raises(SiteError, match="donor's ids"):
        capture(lm, batch.recipient_ids, batch, [PatternSite(1, 0)])
    assert count_hooks(lm.model) == 0


def test_a_key_paired_after_its_query_row_is_refused(gpt2_tokenizer):
    """A named position may pair a donor key before the query with a recipient token after it: writing that
    weight would let the recipient's row read its own future. Gemma 3's window (4) at "gave" holds " store", ",",
    " John" and " gave", all paired by name; " John" is paired with the recipient's " drink", later than "gave"."""
    lm = wrap_model(_sharp("gemma3"), gpt2_tokenizer)
    pair = PromptPair(UNEQUAL[0].recipient, UNEQUAL[0].donor, " girl", " boy", positions=(
        ("gave", "John gave", "John gave"), ("comma", "store,", "store,"), ("store", "the store", "big store"),
        ("x", "a drink", "store, John")))
    batch = tokenize_pairs(gpt2_tokenizer, [pair])
    with pytest.raises(SiteError, match="cannot be written on pair 0"):
        _engine(lm, batch, [[PatternSite(0, 2, "gave")]])
    ok = PromptPair(pair.recipient, pair.donor, " girl", " boy", positions=pair.positions[:3] + (
        ("x", "store, John", "store, John"),))  # the same window, paired in order: written
    _engine(lm, tokenize_pairs(gpt2_tokenizer, [ok]), [[PatternSite(0, 2, "gave")]])
