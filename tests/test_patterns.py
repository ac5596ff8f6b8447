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

from actpatch import AttentionPatterns, HeadSite, PromptPair, capture, count_hooks, patterns, tokenize_pairs, wrap_model
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


def test_path_patching_moves_a_receivers_pattern_as_a_by_hand_run_says(gpt2_tokenizer):
    """Senders (all heads of layer 0, from the donor) patched into head 2.1's query only. Reference by hand: run 2
    with plain hooks (every head's output frozen to the recipient's own, layer 0's set to the donor's), its query
    of head 2.1 cut from c_attn; the pattern is softmax(q k^T / sqrt(dh)) with the recipient's own keys."""
    from actpatch import HeadSite
    from actpatch.analysis.patterns import pattern_shift
    from actpatch.engine.paths import Receiver, path_patch_attention

    model = tiny_model("gpt2")
    with torch.no_grad():  # peaked attention (queries x 100): a random tiny GPT-2 attends almost uniformly
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :32] *= 100
            block.attn.c_attn.bias[:32] *= 100
    gpt2 = wrap_model(model, gpt2_tokenizer)
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS[:1])  # one pair: no padding in the by-hand runs
    rec = gpt2_tokenizer(PAIRS[0].recipient)["input_ids"]
    don = gpt2_tokenizer(PAIRS[0].donor)["input_ids"]
    donor, _ = capture(gpt2, batch.donor_ids, batch, [HeadSite(L) for L in range(3)])
    _, att = path_patch_attention(gpt2, batch, donor, [HeadSite(0)], [Receiver("q", 2, 1)], [(2, 1), (1, 0)])

    def heads_and_qkv(ids, replace=None):
        z, qkv, handles = {}, {}, []
        for L, block in enumerate(model.transformer.h):
            def pre(m, args, L=L):
                if replace is None:
                    z[L] = args[0].detach().clone()
                    return None
                return (replace[L].clone(),)
            handles.append(block.attn.c_proj.register_forward_pre_hook(pre))
            handles.append(block.attn.c_attn.register_forward_hook(lambda m, a, out, L=L: qkv.update({L: out[0].detach()})))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            for hd in handles:
                hd.remove()
        return z, qkv

    z_rec, qkv_rec = heads_and_qkv(rec)
    z_don, _ = heads_and_qkv(don)
    frozen = {L: z_rec[L] for L in range(3)}
    frozen[0] = z_don[0]  # every head of layer 0 from the donor, all positions (equal lengths)
    _, qkv2 = heads_and_qkv(rec, frozen)
    D, dh, n = 32, 8, len(rec)
    q = qkv2[2][:, 1 * dh:2 * dh]  # head 2.1's query in run 2
    k = qkv_rec[2][:, D + 1 * dh:D + 2 * dh]  # its own keys, unpatched
    scores = (q @ k.T / dh ** 0.5).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    want = torch.softmax(scores, -1)
    torch.testing.assert_close(att[(2, 1)][0, :n, :n], want, rtol=0, atol=1e-5)  # float32, other matmul order
    clean = patterns(gpt2, batch, [(2, 1), (1, 0)])
    assert float((att[(2, 1)][0, :n, :n] - clean.pattern(2, 1, 0)).abs().max()) > 1e-3  # it moved
    torch.testing.assert_close(att[(1, 0)][0, :n, :n], clean.pattern(1, 0, 0), rtol=0, atol=1e-6)  # not a receiver
    shift = pattern_shift(gpt2, batch, donor, [HeadSite(0)], (2, 1), keys=("S2",))
    end, s2 = n - 1, int(batch.position("S2")[0])
    assert shift["S2"]["patched"] == pytest.approx(float(want[end, s2]), abs=1e-5)
    assert shift["S2"]["change"] == pytest.approx(float(want[end, s2] - clean.pattern(2, 1, 0)[end, s2]), abs=1e-5)
    assert count_hooks(model) == 0


def test_node_patterns_are_a_heads_or_its_layers_mean(gpt2):
    """node_patterns for a circuit drawing: a5.h3 -> that head's pattern (by hand), a5 -> the mean over layer 5's
    heads (by hand), other nodes skipped, ``limit`` nodes at most; rows hold the lower triangle row by row."""
    from actpatch.analysis.patterns import node_patterns

    batch = tokenize_pairs(gpt2.tokenizer, PAIRS)
    got = node_patterns(gpt2, batch, ["input", "a1.h2", "m0", "a0", "a1.kv0", "logits", "a2.h0"], limit=2)
    assert [(r["node"], r["pair"]) for r in got["rows"]] == [("a1.h2", 0), ("a1.h2", 1), ("a0", 0), ("a0", 1)]
    n_heads = gpt2.model.config.n_head
    for row in got["rows"]:
        ids = batch.recipient_ids[row["pair"], : int(batch.attention_mask[row["pair"]].sum())].tolist()
        if row["node"] == "a1.h2":
            want = _gpt2_by_hand(gpt2.model, ids, 1, 2)
        else:
            want = torch.stack([_gpt2_by_hand(gpt2.model, ids, 0, h) for h in range(n_heads)]).mean(0)
        q, k = torch.tril_indices(len(ids), len(ids))
        # the stored weights are rounded to 3 decimals: 5e-4, plus float32 softmax
        torch.testing.assert_close(torch.tensor(row["w"]), want[q, k].float(), rtol=0, atol=6e-4)
    assert node_patterns(gpt2, batch, ["input", "m1", "logits"]) is None
