"""Attribution patching against a finite-difference directional derivative (float64 tiny models)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from actpatch import HeadSite, HiddenSite, capture, count_hooks, generate_pairs, hooks, last_logits, tokenize_ioi, wrap_model
from actpatch.engine.attribution import attribute
from actpatch.engine.metrics import logit_diff


# Central differences (truncation O(eps^2)). GPT-2 runs fully in float64, so eps can be small and the check
# tight. Llama's RMSNorm computes in float32 even in a float64 model: float32 rounding (~1e-7 on LD) then
# needs a larger eps, and 5e-3 relative covers rounding plus truncation.
@pytest.mark.parametrize("arch,eps,rel", [("gpt2", 1e-4, 1e-5), ("llama", 1e-2, 5e-3)])
def test_attribution_is_the_directional_derivative(arch, eps, rel, gpt2_tokenizer):
    lm = wrap_model(tiny_model(arch).double(), gpt2_tokenizer)
    batch = tokenize_ioi(gpt2_tokenizer, generate_pairs(gpt2_tokenizer, 4, designs=("abc",), seed=3)["abc"])
    a = lm.adapter
    sites = [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(L) for L in range(a.n_layers)]
    donor, _ = capture(lm, batch.donor_ids, batch, sites)
    rec, _ = capture(lm, batch.recipient_ids, batch, sites)
    att = attribute(lm, batch, donor)
    assert att.heads.shape == (a.n_layers, a.n_heads, len(batch), batch.recipient_ids.shape[1])
    assert count_hooks(lm.model) == 0

    def mean_ld(specs) -> float:
        with torch.inference_mode(), hooks(specs):
            lg = last_logits(lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
        return float(logit_diff(lg, batch.answer_ids, batch.wrong_ids).mean())

    L, h = 1, 2
    z_don, z_rec = donor[HeadSite(L)], rec[HeadSite(L)]
    h_don, h_rec = donor[HiddenSite(0)], rec[HiddenSite(0)]

    def head_at(e: float):
        def nudge(x):
            z = x.clone().view(*x.shape[:-1], a.n_heads, a.d_head)  # (B, T, H, Dh)
            z[:, :, h] = z_rec[:, :, h] + e * (z_don[:, :, h] - z_rec[:, :, h])
            return z.view_as(x)

        return [(a.attn_out(L), "input", nudge)]

    def hidden_at(e: float):
        return [(a.block(0), "output", lambda x: h_rec + e * (h_don - h_rec))]

    fd_head = (mean_ld(head_at(eps)) - mean_ld(head_at(-eps))) / (2 * eps)
    fd_hidden = (mean_ld(hidden_at(eps)) - mean_ld(hidden_at(-eps))) / (2 * eps)
    assert float(att.head_effect()[L, h]) == pytest.approx(fd_head, rel=rel, abs=1e-9)
    assert float(att.hidden[0].sum()) == pytest.approx(fd_hidden, rel=rel, abs=1e-9)
    assert float(att.at_positions(att.heads, batch.position("END"))[L, h]) == pytest.approx(
        float(att.heads[L, h, torch.arange(len(batch)), batch.position("END")].sum()), rel=1e-12)


def test_attribution_leaves_parameters_as_found(gpt2_tokenizer):
    model = tiny_model("gpt2")
    model.requires_grad_(True)
    lm = wrap_model(model, gpt2_tokenizer)
    batch = tokenize_ioi(gpt2_tokenizer, generate_pairs(gpt2_tokenizer, 2, designs=("swap",))["swap"])
    donor, _ = capture(lm, batch.donor_ids, batch, [HeadSite(L) for L in range(3)] + [HiddenSite(L) for L in range(3)])
    attribute(lm, batch, donor)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert count_hooks(model) == 0
