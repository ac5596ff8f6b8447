"""Every supported family, checked the same way: one parametrised test per check, one tiny config per family.

Two kinds of reference:
- ``test_sites_match_a_plain_reference``: module paths and q/k/v column layouts written out by hand below (PATHS),
  one full forward per patch with plain PyTorch hooks (``tests/reference.naive_patch_module``), explicit positions.
  It shares nothing with the adapter, the sites or the patch code.
- ``test_check_model_self_test``: ``actpatch check-model``'s self-test (``experiment.selftest``), which compares the
  fast path with the library's independent reference patcher, checks the adapter's logits against the model's,
  the identity patch, q/k/v isolation per head, path patching against a hand freeze-and-replay, DLA against
  attention's measured write and edge patching against node patching. Its results make the README's family table
  (``tests/family_table.py``); ``test_readme_family_table_is_current`` fails when the README is stale.

All models run in float64, so differences are rounding, far below any effect a wrong slice would have.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from families import CONFIGS
from reference import naive_patch_cont_logits, naive_patch_module

from actpatch import AttnOutSite, HeadSite, HiddenSite, MlpOutSite, capture, wrap_model
from actpatch.engine.sites import EmbedSite, QKVSite
from actpatch.engine.batch import tokenize_pairs
from actpatch.engine.hooks import count_hooks
from actpatch.engine.pairs import PromptPair
from actpatch.engine.patching import patch_variants
from actpatch.engine.metrics import continuation_scores
from actpatch.errors import NumericalError, SiteError
from actpatch.experiment.selftest import self_test

FAMILIES = list(CONFIGS)
_LL = dict(o="self_attn.o_proj", mlp="mlp", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           layout="separate", kv=2, dh=8)
_FALCON = dict(o="self_attention.dense", mlp="mlp", qkv=("self_attention.query_key_value",), dh=8)
# by hand, per family: heads' input (o), the MLP's write (mlp), q/k/v module(s) and layout, KV heads, d_head
PATHS = {
    "gpt2": dict(o="attn.c_proj", mlp="mlp", qkv=("attn.c_attn",), layout="blocks", kv=4, dh=8),
    **{f: _LL for f in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "starcoder2", "granite", "qwen2_moe",
                        "qwen3_moe", "mixtral", "stablelm", "stablelm_parallel", "cohere")},
    "olmoe": dict(_LL, qkv=("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj")),
    "phi": dict(_LL, o="self_attn.dense", kv=4),
    "phi3": dict(_LL, qkv=("self_attn.qkv_proj",), layout="blocks"),
    "gemma2": _LL,
    "gemma3": dict(_LL, kv=1, dh=16),
    "olmo2": dict(_LL, qkv=("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj"), kv=4),
    "gpt_neox": dict(o="attention.dense", mlp="mlp", qkv=("attention.query_key_value",), layout="per_head", kv=4, dh=8),
    "gpt_neo": dict(o="attn.attention.out_proj", mlp="mlp", layout="separate", kv=4, dh=8,
                    qkv=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj")),
    "gptj": dict(o="attn.out_proj", mlp="mlp", qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"), layout="separate",
                 kv=4, dh=8),
    "falcon": dict(_FALCON, layout="blocks", kv=1),
    "falcon_new": dict(_FALCON, layout="grouped", kv=2),
    "falcon_seq": dict(_FALCON, layout="per_head", kv=4),
    "opt": dict(o="self_attn.out_proj", mlp=None, qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                layout="separate", kv=4, dh=8),
    "bloom": dict(_FALCON, mlp="mlp.dense_4h_to_h", layout="per_head", kv=4),
    "gpt_bigcode": dict(o="attn.c_proj", mlp="mlp", qkv=("attn.c_attn",), layout="blocks", kv=1, dh=8),
}
PATHS["opt_post"] = PATHS["opt"]
BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h",
          "falcon": "transformer.h", "bloom": "transformer.h", "gpt_bigcode": "transformer.h",
          "opt": "model.decoder.layers"}
# what each family cannot serve, and so what check-model must report UNSUPPORTED (nothing else)
UNSUPPORTED = {
    "granite": {"circuits"}, "olmoe": {"circuits"}, "olmo2": {"circuits"}, "cohere": {"circuits"}, "phi": {"circuits"},
    "gptj": {"circuits"}, "falcon": {"circuits"}, "stablelm_parallel": {"circuits"}, "opt": {"mlp", "circuits"},
    "opt_post": {"mlp", "dla", "gap", "circuits"},
}
RESULTS: dict[str, object] = {}
PAIRS = [  # equal token lengths on both sides and across rows: every position can be patched, no padding (in float64
    # transformers' masks of padded rows under a sliding window give NaN; padded rows are tested in float32 elsewhere)
    PromptPair("When Mary and John went to the store, John gave a drink to",
               "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    PromptPair("When Anna and Paul went to the park, Paul gave a book to",
               "When Anna and Paul went to the park, Anna gave a book to", " Anna", " Paul"),
]


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _model(family):
    return tiny_model(family).to(torch.float64)


def _qkv_cols(paths, which: str, head: int, n_heads: int) -> tuple[int, slice]:
    """(module number, columns) of head ``head``'s ``which`` (a KV head for k and v), from the layout by hand."""
    i, kv, dh = "qkv".index(which), paths["kv"], paths["dh"]
    layout = paths["layout"]
    if layout == "separate":
        return i, slice(head * dh, (head + 1) * dh)
    if layout == "blocks":
        block = [head, n_heads + head, n_heads + kv + head][i]
    elif layout == "per_head":
        block = 3 * head + i
    else:  # grouped: per KV group, its G query heads, then k, then v
        g = n_heads // kv
        block = (head // g) * (g + 2) + head % g if which == "q" else head * (g + 2) + g + i - 1
    return 0, slice(block * dh, (block + 1) * dh)


def _plain_cases(model, family, n_heads):
    """(engine site, module, pre-hook?, columns) for layer 1, by hand."""
    p = PATHS[family]
    block = _get(model, BLOCKS.get(model.config.model_type, "model.layers"))[1]
    block0 = _get(model, BLOCKS.get(model.config.model_type, "model.layers"))[0]
    o = _get(block, p["o"])
    dh, last, all_cols = p["dh"], n_heads - 1, slice(None)
    out = []
    for pos in (None, 3, -1):
        out += [(HiddenSite(1, pos), block, False, all_cols), (HeadSite(1, last, pos), o, True, slice(last * dh, n_heads * dh)),
                (HeadSite(1, None, pos), o, True, all_cols), (AttnOutSite(1, pos), o, False, all_cols),
                (EmbedSite(pos), block0, True, all_cols)]
        if p["mlp"]:
            out.append((MlpOutSite(1, pos), _get(block, p["mlp"]), False, all_cols))
        for which in "qkv":
            for head in sorted({0, (n_heads if which == "q" else p["kv"]) - 1}):
                k, cols = _qkv_cols(p, which, head, n_heads)
                out.append((QKVSite(1, which, head, pos), _get(block, p["qkv"][k]), False, cols))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_a_plain_reference(family, gpt2_tokenizer):
    """hidden, all heads, one head, attn, mlp, embed, q, k and v at layer 1, at every position, at 3 and at END."""
    model = _model(family)
    lm = wrap_model(model, gpt2_tokenizer)
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    H = lm.adapter.n_heads
    cases = _plain_cases(model, family, H)

    donor, _ = capture(lm, batch.donor_ids, batch, [c[0] for c in cases])
    got = patch_variants(lm, batch, donor, [[c[0]] for c in cases], donor_from_batch=True,
                         reduce=lambda lg: {"logits": lg})["logits"]  # (K, B, V)
    lengths = batch.attention_mask.sum(1).tolist()
    worst = 0.0
    for k, (site, module, pre, cols) in enumerate(cases):
        for b, n in enumerate(lengths):
            rec, don = batch.recipient_ids[b, :n].tolist(), batch.donor_ids[b, :n].tolist()
            positions = range(n) if site.pos is None else [site.pos % n]
            want = naive_patch_module(model, rec, don, module, pre, cols, [(p, p) for p in positions])
            d = float((got[k, b] - want).abs().max())
            # float64 with different batch shapes; the read-out rows pass through float32 in one route
            assert d <= 1e-6, f"{family} {site} row {b}: {d:.3g}"
            worst = max(worst, d)
    if PATHS[family]["mlp"] is None:  # refused with a message, never patched at the wrong rows
        with pytest.raises(SiteError, match="flattened"):
            capture(lm, batch.donor_ids, batch, [MlpOutSite(1)])
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_check_model_self_test(family, gpt2_tokenizer):
    """check-model's self-test: every supported feature passes, and exactly the expected ones are unsupported."""
    lm = wrap_model(_model(family), gpt2_tokenizer)
    report = self_test(lm)
    RESULTS[family] = report
    failed = {c.feature: c.detail for c in report.checks if c.status == "FAIL"}
    assert not failed, f"{family}: {failed}"
    assert {c.feature for c in report.checks if c.status == "UNSUPPORTED"} == UNSUPPORTED.get(family, set())


def test_readme_family_table_is_current():
    """The README's family x feature table is the one the self-test results above give (tests/family_table.py)."""
    from family_table import render

    if set(RESULTS) != set(FAMILIES):
        pytest.skip("needs every test_check_model_self_test case in the same run")  # e.g. under -k
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = render(RESULTS)
    assert table in readme, "README's family table is stale: run `.venv/bin/python tests/family_table.py`"


CONT_PAIRS = [  # different lengths (padded rows), answers of several tokens, an answer set, a named position
    PromptPair("The Getty Center is a museum in the city of", "The Space Needle is in the city of", " Los Angeles",
               " Seattle", positions=(("subject", "Getty Center", "Space Needle"),)),
    PromptPair("The Mona Lisa was painted by", "The Starry Night was painted by the artist", " Leonardo da Vinci",
               (" Vincent van Gogh", " Picasso"), positions=(("subject", "Mona Lisa", "Starry Night"),)),
]
WINDOWED = {"mistral", "starcoder2", "gemma2", "gemma3"}  # a sliding window of 4 tokens in the tiny config


def _last_token(tok, text: str, span: str) -> int:
    """Index of the last token of ``span`` in ``text``, by tokenizing the text up to the span's end."""
    return len(tok(text[: text.index(span) + len(span)])["input_ids"]) - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_continuations_match_a_plain_reference(family, gpt2_tokenizer):
    """log P(answer) - log P(wrong) over continuations of several tokens, under a hidden-state patch at a named
    position and a one-head patch at END: equal to log-probs summed by hand over one full forward per patch and
    continuation (prompt + continuation, a batch of one, module paths written out by hand above). A sliding window
    is widened past the padded rows (64): with a window of 4, the padded layout is refused (test below)."""
    model = tiny_model(family, window=64).to(torch.float64)
    lm, tok = wrap_model(model, gpt2_tokenizer), gpt2_tokenizer
    batch = tokenize_pairs(tok, CONT_PAIRS)
    H, p = lm.adapter.n_heads, PATHS[family]
    blocks = _get(model, BLOCKS.get(model.config.model_type, "model.layers"))
    variants = [[HiddenSite(0, "subject")], [HeadSite(1, H - 1, "END")]]
    donor, _ = capture(lm, batch.donor_ids, batch, [v[0] for v in variants])
    got = patch_variants(lm, batch, donor, variants, donor_from_batch=True, reduce=lambda ro: continuation_scores(
        "logit_diff", ro.end, ro.tail, batch.cont_ids, batch.cont_side))["logit_diff"]  # (K, B)
    for b, pair in enumerate(CONT_PAIRS):
        rec, don = tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"]
        span_r, span_d = pair.positions[0][1:]
        cases = [(blocks[0], False, slice(None), [(_last_token(tok, pair.recipient, span_r),
                                                   _last_token(tok, pair.donor, span_d))]),
                 (_get(blocks[1], p["o"]), True, slice((H - 1) * p["dh"], H * p["dh"]), [(len(rec) - 1, len(don) - 1)])]
        for k, (module, pre, cols, writes) in enumerate(cases):
            def logp(texts):
                out = []
                for text in [texts] if isinstance(texts, str) else texts:
                    cont = tok(pair.recipient + text)["input_ids"][len(rec):]
                    lg = torch.log_softmax(naive_patch_cont_logits(model, rec, don, module, pre, cols, writes, cont), -1)
                    out.append(sum(float(lg[len(rec) - 1 + i, t]) for i, t in enumerate(cont)))
                return math.log(sum(math.exp(x) for x in out))
            want = logp(pair.answer) - logp(pair.wrong)
            # float64; other batch shapes and padding, and the blockwise log-softmax sum in its own order
            assert float(got[k, b]) == pytest.approx(want, abs=1e-6), f"{family} {variants[k][0]} pair {b}"
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_continuations_refused_where_a_window_cuts_the_padded_rows(family, gpt2_tokenizer):
    """A window of 4 tokens is shorter than the padded rows: the layout check refuses, no number comes out."""
    lm = wrap_model(tiny_model(family).to(torch.float64), gpt2_tokenizer)
    batch = tokenize_pairs(gpt2_tokenizer, CONT_PAIRS)
    donor, _ = capture(lm, batch.donor_ids, batch, [HiddenSite(0, "subject")])
    with pytest.raises(NumericalError, match="sliding"):
        patch_variants(lm, batch, donor, [[HiddenSite(0, "subject")]], donor_from_batch=True, reduce=lambda ro: {
            "x": continuation_scores("logprob", ro.end, ro.tail, batch.cont_ids, batch.cont_side)["logprob"]})
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_target_logprobs_equal_the_models_log_softmax(family, gpt2_tokenizer):
    """``Adapter.target_logprobs`` (blockwise logsumexp, never the full logits) equals log_softmax of the model's
    own logits at the target ids, with the family's logit scale, soft-cap and LM-head bias. Blocks of 3 rows x 1000
    ids leave a remainder on both axes (50257 ids, 8 rows). The LM head's input is caught by a hook on the module,
    not by the adapter. Tolerance 1e-9: float64, only the summation order differs."""
    model = tiny_model(family).to(torch.float64)
    lm = wrap_model(model, gpt2_tokenizer)
    ids = torch.tensor([gpt2_tokenizer("The Mona Lisa was painted by Leonardo")["input_ids"]])[:, :8]  # (1, 8)
    seen = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.update(h=a[0][0].clone()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # (8, V)
    finally:
        handle.remove()
    targets = torch.tensor([0, 50256, 11, 3, 999, 1000, 25000, 7][: ids.shape[1]])
    want = torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets]
    got = lm.adapter.target_logprobs(seen["h"], targets, rows=3, vocab=1000)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
