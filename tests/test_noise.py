"""Noised donors (causal tracing): the engine's noised runs against a plain hand-written reference.

The reference adds the noise itself (its own generator draws, the standard deviation of the embedding matrix's
sampled rows, the span found by decoding prefixes) and patches with plain hooks, one full forward per patch.
"""

from __future__ import annotations

import json

import pytest
import torch

from actpatch import HiddenSite, PromptPair, capture, patch_variants
from actpatch.engine.batch import tokenize_pairs
from actpatch.engine.planning import shared_prefix
from actpatch.engine.pairs import load_pairs_file
from actpatch.engine.sanity import check_donor_differs
from actpatch.errors import PairsFileError
from actpatch.experiment.contrast import run_pairs
from reference import module_of

PROMPT, OTHER = "The Eiffel Tower is located in the city of", "The Louvre is located in the city of"
PAIRS = [PromptPair(PROMPT, PROMPT, " Paris", " Rome", positions=(("subject", "Eiffel Tower", "Eiffel Tower"),),
                    noise=("Eiffel Tower", 3.0, 11)),
         PromptPair(OTHER, OTHER, " Paris", " London", positions=(("subject", "Louvre", "Louvre"),),
                    noise=("Louvre", 2.0, 12))]


def _span(tok, prompt: str, sub: str) -> list[int]:
    """Token indices of ``sub`` by prefix decoding: from the first prefix reaching its start to the one holding its end."""
    ids, at = tok(prompt)["input_ids"], prompt.index(sub)
    text = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    first = next(i for i in range(len(ids)) if len(text[i]) > at)
    last = next(i for i in range(len(ids)) if sub in text[i])
    return list(range(first, last + 1))


def _naive(model, tok, pair: PromptPair, layer: int, p: int) -> torch.Tensor:
    """END logits of the recipient after writing the noised donor's block-``layer`` output at position p."""
    emb = model.get_input_embeddings()
    std = emb.weight[:: max(1, emb.weight.shape[0] // 4096)].std()
    span, scale, seed = pair.noise
    cols = _span(tok, pair.donor, span)
    z = torch.randn(len(cols), emb.weight.shape[1], generator=torch.Generator().manual_seed(seed)) * scale * std
    ids = torch.tensor([tok(pair.recipient)["input_ids"]])
    kept = {}

    def noise(m, a, out):
        out = out.clone()
        out[0, cols] += z
        return out

    block = module_of(model, "hidden", layer)
    handles = [emb.register_forward_hook(noise),
               block.register_forward_hook(lambda m, a, out: kept.setdefault("x", (out[0] if isinstance(out, tuple) else out).clone()))]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()

    def write(m, a, out):
        x = (out[0] if isinstance(out, tuple) else out).clone()
        x[0, p] = kept["x"][0, p]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handle = block.register_forward_hook(write)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -1]
    finally:
        handle.remove()


def test_noised_donor_patches_match_a_plain_reference(tiny_lm, gpt2_tokenizer):
    """Hidden states at the subject's last token and at END, the fast path (prefix reuse) against the reference:
    1e-4 (float32, batch shape changes the summation order). Skipping the noised prefix would fail it."""
    tok, a = gpt2_tokenizer, tiny_lm.adapter
    batch = tokenize_pairs(tok, PAIRS)
    assert shared_prefix(batch) == 1  # "The" is shared; the subject's noised tokens are not
    names = ["subject", "END"]
    variants = [[HiddenSite(L, n)] for L in range(a.n_layers) for n in names]
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, [HiddenSite(L) for L in range(a.n_layers)])
    fast = patch_variants(tiny_lm, batch, donor, variants, reduce=lambda lg: {"logits": lg}, donor_from_batch=True)["logits"]
    moved = 0
    for k, (site,) in enumerate(variants):
        for b, pair in enumerate(PAIRS):
            p = int(batch.position(site.pos)[b])
            want = _naive(tiny_lm.model, tok, pair, site.layer, p)
            assert torch.allclose(fast[k, b], want, atol=1e-4), (site, b)
            moved += int(site.pos == "subject" and site.layer == 0 and
                         not torch.allclose(want, tiny_lm.model(torch.tensor([tok(pair.recipient)["input_ids"]])).logits[0, -1], atol=1e-3))
    assert moved == 2  # the noise changes what the subject carries: a no-op noise could not pass


