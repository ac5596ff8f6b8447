"""Path patching, head characterisation and the hidden-vs-heads account, against manual computation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from actpatch import AttnOutSite, HeadSite, HiddenSite, SiteError, capture, count_hooks, generate_pairs, tokenize_ioi, wrap_model
from actpatch.analysis.gap import gap_account
from actpatch.analysis.headclasses import class_rules, classify, near_misses
from actpatch.analysis.heads import characterise, frozen_norm
from actpatch.engine.paths import Receiver, path_patch

# END-only unembedding vs the model's full logits, and per-head vs fused matmuls: float32 summation
# order only, so 1e-5 absolute on logits of order 1.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, gpt2_tokenizer):
    lm = wrap_model(tiny_model(request.param), gpt2_tokenizer, {"spec": f"tiny-{request.param}"})
    pairs = generate_pairs(lm.tokenizer, 4, designs=("abc",), seed=4)["abc"]
    batch = tokenize_ioi(lm.tokenizer, pairs)
    donor, _ = capture(lm, batch.donor_ids, batch, [HeadSite(L) for L in range(lm.adapter.n_layers)])
    return request.param, lm, batch, donor


def _raw_z(model, arch, ids, mask):
    """o_proj inputs of every layer, with plain PyTorch hooks."""
    zs, handles = {}, []
    blocks = model.transformer.h if arch == "gpt2" else model.model.layers
    for L, blk in enumerate(blocks):
        proj = blk.attn.c_proj if arch == "gpt2" else blk.self_attn.o_proj
        handles.append(proj.register_forward_pre_hook(lambda m, args, L=L: zs.__setitem__(L, args[0].clone())))
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return zs, blocks


def _qkv_slice(arch, model, which, head):
    """(module, column slice) of a head's q/k/v, written out by hand per architecture."""
    cfg = model.config
    H = cfg.num_attention_heads
    Dh = cfg.hidden_size // H
    if arch == "gpt2":
        d = cfg.hidden_size
        base = "qkv".index(which) * d
        return "attn.c_attn", slice(base + head * Dh, base + (head + 1) * Dh)
    kv = getattr(cfg, "num_key_value_heads", H)
    slot = head if which == "q" else head // (H // kv)
    return f"self_attn.{which}_proj", slice(slot * Dh, (slot + 1) * Dh)


