"""Trust: the engine against a stand-alone reference on every family, and one regression test per wrong-number bug.

The reference (``tests/reference.py``) uses no actpatch code: hand-written module paths, explicit
positions, one full forward per patch, ``model(...).logits``. Tolerance 1e-4 in LD (float32): the
fast path stacks variants and replays suffixes, so matmul shapes and float summation order differ.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from reference import naive_patch_ld

from actpatch import (
    DataError, HeadSite, HiddenSite, PromptPair, capture, generate_pairs, patch_variants, tokenize_ioi, wrap_model,
)
from actpatch.errors import ConfigError
from actpatch.engine.prefix import RecipientState

FAMILIES = ["gpt2", "llama", "gpt_neox", "gpt_neo", "gemma2", "gemma3", "olmo2", "mistral"]
LD_ATOL = 1e-4


def _positions(batch, row: int) -> dict[str, int]:
    """IO, S1, S1+1, S2 and END of one row, found here by scanning its token ids."""
    n = int(batch.attention_mask[row].sum())
    ids = batch.recipient_ids[row, :n].tolist()
    a, w = int(batch.answer_ids[row]), int(batch.wrong_ids[row])
    s = [i for i, t in enumerate(ids) if t == w]
    return {"IO": ids.index(a), "S1": s[0], "S1+1": s[0] + 1, "S2": s[1], "END": n - 1, "n": n, -1: n - 1, -2: n - 2, 2: 2}


def _cases(n_layers: int, n_heads: int):
    """(engine site, reference kind, heads, position: a name, an int, or None for all) for a spread of patches."""
    out = []
    for L in range(n_layers):
        h = (L + 1) % n_heads
        out += [
            (HiddenSite(L), "hidden", [], None), (HiddenSite(L, "END"), "hidden", [], "END"),
            (HiddenSite(L, "S2"), "hidden", [], "S2"), (HeadSite(L), "heads", list(range(n_heads)), None),
            (HeadSite(L, h, "IO"), "heads", [h], "IO"), (HeadSite(L, (0, h), "S1+1"), "heads", [0, h], "S1+1"),
            (HeadSite(L, h, "END"), "heads", [h], "END"), (HeadSite(L, None, "S1"), "heads", list(range(n_heads)), "S1"),
            (HiddenSite(L, -1), "hidden", [], -1), (HeadSite(L, h, -2), "heads", [h], -2),  # ints: from the end
            (HeadSite(L, None, 2), "heads", list(range(n_heads)), 2),  # and from the start
        ]
    return out


def _compare_with_reference(model, lm, batch):
    a = lm.adapter
    cases = _cases(a.n_layers, a.n_heads)
    sites = [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(L) for L in range(a.n_layers)]
    donor, _ = capture(lm, batch.donor_ids, batch, sites)
    got = patch_variants(lm, batch, donor, [[site] for site, *_ in cases], donor_from_batch=True,
                         columns=batch.answer_columns(), reduce=lambda lg: {"ld": lg[..., 0] - lg[..., 1]})["ld"]
    rows = [_positions(batch, b) for b in range(len(batch))]
    for k, (site, kind, heads, pos) in enumerate(cases):
        positions = [list(range(r["n"])) if pos is None else [r[pos]] for r in rows]
        ref = naive_patch_ld(model, batch.recipient_ids, batch.donor_ids, batch.attention_mask, batch.answer_ids,
                             batch.wrong_ids, kind, site.layer, heads, positions, a.d_head)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=LD_ATOL, msg=lambda m, s=site: f"{s}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_the_standalone_reference(family, gpt2_tokenizer):
    """Every family: GQA, partial rotary (NeoX), local attention (Neo), sliding windows of 4 tokens, shorter than
    every prompt (Gemma 2/3, Mistral), soft-capping (Gemma 2/3), post-norms (Gemma 2/3, OLMo 2); padded rows."""
    model = tiny_model(family)
    lm = wrap_model(model, gpt2_tokenizer)
    batch = tokenize_ioi(gpt2_tokenizer, generate_pairs(gpt2_tokenizer, 4, designs=("abc",), seed=3)["abc"])
    assert int(batch.attention_mask.sum(1).min()) < batch.recipient_ids.shape[1], "rows of different lengths"
    _compare_with_reference(model, lm, batch)


def _one_template(tokenizer, n: int, design: str = "abc"):
    """Pairs of one template (ABBA and BABA orders), so every row has the same length: no padding, no mask."""
    pairs = generate_pairs(tokenizer, 15 * n, designs=(design,), seed=2)[design]
    return tokenize_ioi(tokenizer, [p for p in pairs if p.template == 0][:n])


def test_sdpa_model_is_switched_to_eager_and_gives_reference_numbers(gpt2_tokenizer):
    """Bug 1: under SDPA with no padding, the suffix replay's causal mask was aligned top-left (LD 5.04 vs 2.35)."""
    model = tiny_model("llama", attn="sdpa")
    assert model.config._attn_implementation == "sdpa"
    batch = _one_template(gpt2_tokenizer, 2)
    assert bool(batch.attention_mask.all()), "the bug needs a batch without padding"
    lm = wrap_model(model, gpt2_tokenizer)
    _compare_with_reference(model, lm, batch)
    assert lm.info["attn_implementation"] == "eager (was sdpa)"
    model.set_attn_implementation("sdpa")  # switched back behind actpatch's back: the replay refuses
    try:
        with pytest.raises(ConfigError, match="eager attention"):
            RecipientState.record(lm, batch)
    finally:
        model.set_attn_implementation("eager")


