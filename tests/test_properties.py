"""Property-based tests (hypothesis): random tiny GPT-2 / Llama-GQA / NeoX models, sites and prompt pairs.

Invariants that must hold for every draw:
- identity: patching the recipient's own activations changes nothing (bit-identical on the one-variant
  reference path; 1e-5 on the batched fast path, whose matmul shapes differ);
- a hidden-state patch at every position of layer L reproduces the donor's logits (bit-identical);
- the per-head split of the attention output projection's input sums back to its output (1e-5);
- no hook outlives a call, even when the call raises.
The pairs-file parser is fuzzed too: any bytes give pairs or the project's own DataError.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actpatch import (
    AttnOutSite, DataError, HeadSite, HiddenSite, MlpOutSite, PairBatch, PromptPair, capture, count_hooks,
    last_logits, load_pairs_file, patch_variants, run_chunk, wrap_model,
)

VOCAB = 97
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tiny_models(draw):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    arch = draw(st.sampled_from(["gpt2", "llama", "gpt_neox"]))
    n_layers, n_heads, d_head = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4])), draw(st.sampled_from([4, 8]))
    d = n_heads * d_head
    if arch == "gpt2":
        cfg, cls = GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d, n_positions=32, vocab_size=VOCAB), GPT2LMHeadModel
    elif arch == "llama":  # grouped-query attention whenever kv < n_heads
        kv = draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0 and k <= n_heads]))
        cfg = LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=kv, hidden_size=d,
                          intermediate_size=2 * d, max_position_embeddings=32, vocab_size=VOCAB)
        cls = LlamaForCausalLM
    else:
        cfg = GPTNeoXConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads, hidden_size=d, intermediate_size=2 * d,
                            max_position_embeddings=32, vocab_size=VOCAB, use_parallel_residual=draw(st.booleans()))
        cls = GPTNeoXForCausalLM
    cfg._attn_implementation = "eager"
    state = torch.random.get_rng_state()
    torch.manual_seed(draw(st.integers(0, 2**16)))  # restored right after: tests leave the global RNG alone too
    try:
        model = cls(cfg).eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)
    return wrap_model(model, tokenizer=None, info={"spec": f"hypothesis-{arch}"})


@st.composite
def batches(draw):
    """Right-padded recipient/donor ids of random lengths (donor and recipient of a row share a length)."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 8))
    lengths = draw(st.lists(st.integers(2, T), min_size=B, max_size=B))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rec = torch.randint(0, VOCAB, (B, T), generator=gen)
    don = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    rec, don = rec * mask, don * mask  # padding id 0
    answer, wrong = torch.randint(0, VOCAB, (2, B), generator=gen)
    pairs = tuple(PromptPair("r", "d", " a", " b", "random") for _ in range(B))
    return PairBatch(pairs, rec, don, mask, answer, wrong, {"END": torch.tensor(lengths) - 1})


@st.composite
def sites(draw, lm, batch):
    a = lm.adapter
    layer = draw(st.integers(0, a.n_layers - 1))
    min_len = int(batch.attention_mask.sum(1).min())
    pos = draw(st.one_of(st.none(), st.just("END"), st.integers(-min_len, min_len - 1)))
    kind = draw(st.sampled_from(["hidden", "head", "heads", "attn", "mlp"]))
    if kind == "head":
        return HeadSite(layer, draw(st.integers(0, a.n_heads - 1)), pos)
    if kind == "heads":
        return HeadSite(layer, tuple(sorted(draw(st.sets(st.integers(0, a.n_heads - 1), min_size=1)))), pos)
    return {"hidden": HiddenSite, "attn": AttnOutSite, "mlp": MlpOutSite}[kind](layer, pos)


def _all_sites(lm):
    n = lm.adapter.n_layers
    return [c(L) for L in range(n) for c in (HiddenSite, HeadSite, AttnOutSite, MlpOutSite)]


def _logits(lm, ids, batch):
    with torch.inference_mode():
        return last_logits(lm, ids, batch.attention_mask, batch.position("END"))


