"""Answers of several tokens: teacher-forced continuations, read under a patch that shares the patched prompt.

A continuation c = (c_0, .., c_{m-1}) is an answer's tokens after the prompt (``batch.continuation_ids``). Its
log-probability is log P(c_0 | prompt) + sum_i log P(c_i | prompt, c_<i): the first term reads the END logits,
the rest (the *tail*) the logits at the continuation's own positions. A patch writes prompt positions only; the
continuation tokens are recomputed under it, as causal tracing does, with no generation loop.

``ContinuationState`` records the unpatched recipient twice: the prompts (``RecipientState``) and the B*n
continuation rows c[:-1] (padded to M, the longest one's length less one; padding masked, position ids counting the prompt's real tokens), each
computed against its prompt's cached keys and values, so that no prompt position is recomputed. ``run`` replays
a chunk of variants layer by layer: the k*B prompt rows first, with the patch hooks on; then their keys and
values at all T prompt positions stand in for the prompt of each continuation row (k*B*n, M), which runs
with the hooks shut. The patched prompt is computed once per variant, whatever the number of continuations::

    state = ContinuationState.record(lm, batch)
    readout = state.run(lm, batch.position("END"), start=3, pos=5, copies=4, gate=gate)
    readout.end, readout.tail     # (4*B, V) END logits, (4*B, n) tail log-probs

``record`` checks the padded layout against plain right-padded forward passes of the same rows and refuses a
model on which they differ, before any patch runs. A sliding window does this when the padded rows are longer
than the window (the window counts columns, padding included): exact for Mistral's or Gemma's windows of 512 and
more on prompts shorter than that, refused on tiny test configs with windows of a few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.cache_utils import DynamicCache

from ..errors import NumericalError
from ..model.models import LoadedModel
from .batch import PairBatch
from .hooks import hooks
from .noise import noise_hook
from .prefix import RecipientState

LOGIT_BYTES = 2**27  # the tail's full-vocabulary logits are made in slices of at most this many bytes


@dataclass(frozen=True)
class Readout:
    """What a multi-token metric reads: END logits (*, B, V), tail log-probs (*, B, n) (sum over c_1.. of each
    continuation) and, for KL over the answer's positions, the summed KL of the first answer's tail (*, B).

    Example::

        ro = plain_readout(lm, batch); continuation_scores("logprob", ro.end, ro.tail, batch.cont_ids, batch.cont_side)
    """

    end: Float[Tensor, "*rows vocab"]
    tail: Float[Tensor, "*rows n"]
    tail_kl: Float[Tensor, "*rows"] | None = None
    answer_logp: Float[Tensor, "rows M vocab"] | None = None  # plain_readout(keep=True): the answer's tail log-probs

    def view(self, k: int, b: int) -> "Readout":
        kl = None if self.tail_kl is None else self.tail_kl.view(k, b)
        return Readout(self.end.view(k, b, -1), self.tail.view(k, b, -1), kl)

    def nonfinite_rows(self) -> list[int]:
        """Variant indices (leading axis) with a NaN or inf anywhere."""
        ok = self.end.flatten(1).isfinite().all(1) & self.tail.flatten(1).isfinite().all(1)
        return (~ok).nonzero().flatten().tolist()


def tail_layout(batch: PairBatch, pad: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, position ids), each (B*n, T + M): every row's recipient prompt right-padded to T, then one
    continuation's c[:-1] padded to M; rows are pair-major (pair b, continuation c). The padding inside a row is
    masked, and position ids count real tokens."""
    conts = batch.cont_ids  # (B, n, m)
    B, n, m = conts.shape
    inputs = conts[:, :, :-1].reshape(B * n, m - 1)  # (B*n, M): c_0..c_{m-2} are inputs; c_{m-1} only a target
    real = inputs >= 0
    ids = torch.cat([batch.recipient_ids.repeat_interleave(n, 0), torch.where(real, inputs, pad)], dim=1)  # (B*n, T+M)
    mask = torch.cat([batch.attention_mask.repeat_interleave(n, 0), real.long()], dim=1)
    length = batch.lengths().repeat_interleave(n)  # (B*n,)
    positions = torch.cat([torch.arange(batch.recipient_ids.shape[1]).expand(B * n, -1),
                           length[:, None] + torch.arange(m - 1)[None]], dim=1)  # (B*n, T+M)
    return ids, mask, positions


