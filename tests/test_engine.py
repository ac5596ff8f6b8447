"""Adapters, hooks, capture and patching on tiny random GPT-2 / Llama (GQA) / NeoX / Neo models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from actpatch import (
    AttnOutSite, HeadSite, HiddenSite, MlpOutSite, SiteError, UnsupportedArchitectureError, capture, count_hooks,
    generate_pairs, get_adapter, hooks, last_logits, patch_variants, patched, run_chunk, tokenize_ioi, wrap_model,
)
from actpatch.engine.metrics import ioi_scores

# Batching several variants into one forward pass changes matmul shapes and so float summation
# order; 1e-5 relative (float32) bounds that. Everything else is compared exactly.
BATCH_RTOL, BATCH_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def batch(tiny_lm):
    pairs = generate_pairs(tiny_lm.tokenizer, 5, designs=("abc",), seed=1)["abc"]
    return tokenize_ioi(tiny_lm.tokenizer, pairs)


@pytest.fixture(scope="module")
def donor(tiny_lm, batch):
    a = tiny_lm.adapter
    sites = [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(L) for L in range(a.n_layers)]
    sites += [MlpOutSite(L) for L in range(a.n_layers)] + [AttnOutSite(L) for L in range(a.n_layers)]
    return capture(tiny_lm, batch.donor_ids, batch, sites)


@pytest.mark.parametrize("arch,n_layers,n_heads,d_head", [
    ("gpt2", 3, 4, 8), ("llama", 3, 4, 8), ("gpt_neox", 2, 4, 8), ("gpt_neo", 2, 4, 8), ("gemma3", 2, 4, 16)])
def test_adapter_dimensions_and_head_decomposition(arch, n_layers, n_heads, d_head):
    model = tiny_model(arch)
    a = get_adapter(model)
    assert (a.n_layers, a.n_heads, a.d_head) == (n_layers, n_heads, d_head)
    x = torch.randn(2, 5, n_heads * d_head, generator=torch.Generator().manual_seed(0))
    z = x.view(2, 5, n_heads, d_head)
    manual = torch.einsum("bthd,hde->bte", z, a.head_weights(1))
    if a.head_bias(1) is not None:
        manual = manual + a.head_bias(1)
    # Per-head sums vs one fused matmul: float32 summation order differs, 1e-5 absolute is ample at this scale.
    torch.testing.assert_close(manual, a.attn_out(1)(x), rtol=0, atol=1e-5)


def test_gpt2_adapter_targets_attention_c_proj_not_mlp():
    a = get_adapter(tiny_model("gpt2"))
    assert a.attn_out(0) is a.model.transformer.h[0].attn.c_proj
    assert a.attn_out(0) is not a.model.transformer.h[0].mlp.c_proj


def test_unknown_architecture_lists_supported():
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(UnsupportedArchitectureError, match="'bert' is not a causal model .changing token 5"):
        get_adapter(model)  # bidirectional: refused by the causality probe, whatever its config says

    class Renamed(LlamaConfig):
        model_type = "renamed_llama"

    causal = LlamaForCausalLM(Renamed(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(UnsupportedArchitectureError, match="no adapter for model_type 'renamed_llama'; supported: gpt2, llama"):
        get_adapter(causal)


def test_hooks_removed_even_on_exception(tiny_lm):
    block = tiny_lm.adapter.block(0)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks([(block, "output", lambda x: None), (tiny_lm.adapter.attn_out(0), "input", lambda x: None)]):
            assert count_hooks(tiny_lm.model) == 2
            raise RuntimeError("boom")
    assert count_hooks(tiny_lm.model) == 0


def test_hooks_removed_when_hook_itself_raises(tiny_lm, batch):
    def bad(x):
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        with hooks([(tiny_lm.adapter.block(1), "output", bad)]):
            last_logits(tiny_lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    assert count_hooks(tiny_lm.model) == 0


def test_head_patch_equals_manual_slice_swap(tiny_lm, batch, donor):
    """actpatch's head patch == a hand-written pre-hook that copies one head's 8 columns."""
    cache, _ = donor
    a = tiny_lm.adapter
    L, h = 1, 2
    lo, hi = h * a.d_head, (h + 1) * a.d_head
    donor_x = cache[HeadSite(L)].reshape(len(batch), batch.recipient_ids.shape[1], -1)  # (B, T, H*Dh)

    def manual(module, args):
        x = args[0].clone()
        x[..., lo:hi] = donor_x[..., lo:hi]
        return (x,)

    handle = a.attn_out(L).register_forward_pre_hook(manual)
    try:
        with torch.inference_mode():
            expected = last_logits(tiny_lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    finally:
        handle.remove()
    got = run_chunk(tiny_lm, batch, cache, [[HeadSite(L, h)]])[0]
    assert torch.equal(got, expected)


def test_position_patch_only_touches_that_position(tiny_lm, batch, donor):
    """A hidden-state patch at S2 leaves every earlier position's block output untouched."""
    cache, _ = donor
    L = 0
    seen = []
    with torch.inference_mode(), hooks([(tiny_lm.adapter.block(L + 1), "output", lambda x: seen.append(x.clone()))]):
        with patched(tiny_lm, batch, cache, [[HiddenSite(L, "S2")]]):
            last_logits(tiny_lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
        last_logits(tiny_lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    patched_out, clean_out = seen
    s2 = batch.position("S2")
    for row in range(len(batch)):
        assert torch.equal(patched_out[row, : s2[row]], clean_out[row, : s2[row]])
        assert not torch.equal(patched_out[row, s2[row]], clean_out[row, s2[row]])


def test_batched_variants_equal_one_at_a_time(tiny_lm, batch, donor):
    cache, _ = donor
    a = tiny_lm.adapter
    variants = [[HeadSite(L, h)] for L in range(a.n_layers) for h in range(a.n_heads)]
    variants += [[HiddenSite(L, "END")] for L in range(a.n_layers)] + [[MlpOutSite(1, "S2"), AttnOutSite(0, -1)]]
    # by position: the fast path then also skips positions before the patch (recipient keys/values reused)
    variants += [[HeadSite(L, h, p)] for L in range(a.n_layers) for h in (0, 3) for p in ("IO", "S1+1", "S2", 2)]
    scores = lambda lg: ioi_scores(lg, batch.answer_ids, batch.wrong_ids)  # noqa: E731
    batched = patch_variants(tiny_lm, batch, cache, variants, scores, donor_from_batch=True)["logit_diff"]
    one_by_one = patch_variants(tiny_lm, batch, cache, variants, scores, max_rows=1)["logit_diff"]
    chunked = patch_variants(tiny_lm, batch, cache, variants, scores, max_rows=3 * len(batch))["logit_diff"]
    reference = torch.stack([  # one plain full forward pass per variant: the simple path
        scores(run_chunk(tiny_lm, batch, cache, [v]))["logit_diff"][0] for v in variants])
    assert batched.shape == (len(variants), len(batch))
    torch.testing.assert_close(batched, reference, rtol=BATCH_RTOL, atol=BATCH_ATOL)
    torch.testing.assert_close(batched, one_by_one, rtol=BATCH_RTOL, atol=BATCH_ATOL)
    torch.testing.assert_close(chunked, one_by_one, rtol=BATCH_RTOL, atol=BATCH_ATOL)


@pytest.mark.parametrize("design", ["s2io", "swap"])
def test_patches_inside_the_shared_prefix_are_no_ops_on_the_fast_path(tiny_lm, design):
    """s2io donors differ from their recipients only from S2 on; swap donors from the first name on.

    The fast path starts each chunk after the donor/recipient shared prefix. A patch at a named
    position inside that prefix (IO, S1, S1+1 for s2io) writes the recipient's own values, so the
    result must be the unpatched recipient's, and must equal a plain forward pass per variant.
    (A regression: such positions were shifted by the chunk's start and wrapped to the end.)
    """
    a = tiny_lm.adapter
    pairs = generate_pairs(tiny_lm.tokenizer, 4, designs=(design,), seed=2)[design]
    b = tokenize_ioi(tiny_lm.tokenizer, pairs)
    sites = [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(L) for L in range(a.n_layers)]
    cache, _ = capture(tiny_lm, b.donor_ids, b, sites)
    rec_cache, rec_logits = capture(tiny_lm, b.recipient_ids, b, [])
    positions = ("IO", "S1", "S1+1", "S2", "END", 1, None)
    variants = [[site] for L in range(a.n_layers) for p in positions
                for site in (HiddenSite(L, p), HeadSite(L, None, p), HeadSite(L, 1, p))]
    scores = lambda lg: ioi_scores(lg, b.answer_ids, b.wrong_ids)  # noqa: E731
    fast = patch_variants(tiny_lm, b, cache, variants, scores, donor_from_batch=True)["logit_diff"]
    reference = torch.stack([scores(run_chunk(tiny_lm, b, cache, [v]))["logit_diff"][0] for v in variants])
    torch.testing.assert_close(fast, reference, rtol=BATCH_RTOL, atol=BATCH_ATOL)
    if design == "s2io":
        unpatched = scores(rec_logits)["logit_diff"]
        before_s2 = [k for k, v in enumerate(variants) if v[0].pos in ("IO", "S1", "S1+1", 1)]
        # identical tokens there, so identical activations: only float summation order differs
        torch.testing.assert_close(fast[before_s2], unpatched.expand(len(before_s2), -1), rtol=BATCH_RTOL, atol=BATCH_ATOL)


def test_answer_columns_readout_equals_full_logits(tiny_lm, batch, donor):
    cache, _ = donor
    variants = [[HeadSite(1, 2)], [HiddenSite(0, "S2")], [HeadSite(2, None, "END")]]
    cols = torch.stack([batch.answer_ids, batch.wrong_ids], dim=1)  # (B, 2)
    full = patch_variants(tiny_lm, batch, cache, variants, lambda lg: {"lg": lg})["lg"]  # (K, B, V)
    part = patch_variants(tiny_lm, batch, cache, variants, lambda lg: {"lg": lg}, columns=cols)["lg"]  # (K, B, 2)
    expected = full.gather(-1, cols.expand(len(variants), -1, -1))
    # a gathered dot product vs a row of the full matmul: float32 summation order (1e-5)
    torch.testing.assert_close(part, expected, rtol=BATCH_RTOL, atol=1e-5)


def test_chunk_plan_keeps_costs_close_to_each_variants_own():
    from actpatch.engine.planning import plan_chunks

    starts = [(L, p) for L in range(12) for p in range(16)]
    chunks = plan_chunks(starts, 12, (32, 16), max_tokens=2048)
    assert sorted(i for c in chunks for i in c) == list(range(len(starts)))
    for c in chunks:
        L, p = min(starts[i][0] for i in c), min(starts[i][1] for i in c)
        own = sum((12 - starts[i][0]) * (16 - starts[i][1]) for i in c)
        assert len(c) * (12 - L) * (16 - p) <= 1.15 * own
        assert len(c) * 32 * (16 - p) <= 2048


@pytest.mark.parametrize("extra", [0, 6, 40])
def test_chunk_plan_counts_a_continuations_positions(extra):
    """Continuation rows compute ``extra`` positions whatever the start: counted in each chunk's cost and size.
    Without them, a chunk of late-position variants would hold far more tokens than the budget."""
    from actpatch.engine.planning import plan_chunks

    starts = [(L, p) for p in range(16) for L in range(12)]  # position-major: the plan must reorder
    chunks = plan_chunks(starts, 12, (32, 16), max_tokens=4096, extra=extra)
    assert sorted(i for c in chunks for i in c) == list(range(len(starts)))
    for c in chunks:
        L, p = min(starts[i][0] for i in c), min(starts[i][1] for i in c)
        own = sum((12 - starts[i][0]) * (16 - starts[i][1] + extra) for i in c)
        assert len(c) * (12 - L) * (16 - p + extra) <= 1.15 * own
        assert len(c) * 32 * (16 - p + extra) <= 4096 or len(c) == 1


def test_token_budget_is_positive_and_sized_to_the_model(tiny_lm):
    from actpatch.engine.planning import token_budget

    budget = token_budget(tiny_lm, 16)
    assert 16 <= budget <= 10**7
    cfg = tiny_lm.model.config
    if tiny_lm.device.type == "cpu":  # the MLP's hidden activations of one chunk fit the cache budget
        d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
        assert budget * d_ff * 4 <= 12 * 2**20 or budget == 16


def test_variants_do_not_leak_into_each_other(tiny_lm, batch, donor):
    """An empty variant stacked next to a patched one still gives the clean recipient logits."""
    cache, _ = donor
    clean = run_chunk(tiny_lm, batch, cache, [[]])[0]
    both = run_chunk(tiny_lm, batch, cache, [[HiddenSite(0)], []])
    torch.testing.assert_close(both[1], clean, rtol=BATCH_RTOL, atol=BATCH_ATOL)
    assert not torch.allclose(both[0], clean)


def test_site_validation_errors(tiny_lm, batch, donor):
    cache, _ = donor
    with pytest.raises(SiteError, match=r"layer must be an int in \[0, 2\]"):
        run_chunk(tiny_lm, batch, cache, [[HeadSite(7)]])
    with pytest.raises(SiteError, match=r"head must be an int in \[0, 3\]"):
        run_chunk(tiny_lm, batch, cache, [[HeadSite(0, 4)]])
    with pytest.raises(SiteError, match="position 'XYZ' is not known"):
        run_chunk(tiny_lm, batch, cache, [[HiddenSite(0, "XYZ")]])
    with pytest.raises(SiteError, match="outside the prompt"):
        run_chunk(tiny_lm, batch, cache, [[HiddenSite(0, 200)]])
    assert count_hooks(tiny_lm.model) == 0


def test_model_left_as_found(tiny_lm, batch, donor):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    run_chunk(tiny_lm, batch, donor[0], [[HeadSite(0), HiddenSite(1, "END")]])
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_lm.model.training and count_hooks(tiny_lm.model) == 0


def test_wrap_model_describes_gqa_query_heads(gpt2_tokenizer):
    lm = wrap_model(tiny_model("llama"), gpt2_tokenizer)
    # 4 query heads over 2 KV heads: o_proj takes n_heads * d_head = 32 features, patched per query head.
    assert lm.info["n_heads"] == 4 and lm.info["d_head"] == 8 and lm.adapter.attn_out(0).in_features == 32


def test_shared_prefix_counts_identical_leading_tokens(batch):
    from actpatch.engine.planning import shared_prefix

    first_diff = [int((d != r).nonzero()[0]) for d, r in zip(batch.donor_ids, batch.recipient_ids)]
    assert shared_prefix(batch) == min(first_diff) > 0


def test_fast_path_check_recomputes_every_kind_of_patch(tiny_lm, batch, donor):
    """The sanity check must notice a wrong cell of any kind, not only at its evenly spread picks."""
    from actpatch.engine.sanity import check_fast_path

    cache, _ = donor
    a = tiny_lm.adapter
    variants = [[HeadSite(L, h)] for L in range(a.n_layers) for h in range(a.n_heads)]
    variants += [[HiddenSite(L, p)] for p in ("IO", "S1+1") for L in range(a.n_layers)]
    scores = lambda lg: ioi_scores(lg, batch.answer_ids, batch.wrong_ids)  # noqa: E731
    ld = patch_variants(tiny_lm, batch, cache, variants, scores, donor_from_batch=True)["logit_diff"]
    assert check_fast_path(tiny_lm, batch, cache, variants, ld).passed
    n = len(variants)
    spread = {0, n // 3, 2 * n // 3, n - 1}
    bad = next(k for k, v in enumerate(variants) if v[0].pos == "IO" and k not in spread and
               k == max(j for j, w in enumerate(variants) if w[0].pos == "IO"))  # the last IO cell
    wrong = ld.clone()
    wrong[bad] += 1.0
    check = check_fast_path(tiny_lm, batch, cache, variants, wrong)
    assert not check.passed and "numbers are wrong" in check.detail
