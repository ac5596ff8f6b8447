"""Head characterisation on IOI: where each head looks, what it writes, which IOI class it resembles.

    prof = characterise(lm, batch)          # batch: IOI recipients with IO, S1, S1+1, S2, END
    prof.attention["END->IO"]                # (L, H) mean attention probability
    prof.dla                                 # (L, H) direct logit attribution to logit(IO) - logit(S)
    prof.copy                                # (L, H) copy score; prof.neg_copy the negative one
    classify(prof)                           # analysis.headclasses: [{"layer", "head", "classes", "evidence"}, ...]

Definitions (Wang et al. 2022, "Interpretability in the wild"):
- attention: the softmax probability from one named position to another, averaged over pairs:
  END->IO, END->S1, END->S2 (name movers, S-inhibition), S2->S1 (duplicate token), S2->S1+1
  (induction), S1+1->S1 (previous token).
- direct logit attribution: the head's output at END, z_h W_O[h], through the final norm with its
  scale frozen at the recipient's own run, dotted with W_U[IO] - W_U[S]; mean over pairs. Soft-capping
  (Gemma 2/3) is left out: DLA is a linear read-out.
- copy score: for single-token names, the residual after block 0 (the paper: embedding then MLP0) is
  sent through the head's OV circuit (a length-1 sequence attends only to itself, so the head's
  output is exactly V then W_O), then the final norm and the unembedding; the score is the fraction
  of names that come out in the top 5 logits. The negative copy score negates the OV output first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..engine.batch import PairBatch
from ..engine.capture import ActivationCache, capture, rows_at
from ..engine.hooks import hooks
from ..engine.metrics import logit_diff
from ..engine.sites import AttnOutSite, HeadSite, HiddenSite
from ..errors import UnsupportedArchitectureError
from ..model.models import LoadedModel
from ..model.placement import execution_device, onloaded

ATTENTION_PAIRS = {"END->IO": ("END", "IO"), "END->S1": ("END", "S1"), "END->S2": ("END", "S2"),
                   "S2->S1": ("S2", "S1"), "S2->S1+1": ("S2", "S1+1"), "S1+1->S1": ("S1+1", "S1")}

# Wang et al. 2022, GPT-2 small (layer, head); anchors.md section 2b
PAPER_GPT2_HEADS = {
    "name mover": [(9, 9), (9, 6), (10, 0)],
    "negative name mover": [(10, 7), (11, 10)],
    "S-inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (6, 9), (5, 8), (5, 9)],
    "duplicate token": [(0, 1), (3, 0), (0, 10)],
    "previous token": [(2, 2), (4, 11)],
    "backup name mover": [(9, 0), (9, 7), (10, 1), (10, 2), (10, 6), (10, 10), (11, 2), (11, 9)],
}


NAMES_PER_PASS = 32  # copy scores: full-vocabulary logits of this many names per head at a time


@dataclass(frozen=True)
class HeadProfile:
    """Per-head evidence, every array (L, H); ``recipient_logit_diff`` sets the DLA scale."""

    attention: dict[str, Float[Tensor, "layer head"]]
    dla: Float[Tensor, "layer head"]
    copy: Float[Tensor, "layer head"] | None          # None: not computed (characterise(copy=False))
    neg_copy: Float[Tensor, "layer head"] | None
    recipient_logit_diff: float
    n_names: int
    bias_dla: Float[Tensor, "layer"] | None = None  # the output projection's bias, per layer (None: no bias)


def frozen_norm(norm: nn.Module, x: Float[Tensor, "batch d"]):
    """The norm as a linear map with its per-row scale frozen at ``x``; ``f(x) + bias == norm(x)`` (checked)."""
    with onloaded(norm):  # a device map may have offloaded it; the gains are copied to x's device
        weight, bias = (None if t is None else t.detach().to(x.device) for t in (
            getattr(norm, "weight", None), getattr(norm, "bias", None)))
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6
    if isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__:
        xf = x.float()
        scale = (xf.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()  # (B, 1)
        gain = 1.0 if weight is None else weight.float()

        def f(c: Tensor) -> Tensor:
            return (c.float() - c.float().mean(-1, keepdim=True)) * scale * gain
    else:  # RMSNorm family; Gemma stores the gain as weight - 1
        xf = x.float()
        scale = (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        gain = 1.0 if weight is None else (1.0 + weight.float() if "Gemma" in type(norm).__name__ else weight.float())

        def f(c: Tensor) -> Tensor:
            return c.float() * scale * gain
        bias = None  # RMSNorm has none
    own = weight.dtype if weight is not None else x.dtype  # the norm runs in its own (the model's) dtype
    with torch.no_grad():
        expected = norm(x.to(execution_device(norm), own)).float().to(x.device)  # a device map may put it elsewhere
        got = f(x) + (0 if bias is None else bias.float())
    full = all(t in (torch.float32, torch.float64) for t in (x.dtype, own))
    tol = 1e-3 if full else 5e-2  # the norm itself ran in half precision
    if not torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max()) + 1e-6):
        raise UnsupportedArchitectureError(
            f"cannot linearise the final norm {type(norm).__name__}: expected a LayerNorm or RMSNorm, and the "
            "frozen-scale map does not reproduce it; please report the model id."
        )
    return f


def ld_direction(lm: LoadedModel, batch: PairBatch, device) -> Float[Tensor, "batch d_model"]:
    """W_U[IO] - W_U[S] per pair: the residual direction that logit(IO) - logit(S) reads."""
    with onloaded(lm.model.get_output_embeddings()) as head:
        w_u = head.weight  # (V, D)
        return (w_u[batch.answer_ids.to(w_u.device)] - w_u[batch.wrong_ids.to(w_u.device)]).float().to(device)


def _recipient_run(lm: LoadedModel, batch: PairBatch) -> tuple[dict[int, Tensor], ActivationCache, Tensor]:
    """One recipient forward: every layer's attention weights (B, H, T, T), heads, last residual, END logits.

    The weights are read from the attention modules' own (output, weights);
    ``output_attentions=True`` would make transformers install hooks that stay on the model.
    """
    a = lm.adapter
    weights: dict[int, Tensor] = {}

    def keep(L: int):
        def fn(out) -> None:
            weights[L] = out[1].detach()  # (B, H, T, T)
        return fn

    sites = [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(a.n_layers - 1)]
    sites += [AttnOutSite(L) for L in range(a.n_layers) if a.attn_post_norm(L) is not None]  # post-norm scales
    with hooks([(a.attention(L), "result", keep(L)) for L in range(a.n_layers)]):
        cache, logits = capture(lm, batch.recipient_ids, batch, sites)
    return weights, cache, logits


def _attention(weights: dict[int, Tensor], batch: PairBatch) -> dict[str, Tensor]:
    """Mean attention between named positions, per layer and head."""
    rows = torch.arange(len(batch))
    stacked = torch.stack([weights[L].float().cpu() for L in sorted(weights)])  # (L, B, H, T, T)
    result = {}
    for name, (q, k) in ATTENTION_PAIRS.items():
        if q not in batch.positions or k not in batch.positions:
            continue
        qi, ki = batch.positions[q], batch.positions[k]
        per_layer = [layer[rows, :, qi, ki].mean(0) for layer in stacked]  # (H,) each
        result[name] = torch.stack(per_layer)  # (L, H)
    return result


def ld_readout(lm: LoadedModel, batch: PairBatch, resid_end: Float[Tensor, "batch d_model"]) -> Callable[[Tensor], Tensor]:
    """g(x) = (x through the final norm, its scale frozen at ``resid_end``) . (W_U[IO] - W_U[S]), per pair:
    (..., B, D) -> (..., B). ``resid_end``: the recipient's last residual stream at END, (B, D)."""
    dev = execution_device(lm.model.get_output_embeddings())  # the read-out's device (a device map may split the model)
    a = lm.adapter
    _require_residual_sum(lm, "the direct logit attribution")
    f = frozen_norm(a.final_norm(), resid_end.to(dev))
    proj = a.final_proj()  # OPT's project_out: linear, no bias
    direction = ld_direction(lm, batch, dev) * a.logit_scale  # (B, D_embed); Cohere and Granite scale the logits
    if proj is not None:
        return lambda x: (proj(f(x.to(dev)).to(proj.weight.dtype)).float() * direction).sum(-1)
    return lambda x: (f(x.to(dev)) * direction).sum(-1)