def tail_targets(batch: PairBatch) -> tuple[Int[Tensor, "rows M"], Tensor]:
    """(B*n, M) the token each continuation position predicts (c_{i+1} at position i), and where it is real."""
    conts = batch.cont_ids
    targets = conts[:, :, 1:].reshape(conts.shape[0] * conts.shape[1], conts.shape[2] - 1)  # (B*n, M)
    return targets.clamp(min=0), targets >= 0


def tail_readout(
    lm: LoadedModel, hidden: Float[Tensor, "rows M d"], targets: Tensor, real: Tensor,
    reference: Float[Tensor, "b M vocab"] | None = None, n: int = 1,
) -> tuple[Float[Tensor, "rows"], Float[Tensor, "rows"] | None]:
    """Summed log-probs of each row's targets from finalized ``hidden``; with ``reference`` (the unpatched first
    continuation's log-probs per pair) also the summed KL(reference || patched) of each pair's first continuation.
    The vocabulary's logits are never made all at once: in cache-sized blocks for log-probs alone
    (``Adapter.target_logprobs``), in slices of rows with ``reference``."""
    R, M = targets.shape
    if reference is None:  # log-probs alone: no (rows, vocab) log-softmax is ever made
        lp = lm.adapter.target_logprobs(hidden.flatten(0, 1), targets.flatten()).view(R, M)
        return (lp * real.to(lp.device)).sum(1).cpu(), None
    lp = torch.zeros(R, dtype=torch.float32 if hidden.dtype != torch.float64 else torch.float64)
    kl = torch.zeros_like(lp)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    step = max(1, LOGIT_BYTES // (8 * vocab * max(M, 1)))
    for lo in range(0, R, step):
        h = hidden[lo:lo + step]  # (r, M, D)
        logp = torch.log_softmax(lm.adapter.unembed(h.flatten(0, 1)).float().view(h.shape[0], M, -1), dim=-1)
        t, ok = targets[lo:lo + step].to(logp.device), real[lo:lo + step].to(logp.device)
        lp[lo:lo + step] = (logp.gather(-1, t[..., None])[..., 0] * ok).sum(1).cpu().to(lp.dtype)
        rows = torch.arange(lo, lo + h.shape[0])
        first = rows % n == 0  # the answer's own continuation: slot 0 of each pair
        if first.any():
            ref = reference[(rows[first] // n) % reference.shape[0]].to(logp.device)  # (r0, M, V)
            d = (ref.exp() * (ref - logp[first])).sum(-1)  # (r0, M)
            kl[rows[first]] = (d * ok[first]).sum(1).cpu().to(kl.dtype)
    return lp, kl


class ContinuationState:
    """The recipient's prompt state and its continuation rows' state (see the module docstring).

    Example::

        state = ContinuationState.record(lm, batch); state.run(lm, batch.position("END"), 0, 0, 1, HookGate())
    """

    def __init__(self, lm: LoadedModel, batch: PairBatch) -> None:
        self.prompt = RecipientState.record(lm, batch)
        self.n, self.T = batch.cont_ids.shape[1], batch.recipient_ids.shape[1]
        self.M = batch.cont_ids.shape[2] - 1
        self.targets, self.real = tail_targets(batch)
        self.tail = None
        self.reference = None
        self.base = torch.zeros(len(batch), self.n)
        if self.M:
            self._record(lm, batch)

    @torch.inference_mode()
    def _record(self, lm: LoadedModel, batch: PairBatch) -> None:
        """The continuation rows' state, the unpatched tail log-probs, and the answer's log-probs for KL over it."""
        ids, mask, positions = tail_layout(batch)
        past = DynamicCache()  # the prompts' keys and values, once per continuation row: only c[:-1] is computed
        for L, (k, v) in enumerate(self.prompt.kv):
            past.update(k.repeat_interleave(self.n, 0), v.repeat_interleave(self.n, 0), L)
        self.tail = RecipientState.record_rows(lm, ids[:, self.T:], mask, positions[:, self.T:], past)
        hidden = self.tail.final  # (B*n, M, D), final-normed
        self.reference = tail_readout_logp(lm, hidden[::self.n])  # (B, M, V): the answer's own continuation
        self.base = tail_readout(lm, hidden, self.targets, self.real)[0].view(len(batch), self.n)
        self._check_layout(lm, batch)

    @classmethod
    def record(cls, lm: LoadedModel, batch: PairBatch) -> "ContinuationState":
        return cls(lm, batch)

    def _check_layout(self, lm: LoadedModel, batch: PairBatch) -> None:
        """The padded layout must give what plain right-padded rows give (prompt + c[:-1], no padding inside), on
        the pairs where it differs most from them: the shortest prompt (the most padding inside its rows, the
        farthest back its real keys), the longest prompt and the longest continuation."""
        lengths, conts = batch.lengths(), (batch.cont_ids >= 0).sum(2).amax(1)  # (B,), (B,)
        pick = sorted({int(lengths.argmin()), int(lengths.argmax()), int(conts.argmax())})
        d = float((plain_readout(lm, batch.select(pick)).tail - self.base[pick]).abs().max())
        tol = 1e-3 if lm.dtype in (torch.float32, torch.float64) else 0.25
        if not d <= tol:
            raise NumericalError(
                f"the continuations' log-probs differ by {d:.3g} between the padded layout and plain rows (tolerance "
                f"{tol}) on this model, so multi-token answers cannot be read here; expected equal numbers. A sliding "
                "window shorter than the padded prompts does this (a NaN: a continuation token whose window holds only padding); "
                "use prompts of similar lengths, shorter than the window, or single-token answers.")

    def run(
        self, lm: LoadedModel, end: Int[Tensor, "batch"], start: int, pos: int, copies: int, gate, kl: bool = False,
    ) -> Readout:
        """Blocks ``start``.. of ``copies`` stacked variants: prompt positions ``pos``.. under the patch, then every
        continuation row against the patched prompt's keys and values. END logits and tail log-probs."""
        a, P, C = lm.adapter, self.prompt, self.tail
        if pos and int(end.min()) < pos:
            raise ValueError(f"pos {pos} is after some row's END token; nothing there to compute")
        cache = DynamicCache(ddp_cache_data=[(None, None)] * a.n_layers)
        h = P.hidden[start][:, pos:].repeat(copies, 1, 1)  # (k*B, T-pos, D)
        hc = None if C is None else C.hidden[start].repeat(copies, 1, 1)  # (k*B*n, M, D)
        for L in range(start, a.n_layers):
            h = self._block(lm, P, L, h, copies, pos, cache, P)
            keys, values = cache.layers[L].keys, cache.layers[L].values  # (k*B, KV, T, Dh): the patched prompt
            cache.layers[L] = type(cache.layers[L])()
            if hc is None:
                continue
            tcache = DynamicCache(ddp_cache_data=[(None, None)] * a.n_layers)
            tcache.update(keys.repeat_interleave(self.n, 0), values.repeat_interleave(self.n, 0), L)
            gate.open = False  # continuation positions are computed under the patch, never written
            try:
                hc = self._block(lm, C, L, hc, copies, 0, tcache, None)  # C's calls hold the M queries only
            finally:
                gate.open = True
        h = a.finalize(h)
        rows = torch.arange(h.shape[0], device=h.device)
        logits = a.unembed(h[rows, (end.to(h.device) - pos).repeat(copies)])  # (k*B, V)
        if hc is None:
            return Readout(logits, torch.zeros(h.shape[0], self.n, dtype=torch.float32))
        lp, tkl = tail_readout(lm, a.finalize(hc), self.targets.repeat(copies, 1), self.real.repeat(copies, 1),
                               self.reference if kl else None, self.n)
        return Readout(logits, lp.view(-1, self.n), tkl.view(-1, self.n)[:, 0] if kl else None)

    @staticmethod
    def _block(lm: LoadedModel, state: RecipientState, L: int, h: Tensor, copies: int, pos: int, cache, fill) -> Tensor:
        """Block L on ``h`` with ``state``'s recorded call arguments cut at query position ``pos``."""
        if fill is not None:
            fill._fill(cache, L, pos, copies)  # the recipient's keys/values of positions < pos
        rest, kwargs = state._prepare(state.calls[L], copies, pos, cache)
        for name in lm.adapter.arch.head_batched_args:  # (B*H, ..., T_keys) (Bloom's ALiBi): repeated, never cut
            if isinstance(state.calls[L][1].get(name), Tensor):
                x = state.calls[L][1][name]
                kwargs[name] = x.repeat(copies, *([1] * (x.dim() - 1)))
        out = lm.adapter.block(L)(h, *rest, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def tail_readout_logp(lm: LoadedModel, hidden: Float[Tensor, "b M d"]) -> Float[Tensor, "b M vocab"]:
    """Full log-softmax at every position of ``hidden`` (final-normed), in float32."""
    return torch.log_softmax(lm.adapter.unembed(hidden.flatten(0, 1)).float(), -1).view(*hidden.shape[:2], -1).cpu()


def plain_readout(lm: LoadedModel, batch: PairBatch, side: str = "recipient", against: Tensor | None = None,
                  keep: bool = False) -> Readout:
    """Unpatched readout of the recipient (or ``side="donor"``) prompts: one forward on B*n plain right-padded rows
    (prompt + c[:-1]) and END logits from the first continuation's row of each pair. ``against`` (B, M, V): the
    recipient's answer log-probs (``keep=True`` keeps them), for the KL over the answer's tail.

    Example::

        rec = plain_readout(lm, batch, keep=True); don = plain_readout(lm, batch, "donor", against=rec.answer_logp)
    """
    ids, mask = (batch.donor_ids, batch.donor_attention_mask) if side == "donor" else (batch.recipient_ids, batch.attention_mask)
    n, m = batch.cont_ids.shape[1:]
    lengths = mask.sum(1)
    rows, starts = [], []
    for b in range(len(batch)):
        for c in range(n):
            cont = [int(t) for t in batch.cont_ids[b, c, :-1] if t >= 0]
            rows.append(ids[b, : int(lengths[b])].tolist() + cont)
            starts.append(int(lengths[b]) - 1)
    width = max(len(r) for r in rows)
    plain = torch.zeros((len(rows), width), dtype=torch.long)
    plain_mask = torch.zeros_like(plain)
    for r, row in enumerate(rows):
        plain[r, :len(row)], plain_mask[r, :len(row)] = torch.tensor(row), 1
    noise = noise_hook(lm, batch, torch.arange(len(batch)).repeat_interleave(n)) if side == "donor" else None
    with torch.inference_mode(), hooks([] if noise is None else [noise]):  # a noised donor is read noised
        hidden = lm.model.base_model(input_ids=plain.to(lm.device), attention_mask=plain_mask.to(lm.device),
                                     use_cache=False).last_hidden_state  # (B*n, W, D)
        s = torch.tensor(starts, device=hidden.device)
        idx = (s[:, None] + torch.arange(m, device=hidden.device)[None]).clamp(max=width - 1)  # (B*n, m): END, then c's
        picked = hidden[torch.arange(len(rows), device=hidden.device)[:, None], idx]  # (B*n, m, D)
        end = lm.adapter.unembed(picked[::n, 0])  # (B, V)
        if m == 1:
            return Readout(end, torch.zeros(len(batch), n), torch.zeros(len(batch)) if against is not None else None)
        targets, real = tail_targets(batch)
        lp, kl = tail_readout(lm, picked[:, 1:], targets, real, against, n)
        logp = tail_readout_logp(lm, picked[::n, 1:]) if keep else None
    return Readout(end, lp.view(len(batch), n), None if kl is None else kl.view(-1, n)[:, 0], logp)
