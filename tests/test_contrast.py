"""Pairs of different lengths aligned by named positions, answer sets: the engine against a one-row-at-a-time reference.

The reference (``tests/reference.py``) runs each pair alone (no padding, batch of one), finds the positions
here by decoding prefixes (not by the offsets ``substring_position`` uses), and writes donor position q into
recipient position p with plain hooks.
"""

from __future__ import annotations

import pytest
import torch

from actpatch import AttnOutSite, DataError, HeadSite, HiddenSite, PromptPair, capture, patch_variants, run_sanity_checks
from actpatch.engine.batch import tokenize_pairs
from actpatch.engine.patching import run_chunk
from actpatch.engine.planning import shared_prefix
from reference import naive_patch_end_logits, naive_patch_module

FACTS = [
    PromptPair("The Eiffel Tower is located in the city of", "The Statue of Liberty is located in the city of", " Paris",
               (" New", " London"), positions=(("subject", "Eiffel Tower", "Statue of Liberty"), ("city", "city", "city"))),
    PromptPair("The Louvre is in the city of", "The Brandenburg Gate is in the city of", (" Paris", " France"),
               " Berlin", positions=(("subject", "Louvre", "Brandenburg Gate"), ("city", "city", "city"))),
]
# every row shares "A B C" with its donor: the named position "b" reads the donor at another index inside it
PREFIXED = [
    PromptPair("A B C D x", "A B C y z w", " Paris", " Rome", positions=(("b", "B", "C"), ("a", "A", "A"))),
    PromptPair("A B C D x y", "A B C z", " Paris", " Rome", positions=(("b", "B", "C"), ("a", "A", "A"))),
]


def _index(tok, prompt: str, sub: str) -> int:
    """The first token whose prefix decodes to text containing ``sub`` (prefix decoding, not offsets)."""
    ids = tok(prompt)["input_ids"]
    return next(i for i in range(len(ids)) if sub in tok.decode(ids[: i + 1]))


def _expected(tok, pair: PromptPair, name: str) -> tuple[int, int]:
    if name == "END":
        return len(tok(pair.recipient)["input_ids"]) - 1, len(tok(pair.donor)["input_ids"]) - 1
    _, rec_sub, don_sub = next(p for p in pair.positions if p[0] == name)
    return _index(tok, pair.recipient, rec_sub), _index(tok, pair.donor, don_sub)


def test_positions_and_answer_sets_are_tokenized_per_side(gpt2_tokenizer):
    tok = gpt2_tokenizer
    batch = tokenize_pairs(tok, FACTS)
    for name in ("subject", "city", "END"):
        for b, pair in enumerate(FACTS):
            assert (int(batch.position(name)[b]), int(batch.donor_position(name)[b])) == _expected(tok, pair, name)
    assert batch.unequal_rows() == [0, 1]
    answers, wrong = batch.answers()
    assert answers.tolist() == [[tok.encode(" Paris")[0], -1], [tok.encode(" Paris")[0], tok.encode(" France")[0]]]
    assert wrong.tolist() == [[tok.encode(" New")[0], tok.encode(" London")[0]], [tok.encode(" Berlin")[0], -1]]
    assert batch.trim().donor_ids.shape[1] == max(len(tok(p.donor)["input_ids"]) for p in FACTS)


