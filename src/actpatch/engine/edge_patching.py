"""Exact edge patching: one forward pass in which each receiver reads its own copy of the residual stream.

    don, _ = sender_outputs(lm, graph, batch, "donor")          # (S + P, B, T, D): what each sender wrote, and more
    logits = edge_patched_logits(lm, graph, batch, don, weights)  # weights (R, S): 1 = the edge carries the donor

Receiver r reads x_r = resid + sum_s w[r, s] (donor_s - current_s), where ``resid`` is the residual stream of this
very run at r's layer and ``current_s`` what sender s wrote in this run. With every weight 0 the run is the
recipient's; with every allowed weight 1 each receiver reads the donor's residual stream, so the run is the donor's;
patching every edge out of one head equals an ordinary patch of that head. The q, k and v of each head are computed
separately without copying any attention code: a layer's most common q/k/v input is given to its norm, and the
hook on the projection that makes them (q_proj or GPT-2's fused c_attn) replaces the slice of each head that reads
another input with the projection of its own normed input (once per distinct input). Weights need not be
0 or 1 (finite differences use small ones). Gradients for attribution: ``engine.edge_gradients``; the graph:
``engine.circuit_graph``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ConfigError, DataError
from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import last_logits
from .circuit_graph import Graph
from .hooks import HookSpec, hooks
from .noise import noise_hook


class _Flow:
    """The state of one edge-patched (or recorded, or differentiated) forward pass and the hooks that keep it.

    ``mode``: "record" keeps every sender's output and the residual stream at every receiver point; "patch" adds
    ``weights`` x (donor - current) at receivers; "grad": ``engine.edge_gradients._GradFlow``.

    Patch mode sums over few senders either way: a receiver group with fewer patched edges than kept ones adds
    sum_s w (donor_s - current_s) over its patched senders; otherwise it adds the donor's residual stream at its
    input minus this run's (every sender before it, at once) minus sum_s (1 - w) (donor_s - current_s) over its kept
    ones (a small circuit: few terms).
    """

    def __init__(self, lm: LoadedModel, graph: Graph, mode: str, donor: Tensor | None = None,
                 weights: Tensor | None = None, explicit: bool = False) -> None:
        _check_one_device(lm)
        self.lm, self.g, self.a, self.mode, self.donor = lm, graph, lm.adapter, mode, donor
        self.weights = None if weights is None else (weights.float() * graph.allowed.float())
        S = len(graph.senders)
        self.written: Tensor | None = None                                # (S + P, B, T, D) outputs, streams (record)
        self.diff: list[Tensor | None] = [None] * S                      # donor - current (patch mode, needed ones)
        self.resid: dict[int, Tensor] = {}
        self.w_o: dict[int, Tensor] = {}                                  # W_O per head, per layer (read once)
        self.w_qkv: dict[int, tuple] = {}                                 # a receiver's rows of its projection
        self.complement = torch.zeros(len(graph.receivers), dtype=torch.bool)
        self.base: dict[int, int] = {}  # layer -> a receiver whose input the layer's norm gets (patch mode)
        self.own: set[int] = set()      # q/k/v receivers with another input: made at the projection (patch mode)
        self.needed = torch.full((S,), mode == "record", dtype=torch.bool)
        if mode == "patch":
            self._plan(explicit)

    def _plan(self, explicit: bool) -> None:
        """Per receiver group (one hook's rows), the form of its sum; which senders' diffs must be kept; each
        layer's shared q/k/v input. ``explicit``: every sum written out, every q/k/v remade at the projection."""
        allowed = self.g.allowed
        for rows in self._groups():
            w, ok = self.weights[rows], allowed[rows]
            patched, kept = w != 0, ok & (w != 1)
            if not bool(patched.any()):
                continue
            if not explicit and int(kept.any(0).sum()) < int(patched.any(0).sum()):
                self.complement[rows] = True
                self.needed |= kept.any(0)
            else:
                self.needed |= patched.any(0)
        for L in range(self.g.n_layers):  # each layer's most common q/k/v input is made once, at its norm
            rows = self.g.layer_receivers(L, ("q", "k", "v"))
            if explicit:
                self.own.update(rows)
                continue
            distinct, which, counts = torch.unique(self.weights[rows], dim=0, return_inverse=True, return_counts=True)
            common = int(counts.argmax())
            if bool(distinct[common].any()):
                self.base[L] = rows[which.tolist().index(common)]
            self.own.update(r for r, u in zip(rows, which.tolist()) if u != common)

    def _groups(self) -> list[list[int]]:
        g, groups = self.g, []
        for L in range(g.n_layers):
            groups += [g.layer_receivers(L, which) for _, which in _qkv_modules(self.a, L)]
            groups.append([g.receiver_index(f"m{L}")])
        return groups + [[g.receiver_index("logits")]]

    # --- senders ---------------------------------------------------------------------------------------------
    def _wrote(self, s: int, value: Tensor) -> None:
        if self.mode == "record":  # one (S + P, B, T, D) block, filled in place: no per-sender copies to stack
            if self.written is None:
                self.written = value.new_empty(len(self.g.senders) + n_points(self.g), *value.shape)
            self.written[s].copy_(value.detach())
        elif self.mode == "patch" and self.needed[s]:
            self.diff[s] = self.donor[s].to(value.device, value.dtype) - value

    def on_input(self, x: Tensor) -> Tensor | None:
        self._wrote(0, x)
        return None

    def on_heads(self, layer: int, z: Tensor) -> None:
        first, H = self.g.sender_index(f"a{layer}.h0"), self.a.n_heads
        if bool(self.needed[first:first + H].any()):
            out = self.head_writes(layer, z.view(*z.shape[:2], H, self.a.d_head))  # (B, T, H*Dh) -> (B, T, H, Dh)
            for h in range(H):
                self._wrote(first + h, out[h])

    def head_writes(self, layer: int, zh: Tensor) -> Tensor:
        """Each head's write z_h W_O[h] from its output ``zh`` (..., H, Dh): (H, ..., D), W_O read once per run."""
        if layer not in self.w_o:
            self.w_o[layer] = self.a.head_weights(layer)
        return torch.einsum("...he,hed->h...d", zh.detach(), self.w_o[layer].to(zh.device, zh.dtype))

    def _stream(self, point: int, x: Tensor) -> None:
        """Record mode: the residual stream at a receiver point, after the senders' rows."""
        self.written[len(self.g.senders) + point].copy_(x.detach())

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
        # every allowed sender's diff at once: the senders before a receiver are what its residual stream sums
        total = (self.donor[len(self.g.senders) + _point(self.g, rows[0])].to(like.device, like.dtype) - like).unsqueeze(0)
        kept = self._sum(rows, (1 - w) * ok.float(), like)
        return total.expand(len(rows), *total.shape[1:]) - (0 if kept is None else kept)

    def read(self, receiver: int, x: Tensor) -> Tensor | None:
        """What ``receiver`` reads where the stream is ``x`` (B, T, D); None: ``x`` unchanged."""
        d = self.delta([receiver], x)
        return None if d is None else x + d[0]

    def on_attn_input(self, layer: int, x: Tensor) -> Tensor | None:
        """Keep the layer's residual stream; in patch mode, give the norm its most common receivers' input."""
        self.resid[layer] = x
        if self.mode == "record":
            self._stream(2 * layer, x)
        return self.read(self.base[layer], x) if layer in self.base else None

    def on_qkv(self, layer: int, which: tuple[str, ...], out: Tensor) -> Tensor | None:
        """Replace each receiving head's slice of the projection ``out`` (B, T, F) by the projection of its own input."""
        rows = [r for r in self.g.layer_receivers(layer, which) if r in self.own]  # the others read what the norm got
        if not rows:
            return None
        # receivers with the same edge weights read the same input: each distinct one is made and normed once
        which = torch.unique(self.weights[rows], dim=0, return_inverse=True)[1].tolist()  # row i -> its distinct row
        first: dict[int, int] = {}
        for r, u in zip(rows, which):
            first.setdefault(u, r)
        reps = [first[u] for u in range(len(first))]  # one receiver per distinct row of weights
        x = self.resid[layer]
        d = self.delta(reps, x)  # None: they read the stream unchanged, which the norm did not get
        xs = x.unsqueeze(0) if d is None else x.unsqueeze(0) + d  # (U, B, T, D)
        normed = self.a.attn_norm(layer).forward(xs)  # (U, B, T, D); .forward does not re-enter the hooks
        new, Dh = out.clone(), self.a.d_head
        for i, r in enumerate(rows):
            weight, bias, start = self._head_rows(layer, r)
            y = normed[which[i]] @ weight.to(normed.dtype).T  # (B, T, Dh): only this head's rows of the projection
            new[..., start:start + Dh] = y if bias is None else y + bias.to(y.dtype)
        return new

    def _head_rows(self, layer: int, r: int) -> tuple[Tensor, Tensor | None, int]:
        """Receiver r's rows of its projection, W (Dh, D) and bias, read once per run, and where its slice starts."""
        rec = self.g.receivers[r]
        if r not in self.w_qkv:
            self.w_qkv[r] = self.a.qkv_head_weights(layer, rec.input, rec.index)  # (Dh, D), (Dh,)
        return *self.w_qkv[r], self.a.qkv_start(rec.input, rec.index)

    def on_single(self, receiver: int, x: Tensor) -> Tensor | None:
        if self.mode == "record":
            self._stream(_point(self.g, receiver), x)
            return None
        return self.read(receiver, x)

    # --- the hooks ---------------------------------------------------------------------------------------------
    def specs(self) -> list[HookSpec]:
        a, g = self.a, self.g
        specs: list[HookSpec] = [(a.block(0), "input", self.on_input)]
        for L in range(g.n_layers):
            specs.append((a.attn_norm(L), "input", lambda x, L=L: self.on_attn_input(L, x)))
            if self.mode != "record":
                for module, which in _qkv_modules(a, L):
                    specs.append((module, "output", lambda out, L=L, w=which: self.on_qkv(L, w, out)))
            if g.head_senders:
                specs.append((a.attn_out(L), "input", lambda z, L=L: self.on_heads(L, z)))
            else:
                specs.append((a.attn_post_norm(L), "output", lambda out, L=L: self.on_written(f"a{L}", out)))
            mlp_r = g.receiver_index(f"m{L}")
            specs.append((a.mlp_norm(L), "input", lambda x, r=mlp_r: self.on_single(r, x)))
            specs.append((a.mlp_written(L), "output", lambda out, L=L: self.on_written(f"m{L}", out)))
        specs.append((a.final_norm(), "input", lambda x, r=g.receiver_index("logits"): self.on_single(r, x)))
        return specs


def n_points(graph: Graph) -> int:
    """Receiver points: each layer's attention input and MLP input, and the final norm's input."""
    return 2 * graph.n_layers + 1


def _point(graph: Graph, r: int) -> int:
    """Receiver r's point: 2L for layer L's q/k/v, 2L + 1 for its MLP, 2 n_layers for the logits."""
    rec = graph.receivers[r]
    return 2 * graph.n_layers if rec.input == "logits" else 2 * rec.layer + (rec.input == "mlp")


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
    """What every sender writes in the ``side`` ("recipient" or "donor") run, and its END logits.

    Rows 0..S-1 of the (S + P, B, T, D) block are the senders' writes, in ``graph.senders`` order; the P =
    ``n_points(graph)`` rows after them are the residual stream at each receiver point (layer L's attention input
    at S + 2L, its MLP input at S + 2L + 1, the final norm's input last): what edge patching needs of the donor.

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
    weights: Float[Tensor, "receiver sender"], explicit: bool = False,
) -> Float[Tensor, "batch vocab"]:
    """END logits of the recipient run with ``weights`` of every edge patched to the donor (1 = fully patched).

    ``explicit``: every receiver's input as the written-out sum over its patched senders, and every head's q, k and
    v remade at the projection (no shared input at the norm, no stream differences): slower, for checks.

    Example::

        logits = edge_patched_logits(lm, graph, batch, donor, (~circuit).float())   # everything outside the circuit
    """
    _check_aligned(batch)
    if weights.shape != graph.allowed.shape:
        raise DataError(f"edge weights must be (receivers, senders) = {tuple(graph.allowed.shape)}, got "
                        f"{tuple(weights.shape)}")
    want = len(graph.senders) + n_points(graph)
    if donor.dim() != 4 or donor.shape[0] != want or tuple(donor.shape[1:3]) != tuple(batch.recipient_ids.shape):
        raise DataError(f"the donor must be (senders + receiver points, pairs, tokens, d_model) with {want} rows and "
                        f"{tuple(batch.recipient_ids.shape)} pairs x tokens, got {tuple(donor.shape)}: record it with "
                        "sender_outputs(lm, graph, batch, 'donor') for this very batch")
    with torch.inference_mode():
        return _run(lm, batch, _Flow(lm, graph, "patch", donor=donor, weights=weights, explicit=explicit), "recipient")