def manual_path_patch(arch, lm, batch, sender, receiver):
    """Wang-style path patching for one sender head (all positions) and one q/k/v receiver, by hand."""
    model = lm.model
    ids, don, mask = batch.recipient_ids, batch.donor_ids, batch.attention_mask
    H = model.config.num_attention_heads
    Dh = model.config.hidden_size // H
    with torch.no_grad():
        z_rec, blocks = _raw_z(model, arch, ids, mask)
        z_don, _ = _raw_z(model, arch, don, mask)
        Ls, hs = sender
        which, Lr, hr = receiver
        path, cols = _qkv_slice(arch, model, which, hr)
        module = blocks[Lr].get_submodule(path)
        handles, rec = [], {}
        for L, blk in enumerate(blocks):
            proj = blk.attn.c_proj if arch == "gpt2" else blk.self_attn.o_proj

            def freeze(m, args, L=L):
                z = z_rec[L].clone()
                if L == Ls:
                    z[..., hs * Dh:(hs + 1) * Dh] = z_don[L][..., hs * Dh:(hs + 1) * Dh]
                return (z,)
            handles.append(proj.register_forward_pre_hook(freeze))
        handles.append(module.register_forward_hook(lambda m, a, out: rec.__setitem__("x", out[..., cols].clone())))
        model(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()

        def write(m, a, out):
            out = out.clone()
            out[..., cols] = rec["x"]
            return out
        h = module.register_forward_hook(write)
        try:
            logits = model(input_ids=ids, attention_mask=mask).logits
        finally:
            h.remove()
    return logits[torch.arange(len(batch)), batch.position("END")]


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_path_patching_matches_manual(setup, which):
    arch, lm, batch, donor = setup
    got = path_patch(lm, batch, donor, [HeadSite(0, 1)], [Receiver(which, 2, 3)])
    want = manual_path_patch(arch, lm, batch, (0, 1), (which, 2, 3))
    torch.testing.assert_close(got, want, **TOL)
    clean = lm.model(input_ids=batch.recipient_ids, attention_mask=batch.attention_mask).logits[
        torch.arange(len(batch)), batch.position("END")]
    # on random weights attention is near-uniform, so a key path moves logits only slightly: just not zero
    assert not torch.equal(got, clean), "the path must carry some effect"
    assert count_hooks(lm.model) == 0


def test_path_to_logits_with_frozen_mlps_is_the_direct_effect(setup):
    """Senders -> logits with every other component frozen: the final residual moves by exactly the
    senders' change through W_O, and the final norm is recomputed on it."""
    arch, lm, batch, donor = setup
    a = lm.adapter
    got = path_patch(lm, batch, donor, [HeadSite(1, (0, 2))], [Receiver("logits")], freeze_mlps=True)
    rec, _ = capture(lm, batch.recipient_ids, batch, [HeadSite(1), HiddenSite(a.n_layers - 1)])
    rows, end = torch.arange(len(batch)), batch.position("END")
    dz = (donor[HeadSite(1)] - rec[HeadSite(1)])[rows, end][:, [0, 2]]  # (B, 2, Dh)
    delta = torch.einsum("bhd,hde->be", dz, a.head_weights(1)[[0, 2]])
    final = rec[HiddenSite(a.n_layers - 1)][rows, end] + delta
    want = lm.model.get_output_embeddings()(a.final_norm()(final))
    torch.testing.assert_close(got, want, **TOL)


def test_s_inhibition_path_reports_how_the_name_movers_attention_moves(setup):
    """design_measurements' S-inhibition -> name-mover path: its LD equals plain path_patch, and each mover's
    END -> IO / S2 attention is stated unpatched (checked against HF's own output_attentions) and patched (checked
    against path_patch_attention, itself checked by hand in test_patterns); the report sentence carries them."""
    from actpatch.analysis.summary import design_measurements
    from actpatch.engine.metrics import logit_diff
    from actpatch.engine.paths import path_patch_attention
    from actpatch.engine.sites import AttnOutSite as Attn
    from actpatch.report.markdown import shift_line

    arch, lm, batch, _ = setup
    n = lm.adapter.n_layers
    sites = [s for L in range(n) for s in (HiddenSite(L), Attn(L), HeadSite(L))]
    rec, _ = capture(lm, batch.recipient_ids, batch, sites)
    don, _ = capture(lm, batch.donor_ids, batch, sites)
    classes = [{"layer": 0, "head": 1, "classes": ["S-inhibition"]}, {"layer": 2, "head": 3, "classes": ["name mover"]}]
    path = next(p for p in design_measurements(lm, batch, rec, don, classes)["paths"] if "queries" in p["what"])
    senders = [HeadSite(0, 1, "END")]
    logits, att = path_patch_attention(lm, batch, don, senders, [Receiver("q", 2, 3)], [(2, 3)], recipient=rec)
    plain = path_patch(lm, batch, don, senders, [Receiver("q", 2, 3)], recipient=rec)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)  # the same run, watched: bit for bit
    assert path["logit_diff"] == pytest.approx(float(logit_diff(plain, batch.answer_ids, batch.wrong_ids).mean()), abs=1e-6)
    (entry,) = path["attention"]
    assert entry["head"] == [2, 3]
    import copy

    # a copy: HF records output_attentions through forward hooks it leaves on the model
    fresh = copy.deepcopy(lm.model)
    out = fresh(input_ids=batch.recipient_ids, attention_mask=batch.attention_mask, output_attentions=True)
    rows, end = torch.arange(len(batch)), batch.position("END")
    for key in ("IO", "S2"):
        col = batch.position(key)
        # float32 softmax of the same scores by two routes: 1e-6
        assert entry["keys"][key]["unpatched"] == pytest.approx(float(out.attentions[2][rows, 3, end, col].mean()), abs=1e-6)
        assert entry["keys"][key]["patched"] == pytest.approx(float(att[(2, 3)][rows, end, col].mean()), abs=1e-6)
        k = entry["keys"][key]
        assert k["change"] == pytest.approx(k["patched"] - k["unpatched"], abs=1e-9)
    line = shift_line("L0H1", entry)
    assert line.startswith("Patching L0H1 into name mover L2H3's query") and f"{entry['keys']['IO']['patched']:.2f}" in line