def _require_residual_sum(lm: LoadedModel, what: str) -> None:
    """Refuse ``what`` on a model whose residual stream is not a sum of writes (norms after the residual add)."""
    if lm.adapter.arch.post_ln or lm.adapter.final_norm() is None:
        raise UnsupportedArchitectureError(
            f"{what} needs a residual stream that is the sum of what each block writes, but {lm.adapter.arch.name} "
            f"({lm.model.config.model_type}) normalises after the residual add (post-LN). Patching works on it; "
            "run without the analysis (--no-analysis, analysis=False).")


def direct_readout(
    lm: LoadedModel, batch: PairBatch, recipient: ActivationCache,
) -> tuple[torch.device, Tensor, Callable[[Tensor], Tensor]]:
    """The direct path to LD at END: (device, END indices there, ``ld_readout`` frozen at the recipient's last
    residual). ``recipient`` needs the last layer's HiddenSite."""
    dev = execution_device(lm.model.get_output_embeddings())
    end = batch.position("END").to(dev)
    return dev, end, ld_readout(lm, batch, rows_at(recipient[HiddenSite(lm.adapter.n_layers - 1)], end, dev))


def head_writes(
    lm: LoadedModel, layer: int, cache: ActivationCache, end: Tensor, dev,
) -> tuple[Float[Tensor, "head batch d_model"], Float[Tensor, "batch d_model"] | None]:
    """What each head of ``layer`` writes into the residual stream at END, and the bias term (or None).

    z_h W_O[h] (and b_O), passed through the attention post-norm when the family has one (Gemma 2/3,
    OLMo 2), linearised with its scale frozen at the recipient's attention output, the same way the
    final norm is: then the heads' writes plus the bias's sum to what the attention block really wrote.
    ``cache`` needs HeadSite(layer), and AttnOutSite(layer) under a post-norm.
    """
    a = lm.adapter
    z = rows_at(cache[HeadSite(layer)], end, dev).float()  # (B, H, Dh)
    per_head = torch.einsum("bhd,hde->hbe", z, a.head_weights(layer).to(dev).float())  # (H, B, D)
    bias = a.head_bias(layer)
    bias = None if bias is None else bias.to(dev).float().expand(z.shape[0], -1)  # (B, D)
    norm = a.attn_post_norm(layer)
    if norm is not None:
        post = frozen_norm(norm, rows_at(cache[AttnOutSite(layer)], end, dev))  # scale of the real output
        per_head = post(per_head)
        bias = None if bias is None else post(bias)
    if a.resid_scale != 1.0:  # Granite adds residual_multiplier x attention
        per_head, bias = per_head * a.resid_scale, None if bias is None else bias * a.resid_scale
    return per_head, bias