def test_noise_is_the_same_in_any_batch(tiny_lm, gpt2_tokenizer):
    """A row's noise comes from its own seed: alone or in a batch, its noised donor logits agree (1e-5, padding)."""
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    _, both = capture(tiny_lm, batch.donor_ids, batch, [])
    one = batch.select([1]).trim()
    _, alone = capture(tiny_lm, one.donor_ids, one, [])
    _, clean = capture(tiny_lm, one.recipient_ids, one, [])
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert not torch.allclose(alone[0], clean[0], atol=1e-3)


def test_a_noised_donor_is_not_a_control_pair(tiny_lm, gpt2_tokenizer):
    """The same text with noise is a real donor: a donor cache that is the clean recipient's run fails the check."""
    batch = tokenize_pairs(gpt2_tokenizer, PAIRS)
    sites = [HiddenSite(0)]
    rec, _ = capture(tiny_lm, batch.recipient_ids, batch, sites)
    don, _ = capture(tiny_lm, batch.donor_ids, batch, sites)
    assert check_donor_differs(tiny_lm, batch, rec, don).passed
    assert not check_donor_differs(tiny_lm, batch, rec, rec).passed


def test_run_with_noised_pairs_passes_its_checks(tiny_lm, gpt2_tokenizer):
    result = run_pairs(lm=tiny_lm, pairs=PAIRS, sites=("hidden", "mlp"), positions=("subject", "END"), progress=False)
    assert result.passed, {n: c["detail"] for n, c in result.sanity.items() if not c["passed"]}


def test_pairs_file_noise_field(tmp_path):
    good = {"recipient": PROMPT, "donor": PROMPT, "answer": " Paris", "wrong": " Rome", "noise": {"span": "Eiffel Tower"}}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert load_pairs_file(path)[0].noise == ("Eiffel Tower", 3.0, 0)
    path.write_text(json.dumps({**good, "noise": {"span": "Eiffel Tower", "scale": -1}}) + "\n")
    with pytest.raises(PairsFileError, match="noise"):
        load_pairs_file(path)


def _noised_logprob(model, tok, pair: PromptPair, answer: str) -> float:
    """log P(answer | noised donor prompt) by teacher forcing, the noise added by hand (as in ``_naive``)."""
    emb = model.get_input_embeddings()
    std = emb.weight[:: max(1, emb.weight.shape[0] // 4096)].std()
    span, scale, seed = pair.noise
    cols = _span(tok, pair.donor, span)
    z = torch.randn(len(cols), emb.weight.shape[1], generator=torch.Generator().manual_seed(seed)) * scale * std
    prompt = tok(pair.donor)["input_ids"]
    cont = tok(pair.donor + answer)["input_ids"][len(prompt):]
    with torch.no_grad():
        x = emb(torch.tensor([prompt + cont[:-1]]))
        x[0, cols] += z
        logp = model(inputs_embeds=x).logits[0].log_softmax(-1)  # (T, V)
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)))


def test_a_noised_donors_baseline_with_multi_token_answers_is_the_noised_run(tiny_lm, gpt2_tokenizer):
    """The donor baseline of noised pairs whose answers have several tokens is read from the noised run, not the
    clean prompt (a bug that made donor == recipient and every normalised effect infinite): against teacher
    forcing by hand with the noise added by hand, 1e-4 (float32, padded batch vs one row)."""
    pairs = [PromptPair(PROMPT, PROMPT, " Rio de Janeiro", " Buenos Aires",
                        positions=(("subject", "Eiffel Tower", "Eiffel Tower"),), noise=("Eiffel Tower", 3.0, 11)),
             PromptPair(OTHER, OTHER, " Paris", " Los Angeles", positions=(("subject", "Louvre", "Louvre"),),
                        noise=("Louvre", 2.0, 12))]
    result = run_pairs(lm=tiny_lm, pairs=pairs, sites=("hidden",), positions=("subject", "END"), metric="logit_diff",
                       progress=False)
    assert result.passed, {n: c["detail"] for n, c in result.sanity.items() if not c["passed"]}
    want = [_noised_logprob(tiny_lm.model, gpt2_tokenizer, p, p.answer) - _noised_logprob(tiny_lm.model, gpt2_tokenizer, p, p.wrong)
            for p in pairs]
    donor, recipient = result.baseline["donor"]["mean_logit_diff"], result.baseline["recipient"]["mean_logit_diff"]
    assert donor == pytest.approx(sum(want) / 2, abs=1e-4)
    assert abs(donor - recipient) > 1e-3  # the noise moves the metric: a clean read could not pass