def test_identity_path_changes_nothing_and_bad_receivers_fail(setup):
    arch, lm, batch, _ = setup
    own, logits = capture(lm, batch.recipient_ids, batch, [HeadSite(L) for L in range(lm.adapter.n_layers)])
    torch.testing.assert_close(path_patch(lm, batch, own, [HeadSite(0)], [Receiver("q", 2, 0)]), logits, **TOL)
    for bad in (Receiver("x", 1, 0), Receiver("q", 9, 0), Receiver("q", 1, 99)):
        with pytest.raises(SiteError):
            path_patch(lm, batch, own, [HeadSite(0)], [bad])
    assert count_hooks(lm.model) == 0


def test_characterisation_matches_manual(setup):
    arch, lm, batch, _ = setup
    a, model = lm.adapter, lm.model
    names = torch.unique(torch.cat([batch.answer_ids, batch.wrong_ids]))
    prof = characterise(lm, batch, names)
    rows = torch.arange(len(batch))
    P = batch.positions
    fresh = wrap_model(tiny_model(arch), lm.tokenizer).model  # output_attentions leaves transformers' hooks behind
    out = fresh(input_ids=batch.recipient_ids, attention_mask=batch.attention_mask, output_attentions=True)
    manual = torch.stack([att[rows, :, P["END"], P["IO"]].mean(0) for att in out.attentions])  # (L, H)
    torch.testing.assert_close(prof.attention["END->IO"], manual, **TOL)
    # DLA by hand: the head's END output through W_O, the final norm's frozen scale, W_U[IO] - W_U[S]
    z, _ = _raw_z(model, arch, batch.recipient_ids, batch.attention_mask)
    rec, _ = capture(lm, batch.recipient_ids, batch, [HiddenSite(a.n_layers - 1)])
    x = rec[HiddenSite(a.n_layers - 1)][rows, P["END"]]
    norm = a.final_norm()
    if arch == "gpt2":
        scale = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
        lin = lambda c: (c - c.mean(-1, keepdim=True)) * scale * norm.weight  # noqa: E731
    else:
        scale = 1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        lin = lambda c: c * scale * norm.weight  # noqa: E731
    W_U = model.get_output_embeddings().weight
    direction = W_U[batch.answer_ids] - W_U[batch.wrong_ids]
    H, Dh = a.n_heads, a.d_head
    for L in range(a.n_layers):
        for h in range(H):
            zh = z[L][rows, P["END"], h * Dh:(h + 1) * Dh]
            contrib = zh @ a.head_weights(L)[h]
            want = (lin(contrib) * direction).sum(-1).mean()
            assert abs(float(prof.dla[L, h]) - float(want)) < 1e-5
    # copy score by hand for one head: value of the name's block-0 residual, W_O, final norm, unembedding
    L, h = a.n_layers - 1, 1
    block0, _ = capture(lm, names[:, None], _one_token_batch(batch, names), [HiddenSite(0)])
    r0 = block0[HiddenSite(0)][:, 0]  # (N, D)
    blk = a.block(L)
    if arch == "gpt2":
        v = blk.attn.c_attn(blk.ln_1(r0[:, None]))[:, 0, 2 * a.n_heads * Dh:][:, h * Dh:(h + 1) * Dh]
    else:
        kv = model.config.num_key_value_heads
        g = h // (H // kv)
        v = blk.self_attn.v_proj(blk.input_layernorm(r0))[:, g * Dh:(g + 1) * Dh]
    logits = model.get_output_embeddings()(norm(v @ a.head_weights(L)[h]))
    want = (logits.topk(5, dim=-1).indices == names[:, None]).any(-1).float().mean()
    assert float(prof.copy[L, h]) == pytest.approx(float(want), abs=1e-6)
    assert isinstance(classify(prof, attn=0.0), list)
    assert count_hooks(model) == 0


def _one_token_batch(batch, names):
    from actpatch import PairBatch, PromptPair

    n = len(names)
    ids = names[:, None]
    return PairBatch(tuple(PromptPair("x", "x", " a", " b", "n") for _ in range(n)), ids, ids, torch.ones_like(ids),
                     names, names, {"END": torch.zeros(n, dtype=torch.long)})


