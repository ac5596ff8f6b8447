"""A norm's vector-Jacobian product for many cotangents at once, in closed form where the norm's form is known.

    apply = projected_pullback(norm, x, cache)  # x (N, D): the norm's input; None where no closed form fits
    wg, wb = folded_rows(norm, w_rows, block, cache, key)  # the R rows (Dh, D) times the gain, into block
    apply(g, wg, out, add=False)                 # out (R, N, D) = d/dx of <g[r] @ w[r], norm(x)> for each r
    vmap_pullback(norm, x)(u)                    # any norm: u (R, N, D) -> (R, N, D), by torch.func

EAP needs, per layer, the input gradient of every head's q, k and v: the norm's VJP at the same x for R' cotangents.
``torch.func.vmap`` over ``torch.func.vjp`` does it for any norm but costs about four times the arithmetic. Per
position, with a = g * u (g the norm's gain, or 1 + weight for Gemma's RMSNorm) and x_hat the normalised input:

- RMSNorm:   r = 1 / sqrt(mean(x^2) + eps),            J^T u = r (a - x_hat mean(a x_hat))
- LayerNorm: r = 1 / sqrt(var(x) + eps) (biased var),  J^T u = r (a - mean(a) - x_hat mean(a x_hat))

Which form a norm has is not read from its class name: each candidate (the very code that is then used, with w
the identity) is tried on one random cotangent against ``torch.func.vjp`` of the module itself, and the first that
agrees (relative 1e-4, or 2e-2 below float32) is kept in ``cache`` for every norm of that class, eps and weight
shape; a norm that matches none uses vmap. So a wrong guess can cost speed, never a value.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

Pullback = Callable[[Tensor], Tensor]


def _eps(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return None


def _stats(norm: nn.Module, kind: str, x: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """(r (N, 1), x_hat (N, D), working dtype) of ``kind`` at ``x`` (the gain is folded into the rows instead)."""
    work = torch.promote_types(x.dtype, torch.float32)
    xf, eps = x.detach().to(work), _eps(norm)
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (N, 1)
    return r, xf * r, work


def _gain(norm: nn.Module, kind: str, work: torch.dtype, device) -> Tensor | None:
    """The norm's gain (D,) in ``work``: its weight, 1 + weight for Gemma's form, None without a weight."""
    weight = getattr(norm, "weight", None)
    gain = None if weight is None else weight.detach().to(device, work)
    return 1 + gain if kind == "rms1p" and gain is not None else gain


def projected_pullback(norm: nn.Module, x: Float[Tensor, "pos d_model"], cache: dict):
    """None for a norm without a closed form; else ``apply(g, wg, out, add, made, gr_sum, wb)``: the norm's VJP at
    ``x`` of the cotangents g @ w (g (R, N, Dh): d metric / d the projection's output; w (R, Dh, D) its rows, given
    as ``wg``, w times the norm's gain, from ``folded_rows``), written into ``out`` (R, N, D), or added to it with
    ``add``. The gain is folded into w and 1/rms into g, so ``out`` is written by one batched product and one rank-one
    correction: no (R, N, D) temporaries (EAP-IG sums its steps this way). ``made`` (R, N, Dh), optional: what the rows
    w made of norm(x) in the forward pass (the projection's output less its bias), which holds w (gain x_hat) + w beta
    (``wb``, LayerNorm's bias) already; it is used only where it agrees with wg x_hat recomputed on a few positions
    (relative 1e-4), else that product is computed in full. ``gr_sum``: see ``finish``."""
    kind = _cached_kind(norm, x, cache)
    return None if kind == "vmap" else _fused(norm, kind, x)


def folded_rows(norm: nn.Module, rows: list[Tensor], block: Tensor, cache: dict,
                key: tuple) -> tuple[Tensor, Tensor | None]:
    """(wg, wb): the rows w (R of (Dh, D), views of the projection's weight) times the gain of ``norm`` (its form as
    ``projected_pullback`` found it), written into ``block`` (R, Dh, D) in float32 or wider (a caller's scratch
    block: nothing of size R x Dh x D is kept between layers), and w beta (R, Dh) for a norm with a bias (else None),
    kept in ``cache`` under ``key`` (the caller's name for the rows: layer and receivers)."""
    kind, work = cache[("norm-kind", id(norm))], block.dtype
    gain = _gain(norm, kind, work, block.device)
    for w, out in zip(rows, block):
        out.copy_(w) if gain is None else torch.mul(w, gain, out=out)  # (Dh, D)
    beta = getattr(norm, "bias", None)
    if not isinstance(beta, Tensor):
        return block, None
    if ("w beta", id(norm), key) not in cache:
        cache[("w beta", id(norm), key)] = torch.stack([w.to(work) @ beta.detach().to(w.device, work) for w in rows])
    return block, cache[("w beta", id(norm), key)]


def _fused(norm: nn.Module, kind: str, x: Tensor):
    """``projected_pullback``'s ``apply`` for the closed form ``kind`` at ``x``."""
    r, x_hat, work = _stats(norm, kind, x)
    D = x_hat.shape[-1]

    def apply(g: Tensor, wg: Tensor, out: Tensor, add: bool = False, made: Tensor | None = None,
              gr_sum: Tensor | None = None, wb: Tensor | None = None) -> Tensor:
        g = g.to(work)  # (R, N, Dh); wg (R, Dh, D)
        wx = _gain_part(made, wg, x_hat, wb, work)  # (R, N, Dh): each row of w (gain) against x_hat
        if gr_sum is not None:  # the correction only; g r @ (gain w) is linear in g r: summed, multiplied once
            inner = (g * wx).sum(-1) * (r.squeeze(-1) / D)  # (R, N): r mean(a x_hat)
            if add:
                gr_sum.addcmul_(g.to(gr_sum.dtype), r.to(gr_sum.dtype))
                out.addcmul_(x_hat.unsqueeze(0).to(out.dtype), inner.unsqueeze(-1).to(out.dtype), value=-1)
            else:
                torch.mul(g, r, out=gr_sum)
                torch.mul(x_hat.unsqueeze(0).to(out.dtype), inner.unsqueeze(-1).to(out.dtype).neg(), out=out)
            return out
        gr = g * r  # (R, N, Dh): 1/rms per position
        inner = (gr * wx).sum(-1) / D  # (R, N): r mean(a x_hat)
        if add:
            out.baddbmm_(gr.to(out.dtype), wg.to(out.dtype))
        else:
            torch.bmm(gr.to(out.dtype), wg.to(out.dtype), out=out)  # r a, a = gain * (g @ w)
        out.addcmul_(x_hat.unsqueeze(0).to(out.dtype), inner.unsqueeze(-1).to(out.dtype), value=-1)
        if kind == "layer":  # minus r mean(a)
            out.sub_((torch.einsum("rnh,rh->rn", gr, wg.sum(-1)) / D).unsqueeze(-1).to(out.dtype))
        return out
    return apply


def finish(norm: nn.Module, wg: Tensor, gr_sum: Tensor, out: Tensor, cache: dict) -> Tensor:
    """Add to ``out`` (R, N, D) the part of the pullbacks applied with ``gr_sum`` (``apply(..., gr_sum=...)``, which
    wrote only their correction to ``out`` and summed g r there) that is linear in g r: ``gr_sum`` (R, N, Dh) @ wg
    (the gain-folded rows, ``folded_rows``), and for LayerNorm minus its mean over d_model. One batched product for
    all the steps."""
    kind = cache[("norm-kind", id(norm))]
    out.baddbmm_(gr_sum.to(out.dtype), wg.to(out.dtype))
    if kind == "layer":  # minus r mean(a), summed over the steps
        mean = torch.einsum("rnh,rh->rn", gr_sum.to(wg.dtype), wg.sum(-1)) / wg.shape[-1]  # (R, N)
        out.sub_(mean.unsqueeze(-1).to(out.dtype))
    return out


def _gain_part(made: Tensor | None, wg: Tensor, x_hat: Tensor, wb: Tensor | None,
               work: torch.dtype) -> Float[Tensor, "receiver pos d_head"]:
    """(R, N, Dh): wg @ x_hat per position. From ``made`` = w norm(x) = wg x_hat + w beta (``wb``) when it agrees with
    the product recomputed on the first positions; else the full product (R x Dh x D x N multiply-adds)."""
    if made is not None and made.dtype in (torch.float32, torch.float64):
        wx = made.to(work)
        if wb is not None:
            wx = wx - wb.unsqueeze(1).to(work)  # (R, 1, Dh): what the norm's bias adds
        few = torch.matmul(wg, x_hat[:4].T).transpose(1, 2)  # (R, 4, Dh)
        if float((wx[:, :4] - few).abs().max()) <= 1e-4 * max(float(few.abs().max()), 1e-12):
            return wx
    return torch.matmul(wg, x_hat.T).transpose(1, 2)  # (R, Dh, N) -> (R, N, Dh)


def vmap_pullback(norm: nn.Module, x: Tensor) -> Pullback:
    """The norm's VJP at ``x`` for a leading axis of cotangents, by ``torch.func``: any norm, written over them."""
    with torch.enable_grad():
        _, pull = torch.func.vjp(norm.forward, x.detach())

    def pullback(u: Tensor) -> Tensor:  # (R, N, D), overwritten with the result
        with torch.enable_grad():
            return u.copy_(torch.func.vmap(pull)(u.to(x.dtype))[0])
    return pullback


def _kind(norm: nn.Module, x: Tensor) -> str:
    """The closed form that ``norm`` has, checked at ``x`` on one random cotangent; "vmap" when none fits."""
    if _eps(norm) is None or x.shape[0] == 0:
        return "vmap"
    x = x[:8]  # the norm acts on each position alone: a few positions check the form
    gen = torch.Generator(device="cpu").manual_seed(0)  # a local generator: the global RNG is left alone
    u = torch.randn(1, *x.shape, generator=gen).to(x.device, torch.promote_types(x.dtype, torch.float32))
    want = vmap_pullback(norm, x)(u.clone())
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
    eye = torch.eye(x.shape[-1], dtype=u.dtype, device=x.device).unsqueeze(0)  # g @ w = g: the cotangent itself
    for kind in ("rms", "rms1p", "layer"):
        gain = _gain(norm, kind, u.dtype, x.device)
        got = _fused(norm, kind, x)(u, eye if gain is None else eye * gain, torch.empty_like(u))
        if float((got - want).abs().max()) <= tol * max(float(want.abs().max()), 1e-12):
            return kind
    return "vmap"


def _cached_kind(norm: nn.Module, x: Tensor, cache: dict) -> str:
    """The form of ``norm``, checked once per call for each kind of norm module: its class, eps, and the shapes of
    its weight and bias (the form is the class's code; the weights only enter as the gain and bias)."""
    key = ("norm-kind", id(norm))
    if key not in cache:
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        sig = ("norm-form", type(norm), _eps(norm), getattr(weight, "shape", None), getattr(bias, "shape", None),
               x.dtype)
        if sig not in cache:
            cache[sig] = _kind(norm, x)
        cache[key] = cache[sig]
    return cache[key]
