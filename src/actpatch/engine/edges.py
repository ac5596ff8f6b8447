"""Exact edge patching: one forward pass in which each receiver reads its own copy of the residual stream.

    rec = sender_outputs(lm, graph, batch, "recipient")          # (S, B, T, D): what each sender wrote
    don = sender_outputs(lm, graph, batch, "donor")
    logits = edge_patched_logits(lm, graph, batch, don, weights)  # weights (R, S): 1 = the edge carries the donor

Receiver r reads x_r = resid + sum_s w[r, s] (donor_s - current_s), where ``resid`` is the residual stream of this
very run at r's layer and ``current_s`` what sender s wrote in this run. With every weight 0 the run is the
recipient's; with every allowed weight 1 each receiver reads the donor's residual stream, so the run is the donor's;
patching every edge out of one head equals an ordinary patch of that head. The q, k and v of each head are computed
separately without copying any attention code: the hook on the projection that makes them (q_proj or GPT-2's
fused c_attn) replaces each receiving head's slice with the projection of its own normed input. Weights need not be
0 or 1 (finite differences use small ones). For gradients (``receiver_inputs``, used by ``engine.eap``) nothing is
copied: a plain forward and backward, then each head's input gradient is its slice of the projection's gradient
through its rows of the weight and the block's norm (``_Flow.receiver_grads``). The graph: ``engine.graph``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ConfigError, DataError
from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import last_logits
from .graph import Graph
from .hooks import HookSpec, hooks
from .noise import noise_hook


class _Flow:
    """The state of one edge-patched (or recorded, or differentiated) forward pass and the hooks that keep it.

    ``mode``: "record" keeps every sender's output; "patch" adds ``weights`` x (donor - current) at receivers;
    "grad" keeps what a backward pass needs for per-receiver gradients (``receiver_grads``); ``interpolate`` (grad
    mode) replaces the input embeddings by donor + alpha (recipient - donor).

    Patch mode sums over few senders either way: a receiver group with fewer patched edges than kept ones adds
    sum_s w (donor_s - current_s) over its patched senders; otherwise it adds the running total of every sender's
    (donor - current) minus sum_s (1 - w) (donor_s - current_s) over its kept ones (a small circuit: few terms).
    """

    def __init__(self, lm: LoadedModel, graph: Graph, mode: str, donor: Tensor | None = None,
                 weights: Tensor | None = None, interpolate: tuple[Tensor, float] | None = None) -> None:
        _check_one_device(lm)
        self.lm, self.g, self.a, self.mode = lm, graph, lm.adapter, mode
        self.donor, self.interpolate = donor, interpolate
        self.weights = None if weights is None else (weights.float() * graph.allowed.float())
        S = len(graph.senders)
        self.written: Tensor | None = None                                # (S, B, T, D) every sender's output (record)
        self.diff: list[Tensor | None] = [None] * S                      # donor - current (patch mode, needed ones)
        self.total: Tensor | None = None                                  # the running sum of every diff so far
        self.seen = torch.zeros(S, dtype=torch.bool)                      # senders that have run
        self.inputs: list[tuple[list[int], Tensor]] = []                  # (receivers, their inputs) (grad mode)
        self.projected: list[tuple[int, list[int], Tensor]] = []          # (layer, receivers, q/k/v output) (grad)
        self.resid: dict[int, Tensor] = {}
        self.w_o: dict[int, Tensor] = {}                                  # W_O per head, per layer (read once)
        self.w_qkv: dict[int, tuple] = {}                                 # a receiver's rows of its projection
        self.complement = torch.zeros(len(graph.receivers), dtype=torch.bool)
        self.needed = torch.ones(S, dtype=torch.bool) if mode == "record" else torch.zeros(S, dtype=torch.bool)
        if mode == "patch":
            self._plan()

    def _plan(self) -> None:
        """Per receiver group (one hook's rows), the form of its sum; which senders' diffs must be kept."""
        allowed = self.g.allowed
        for rows in self._groups():
            w, ok = self.weights[rows], allowed[rows]
            patched, kept = w != 0, ok & (w != 1)
            if not bool(patched.any()):
                continue
            if int(kept.any(0).sum()) < int(patched.any(0).sum()):
                self.complement[rows] = True
                self.needed[:] = True  # the running total reads every sender
            else:
                self.needed |= patched.any(0)

    def _groups(self) -> list[list[int]]:
        g, groups = self.g, []
        for L in range(g.n_layers):
            groups += [g.layer_receivers(L, which) for _, which in _qkv_modules(self.a, L)]
            groups.append([g.receiver_index(f"m{L}")])
        return groups + [[g.receiver_index("logits")]]

    # --- senders ---------------------------------------------------------------------------------------------
    def _wrote(self, s: int, value: Tensor) -> None:
        if self.mode == "record":  # one (S, B, T, D) block, filled in place: no per-sender copies to stack
            if self.written is None:
                self.written = value.new_empty(len(self.g.senders), *value.shape)
            self.written[s].copy_(value.detach())
        elif self.mode == "patch" and self.needed[s]:
            d = self.diff[s] = self.donor[s].to(value.device, value.dtype) - value
            self.total = d.clone() if self.total is None else self.total + d
        self.seen[s] = True

    def on_input(self, x: Tensor) -> Tensor | None:
        if self.mode == "grad":  # the graph starts here: every receiver's gradient flows back to this leaf
            x = x.detach()
            if self.interpolate is not None:
                donor_in, alpha = self.interpolate
                donor_in = donor_in.to(x.device, x.dtype)
                x = donor_in + alpha * (x - donor_in)
            return x.requires_grad_(True)
        self._wrote(0, x)
        return None

    def on_heads(self, layer: int, z: Tensor) -> None:
        first = self.g.sender_index(f"a{layer}.h0")
        H, Dh = self.a.n_heads, self.a.d_head
        if self.mode == "grad" or not bool(self.needed[first:first + H].any()):
            return
        if layer not in self.w_o:
            self.w_o[layer] = self.a.head_weights(layer)
        zh = z.view(*z.shape[:2], H, Dh)  # (B, T, H*Dh) -> (B, T, H, Dh)
        out = torch.einsum("bthe,hed->hbtd", zh, self.w_o[layer].to(z.device, z.dtype))  # (H, B, T, D): each head's write
        for h in range(H):
            self._wrote(first + h, out[h])

    def on_written(self, name: str, out: Tensor) -> None:
        self._wrote(self.g.sender_index(name), out)

    # --- receivers ---------------------------------------------------------------------------------------------
    def _sum(self, rows: list[int], coef: Tensor, like: Tensor) -> Tensor | None:
        """sum_s coef[r, s] diff_s over the senders with a nonzero coefficient: (R', B, T, D), or None."""
        cols = coef.any(dim=0).nonzero().flatten().tolist()
        if not cols:
            return None
        diff = torch.stack([self.diff[s] for s in cols])  # (S', B, T, D)
        out = coef[:, cols].to(like.device, like.dtype) @ diff.flatten(1)  # (R', S') @ (S', B*T*D)
        return out.view(len(rows), *diff.shape[1:])  # (R', B, T, D)

    def delta(self, rows: list[int], like: Tensor) -> Tensor | None:
        """sum_s w[r, s] (donor_s - current_s) for ``rows``: (R', B, T, D), or None when no edge into them is patched."""
        w, ok = self.weights[rows], self.g.allowed[rows]
        if not bool(self.complement[rows[0]]):
            return self._sum(rows, w, like)
        # every allowed sender's diff, minus the written senders that are not allowed (a parallel residual's own layer)
        extra = self._sum(rows[:1], (self.seen & ~ok[0]).float().unsqueeze(0), like)
        total = self.total.unsqueeze(0) - (0 if extra is None else extra)
        kept = self._sum(rows, (1 - w) * ok.float(), like)
        return total.expand(len(rows), *total.shape[1:]) - (0 if kept is None else kept)

    def receive(self, rows: list[int], x: Tensor) -> Tensor | None:
        """The inputs (R', B, T, D) of ``rows`` that all read ``x`` (B, T, D); None: they read ``x`` unchanged."""
        if self.mode == "grad":
            xs = x.unsqueeze(0).expand(len(rows), *x.shape).clone()  # (R', B, T, D): one input per receiver
            xs.retain_grad()
            self.inputs.append((rows, xs))
            return xs
        if self.mode == "record":
            return None
        d = self.delta(rows, x)
        return None if d is None else x.unsqueeze(0) + d

    def on_qkv(self, layer: int, which: tuple[str, ...], out: Tensor) -> Tensor | None:
        """Replace each receiving head's slice of the projection ``out`` (B, T, F) by the projection of its own input."""
        rows = self.g.layer_receivers(layer, which)
        if self.mode == "grad":  # the heads share one input; their gradients are split after the backward pass
            out.retain_grad()
            self.projected.append((layer, rows, out))
            return None
        xs = self.receive(rows, self.resid[layer])
        if xs is None:
            return None
        normed = self.a.attn_norm(layer).forward(xs)  # (R', B, T, D); .forward does not re-enter the hooks
        new, Dh = out.clone(), self.a.d_head
        for i, r in enumerate(rows):
            weight, bias, start = self._head_rows(layer, r)
            y = normed[i] @ weight.to(normed.dtype).T  # (B, T, Dh): only this head's rows of the projection
            new[..., start:start + Dh] = y if bias is None else y + bias.to(y.dtype)
        return new

    def _head_rows(self, layer: int, r: int) -> tuple[Tensor, Tensor | None, int]:
        """Receiver r's rows of its projection, W (Dh, D) and bias, read once per run, and where its slice starts."""
        rec = self.g.receivers[r]
        if r not in self.w_qkv:
            self.w_qkv[r] = self.a.qkv_head_weights(layer, rec.input, rec.index)  # (Dh, D), (Dh,)
        return *self.w_qkv[r], self.a.qkv_start(rec.input, rec.index)

    def receiver_grads(self) -> Iterator[tuple[list[int], Tensor]]:
        """After a backward pass (grad mode): (receivers, d metric / d their input (R', B, T, D)), group by group.

        A head's q (k, v) is its rows W of the projection applied to norm(x), so its input's gradient is the norm's
        vector-Jacobian product at x of (d metric / d its slice) @ W: one small batched pass through the norm per
        group, instead of a copy of the input per receiver in the model's own forward and backward."""
        yield from ((rows, xs.grad) for rows, xs in self.inputs)
        Dh, by_layer = self.a.d_head, {}
        for layer, rows, out in self.projected:  # q, k and v of a layer share one input: one pass through its norm
            by_layer.setdefault(layer, []).extend((r, out.grad) for r in rows)
        for layer, parts in by_layer.items():
            rows = [r for r, _ in parts]
            heads = [self._head_rows(layer, r) for r in rows]
            g_head = torch.stack([g[..., s:s + Dh] for (_, g), (_, _, s) in zip(parts, heads)])  # (R', B, T, Dh)
            w = torch.stack([weight for weight, _, _ in heads]).to(g_head.device, g_head.dtype)  # (R', Dh, D)
            g_normed = torch.einsum("rbte,red->rbtd", g_head, w)  # (R', B, T, D)
            with torch.enable_grad():  # the norm's vector-Jacobian product at x, mapped over the R' cotangents
                _, pullback = torch.func.vjp(self.a.attn_norm(layer).forward, self.resid[layer].detach())
                yield rows, torch.func.vmap(pullback)(g_normed)[0]  # (R', B, T, D)

    def on_single(self, receiver: int, x: Tensor) -> Tensor | None:
        xs = self.receive([receiver], x)
        return None if xs is None else xs[0]

    # --- the hooks ---------------------------------------------------------------------------------------------
    def specs(self) -> list[HookSpec]:
        a, g = self.a, self.g
        specs: list[HookSpec] = [(a.block(0), "input", self.on_input)]
        for L in range(g.n_layers):
            specs.append((a.attn_norm(L), "input", lambda x, L=L: self.resid.__setitem__(L, x)))
            if self.mode != "record":
                for module, which in _qkv_modules(a, L):
                    specs.append((module, "output", lambda out, L=L, w=which: self.on_qkv(L, w, out)))
            if g.head_senders:
                specs.append((a.attn_out(L), "input", lambda z, L=L: self.on_heads(L, z)))
            else:
                specs.append((a.attn_post_norm(L), "output", lambda out, L=L: self.on_written(f"a{L}", out)))
            if self.mode != "record":
                mlp_r = g.receiver_index(f"m{L}")
                specs.append((a.mlp_norm(L), "input", lambda x, r=mlp_r: self.on_single(r, x)))
            specs.append((a.mlp_written(L), "output", lambda out, L=L: self.on_written(f"m{L}", out)))
        if self.mode != "record":
            specs.append((a.final_norm(), "input", lambda x, r=g.receiver_index("logits"): self.on_single(r, x)))
        return specs


def _qkv_modules(adapter, layer: int) -> list[tuple[object, tuple[str, ...]]]:
    if adapter.arch.qkv_layout == "separate":
        return [(adapter.qkv_module(layer, w), (w,)) for w in ("q", "k", "v")]
    return [(adapter.qkv_module(layer, "q"), ("q", "k", "v"))]


def _check_one_device(lm: LoadedModel) -> None:
    placed = set((getattr(lm.model, "hf_device_map", None) or {}).values())
    if len(placed) > 1:
        raise ConfigError(f"edge patching keeps every sender's output in one tensor on one device, but this model is "
                          f"spread over {sorted(map(str, placed))} by a device map. Load it on one device (no "
                          "--device-map) for circuits.")


def _check_aligned(batch: PairBatch) -> None:
    if batch.donor_mask is not None or batch.donor_positions is not None:
        raise DataError("edge patching adds donor - recipient at the same positions, so it needs pairs of equal token "
                        f"length; pairs {batch.unequal_rows()[:8]} differ. Use a donor design that keeps lengths "
                        "(e.g. facts --donor noise) or equal-length pairs.")


def _run(lm: LoadedModel, batch: PairBatch, flow: _Flow, side: str) -> Float[Tensor, "batch vocab"]:
    dev = lm.device
    ids = batch.donor_ids if side == "donor" else batch.recipient_ids
    specs = flow.specs()
    noise = noise_hook(lm, batch) if side == "donor" else None
    with hooks(([noise] if noise else []) + specs):
        return last_logits(lm, ids.to(dev), batch.attention_mask.to(dev), batch.position("END"))


def sender_outputs(lm: LoadedModel, graph: Graph, batch: PairBatch, side: str) -> tuple[Tensor, Tensor]:
    """What every sender writes in the ``side`` ("recipient" or "donor") run: (S, B, T, D), and its END logits.

    Example::

        donor, donor_logits = sender_outputs(lm, graph, batch, "donor")
    """
    _check_aligned(batch)
    flow = _Flow(lm, graph, "record")
    with torch.inference_mode():
        logits = _run(lm, batch, flow, side)
    return flow.written, logits


def edge_patched_logits(
    lm: LoadedModel, graph: Graph, batch: PairBatch, donor: Float[Tensor, "sender batch pos d_model"],
    weights: Float[Tensor, "receiver sender"],
) -> Float[Tensor, "batch vocab"]:
    """END logits of the recipient run with ``weights`` of every edge patched to the donor (1 = fully patched).

    Example::

        logits = edge_patched_logits(lm, graph, batch, donor, (~circuit).float())   # everything outside the circuit
    """
    _check_aligned(batch)
    if weights.shape != graph.allowed.shape:
        raise DataError(f"edge weights must be (receivers, senders) = {tuple(graph.allowed.shape)}, got "
                        f"{tuple(weights.shape)}")
    with torch.inference_mode():
        return _run(lm, batch, _Flow(lm, graph, "patch", donor=donor, weights=weights), "recipient")


@contextlib.contextmanager
def receiver_inputs(lm: LoadedModel, graph: Graph, alpha: float | None = None,
                    donor_input: Tensor | None = None) -> Iterator[_Flow]:
    """Hooks (inside the block) that keep what per-receiver gradients need; after ``backward()``,
    ``flow.receiver_grads()`` yields them. With ``alpha`` the input embeddings are donor_input + alpha
    (recipient - donor_input) (integrated gradients)."""
    flow = _Flow(lm, graph, "grad", interpolate=None if alpha is None else (donor_input, alpha))
    with hooks(flow.specs()):
        yield flow