def test_frozen_norm_reproduces_the_norm(setup):
    _, lm, batch, _ = setup
    x = torch.randn(3, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    f = frozen_norm(lm.adapter.final_norm(), x)
    bias = getattr(lm.adapter.final_norm(), "bias", None)
    torch.testing.assert_close(f(x) + (0 if bias is None else bias), lm.adapter.final_norm()(x), **TOL)


def test_gap_account_matches_manual(setup):
    arch, lm, batch, _ = setup
    a = lm.adapter
    sites = [HiddenSite(L) for L in range(a.n_layers)] + [AttnOutSite(L) for L in range(a.n_layers)]
    rec, _ = capture(lm, batch.recipient_ids, batch, sites)
    don, _ = capture(lm, batch.donor_ids, batch, sites)
    records = gap_account(lm, batch, rec, don, exact={("hidden", 1): 0.5, ("all_heads", 1): -0.25})
    rows, end = torch.arange(len(batch)), batch.position("END")
    h = rec[HiddenSite(1)][rows, end]
    dh = don[HiddenSite(1)][rows, end] - h
    datt = don[AttnOutSite(1)][rows, end] - rec[AttnOutSite(1)][rows, end]
    r = records[1]
    assert r["hidden_delta"] == pytest.approx(float((dh.norm(dim=-1) / h.norm(dim=-1)).mean()), rel=1e-5)
    assert r["heads_delta"] == pytest.approx(float((datt.norm(dim=-1) / h.norm(dim=-1)).mean()), rel=1e-5)
    assert r["attn_share"] == pytest.approx(float((rec[AttnOutSite(1)][rows, end].norm(dim=-1) / h.norm(dim=-1)).mean()), rel=1e-5)
    assert r["hidden_indirect"] == pytest.approx(0.5 - r["hidden_direct"])
    assert r["heads_indirect"] == pytest.approx(-0.25 - r["heads_direct"])
    assert "hidden_total" not in records[0]  # no exact number given for layer 0: no total, no indirect part


def test_classify_rules_on_a_synthetic_profile():
    from actpatch.analysis.heads import HeadProfile

    L, H = 4, 3
    z = torch.zeros(L, H)
    att = {k: z.clone() for k in ("END->IO", "END->S1", "END->S2", "S2->S1", "S2->S1+1", "S1+1->S1")}
    dla, copy, neg = z.clone(), z.clone(), z.clone()
    att["END->IO"][3, 0], copy[3, 0], dla[3, 0] = 0.6, 0.9, 1.0        # name mover
    att["END->IO"][3, 1], neg[3, 1], dla[3, 1] = 0.6, 0.9, -1.0        # negative name mover
    att["END->S2"][2, 0] = 0.7                                          # S-inhibition: before the name mover
    att["END->S2"][3, 2], neg[3, 2], dla[3, 2] = 0.7, 1.0, 2.0         # writes against S itself
    att["S2->S1+1"][1, 0], att["S2->S1"][0, 1], att["S1+1->S1"][0, 2] = 0.5, 0.5, 0.5
    prof = HeadProfile(att, dla, copy, neg, recipient_logit_diff=4.0, n_names=10)
    got = {(c["layer"], c["head"]): c["classes"] for c in classify(prof)}
    assert got == {(3, 0): ["name mover"], (3, 1): ["negative name mover"], (2, 0): ["S-inhibition"],
                   (3, 2): ["S suppressor"], (1, 0): ["induction"], (0, 1): ["duplicate token"],
                   (0, 2): ["previous token"]}


def test_near_misses_name_the_one_criterion_missed():
    """A head meeting two of the name mover's three criteria is a near miss with the third named and its value;
    a head meeting all three, or only one, is not; one-criterion classes count from half the threshold."""
    from actpatch.analysis.heads import HeadProfile

    L, H = 4, 3
    z = torch.zeros(L, H)
    att = {k: z.clone() for k in ("END->IO", "END->S1", "END->S2", "S2->S1", "S2->S1+1", "S1+1->S1")}
    dla, copy, neg = z.clone(), z.clone(), z.clone()
    att["END->IO"][3, 0], copy[3, 0], dla[3, 0] = 0.6, 0.9, 1.0    # a name mover
    att["END->IO"][3, 1], copy[3, 1], dla[3, 1] = 0.6, 0.45, 1.0   # copy 0.45 < 0.5: missed by one
    att["END->IO"][2, 1], copy[2, 1], dla[2, 1] = 0.25, 0.9, 1.0   # END->IO 0.25 < 0.3: missed by one, farther
    att["END->IO"][2, 2] = 0.6                                      # one criterion of three: not near
    att["S2->S1+1"][1, 0], att["S2->S1+1"][1, 1], att["S2->S1+1"][1, 2] = 0.2, 0.1, 0.35  # induction: near, far, in
    prof = HeadProfile(att, dla, copy, neg, recipient_logit_diff=4.0, n_names=10)
    near = near_misses(prof)
    assert [(r["layer"], r["head"], r["missed"]) for r in near["name mover"]] == [
        (3, 1, "copy >= 0.5 (0.45)"), (2, 1, "END->IO >= 0.3 (0.25)")]  # closest first: gaps 0.1 and 0.167
    assert [(r["layer"], r["head"]) for r in near["induction"]] == [(1, 0)]
    assert class_rules()["name mover"] == "END->IO >= 0.3, copy >= 0.5, DLA >= 0.05 x |recipient LD|"
    assert class_rules(attn=0.4)["backup name mover"].startswith("END->IO >= 0.2,")


def test_cli_report_has_analysis_and_position_plots(gpt2_dir, tmp_path):
    import json

    from actpatch.cli import main

    out = tmp_path / "run"
    assert main(["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--donor", "abc", "--by-position", "--out", str(out),
                 "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "heads that nearly qualified" in report and "S2->S1+1 >= 0.3" in report
    assert "## Which heads do IOI" in report and "## Why heads move LD less than hidden states, donor design `abc`" in report
    for name in ("positions_abc.png", "heads_by_position_abc.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "results.json").read_text())
    gap = data["analysis"]["designs"]["abc"]["gap"]
    assert [r["layer"] for r in gap] == [0, 1, 2] and "heads_total" in gap[0]


def test_cli_compare_two_models_on_a_shared_depth_axis(gpt2_dir, gpt2_tokenizer, tmp_path):
    import json

    from actpatch.cli import main

    llama_dir = tmp_path / "tiny-llama"
    tiny_model("gpt_neox").save_pretrained(llama_dir)  # 2 layers against GPT-2's 3: depths differ
    gpt2_tokenizer.save_pretrained(llama_dir)
    out = tmp_path / "cmp"
    assert main(["compare", "--models", str(gpt2_dir), str(llama_dir), "--n-pairs", "3", "--donor", "swap",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [m["n_layers"] for m in summary["models"]] == [3, 2] and all(m["passed"] for m in summary["models"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "compare.md").read_text()
    assert "(3L x 4H)" in text and "(2L x 4H)" in text
    for i in (1, 2):
        assert (out / f"model-{i}" / "results.json").is_file()
    assert main(["compare", "--models", str(gpt2_dir), "--out", str(tmp_path / "one")]) == 2  # one model: an error


def test_gpt2_small_gets_the_paper_comparison(gpt2_tokenizer):
    """With model id gpt2 and GPT-2 small's 12 x 12 heads the report lines the classes up with the paper's list."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from actpatch import run_ioi
    from actpatch.report.markdown import render_report

    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=48, n_positions=64)
    cfg._attn_implementation = "eager"
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)
    lm = wrap_model(model, gpt2_tokenizer, {"spec": "gpt2", "model_id": "gpt2"})
    res = run_ioi(lm=lm, n_pairs=2, designs=("abc",), head_sweep=False, progress=False)
    table = res.analysis["heads"]["paper_comparison"]
    assert {(r["layer"], r["head"]) for r in table if r["class"] == "name mover"} == {(9, 9), (9, 6), (10, 0)}
    assert len(table) == 26 and all(isinstance(r["agrees"], bool) for r in table)
    assert "Compared with Wang et al. 2022 (GPT-2 small)" in render_report(res)


def test_nudge_summary_reads_noising_and_denoising_alike():
    """A flip is a sign change relative to the recipient; the strongest cell has the largest normalised effect."""
    from actpatch.analysis.summary import nudge_summary
    from actpatch.engine.metrics import normalised_effect

    def rows(rec: float, don: float, lds: list[float]) -> list[dict]:
        return [{"experiment": "all_heads", "position": "all", "layer": L, "logit_diff": ld,
                 "normalised_effect": float(normalised_effect(ld, rec, don))} for L, ld in enumerate(lds)]

    noising = nudge_summary(rows(4.0, -4.0, [3.9, 1.0, -2.0, 4.1]), 4.0)["all"]
    denoising = nudge_summary(rows(-4.0, 4.0, [-3.9, -1.0, 2.0, -4.1]), -4.0)["all"]
    for s in (noising, denoising):
        assert s["flip_layers"] == [2] and s["near_flip_layers"] == [] and s["nudge_layers"] == [0, 3]
        assert s["strongest"]["layer"] == 2
    near = nudge_summary(rows(-4.0, 2.0, [-0.5]), -4.0)["all"]  # normalised effect 0.58, no sign change
    assert near["near_flip_layers"] == [0] and near["flip_layers"] == []