def test_donor_cache_of_another_width_is_refused(tiny_lm):
    """Bug 3: rows captured on a wider padded batch were written at shifted positions."""
    tok = tiny_lm.tokenizer
    pairs = generate_pairs(tok, 4, designs=("abc",), seed=3)["abc"]
    wide = tokenize_ioi(tok, pairs)
    short = sorted(range(4), key=lambda i: len(tok(pairs[i].recipient)["input_ids"]))[:2]
    narrow = tokenize_ioi(tok, [pairs[i] for i in short])
    assert narrow.recipient_ids.shape[1] < wide.recipient_ids.shape[1]
    donor, _ = capture(tiny_lm, wide.donor_ids, wide, [HeadSite(1)])
    donor = type(donor)({k: v[short] for k, v in donor.items()})  # the right rows, at the wide batch's width
    for state in (False, True):
        with pytest.raises(DataError, match="positions, but this batch's donors are 2 pairs"):
            patch_variants(tiny_lm, narrow, donor, [[HeadSite(1, 0, "END")]], donor_from_batch=state,
                           reduce=lambda lg: {"x": lg[..., 0]})


@pytest.mark.parametrize("all_controls", [False, True])
def test_control_pairs_have_exactly_zero_effect(tiny_lm, all_controls):
    """Bug 4: a short pair with donor == recipient moved the replay's start past its END (ValueError)."""
    tok = tiny_lm.tokenizer
    short = "When Mary and John went to the store, John gave a drink to"  # 13 tokens: END at 12
    long_ = "Then, Anna and Paul had a lot of fun at the restaurant. {} gave a book to"  # differs at S2, position 14
    pairs = [PromptPair(short, short, " Mary", " John", "control"),
             PromptPair(long_.format("Paul"), long_.format("Paul" if all_controls else "Anna"), " Anna", " Paul", "s2io")]
    batch = tokenize_ioi(tok, pairs)
    assert int(batch.positions["S2"][1]) > int(batch.positions["END"][0])
    a = tiny_lm.adapter
    donor, rec_logits = capture(tiny_lm, batch.donor_ids, batch, [HeadSite(L) for L in range(a.n_layers)]
                                + [HiddenSite(L) for L in range(a.n_layers)])
    rec_ld = rec_logits[:, batch.answer_ids].diagonal() - rec_logits[:, batch.wrong_ids].diagonal()
    variants = [[HeadSite(L, None, "END")] for L in range(a.n_layers)] + [[HiddenSite(L, "S2")] for L in range(a.n_layers)]
    ld = patch_variants(tiny_lm, batch, donor, variants, donor_from_batch=True, columns=batch.answer_columns(),
                        reduce=lambda lg: {"ld": lg[..., 0] - lg[..., 1]})["ld"]  # (K, B)
    controls = [i for i, p in enumerate(pairs) if p.donor == p.recipient]
    # zero up to float summation order: the control rows are recomputed from a later position than a plain
    # forward, with cached keys (measured: 0 on GPT-2, 3e-8 on Llama); 1e-6
    torch.testing.assert_close(ld[:, controls], rec_ld[controls].expand(len(variants), -1), rtol=0, atol=1e-6)


def test_olmo2_query_receiver_does_not_leak_into_other_heads(gpt2_tokenizer):
    """Bug 5: OLMo 2's q_norm spans all heads; writing one head's query before it changed every head's."""
    from actpatch.engine.paths import Receiver, path_patch

    model = tiny_model("olmo2")
    lm = wrap_model(model, gpt2_tokenizer)
    batch = tokenize_ioi(gpt2_tokenizer, generate_pairs(gpt2_tokenizer, 3, designs=("abc",), seed=3)["abc"])
    donor, _ = capture(lm, batch.donor_ids, batch, [HeadSite(0)])
    seen = []
    o_proj = model.model.layers[1].self_attn.o_proj  # written out by hand, not through the adapter
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=batch.recipient_ids, attention_mask=batch.attention_mask)
        path_patch(lm, batch, donor, [HeadSite(0, None, None)], [Receiver("q", 1, 2)])
    finally:
        handle.remove()
    rec, last = seen[0].view(*seen[0].shape[:2], 4, -1), seen[-1].view(*seen[-1].shape[:2], 4, -1)  # (B, T, H, Dh)
    real = batch.attention_mask.bool()
    others = [0, 1, 3]
    # the receiver's own head must change, the others must keep the recipient's values (same kernels: exact)
    assert not torch.equal(last[:, :, 2][real], rec[:, :, 2][real])
    assert torch.equal(last[:, :, others][real], rec[:, :, others][real])


def test_cli_pairs_file_with_control_pairs_exits_0(gpt2_dir, tmp_path):
    """Bug 4 through the command line: it was a raw ValueError traceback and exit status 1."""
    import json

    from actpatch.cli import main

    short = "When Mary and John went to the store, John gave a drink to"
    long_ = "Then, Anna and Paul had a lot of fun at the restaurant. {} gave a book to"
    lines = [{"recipient": short, "donor": short, "answer": " Mary", "wrong": " John"},
             {"recipient": long_.format("Paul"), "donor": long_.format("Anna"), "answer": " Anna", "wrong": " Paul"}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["ioi", "--model", str(gpt2_dir), "--pairs-file", str(f), "--out", str(tmp_path / "out"), "--quiet",
                 "--by-position", "--no-analysis"]) == 0