def _dla(lm: LoadedModel, batch: PairBatch, cache: ActivationCache) -> tuple[Tensor, Tensor | None]:
    """(L, H) DLA of every head, and (L,) the bias's (None without a bias)."""
    a = lm.adapter
    dev, end, direct = direct_readout(lm, batch, cache)
    heads, biases = [], []
    with torch.inference_mode():
        for L in range(a.n_layers):
            per_head, bias = head_writes(lm, L, cache, end, dev)  # (H, B, D), (B, D)
            heads.append(direct(per_head).mean(-1))  # (H,)
            biases.append(None if bias is None else direct(bias).mean())
    bias_dla = None if biases[0] is None else torch.stack(biases).cpu()
    return torch.stack(heads).cpu(), bias_dla


def copy_scores(lm: LoadedModel, name_ids: Int[Tensor, "n"], top: int = 5) -> tuple[Tensor, Tensor]:
    """(L, H) copy and negative copy scores of every head over ``name_ids`` (module docstring)."""
    a, dev = lm.adapter, lm.device
    ids = name_ids.to(dev)[:, None]  # (N, 1): each name alone
    mask = torch.ones_like(ids)
    first = _block0_output(lm, ids, mask)
    z: dict[int, Tensor] = {}

    def feed(x: Tensor) -> Tensor:
        return first.to(x.device)  # every block sees the name's post-block-0 residual

    def keep(L: int):
        def fn(x: Tensor) -> None:
            z[L] = x.detach()
        return fn

    specs = [(a.block(L), "input", feed) for L in range(a.n_layers)]
    specs += [(a.attn_out(L), "input", keep(L)) for L in range(a.n_layers)]
    with torch.inference_mode(), hooks(specs):
        lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    _require_residual_sum(lm, "the copy scores")
    norm, w_u = a.finalize, lm.model.get_output_embeddings()
    copy, neg = torch.zeros(a.n_layers, a.n_heads), torch.zeros(a.n_layers, a.n_heads)
    with torch.inference_mode():
        for L in range(a.n_layers):
            zz = z[L][:, 0].view(len(ids), a.n_heads, a.d_head)  # (N, H*Dh) -> (N, H, Dh)
            ov = torch.einsum("nhd,hde->hne", zz, a.head_weights(L))  # (H, N, D)
            post = a.attn_post_norm(L)
            if post is not None:  # Gemma 2/3, OLMo 2: what the head writes passes the post-norm (sign-symmetric)
                ov = post(ov.to(execution_device(post)))
            ov = ov.to(execution_device(a.final_norm()))
            for sign, target in ((1.0, copy), (-1.0, neg)):
                hits = []
                for lo in range(0, len(ids), NAMES_PER_PASS):  # (H, n, V) logits for a few names at a time
                    part = slice(lo, lo + NAMES_PER_PASS)
                    logits = w_u(norm(sign * ov[:, part]).to(execution_device(w_u)))  # (H, n, V)
                    top_ids = logits.topk(top, dim=-1).indices.cpu()  # (H, n, top)
                    hits.append((top_ids == ids.cpu()[None, part, :]).any(-1))  # (H, n)
                target[L] = torch.cat(hits, dim=1).float().mean(-1)
    return copy, neg


