"""actpatch.patterns: attention patterns read from the attention modules, against independent references.

- tiny GPT-2: by hand from the q/k projections (c_attn's output, split by hand), softmax over the causal row;
- tiny Llama (grouped-query attention) and Gemma 3 (a sliding window of 4, shorter than the prompts): the
  model's own ``output_attentions=True`` on a fresh copy of the model, one pair at a time (no padding).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from actpatch import AttentionPatterns, HeadSite, PromptPair, count_hooks, patterns, tokenize_pairs, wrap_model
from actpatch.errors import SiteError, UnsupportedArchitectureError

PAIRS = [  # different lengths: the second row is padded
    PromptPair("When Mary and John went to the store, John gave a drink to",
               "When Mary and John went to the store, Mary gave a drink to", " Mary", " John",
               positions=(("S2", "John gave", "Mary gave"),)),
    PromptPair("When Anna and Paul left, Paul gave a book to", "When Anna and Paul left, Anna gave a book to",
               " Anna", " Paul", positions=(("S2", "Paul gave", "Anna gave"),)),
]


def _gpt2_by_hand(model, ids: list[int], layer: int, head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) with the causal mask, q and k cut from c_attn's output by hand."""
    block, seen = model.transformer.h[layer], {}
    handle = block.attn.c_attn.register_forward_hook(lambda m, a, out: seen.update(qkv=out[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    D, H = model.config.n_embd, model.config.n_head
    dh = D // H
    q = seen["qkv"][:, head * dh:(head + 1) * dh]  # (n, dh): q is the first D features, head-major
    k = seen["qkv"][:, D + head * dh:D + (head + 1) * dh]
    scores = q @ k.T / math.sqrt(dh)  # (n, n)
    n = len(ids)
    scores = scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    return torch.softmax(scores, -1)


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return wrap_model(tiny_model("gpt2"), gpt2_tokenizer)


def test_gpt2_patterns_match_a_by_hand_softmax(gpt2, gpt2_tokenizer):
    """Every head of every layer, both pairs (one padded). Tolerance 1e-5: float32, two matmul orders."""
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    pats = patterns(gpt2, batch)
    assert pats.weights.shape[:2] == (3 * 4, 2)
    for b, pair in enumerate(PAIRS):
        ids = gpt2_tokenizer(pair.recipient)["input_ids"]
        assert len(pats.tokens[b]) == len(ids)
        for L in range(3):
            for h in range(4):
                torch.testing.assert_close(pats.pattern(L, h, b), _gpt2_by_hand(gpt2.model, ids, L, h), rtol=0, atol=1e-5)
    assert count_hooks(gpt2.model) == 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_patterns_match_the_models_own_attentions(family, gpt2_tokenizer):
    """GQA (4 query heads on 2 KV heads) and a sliding window: each head equals output_attentions of a fresh copy,
    one pair at a time. Tolerance 1e-6: float32, the same kernels on another batch shape."""
    lm = wrap_model(tiny_model(family), gpt2_tokenizer)
    ref_model = tiny_model(family)  # output_attentions may leave hooks behind: never on the model under test
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
    pats = patterns(lm, batch, heads)
    for b, pair in enumerate(PAIRS):
        ids = torch.tensor([gpt2_tokenizer(pair.recipient)["input_ids"]])
        with torch.no_grad():
            att = ref_model(input_ids=ids, output_attentions=True).attentions  # per layer (1, H, n, n)
        for L, h in heads:
            torch.testing.assert_close(pats.pattern(L, h, b), att[L][0, h], rtol=0, atol=1e-6)
    if family == "gemma3":  # layer 0 slides: a query 5 tokens after a key never sees it
        assert float(pats.pattern(0, 0, 0)[10, :6].sum()) == 0.0
    assert count_hooks(lm.model) == 0


def test_patterns_are_distributions_and_name_their_positions(gpt2, gpt2_tokenizer, tmp_path):
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    pats = patterns(gpt2, batch, [HeadSite(1, 2), (2, 0)])
    for b in range(2):
        p = pats.pattern(1, 2, b)
        torch.testing.assert_close(p.sum(-1), torch.ones(len(p)), rtol=0, atol=1e-5)  # float32 sums
        assert float(torch.triu(p, 1).abs().max()) == 0.0  # no query sees a later key
    end, s2 = batch.position("END"), batch.position("S2")
    want = torch.stack([pats.pattern(L, h, b)[int(end[b]), int(s2[b])] for L, h in pats.heads for b in range(2)])
    assert torch.equal(pats.between("END", "S2").flatten(), want)
    df = pats.to_dataframe()
    n0, n1 = (len(t) for t in pats.tokens)
    assert len(df) == 2 * (n0 * (n0 + 1) // 2 + n1 * (n1 + 1) // 2)
    row = df[(df["layer"] == 2) & (df["head"] == 0) & (df["pair"] == 1) & (df["query"] == n1 - 1) & (df["key"] == 0)]
    assert float(row.weight.iloc[0]) == pytest.approx(float(pats.pattern(2, 0, 1)[n1 - 1, 0]), abs=0)
    assert row.key_token.iloc[0] == "When" and row.query_token.iloc[0] == " to"
    back = AttentionPatterns.load(pats.save(tmp_path / "pats"))
    assert torch.equal(back.weights, pats.weights) and back.heads == pats.heads and back.tokens == pats.tokens
    fig = pats.plot_pattern(1, 2, pair=1)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "When" and labels[int(s2[1])].endswith("[S2]")


def test_patterns_refuse_bad_heads_and_non_eager_attention(gpt2, gpt2_tokenizer):
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    with pytest.raises(SiteError, match="layer in 0..2"):
        patterns(gpt2, batch, [(3, 0)])
    pats = patterns(gpt2, batch, [(0, 1)])
    with pytest.raises(SiteError, match="not in these patterns"):
        pats.pattern(0, 2, 0)
    sdpa = wrap_model(tiny_model("gpt2", attn="sdpa"), gpt2_tokenizer)
    sdpa.model.set_attn_implementation("sdpa")  # wrap_model switched it to eager; put SDPA back
    with pytest.raises(UnsupportedArchitectureError, match="eager"):
        patterns(sdpa, batch, [(0, 1)])
    assert count_hooks(sdpa.model) == 0