@SETTINGS
@given(data=st.data())
def test_identity_patch_changes_nothing(data):
    lm, batch = data.draw(tiny_models()), data.draw(batches())
    site = data.draw(sites(lm, batch))
    own, _ = capture(lm, batch.recipient_ids, batch, _all_sites(lm))
    clean = _logits(lm, batch.recipient_ids, batch)
    assert torch.equal(run_chunk(lm, batch, own, [[site]])[0], clean)
    fast = patch_variants(lm, batch, own, [[site], [site, HiddenSite(0)]], lambda lg: {"lg": lg})["lg"]  # (2, B, V)
    torch.testing.assert_close(fast, clean.expand_as(fast), rtol=1e-5, atol=1e-5)
    assert count_hooks(lm.model) == 0


@SETTINGS
@given(data=st.data())
def test_hidden_patch_at_every_position_gives_the_donor(data):
    lm, batch = data.draw(tiny_models()), data.draw(batches())
    layer = data.draw(st.integers(0, lm.adapter.n_layers - 1))
    donor, donor_logits = capture(lm, batch.donor_ids, batch, [HiddenSite(layer)])
    assert torch.equal(run_chunk(lm, batch, donor, [[HiddenSite(layer)]])[0], donor_logits)
    assert count_hooks(lm.model) == 0


@SETTINGS
@given(data=st.data())
def test_heads_sum_to_the_output_projection(data):
    lm, batch = data.draw(tiny_models()), data.draw(batches())
    a = lm.adapter
    cache, _ = capture(lm, batch.recipient_ids, batch, [HeadSite(L) for L in range(a.n_layers)]
                       + [AttnOutSite(L) for L in range(a.n_layers)])
    for L in range(a.n_layers):
        z = cache[HeadSite(L)]  # (B, T, H, Dh)
        total = torch.einsum("bthd,hde->bte", z, a.head_weights(L))
        if a.head_bias(L) is not None:
            total = total + a.head_bias(L)
        # H per-head matmuls summed vs one fused matmul: float32 summation order (1e-5)
        torch.testing.assert_close(total, cache[AttnOutSite(L)], rtol=1e-5, atol=1e-5)


@SETTINGS
@given(data=st.data())
def test_no_hook_leaks_even_when_a_sweep_raises(data):
    lm, batch = data.draw(tiny_models()), data.draw(batches())
    variants = [[data.draw(sites(lm, batch))] for _ in range(data.draw(st.integers(1, 4)))]
    donor, _ = capture(lm, batch.donor_ids, batch, _all_sites(lm))
    fail_at = data.draw(st.integers(1, len(variants)))
    calls = []

    def reduce(logits):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return {"x": logits[..., 0]}

    try:
        patch_variants(lm, batch, donor, variants, reduce, max_rows=len(batch))
    except RuntimeError:
        pass
    assert count_hooks(lm.model) == 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
PAIR_LIKE = st.fixed_dictionaries(
    {}, optional={k: st.one_of(st.text(max_size=30), JSON_VALUES) for k in ("recipient", "donor", "answer", "wrong")})


def _parse(tmp_path, raw: bytes):
    f = tmp_path / "fuzz.jsonl"
    f.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing leading space only warns
        try:
            pairs = load_pairs_file(f)
        except DataError:
            return None
    assert pairs and all(isinstance(p, PromptPair) for p in pairs)
    return pairs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_fuzz_pairs_file_bytes(tmp_path, raw):
    _parse(tmp_path, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(PAIR_LIKE, JSON_VALUES, st.text(max_size=40)), max_size=5),
       sep=st.sampled_from(["\n", "\r\n", "\n\n"]))
def test_fuzz_pairs_file_json_lines(tmp_path, lines, sep):
    text = sep.join(x if isinstance(x, str) and not x.startswith("{") else json.dumps(x) for x in lines)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # hypothesis text may hold lone surrogates: feed them as JSON escapes instead
        raw = text.encode("utf-8", "backslashreplace")
    pairs = _parse(tmp_path, raw)
    if pairs is not None:
        for p in pairs:
            assert all(isinstance(v, str) and v.strip() for v in (p.recipient, p.donor, p.answer, p.wrong))


def test_deeply_nested_json_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="line 1"):
        load_pairs_file_bytes(tmp_path, b"[" * 100_000)


def load_pairs_file_bytes(tmp_path, raw: bytes):
    f = tmp_path / "deep.jsonl"
    f.write_bytes(raw)
    return load_pairs_file(f)
