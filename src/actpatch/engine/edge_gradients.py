"""Every receiver's input gradient from one plain forward and backward, for edge attribution (``engine.eap_scores``).

    with receiver_inputs(lm, graph, alpha, donor, keep, record=True) as flow:
        metric(last_logits(...)).sum().backward()
    flow.receiver_grads()   # (receivers, d metric / d their input (R', N, D)), layer by layer
    flow.written            # (S, N, D): every sender's donor output minus its output in this run

Nothing is copied per receiver inside the model. A head's q (k, v) is its rows W of the projection applied to
norm(x), so after the backward pass its input's gradient is the norm's vector-Jacobian product at x of
(d metric / d its slice of the projection) @ W: one small batched pass through the norm per layer. MLP and logits
receivers read the stream itself (one clone each, to keep its gradient). Only the ``keep`` positions (B, T) are
returned (N of them: padding has no gradient); the norm acts on each position alone, so they are taken before it.
With ``alpha`` the run's embeddings are donor + alpha (recipient - donor) (integrated gradients on the inputs;
alpha = 1 is the recipient's run, exactly). With ``mix`` as well, every sender's write is donor + alpha (its
output in this run - donor) (integrated gradients on the activations: alpha -> 0 is the donor's writes, alpha = 1
the recipient's run); the shift is a constant of the backward pass, so the gradient is the model's own at the mixed
activations. A layer's heads share one alpha, so their mixed writes sum to the mixed attention output, which is
where it is applied. With ``record`` the same run writes every sender's donor - current, so the recipient needs no
recording pass of its own. The norm's VJP is ``engine.norm_vjp``'s (closed form where it is checked to hold).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..model.models import LoadedModel
from .edge_patching import _Flow
from .circuit_graph import Graph
from .hooks import HookSpec, hooks
from .norm_vjp import finish, folded_rows, projected_pullback, vmap_pullback


class _GradFlow(_Flow):
    """The hooks of one differentiated forward pass (see the module docstring)."""

    def __init__(self, lm: LoadedModel, graph: Graph, donor: Tensor, alpha: float | None,
                 keep: Tensor | None, record: bool, weights: dict | None = None, mix: bool = False,
                 blocks: dict | None = None) -> None:
        super().__init__(lm, graph, "grad", donor=donor)
        self.alpha, self.record = alpha, record
        self.mix = mix and alpha is not None and alpha != 1  # alpha = 1: every write is the run's own
        if keep is None and donor is not None:  # every position
            keep = torch.ones(donor.shape[1:3], dtype=torch.bool, device=lm.device)
        # the kept positions as flat indices b * T + t (N,); ALL when every one is kept (a view, no gather)
        self.at = None if keep is None else ALL if bool(keep.all()) else keep.flatten().nonzero().flatten()
        self.inputs: list[tuple[int, Tensor]] = []                # (MLP or logits receiver, its input)
        self.projected: list[tuple[int, list[int], Tensor]] = []  # (layer, receivers, q/k/v projection output)
        self.layer_weights = {} if weights is None else weights   # layer -> its receivers' rows (R', Dh, D), shared
        self.blocks = self.layer_weights if blocks is None else blocks  # scratch memory only (``reused_block``)
        if record:  # donor - current, each sender's row written once, as it is computed (S, N, D) float32
            shape = (len(graph.senders), int(keep.sum()), donor.shape[-1])  # one block for every pass of a run
            self.written = reused_block(self.blocks, "written", shape, torch.float32, lm.device)

    def _wrote(self, s: int, value: Tensor) -> None:
        if self.record:  # (N, D): the donor's row at the kept positions minus this run's
            self._donor_into(s, s + 1).squeeze(0).sub_(_positions(value.detach(), self.at))

    def _donor_into(self, first: int, end: int) -> Tensor:
        """The donor's rows first..end-1 at the kept positions, written into ``written``'s rows: (S', N, D) float32."""
        out, rows = self.written[first:end], self.donor[first:end].flatten(1, 2)  # (S', b*T, D): a view
        if isinstance(self.at, Tensor) and rows.dtype == out.dtype:
            return torch.index_select(rows, 1, self.at.to(rows.device), out=out)
        return out.copy_(_positions(self.donor[first:end], self.at, 1))

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
            out = self._donor_into(first, first + H)
            if zh.dtype != out.dtype:  # in the model's dtype, as the recording
                out.sub_(self.head_writes(layer, zh))
                return
            if layer not in self.w_o:
                self.w_o[layer] = self.a.head_weights(layer).to(zh.device, zh.dtype)  # (H, Dh, D)
            # minus z_h @ W_O[h] for every head in one product, in place: (H, N, Dh) @ (H, Dh, D)
            out.baddbmm_(zh.detach().transpose(0, 1), self.w_o[layer], alpha=-1)

    def _mixed(self, first: int, end: int, out: Tensor, bias: Tensor | None = None) -> Tensor | None:
        """``out`` (B, T, D) moved to donor + alpha (out - donor), donor = the sum of the donor's rows first..end-1
        (+ ``bias``, which both runs add); the shift is detached, so the gradient passes as if unmixed."""
        if not self.mix:
            return None
        donor = self.donor[first:end].sum(0).to(out.device, out.dtype)  # (B, T, D)
        if bias is not None:
            donor = donor + bias.to(out.dtype)
        return out + (1 - self.alpha) * (donor - out.detach())

    def on_written(self, name: str, out: Tensor) -> Tensor | None:
        s = self.g.sender_index(name)
        self._wrote(s, out)
        return self._mixed(s, s + 1, out)

    def on_attn_written(self, layer: int, out: Tensor) -> Tensor | None:
        """The attention output of ``layer`` (every head's write, and the bias) when each head is a sender."""
        first = self.g.sender_index(f"a{layer}.h0")
        return self._mixed(first, first + self.a.n_heads, out, self.a.head_bias(layer))

    def specs(self) -> list[HookSpec]:
        specs = super().specs()
        if self.mix and self.g.head_senders:
            specs += [(self.a.attn_out(L), "output", lambda out, L=L: self.on_attn_written(L, out))
                      for L in range(self.g.n_layers)]
        return specs

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
    def receiver_grads(self) -> Iterator[tuple[list[int], Callable[..., Tensor]]]:
        """(receivers, fill) one layer's heads or one MLP at a time, in graph order: ``fill(out, add=False)`` writes
        d metric / d their input into ``out`` (R', N, D) float32 (a caller's buffer: no fresh memory per layer), or
        adds it to what ``out`` holds, and returns ``out``. ``fill(out, add, heads)`` with ``heads`` (R', N, Dh)
        float32 (EAP-IG, the same block at every step): a closed-form layer's heads write or add only the norm's
        correction to ``out``, and their 1/rms-scaled projection gradients to ``heads``; fill then returns
        ``finish``, and ``finish()`` adds the rest to that ``out`` once, after the last step (else None)."""
        by_layer: dict[int, list] = {}
        for layer, rows, out in self.projected:  # q, k and v of a layer share one input: one pass through its norm
            by_layer.setdefault(layer, []).extend((r, out) for r in rows)
        groups = [([r], lambda out, add=False, heads=None, xs=xs: self._stream_grad(xs, out, add, heads))
                  for r, xs in self.inputs]
        groups += [([r for r, _ in parts], lambda out, add=False, heads=None, L=L, parts=parts:
                    self._head_grads(L, parts, out, add, heads)) for L, parts in by_layer.items()]
        yield from sorted(groups, key=lambda g: g[0][0])  # receivers are numbered layer by layer

    def _stream_grad(self, xs: Tensor, out: Tensor, add: bool, heads: Tensor | None = None) -> Tensor | None:
        grad = _positions(xs.grad, self.at).unsqueeze(0)  # (1, N, D)
        out = out.add_(grad) if add else out.copy_(grad)
        return None if heads is not None else out

    def _head_grads(self, layer: int, parts: list[tuple[int, Tensor]], out: Tensor, add: bool = False,
                    heads: Tensor | None = None):
        """d metric / d the input of the heads in ``parts`` ((receiver, its projection's output) each), written
        into ``out`` (R', N, D) or, with ``add``, added to it (with ``heads``: see ``receiver_grads``)."""
        Dh = self.a.d_head
        rows = [r for r, _ in parts]
        starts = [self.a.qkv_start(self.g.receivers[r].input, self.g.receivers[r].index) for r in rows]
        made = {id(p): p for _, p in parts}  # (B, T, F) -> (N, F) at the kept positions, once per projection
        grads = {k: _positions(p.grad, self.at) for k, p in made.items()}
        # each receiver's slice of its projection's gradient (R', N, Dh), and of what it made in this run
        g_head = _head_slices(grads, parts, starts, Dh)
        x = _positions(self.resid[layer].detach(), self.at)  # (N, D): where the norm's Jacobian is taken
        norm = self.a.attn_norm(layer)
        fused = projected_pullback(norm, x, self.layer_weights)
        if fused is not None:  # closed form: one batched product into out, and a rank-one correction
            # the rows times the norm's gain (R', Dh, D), in a scratch block that every layer reuses: nothing of that
            # size is kept (EAP-IG's finish folds them again); the rows are views of the weights
            w_rows = [self._head_rows(layer, r)[0].to(out.device) for r in rows]
            shape, work = (len(rows), Dh, x.shape[-1]), torch.promote_types(w_rows[0].dtype, torch.float32)
            blocks, cache, key = self.blocks, self.layer_weights, (layer, tuple(rows))

            def folded():  # captures no tensor of this pass: the finish of a later step must not keep it alive
                return folded_rows(norm, w_rows, reused_block(blocks, "folded", shape, work, out.device), cache, key)
            wg, wb = folded()
            made = {k: _positions(p.detach(), self.at) for k, p in made.items()}
            ys = _head_slices(made, parts, starts, Dh)  # (R', N, Dh)
            bias = self._biases(layer, rows)  # (R', Dh) or None: the projection's own, which w norm(x) lacks
            ys = ys if bias is None else ys - bias.unsqueeze(1).to(ys.dtype)
            fused(g_head, wg, out, add, ys, heads, wb)
            return out if heads is None else lambda: finish(norm, folded()[0], heads, out, cache)
        w = self._weights(layer, rows).to(out.device)  # (R', Dh, D)
        target = reused_block(self.blocks, "scratch", out.shape, out.dtype, out.device) if add else out
        torch.bmm(g_head.to(out.dtype), w.to(out.dtype), out=target)  # (R', N, Dh) @ (R', Dh, D): d m / d normed x
        got = vmap_pullback(norm, x)(target)  # the norm's VJP, any norm
        if got is not target:
            target.copy_(got)  # a float64 model's VJP is computed in float64
        out = out.add_(target) if add else out
        return None if heads is not None else out

    def _biases(self, layer: int, rows: list[int]) -> Tensor | None:
        """The receivers' rows of their projection's bias (R', Dh), or None without one; read once per call."""
        key = ("bias", layer, tuple(rows))
        if key not in self.layer_weights:
            biases = [self._head_rows(layer, r)[1] for r in rows]
            self.layer_weights[key] = None if any(b is None for b in biases) else torch.stack(biases).detach()
        return self.layer_weights[key]

    def _weights(self, layer: int, rows: list[int]) -> Float[Tensor, "receiver d_head d_model"]:
        """The rows of the q/k/v projections that make receivers ``rows`` of ``layer``: (R', Dh, D), read once per
        ``edge_scores`` call (the dict is shared by its passes)."""
        key = (layer, tuple(rows))
        if key not in self.layer_weights:
            self.layer_weights[key] = torch.stack([self._head_rows(layer, r)[0] for r in rows])
        return self.layer_weights[key]


def _head_slices(tensors: dict[int, Tensor], parts: list[tuple[int, Tensor]], starts: list[int],
                 Dh: int) -> Float[Tensor, "receiver pos d_head"]:
    """(R', N, Dh): receiver i's Dh features from ``starts[i]`` of its projection's (N, F) tensor (``tensors`` by the
    projection's id), copied once: heads whose slices follow one another in one projection are taken as one view."""
    runs: list[Tensor] = []
    i = 0
    while i < len(parts):
        j, key = i + 1, id(parts[i][1])
        while j < len(parts) and id(parts[j][1]) == key and starts[j] == starts[j - 1] + Dh:
            j += 1
        block = tensors[key][:, starts[i]:starts[i] + (j - i) * Dh]  # (N, n * Dh)
        runs.append(block.unflatten(1, (j - i, Dh)).transpose(0, 1))  # (N, n, Dh) -> (n, N, Dh), a view
        i = j
    return torch.cat(runs)


def reused_block(cache: dict, name: str, shape: tuple, dtype: torch.dtype, device) -> Tensor:
    """A block of ``shape`` kept in ``cache`` under ``name`` and reused by every pass of a scoring run, or by every
    call that is given the same workspace (grown when a pass needs more): fresh memory costs a page fault per 4 KiB on
    first touch, most of a pass's overhead here. Its contents are garbage: every user writes it before reading."""
    n = 1
    for d in shape:
        n *= d
    store = cache.get(name)
    want = torch.device(device)  # "cuda" means the current device, which a block on cuda:0 may be
    moved = store is not None and (store.device.type != want.type or want.index not in (None, store.device.index))
    if store is None or moved or store.numel() < n or store.dtype != dtype:
        cache.pop(name, None)  # the old block goes before the new one is made
        store = cache[name] = torch.empty(n, dtype=dtype, device=device)
    return store[:n].view(shape)


ALL = "every position"  # ``at`` when no position is left out: B and T are merged, with no gather


def _positions(t: Tensor, at: Tensor | str | None, lead: int = 0) -> Tensor:
    """``t`` (*lead, B, T, ...) at the positions ``at`` (flat indices b * T + t, (N,)): (*lead, N, ...); with ``ALL``,
    B and T merged (N = B * T, a view where the strides allow); ``t`` itself when ``at`` is None."""
    if at is None:
        return t
    flat = t.flatten(lead, lead + 1)  # a view for the donor's slices and the run's own tensors
    return flat if at is ALL else flat.index_select(lead, at.to(t.device))


@contextlib.contextmanager
def receiver_inputs(lm: LoadedModel, graph: Graph, alpha: float | None = None,
                    donor: Float[Tensor, "sender batch pos d_model"] | None = None,
                    keep: Bool[Tensor, "batch pos"] | None = None, record: bool = False,
                    weights: dict | None = None, mix: bool = False, blocks: dict | None = None) -> Iterator[_GradFlow]:
    """Hooks (inside the block) for one differentiated forward pass; after ``backward()``,
    ``flow.receiver_grads()`` yields the receivers' input gradients at the positions ``keep`` selects (all when
    None). ``alpha``: the embeddings are donor[0] + alpha (recipient - donor[0]); ``record``: ``flow.written`` is
    every sender's ``donor`` minus its output in this run, at those positions (S, N, D), float32; ``weights``: a dict
    to keep the receivers' projection rows and the norms' forms in between passes; ``mix``: interpolate every sender's
    write too (with ``alpha``); ``blocks``: a dict whose scratch blocks are reused (``weights`` when None)."""
    flow = _GradFlow(lm, graph, donor, alpha, keep, record, weights, mix, blocks)
    with hooks(flow.specs()):
        yield flow