@pytest.mark.parametrize("pairs", [FACTS, PREFIXED], ids=["facts", "shared-prefix"])
def test_named_position_patches_match_one_pair_at_a_time(tiny_lm, gpt2_tokenizer, pairs):
    """Hidden states and heads at named positions and END: the batched fast path (prefix reuse, stacked variants)
    and the plain path both equal each pair patched alone, to 1e-4 (float32; padding and batch shape change the
    summation order)."""
    tok, a = gpt2_tokenizer, tiny_lm.adapter
    batch = tokenize_pairs(tok, pairs)
    if pairs is PREFIXED:
        assert shared_prefix(batch) == 3  # the reuse skips "A B C", yet "b" must be written at 1 from donor 2
    names = [p[0] for p in pairs[0].positions] + ["END"]
    variants = [[HiddenSite(L, n)] for L in range(a.n_layers) for n in names]
    variants += [[HeadSite(L, (1, 2), n)] for L in range(a.n_layers) for n in names]
    variants += [[HeadSite(L, None, "END")] for L in range(a.n_layers)]
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, [HiddenSite(L) for L in range(a.n_layers)] +
                       [HeadSite(L) for L in range(a.n_layers)])
    fast = patch_variants(tiny_lm, batch, donor, variants, reduce=lambda lg: {"logits": lg}, donor_from_batch=True,
                          max_rows=3)["logits"]  # (K, B, V)
    plain = torch.stack([run_chunk(tiny_lm, batch, donor, [v])[0] for v in variants])  # no prefix reuse
    changed = 0
    for k, (site,) in enumerate(variants):
        for b, pair in enumerate(pairs):
            p, q = _expected(tok, pair, site.pos)
            kind = "hidden" if site.kind == "hidden" else "heads"
            head = getattr(site, "head", None)
            heads = list(range(a.n_heads)) if head is None else list(head)
            want = naive_patch_end_logits(tiny_lm.model, tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"],
                                          kind, site.layer, heads, [(p, q)], a.d_head)
            assert torch.allclose(fast[k, b], want, atol=1e-4), (site, b)
            assert torch.allclose(plain[k, b], want, atol=1e-4), (site, b)
            unpatched = naive_patch_end_logits(tiny_lm.model, tok(pair.recipient)["input_ids"],
                                               tok(pair.donor)["input_ids"], kind, site.layer, heads, [], a.d_head)
            changed += int(not torch.allclose(want, unpatched, atol=1e-4))
    assert changed > len(variants)  # the patches do something: a no-op engine could not pass


def test_all_positions_on_pairs_of_different_lengths_names_the_pair(tiny_lm, gpt2_tokenizer):
    batch = tokenize_pairs(gpt2_tokenizer, FACTS)
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, [HiddenSite(0)])
    with pytest.raises(DataError, match=r"all positions.*pair 0 \('The Eiffel Tower.*11 tokens.*10 tokens.*differs \(2 such"):
        run_chunk(tiny_lm, batch, donor, [[HiddenSite(0)]])


def test_runtime_checks_pass_on_pairs_of_different_lengths(tiny_lm, gpt2_tokenizer):
    batch = tokenize_pairs(gpt2_tokenizer, FACTS + PREFIXED)
    sites = [HeadSite(L) for L in range(3)] + [HiddenSite(L) for L in range(3)] + [AttnOutSite(L) for L in range(3)]
    rec, rec_logits = capture(tiny_lm, batch.recipient_ids, batch, sites)
    don, don_logits = capture(tiny_lm, batch.donor_ids, batch, sites)
    checks = {c.name: c for c in run_sanity_checks(tiny_lm, batch, rec, don, rec_logits, don_logits, [0, 1, 2])}
    assert all(c.passed for c in checks.values()), [c.detail for c in checks.values() if not c.passed]
    assert "pairs of different lengths" in checks["hidden_patch_reproduces_donor"].detail


@pytest.mark.parametrize("bad, message", [
    (PromptPair("The Louvre is in", "The Colosseum is in", " Paris", " Rome", positions=(("s", "Eiffel", "Colosseum"),)),
     r"pair 0, position 's'.*'Eiffel' to occur"),
    (PromptPair("The Louvre is in", "The Colosseum is in", " Paris", " Paris"), r"share the token.*' Paris'"),
    (PromptPair("The Louvre is in Par", "The Colosseum is in Par", "is", " Rome"), r"merges with the prompt's last token"),
    (PromptPair("The Louvre is in", "The Colosseum is in", None, " Rome"), r"expected an answer and a wrong token"),
])
def test_bad_pairs_are_refused_with_the_reason(gpt2_tokenizer, bad, message):
    with pytest.raises(DataError, match=message):
        tokenize_pairs(gpt2_tokenizer, [bad])


