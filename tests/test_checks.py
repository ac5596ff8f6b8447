"""The runtime checks and the analysis catch the one-line bugs they exist for.

Each test breaks one thing on purpose (monkeypatched, undone after the test) and asserts that the
check meant for it fails, or computes the analysis' numbers by hand and compares. Hand-written
computations use module paths written out here, not actpatch's adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import actpatch.engine.patching as patching
import actpatch.engine.paths as paths
from actpatch import HeadSite, HiddenSite, AttnOutSite, attribute, capture, generate_pairs, patch_variants, tokenize_ioi, wrap_model
from actpatch.model.adapters import Adapter
from actpatch.analysis.audit import check_dla, check_gap, check_path_identity
from actpatch.analysis.gap import gap_account
from actpatch.analysis.heads import characterise
from actpatch.engine.sanity import check_fast_path, run_sanity_checks


def _setup(lm, n: int = 3, design: str = "abc"):
    batch = tokenize_ioi(lm.tokenizer, generate_pairs(lm.tokenizer, n, designs=(design,), seed=3)[design])
    a = lm.adapter
    sites = [s(L) for L in range(a.n_layers) for s in (HeadSite, HiddenSite, AttnOutSite)]
    rec, rec_logits = capture(lm, batch.recipient_ids, batch, sites)
    don, don_logits = capture(lm, batch.donor_ids, batch, sites)
    return batch, rec, don, rec_logits, don_logits


def _failed(checks) -> set[str]:
    return {c.name for c in checks if not c.passed}


def test_the_checks_pass_on_the_real_engine(tiny_lm):
    batch, rec, don, rec_logits, don_logits = _setup(tiny_lm)
    assert _failed(run_sanity_checks(tiny_lm, batch, rec, don, rec_logits, don_logits, [0, 1, 2])) == set()


def test_a_positioned_patch_on_the_neighbouring_head_is_caught(tiny_lm, monkeypatch):
    original = patching._patch_fn

    d_head = tiny_lm.adapter.d_head
    width = tiny_lm.adapter.n_heads * d_head

    def neighbour(entries, k, n_rows, start, width_, *rest):  # head columns shifted by one head, at one position
        entries = [(j, src, si, di, c if c is None or di is None else (c + d_head) % width)
                   for j, src, si, di, c in entries]
        return original(entries, k, n_rows, start, width_, *rest)

    monkeypatch.setattr(patching, "_patch_fn", neighbour)
    batch, rec, don, rec_logits, don_logits = _setup(tiny_lm)
    assert "patch_writes_exactly" in _failed(run_sanity_checks(tiny_lm, batch, rec, don, rec_logits, don_logits, [0, 1, 2]))
    variants = [[HeadSite(L, 1, "END")] for L in range(3)]
    fast = patch_variants(tiny_lm, batch, don, variants, donor_from_batch=True, columns=batch.answer_columns(),
                          reduce=lambda lg: {"ld": lg[..., 0] - lg[..., 1]})["ld"]
    assert not check_fast_path(tiny_lm, batch, don, variants, fast).passed


def test_the_fast_path_check_catches_a_position_bug_shared_by_the_engine(tiny_lm, monkeypatch):
    """Named positions off by one inside the engine, where its own slow path (run_chunk without a state, the old
    check's reference) reads them too: the independent reference disagrees."""
    original = patching.resolve_pos

    def off_by_one(pos, positions, lengths):
        idx = original(pos, positions, lengths)
        return idx - 1 if isinstance(pos, str) else idx

    monkeypatch.setattr(patching, "resolve_pos", off_by_one)
    batch, rec, don, *_ = _setup(tiny_lm)
    variants = [[HiddenSite(1, "S2")], [HeadSite(0, None, "END")], [HeadSite(2, 3, "IO")]]
    fast = patch_variants(tiny_lm, batch, don, variants, donor_from_batch=True, columns=batch.answer_columns(),
                          reduce=lambda lg: {"ld": lg[..., 0] - lg[..., 1]})["ld"]
    assert not check_fast_path(tiny_lm, batch, don, variants, fast).passed


def test_a_donor_cache_taken_from_the_recipient_fails(tiny_lm):
    batch, rec, _, rec_logits, _ = _setup(tiny_lm)
    failed = _failed(run_sanity_checks(tiny_lm, batch, rec, rec, rec_logits, rec_logits, [0, 1, 2]))
    assert "donor_differs_from_recipient" in failed


def test_control_pairs_are_not_flagged_as_no_op_patches(tiny_lm):
    from actpatch import PromptPair

    pairs = generate_pairs(tiny_lm.tokenizer, 2, designs=("abc",), seed=3)["abc"]
    pairs = [pairs[0], PromptPair(pairs[1].recipient, pairs[1].recipient, pairs[1].answer, pairs[1].wrong, "control")]
    batch = tokenize_ioi(tiny_lm.tokenizer, pairs)
    sites = [s(L) for L in range(3) for s in (HeadSite, HiddenSite, AttnOutSite)]
    rec, rec_logits = capture(tiny_lm, batch.recipient_ids, batch, sites)
    don, don_logits = capture(tiny_lm, batch.donor_ids, batch, sites)
    assert _failed(run_sanity_checks(tiny_lm, batch, rec, don, rec_logits, don_logits, [0, 1, 2])) == set()


def _by_hand(model, batch, family):
    """Per layer, at END: what attention added to the residual stream (the post-norm's output), block outputs,
    and the direct read-out x -> final norm with its scale frozen at the recipient . (W_U[IO] - W_U[S])."""
    layers, end = model.model.layers, batch.attention_mask.sum(1) - 1
    rows = torch.arange(len(batch))
    runs = {}
    for name, ids in (("rec", batch.recipient_ids), ("don", batch.donor_ids)):
        got = {}
        handles = [layers[L].post_attention_layernorm.register_forward_hook(
            lambda m, a, out, L=L: got.__setitem__(("write", L), out[rows, end].detach())) for L in range(len(layers))]
        handles += [layers[L].register_forward_hook(
            lambda m, a, out, L=L: got.__setitem__(("resid", L), (out[0] if isinstance(out, tuple) else out)[rows, end].detach()))
            for L in range(len(layers))]
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=batch.attention_mask)
        finally:
            for h in handles:
                h.remove()
        runs[name] = got
    norm = model.model.norm
    h = runs["rec"][("resid", len(layers) - 1)]
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    gain = 1 + norm.weight if family.startswith("gemma") else norm.weight
    scale = (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    direction = model.lm_head.weight[batch.answer_ids] - model.lm_head.weight[batch.wrong_ids]
    return runs, lambda x: (x * scale * gain * direction).sum(-1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_head_dla_and_the_gap_account_include_the_post_attention_norm(family, gpt2_tokenizer):
    """Bug 2: DLA, copy scores and the gap account read the o_proj output, before the post-attention norm."""
    model = tiny_model(family)
    lm = wrap_model(model, gpt2_tokenizer)
    batch, rec, don, rec_logits, _ = _setup(lm)
    runs, direct = _by_hand(model, batch, family)
    prof = characterise(lm, batch)
    gap = gap_account(lm, batch, rec, don)
    for L in range(len(model.model.layers)):
        write, dwrite = runs["rec"][("write", L)], runs["don"][("write", L)] - runs["rec"][("write", L)]
        # per-head products summed in another order than the fused projection, then a frozen-scale norm: 1e-4
        torch.testing.assert_close(prof.dla[L].sum(), direct(write).mean(), rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(gap[L]["heads_direct"]), direct(dwrite).mean(), rtol=0, atol=1e-4)
        share = (write.norm(dim=-1) / runs["rec"][("resid", L)].norm(dim=-1)).mean()
        torch.testing.assert_close(torch.tensor(gap[L]["attn_share"]), share, rtol=1e-4, atol=0)
    assert check_dla(lm, batch, prof).passed and check_gap(lm, batch, gap).passed


def test_the_analysis_checks_catch_a_forgotten_post_norm(gpt2_tokenizer, monkeypatch):
    lm = wrap_model(tiny_model("gemma3"), gpt2_tokenizer)
    batch, rec, don, *_ = _setup(lm)
    monkeypatch.setattr(Adapter, "attn_post_norm", lambda self, layer: None)
    assert not check_dla(lm, batch, characterise(lm, batch)).passed
    assert not check_gap(lm, batch, gap_account(lm, batch, rec, don)).passed


def test_the_analysis_checks_catch_a_wrong_layer(tiny_lm, monkeypatch):
    """DLA read from the next layer's heads, and path patching freezing each layer to another layer's heads."""
    batch, rec, don, rec_logits, _ = _setup(tiny_lm)
    assert check_path_identity(tiny_lm, batch, rec, rec_logits, [(2, 1)]).passed
    original = paths._frozen_heads
    monkeypatch.setattr(paths, "_frozen_heads", lambda *a: {L: v for L, v in zip(range(3), list(original(*a).values())[::-1])})
    assert not check_path_identity(tiny_lm, batch, rec, rec_logits, [(2, 1)]).passed
    monkeypatch.undo()
    prof = characterise(tiny_lm, batch)
    shifted = type(prof)(prof.attention, prof.dla.roll(1, 0), prof.copy, prof.neg_copy, prof.recipient_logit_diff,
                         prof.n_names, prof.bias_dla)
    assert check_dla(tiny_lm, batch, prof).passed and not check_dla(tiny_lm, batch, shifted).passed


def _attribution_by_hand(model, batch, family):
    """Gradient x (donor - recipient) per head and block output, per pair and position: plain autograd."""
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    heads_in = [b.attn.c_proj if family == "gpt2" else b.self_attn.o_proj for b in blocks]
    n_heads = model.config.num_attention_heads
    end, rows = batch.attention_mask.sum(1) - 1, torch.arange(len(batch))

    def run(ids, grad):
        got = {}
        hs = [m.register_forward_pre_hook(lambda m, a, L=L: got.__setitem__(("z", L), a[0])) for L, m in enumerate(heads_in)]
        hs += [b.register_forward_hook(lambda m, a, o, L=L: got.__setitem__(("h", L), o[0] if isinstance(o, tuple) else o))
               for L, b in enumerate(blocks)]
        hs.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_(grad)))
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=batch.attention_mask).logits
                if grad:
                    for t in got.values():
                        t.retain_grad()
                    (logits[rows, end, batch.answer_ids] - logits[rows, end, batch.wrong_ids]).mean().backward()
        finally:
            for h in hs:
                h.remove()
        return got

    don, rec = run(batch.donor_ids, False), run(batch.recipient_ids, True)
    heads, hidden = [], []
    for L in range(len(blocks)):
        dz = ((don[("z", L)] - rec[("z", L)]) * rec[("z", L)].grad).detach()  # (B, T, H*Dh)
        heads.append(dz.view(*dz.shape[:2], n_heads, -1).sum(-1).permute(2, 0, 1))  # (H, B, T)
        hidden.append(((don[("h", L)] - rec[("h", L)]) * rec[("h", L)].grad).sum(-1).detach())  # (B, T)
    return torch.stack(heads), torch.stack(hidden)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attribution_per_pair_and_position_matches_hand_computed_gradients(family, gpt2_tokenizer):
    """Every (layer, head, pair, position) entry, for backward groups of 1, 2 and all 5 pairs: catches a group
    divided by its own size and scores shifted by one position, which sums over positions would miss."""
    lm = wrap_model(tiny_model(family), gpt2_tokenizer)
    batch, _, don, *_ = _setup(lm, n=5)
    want_heads, want_hidden = _attribution_by_hand(lm.model, batch, family)
    for rows in (1, 2, None):
        att = attribute(lm, batch, don, max_rows=rows)
        # other graphs (groups) sum the same products in another order: 1e-4 relative, 1e-7 absolute
        torch.testing.assert_close(att.heads, want_heads, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(att.hidden, want_hidden, rtol=1e-4, atol=1e-7)


def _in_subprocess(code: str, hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout


def test_pairs_do_not_depend_on_the_hash_seed(gpt2_dir):
    code = ("import json, dataclasses; from transformers import AutoTokenizer; from actpatch import generate_pairs; "
            f"tok = AutoTokenizer.from_pretrained({str(gpt2_dir)!r}); "
            "print(json.dumps({d: [dataclasses.asdict(p) for p in v] for d, v in generate_pairs(tok, 12, ('swap', 'abc', 's2io'), seed=4).items()}))")
    runs = [_in_subprocess(code, seed) for seed in ("0", "1", "12345")]
    assert runs[0] == runs[1] == runs[2] and len(json.loads(runs[0])["abc"]) == 12


def test_results_are_identical_across_processes_and_hash_seeds(gpt2_dir, tmp_path):
    numbers = []
    for seed in ("0", "999"):
        out = tmp_path / f"run-{seed}"
        code = (f"import sys; from actpatch.cli import main; sys.exit(main(['ioi', '--model', {str(gpt2_dir)!r}, '--n-pairs', '3', "
                f"'--donor', 'swap', '--out', {str(out)!r}, '--quiet']))")
        _in_subprocess(code, seed)
        data = json.loads((out / "results.json").read_text())
        numbers.append({k: v for k, v in data.items() if k not in ("config", "environment")})
    assert numbers[0] == numbers[1]
