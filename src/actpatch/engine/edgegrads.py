"""Every receiver's input gradient from one plain forward and backward, for edge attribution (``engine.eap``).

    with receiver_inputs(lm, graph, alpha, donor, keep, record=True) as flow:
        metric(last_logits(...)).sum().backward()
    flow.receiver_grads()   # (receivers, d metric / d their input (R', N, D)), layer by layer
    flow.written            # (S, N, D): every sender's donor output minus its output in this run

Nothing is copied per receiver inside the model. A head's q (k, v) is its rows W of the projection applied to
norm(x), so after the backward pass its input's gradient is the norm's vector-Jacobian product at x of
(d metric / d its slice of the projection) @ W: one small batched pass through the norm per layer. MLP and logits
receivers read the stream itself (one clone each, to keep its gradient). Only the ``keep`` positions (B, T) are
returned (N of them: padding has no gradient); the norm acts on each position alone, so they are taken before it.
With ``alpha`` the run's embeddings are donor + alpha (recipient - donor) (integrated gradients; alpha = 1 is the
recipient's run, exactly); with ``record`` the same run writes every sender's donor - current, so the recipient
needs no recording pass of its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..model.models import LoadedModel
from .edges import _Flow
from .graph import Graph
from .hooks import hooks


class _GradFlow(_Flow):
    """The hooks of one differentiated forward pass (see the module docstring)."""

    def __init__(self, lm: LoadedModel, graph: Graph, donor: Tensor, alpha: float | None,
                 keep: Tensor | None, record: bool) -> None:
        super().__init__(lm, graph, "grad", donor=donor)
        self.alpha, self.record = alpha, record
        self.at = None if keep is None else keep.nonzero(as_tuple=True)  # the kept positions: rows (N,), columns (N,)
        self.inputs: list[tuple[int, Tensor]] = []                # (MLP or logits receiver, its input)
        self.projected: list[tuple[int, list[int], Tensor]] = []  # (layer, receivers, q/k/v projection output)
        if record:  # donor - current, so it starts as the donor, in float32, at the kept positions
            kept = _positions(donor[:len(graph.senders)], self.at, 1)  # (S, N, D)
            self.written = kept.to(torch.float32, copy=kept is donor)

    # --- the forward pass ----------------------------------------------------------------------------------------
    def _wrote(self, s: int, value: Tensor) -> None:
        if self.record:
            self.written[s] -= _positions(value.detach(), self.at)  # (N, D)

    def on_input(self, x: Tensor) -> Tensor:
        """The graph starts here: every receiver's gradient flows back to this leaf."""
        x = x.detach()
        self._wrote(0, x)
        if self.alpha is not None and self.alpha != 1:
            donor = self.donor[0].to(x.device, x.dtype)
            x = donor + self.alpha * (x - donor)
        return x.requires_grad_(True)

    def on_heads(self, layer: int, z: Tensor) -> None:
        if self.record:  # (H, N, D): subtracted from the heads' rows at once
            first, H = self.g.sender_index(f"a{layer}.h0"), self.a.n_heads
            zh = _positions(z.view(*z.shape[:2], H, self.a.d_head), self.at)  # (B, T, H*Dh) -> (N, H, Dh)
            self.written[first:first + H] -= self.head_writes(layer, zh)

    def on_qkv(self, layer: int, which: tuple[str, ...], out: Tensor) -> None:
        """The heads share one input; their gradients are split after the backward pass."""
        out.retain_grad()
        self.projected.append((layer, self.g.layer_receivers(layer, which), out))

    def on_single(self, receiver: int, x: Tensor) -> Tensor:
        xs = x.clone()  # (B, T, D): the receiver's own input, to keep its gradient
        xs.retain_grad()
        self.inputs.append((receiver, xs))
        return xs

    # --- after the backward pass -----------------------------------------------------------------------------
    def receiver_grads(self) -> Iterator[tuple[list[int], Float[Tensor, "receiver pos d_model"]]]:
        """(receivers, d metric / d their input (R', N, D)), one layer's heads or one MLP at a time, in graph order."""
        by_layer: dict[int, list] = {}
        for layer, rows, out in self.projected:  # q, k and v of a layer share one input: one pass through its norm
            by_layer.setdefault(layer, []).extend((r, out.grad) for r in rows)
        groups = [([r], lambda xs=xs: _positions(xs.grad, self.at).unsqueeze(0)) for r, xs in self.inputs]
        groups += [([r for r, _ in parts], lambda L=L, parts=parts: self._head_grads(L, parts))
                   for L, parts in by_layer.items()]
        for rows, grad in sorted(groups, key=lambda g: g[0][0]):  # receivers are numbered layer by layer
            yield rows, grad()

    def _head_grads(self, layer: int, parts: list[tuple[int, Tensor]]) -> Float[Tensor, "receiver pos d_model"]:
        """d metric / d the input of the heads in ``parts`` ((receiver, its projection's gradient) each)."""
        Dh = self.a.d_head
        heads = [self._head_rows(layer, r) for r, _ in parts]
        g_head = torch.stack([g[..., s:s + Dh] for (_, g), (_, _, s) in zip(parts, heads)])  # (R', B, T, Dh)
        g_head = _positions(g_head, self.at, 1)  # (R', N, Dh)
        w = torch.stack([weight for weight, _, _ in heads]).to(g_head.device, g_head.dtype)  # (R', Dh, D)
        g_normed = torch.einsum("r...e,red->r...d", g_head, w)  # (R', N, D)
        x = _positions(self.resid[layer].detach(), self.at)  # (N, D)
        with torch.enable_grad():  # the norm's vector-Jacobian product at x, mapped over the R' cotangents
            _, pullback = torch.func.vjp(self.a.attn_norm(layer).forward, x)
            return torch.func.vmap(pullback)(g_normed)[0]  # (R', N, D)


def _positions(t: Tensor, at: tuple[Tensor, Tensor] | None, lead: int = 0) -> Tensor:
    """``t`` (*lead, B, T, ...) at the positions ``at`` (rows, columns): (*lead, N, ...); ``t`` itself when ``at`` is
    None. Gathers without copying a strided ``t`` (a group's slice of the donor) first."""
    return t if at is None else t[(slice(None),) * lead + tuple(i.to(t.device) for i in at)]


@contextlib.contextmanager
def receiver_inputs(lm: LoadedModel, graph: Graph, alpha: float | None = None,
                    donor: Float[Tensor, "sender batch pos d_model"] | None = None,
                    keep: Bool[Tensor, "batch pos"] | None = None, record: bool = False) -> Iterator[_GradFlow]:
    """Hooks (inside the block) for one differentiated forward pass; after ``backward()``,
    ``flow.receiver_grads()`` yields the receivers' input gradients at the positions ``keep`` selects (all when
    None). ``alpha``: the embeddings are donor[0] + alpha (recipient - donor[0]); ``record``: ``flow.written`` is
    every sender's ``donor`` minus its output in this run, at those positions (S, N, D), float32."""
    flow = _GradFlow(lm, graph, donor, alpha, keep, record)
    with hooks(flow.specs()):
        yield flow