def _block0_output(lm: LoadedModel, ids: Tensor, mask: Tensor) -> Tensor:
    """Block 0's output for ``ids`` (N, T): the name representation the copy score starts from."""
    got: list[Tensor] = []
    with torch.inference_mode(), hooks([(lm.adapter.block(0), "output", lambda h: got.append(h.detach()))]):
        lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return got[0]


def characterise(
    lm: LoadedModel, batch: PairBatch, name_ids: Int[Tensor, "n"] | None = None, *, copy: bool = True,
) -> HeadProfile:
    """Attention, DLA and copy scores of every head on ``batch``'s recipients (see the module docstring).

    ``name_ids``: the single-token names for the copy score (default: the batch's IO and S tokens).
    ``copy=False`` skips the copy scores (``copy`` and ``neg_copy`` are then None): they do not depend on
    the pairs, so a run that streams its pairs in chunks computes them once (``copy_scores``).

    Example::

        profile = characterise(lm, batch); profile.attention["END->IO"].shape  # (L, H)

    """
    if name_ids is None:
        name_ids = torch.unique(torch.cat([batch.answer_ids, batch.wrong_ids]))
    weights, cache, logits = _recipient_run(lm, batch)
    attention = _attention(weights, batch)
    dla, bias_dla = _dla(lm, batch, cache)
    ld = float(logit_diff(logits.cpu(), batch.answer_ids, batch.wrong_ids).mean())
    pos, neg = copy_scores(lm, name_ids) if copy else (None, None)
    return HeadProfile(attention, dla, pos, neg, ld, len(name_ids), bias_dla)
