"""Architecture adapters: an ``Architecture`` entry bound to one loaded model.

The entries themselves are in ``model.architectures`` (one short declarative entry per family). Everything else in
actpatch is architecture-agnostic and talks to a bound ``Adapter``::

    adapter = get_adapter(model)            # picks the Architecture from config.model_type
    adapter.attn_out(5)                     # the o_proj / c_proj module of layer 5
    adapter.head_weights(5)                 # W_O split per head, (H, Dh, D)
    adapter.unembed(adapter.finalize(h))    # final norm (+ projection), LM head, logit scale and soft-cap

Unknown architectures raise ``UnsupportedArchitectureError`` listing the supported ones (``model.autoadapt`` can
try to build an entry from the module tree).
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError
from .architectures import ARCHITECTURES, Architecture, find_architecture, supported_model_types
from .placement import execution_device, onloaded

__all__ = ["ARCHITECTURES", "Adapter", "Architecture", "get_adapter", "supported_model_types"]


def _attr_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path such as ``"transformer.h"``."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Adapter:
    """An ``Architecture`` bound to one loaded model, with its dimensions read and checked.

    Example::

        adapter = get_adapter(model); adapter.attn_out(5); adapter.head_weights(5).shape  # (H, Dh, D)
    """

    def __init__(self, model: nn.Module, arch: Architecture, auto: bool = False) -> None:
        self.model = model
        config = model.config
        self.arch = arch.bind(config)  # every config-dependent field evaluated for this model
        self.auto = auto  # built by inspecting the module tree (model.autoadapt), not from the table
        self.blocks: nn.ModuleList = _attr_path(model, self.arch.blocks)
        self.n_layers = len(self.blocks)
        self.n_heads = int(arch.n_heads(config))
        self.d_head = int(arch.d_head(config))
        self.n_kv_heads = int(arch.n_kv_heads(config))
        in_features = self._in_features(self.attn_out(0))
        if in_features != self.n_heads * self.d_head:
            raise UnsupportedArchitectureError(
                f"{arch.name} adapter: expected the attention output projection to take n_heads * d_head = "
                f"{self.n_heads} * {self.d_head} = {self.n_heads * self.d_head} features, got {in_features}. "
                "The config does not describe this checkpoint; please report the model id."
            )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise UnsupportedArchitectureError(
                f"{arch.name} adapter: expected the {self.n_heads} query heads to split evenly into key/value heads, "
                f"got {self.n_kv_heads} key/value heads; please report the model id.")
        self.resid_scale = 1.0 if arch.resid_scale is None else float(arch.resid_scale(config))
        self.logit_scale = 1.0 if arch.logit_scale is None else float(arch.logit_scale(config))

    def _in_features(self, proj: nn.Module) -> int:
        return proj.weight.shape[0] if self.arch.conv1d else proj.weight.shape[1]

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection of ``layer``; its forward input is the concatenated heads."""
        return _attr_path(self.blocks[layer], self.arch.attn_out)

    def attention(self, layer: int) -> nn.Module:
        """The attention module of ``layer`` (the output projection's parent); eager attention returns
        ``(output, weights)`` from it, weights (B, H, T, T)."""
        return _attr_path(self.blocks[layer], self.arch.attn_out.rpartition(".")[0])

    def qkv_slot(self, layer: int, which: str, head: int) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
        """The module that computes ``which`` ("q", "k" or "v") of ``layer``, and a function that views
        its output (B, T, F) as that query head's slice (B, T, Dh). Under grouped-query attention a
        query head's k and v are its group's shared KV head."""
        slot = head if which == "q" else head // (self.n_heads // self.n_kv_heads)
        start, Dh = self.qkv_start(which, slot), self.d_head
        return self.qkv_module(layer, which), lambda out: out[..., start:start + Dh]  # (B, T, F) -> (B, T, Dh)

    def qkv_module(self, layer: int, which: str) -> nn.Module:
        """The module whose output holds ``which`` ("q", "k" or "v") of ``layer`` (one fused module for all three
        in GPT-2, GPT-NeoX, Phi-3, Falcon, Bloom and GPT-BigCode)."""
        idx = "qkv".index(which)
        return _attr_path(self.blocks[layer], self.arch.qkv[idx if self.arch.qkv_layout == "separate" else 0])

    def qkv_start(self, which: str, head: int) -> int:
        """Where head ``head``'s d_head features of ``which`` start in ``qkv_module``'s output, (B, T, F) flat. For
        k and v under grouped-query attention ``head`` is the KV head (group); for q it is the query head."""
        idx, H, KV, Dh = "qkv".index(which), self.n_heads, self.n_kv_heads, self.d_head
        layout = self.arch.qkv_layout
        if layout == "separate":
            return head * Dh  # (B, T, H', Dh) flat
        if layout == "blocks":
            return ((0, H, H + KV)[idx] + head) * Dh  # (B, T, [H | KV | KV], Dh) flat
        if layout == "per_head":
            return (head * 3 + idx) * Dh  # (B, T, H, 3, Dh) flat
        if layout == "grouped":  # (B, T, KV, G + 2, Dh) flat: each group's G queries, then its k, then its v
            G = H // KV
            if which == "q":
                return ((head // G) * (G + 2) + head % G) * Dh
            return (head * (G + 2) + G + idx - 1) * Dh
        raise UnsupportedArchitectureError(f"{self.arch.name}: unknown qkv_layout {layout!r}; expected separate, "
                                           "blocks, per_head or grouped")

    def qkv_head_weights(self, layer: int, which: str, head: int) -> tuple[Float[Tensor, "d_head d_model"], Tensor | None]:
        """The rows of ``which``'s projection that make head ``head`` (a KV head for k and v): W (Dh, D) and bias (Dh,),
        so that head's ``which`` = x @ W.T + b."""
        start, Dh = self.qkv_start(which, head), self.d_head
        with onloaded(self.qkv_module(layer, which)) as proj:
            weight, bias = proj.weight, proj.bias
        w_out_in = weight.T if self.arch.conv1d else weight  # (F, D)
        return w_out_in[start:start + Dh], None if bias is None else bias[start:start + Dh]

    def mlp(self, layer: int) -> nn.Module:
        """The module whose output is the MLP's output (before any post-norm and residual scale)."""
        return _attr_path(self.blocks[layer], self.arch.mlp)

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        """The norm between the attention output projection and the residual add, if the family has one."""
        return None if self.arch.attn_post_norm is None else _attr_path(self.blocks[layer], self.arch.attn_post_norm)

    @property
    def parallel_residual(self) -> bool:
        """True when attention and MLP both read the block input (GPT-NeoX's default, GPT-J, Phi-2, Cohere, Falcon)."""
        return bool(self.arch.parallel)

    @property
    def shared_norm(self) -> bool:
        """True when attention and the MLP read their input through one and the same norm module (GPT-J, Phi-2)."""
        return bool(self.arch.attn_norm) and self.arch.attn_norm == self.arch.mlp_norm

    def resid_mid(self, layer: int) -> nn.Module | None:
        """The module whose first input is the block input plus what attention wrote (None: parallel residual)."""
        return None if self.parallel_residual else _attr_path(self.blocks[layer], self.arch.resid_mid)

    def attn_written(self, layer: int, attn_out: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """What the attention block adds to the residual stream, given the output projection's output."""
        norm = self.attn_post_norm(layer)
        if norm is not None:
            attn_out = norm(attn_out.to(execution_device(norm))).to(attn_out.device)
        return attn_out * self.resid_scale if self.resid_scale != 1.0 else attn_out

    def attn_norm(self, layer: int) -> nn.Module | None:
        """The norm whose input is the residual stream that ``layer``'s attention reads (None: it reads it raw)."""
        return _attr_path(self.blocks[layer], self.arch.attn_norm) if self.arch.attn_norm else None

    def mlp_norm(self, layer: int) -> nn.Module:
        """The module whose first input is the residual stream that ``layer``'s MLP reads (its pre-norm)."""
        return _attr_path(self.blocks[layer], self.arch.mlp_norm)

    def mlp_written(self, layer: int) -> nn.Module:
        """The module whose output, times ``resid_scale``, is what ``layer``'s MLP adds to the residual stream (the
        MLP, or its post-norm)."""
        path = self.arch.mlp_post_norm or self.arch.mlp
        return _attr_path(self.blocks[layer], path)

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (None for a post-norm OPT, whose blocks end in a norm)."""
        return None if self.arch.final_norm is None else _attr_path(self.model, self.arch.final_norm)

    def final_proj(self) -> nn.Module | None:
        """A projection between the final norm and the LM head (OPT's project_out), if any."""
        return None if self.arch.final_proj is None else _attr_path(self.model, self.arch.final_proj)

    def finalize(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_embed"]:
        """The last block's output -> what the LM head reads: the final norm, then the final projection if any."""
        for module in (self.final_norm(), self.final_proj()):
            if module is not None:
                h = module(h)
        return h

    def head_weights(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        """W_O split per head, so that o_proj(z) = sum_h z_h @ W_O[h] + b_O."""
        with onloaded(self.attn_out(layer)) as proj:  # real weights even when a device map offloaded them
            weight = proj.weight
        w_in_out = weight if self.arch.conv1d else weight.T  # (H*Dh, D)
        return w_in_out.reshape(self.n_heads, self.d_head, -1)  # (H, Dh, D)

    def head_bias(self, layer: int) -> Float[Tensor, "d_model"] | None:
        with onloaded(self.attn_out(layer)) as proj:
            return proj.bias

    def unembed(
        self, hidden: Float[Tensor, "batch d_model"], columns: Int[Tensor, "batch n"] | None = None,
        exact: Int[Tensor, "batch m"] | None = None,
    ) -> Float[Tensor, "batch n"]:
        """Finalized hidden states -> logits, with the family's logit scale (Cohere, Granite) and final soft-cap (Gemma).

        With ``columns`` only those token ids are computed, per row: (batch, n) instead of (batch, vocab),
        in float32. In half precision the full-vocabulary logits come out in the model's dtype, rounded
        to a few parts in a thousand; ``exact`` (batch, m) names the token ids whose logits are then
        recomputed in float32 (the metric's IO and S), so a logit difference is not quantised.
        """
        head = self.model.get_output_embeddings()
        hidden = hidden.to(execution_device(head))  # with a device map the LM head may sit on another device
        if columns is None:
            logits = head(hidden)
            if exact is not None and torch.finfo(logits.dtype).bits < 32:
                logits = logits.float().scatter(1, exact.to(logits.device), self._columns(head, hidden, exact))
        else:
            logits = self._columns(head, hidden, columns)
        return self._finish(logits)

    def _finish(self, logits: Tensor) -> Tensor:
        """The family's logit scale and final soft-cap, applied to raw LM-head logits."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def target_logprobs(
        self, hidden: Float[Tensor, "rows d_model"], targets: Int[Tensor, "rows"], rows: int = 512, vocab: int = 2048,
    ) -> Float[Tensor, "rows"]:
        """log P(target) per row of finalized ``hidden``, in float32, without the (rows, vocab) logits: the
        normalizer is a logsumexp over blocks of ``rows`` x ``vocab`` logits small enough to stay in a CPU's L2
        cache (measured on SmolLM2-135M, 2 cores: 1.5x faster than a log-softmax of the full logits, and
        no slower than the full matmul alone), and the target's logit is one dot product per row.

        Example::

            lp = adapter.target_logprobs(adapter.finalize(h), targets)   # (rows,) == log_softmax(unembed)[targets]
        """
        head = self.model.get_output_embeddings()
        hidden = hidden.to(execution_device(head))
        dt = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=dt, device=hidden.device)
        with onloaded(head):
            w, bias = head.weight, getattr(head, "bias", None)
            for lo in range(0, hidden.shape[0], rows):
                h = hidden[lo:lo + rows]  # (r, D)
                parts = []
                for v in range(0, w.shape[0], vocab):
                    logits = h @ w[v:v + vocab].T  # (r, vocab): one cache-sized block
                    logits = logits if bias is None else logits + bias[v:v + vocab]
                    parts.append(torch.logsumexp(self._finish(logits.to(dt)), -1))
                out[lo:lo + rows] = torch.logsumexp(torch.stack(parts, -1), -1)  # (r,)
        picked = self._finish(self._columns(head, hidden, targets.to(hidden.device)[:, None]))[:, 0]  # (rows,)
        return picked - out

    @staticmethod
    def _columns(head: nn.Module, hidden: Tensor, columns: Tensor) -> Float[Tensor, "batch n"]:
        """Logits of ``columns`` (B, n) only, accumulated in float32 whatever the model's dtype."""
        columns = columns.to(hidden.device)
        dt = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for a float64 model
        with onloaded(head):
            logits = torch.einsum("bd,bnd->bn", hidden.to(dt), head.weight[columns].to(dt))  # (B, n)
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[columns].to(dt)
        return logits

    def describe(self) -> dict[str, object]:
        out = {
            "architecture": self.arch.name, "model_type": self.model.config.model_type,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "d_head": self.d_head,
            "attn_out": f"{self.arch.blocks}[i].{self.arch.attn_out}",
        }
        if self.auto:
            out["adapter"] = "automatic (built from the module tree and accepted by the self-test)"
        return out


@torch.no_grad()
def _not_causal(model: nn.Module, n: int = 6) -> str:
    """Why ``model`` is not causal ("" when it is): changing the last of ``n`` tokens must leave the outputs at
    the earlier positions as they were. Config flags cannot say this (GPT-NeoX's config has is_decoder=False)."""
    try:
        emb = model.get_input_embeddings().weight
        ids = torch.arange(1, n + 1, device=emb.device).remainder(emb.shape[0]).unsqueeze(0)  # (1, T)
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % emb.shape[0]
        a, b = (model(input_ids=x).logits[0, :-1].float() for x in (ids, changed))  # (T-1, V)
    except Exception:  # a forward that needs more than token ids: not this probe's business
        return ""
    d = float((a - b).abs().max())
    if d > 1e-6 * max(1.0, float(a.abs().max())):  # same shapes: a causal model gives the same bits
        return f"changing token {n - 1} changed the outputs at positions 0-{n - 2} by up to {d:.3g}"
    return ""


def get_adapter(model: nn.Module, auto: bool = False) -> Adapter:
    """Bind the matching ``Architecture`` to ``model`` (a HF *ForCausalLM). ``auto``: for a model_type with no entry,
    build one from the module tree (``model.autoadapt``); check it with the self-test before trusting it.

    Example::

        adapter = get_adapter(model)  # model: a HF *ForCausalLM
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is not None and (getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False)):
        raise UnsupportedArchitectureError(
            f"{model_type!r} is an encoder-decoder or cross-attention model; actpatch patches decoder-only causal LMs "
            "(a HF *ForCausalLM with self-attention only). Use a decoder-only model.")
    arch = find_architecture(model_type)
    if arch is not None:
        return Adapter(model, arch)
    why = _not_causal(model)
    if why:
        raise UnsupportedArchitectureError(
            f"{model_type!r} is not a causal model ({why}); actpatch patches decoder-only causal LMs.")
    if auto:
        from .autoadapt import infer_architecture

        arch, missing = infer_architecture(model)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"no adapter for model_type {model_type!r}, and no automatic one could be built: not found: "
                f"{'; '.join(missing)}. Write an Architecture entry in actpatch/model/architectures.py (blocks, "
                "attn_out, mlp, final_norm, qkv, qkv_layout, attn_norm, mlp_norm) like the ones there.")
        return Adapter(model, arch, auto=True)
    raise UnsupportedArchitectureError(
        f"no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
        "Run `actpatch check-model MODEL` to try an automatic adapter, or add an Architecture entry to "
        "actpatch/model/architectures.py (blocks, attn_out, mlp, final_norm, q/k/v)."
    )