def _qkv_module_and_cols(model, which: str, layer: int, head: int, d_head: int, n_heads: int):
    """Written out per family: Llama's separate q/k/v projections; GPT-2's fused c_attn = [q | k | v]."""
    if model.config.model_type == "gpt2":
        block = "qkv".index(which) * n_heads + head
        return model.transformer.h[layer].attn.c_attn, slice(block * d_head, (block + 1) * d_head)
    proj = getattr(model.model.layers[layer].self_attn, f"{which}_proj")
    return proj, slice(head * d_head, (head + 1) * d_head)


def test_embedding_and_qkv_sites_match_one_pair_at_a_time(tiny_lm, gpt2_tokenizer):
    """The residual stream before layer 0 and per-head q, k, v (the llama model has 2 KV heads for 4 query heads:
    a k or v head is a KV group) at named positions of pairs of different lengths, to 1e-4 (float32)."""
    from actpatch.engine.sites import EmbedSite, QKVSite

    tok, a, model = gpt2_tokenizer, tiny_lm.adapter, tiny_lm.model
    batch = tokenize_pairs(tok, FACTS)
    n_kv = a.n_kv_heads
    variants = [[EmbedSite("subject")], [EmbedSite("END")]]
    variants += [[QKVSite(L, w, h, pos)] for L in (0, 2) for w in "qkv" for h in range(a.n_heads if w == "q" else n_kv)
                 for pos in ("subject", "END")]
    sites = [v[0] for v in variants]
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, sites)
    fast = patch_variants(tiny_lm, batch, donor, variants, reduce=lambda lg: {"logits": lg}, donor_from_batch=True)["logits"]
    for k, site in enumerate(sites):
        if isinstance(site, EmbedSite):
            module, pre, cols = model.get_decoder().layers[0] if hasattr(model, "model") else model.transformer.h[0], True, slice(None)
        else:
            (module, cols), pre = _qkv_module_and_cols(model, site.which, site.layer, site.head, a.d_head, a.n_heads), False
        for b, pair in enumerate(FACTS):
            p, q = _expected(tok, pair, site.pos)
            want = naive_patch_module(model, tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"], module, pre,
                                      cols, [(p, q)])
            assert torch.allclose(fast[k, b], want, atol=1e-4), (site, b)
    if tiny_lm.model.config.model_type == "llama":
        assert n_kv == 2 and QKVSite(1, "k", 1).kv_group(a) == (2, 3)


def test_patch_writes_exactly_covers_qkv_and_embedding_sites(tiny_lm, gpt2_tokenizer, monkeypatch):
    """The runtime check observes q, k, v and embedding patches too, and catches a q/k/v write one head off."""
    from actpatch.engine.sites import EmbedSite, QKVSite
    from actpatch.engine.sanity import check_patch_writes_exactly

    batch = tokenize_pairs(gpt2_tokenizer, FACTS)
    sites = [QKVSite(L, w, 0) for L in range(3) for w in "qkv"] + [EmbedSite()]
    sites += [HeadSite(L) for L in range(3)] + [HiddenSite(L) for L in range(3)]
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, sites)
    check = check_patch_writes_exactly(tiny_lm, batch, donor, [0, 1, 2])
    # one head, hidden state, all heads, two heads, q, k, v, embeddings; at END and "subject"
    assert check.passed and "8 kinds x 3 positions" in check.detail, check.detail
    d_head = tiny_lm.adapter.d_head
    original = QKVSite.columns
    swap = lambda self, a: tuple(c + (d_head if self.head % 2 == 0 else -d_head) for c in original(self, a))  # noqa: E731
    monkeypatch.setattr(QKVSite, "columns", swap)  # head h's columns -> head h ^ 1's
    assert not check_patch_writes_exactly(tiny_lm, batch, donor, [0, 1, 2]).passed
