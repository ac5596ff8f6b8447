"""Architecture adapters: where a model keeps its blocks, heads and projections.

One short declarative ``Architecture`` per model family says where the block list, the attention
output projection (whose *input* holds the per-head outputs), the MLP and the final norm live,
and how to read n_heads and d_head from the config. Everything else in actpatch is
architecture-agnostic and talks to a bound ``Adapter``::

    adapter = get_adapter(model)            # picks the Architecture from config.model_type
    adapter.attn_out(5)                     # the o_proj / c_proj module of layer 5
    adapter.head_weights(5)                 # W_O split per head, (H, Dh, D)

Unknown architectures raise ``UnsupportedArchitectureError`` listing the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError
from .placement import execution_device, onloaded


def _attr_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path such as ``"transformer.h"``."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _d_head(config) -> int:
    # Gemma 3 has head_dim 256 != d_model / n_heads, so the config's head_dim wins when present.
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its parts (paths are relative to the *CausalLM* model).

    Example::

        Architecture(name="mine", model_types=("mine",), blocks="model.layers", attn_out="self_attn.o_proj",
                     mlp="mlp", final_norm="model.norm", n_heads=lambda c: c.num_attention_heads, d_head=lambda c: c.head_dim)
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str                 # the ModuleList of decoder blocks
    attn_out: str               # attention output projection, relative to a block (its input = heads)
    mlp: str                    # MLP module, relative to a block
    final_norm: str             # norm applied after the last block (before the LM head)
    n_heads: Callable[[object], int]
    d_head: Callable[[object], int]
    conv1d: bool = False        # GPT-2's Conv1D stores W as (in, out) instead of Linear's (out, in)
    # where queries, keys and values are made (for path patching into a receiver head's q, k or v):
    # three Linear paths (q, k, v), or one fused module with layout "qkv_blocks" ([q | k | v], GPT-2)
    # or "per_head" ([q k v] per head, GPT-NeoX)
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_layout: str = "separate"
    # a norm applied to the attention output before it joins the residual stream (Gemma 2/3, OLMo 2)
    attn_post_norm: str | None = None
    # the module whose first input is the residual stream between attention and MLP (h + attention's
    # write); the sanity checks measure what attention really wrote from it. Unused with a parallel residual.
    resid_mid: str = "post_attention_layernorm"
    # the norms that read the residual stream before attention and before the MLP (their *input* is what a
    # circuit's receiver sees), and a norm after the MLP before the residual add (Gemma 2/3, OLMo 2)
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    mlp_post_norm: str | None = None


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="gpt2", model_types=("gpt2",), blocks="transformer.h", attn_out="attn.c_proj",
        mlp="mlp", final_norm="transformer.ln_f", n_heads=lambda c: c.n_head, d_head=lambda c: c.n_embd // c.n_head, conv1d=True,
        qkv=("attn.c_attn",), qkv_layout="qkv_blocks", resid_mid="ln_2", attn_norm="ln_1", mlp_norm="ln_2",
    ),
    Architecture(
        name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "gemma"),
        blocks="model.layers", attn_out="self_attn.o_proj", mlp="mlp", final_norm="model.norm",
        n_heads=lambda c: c.num_attention_heads, d_head=_d_head,
    ),
    Architecture(  # post-norms: the attention output is normalised before the residual add
        name="gemma2", model_types=("gemma2", "gemma3", "gemma3_text"),
        blocks="model.layers", attn_out="self_attn.o_proj", mlp="mlp", final_norm="model.norm",
        n_heads=lambda c: c.num_attention_heads, d_head=_d_head,
        attn_post_norm="post_attention_layernorm", resid_mid="pre_feedforward_layernorm",
        mlp_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm",
    ),
    Architecture(  # no pre-norms; q_norm / k_norm normalise the whole projection, so q and k are read after them
        name="olmo2", model_types=("olmo2",),
        blocks="model.layers", attn_out="self_attn.o_proj", mlp="mlp", final_norm="model.norm",
        n_heads=lambda c: c.num_attention_heads, d_head=_d_head,
        qkv=("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj"),
        attn_post_norm="post_attention_layernorm", resid_mid="mlp",
        attn_norm="", mlp_norm="mlp", mlp_post_norm="post_feedforward_layernorm",  # no pre-norms
    ),
    Architecture(
        name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
        attn_out="attention.dense", mlp="mlp", final_norm="gpt_neox.final_layer_norm",
        n_heads=lambda c: c.num_attention_heads, d_head=lambda c: c.hidden_size // c.num_attention_heads,
        qkv=("attention.query_key_value",), qkv_layout="per_head",
    ),
    Architecture(
        name="gpt_neo", model_types=("gpt_neo",), blocks="transformer.h",
        attn_out="attn.attention.out_proj", mlp="mlp", final_norm="transformer.ln_f",
        n_heads=lambda c: c.num_heads, d_head=lambda c: c.hidden_size // c.num_heads,
        qkv=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"), resid_mid="ln_2",
        attn_norm="ln_1", mlp_norm="ln_2",
    ),
)


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` that has an adapter.

    Example::

        "llama" in supported_model_types()  # True
    """
    return tuple(t for arch in ARCHITECTURES for t in arch.model_types)


class Adapter:
    """An ``Architecture`` bound to one loaded model, with its dimensions read and checked.

    Example::

        adapter = get_adapter(model); adapter.attn_out(5); adapter.head_weights(5).shape  # (H, Dh, D)
    """

    def __init__(self, model: nn.Module, arch: Architecture) -> None:
        self.model = model
        self.arch = arch
        config = model.config
        self.blocks: nn.ModuleList = _attr_path(model, arch.blocks)
        self.n_layers = len(self.blocks)
        self.n_heads = int(arch.n_heads(config))
        self.d_head = int(arch.d_head(config))
        in_features = self._in_features(self.attn_out(0))
        if in_features != self.n_heads * self.d_head:
            raise UnsupportedArchitectureError(
                f"{arch.name} adapter: expected the attention output projection to take n_heads * d_head = "
                f"{self.n_heads} * {self.d_head} = {self.n_heads * self.d_head} features, got {in_features}. "
                "The config does not describe this checkpoint; please report the model id."
            )

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

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads (fewer than query heads under grouped-query attention)."""
        cfg = self.model.config
        return int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)

    def qkv_slot(self, layer: int, which: str, head: int) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
        """The module that computes ``which`` ("q", "k" or "v") of ``layer``, and a function that views
        its output (B, T, F) as that query head's slice (B, T, Dh). Under grouped-query attention a
        query head's k and v are its group's shared KV head."""
        idx = "qkv".index(which)
        H, Dh = self.n_heads, self.d_head
        slot = head if which == "q" else head // (H // self.n_kv_heads)
        if self.arch.qkv_layout == "separate":
            module = _attr_path(self.blocks[layer], self.arch.qkv[idx])
            return module, lambda out: out.view(*out.shape[:2], -1, Dh)[:, :, slot]  # (B, T, H', Dh) -> head
        module = _attr_path(self.blocks[layer], self.arch.qkv[0])
        if self.arch.qkv_layout == "qkv_blocks":
            return module, lambda out: out.view(*out.shape[:2], 3, H, Dh)[:, :, idx, head]  # (B, T, 3, H, Dh)
        return module, lambda out: out.view(*out.shape[:2], H, 3, Dh)[:, :, head, idx]  # (B, T, H, 3, Dh)

    def qkv_module(self, layer: int, which: str) -> nn.Module:
        """The module whose output holds ``which`` ("q", "k" or "v") of ``layer`` (one fused module for all three
        in GPT-2 and GPT-NeoX)."""
        idx = "qkv".index(which)
        return _attr_path(self.blocks[layer], self.arch.qkv[idx if self.arch.qkv_layout == "separate" else 0])

    def qkv_start(self, which: str, head: int) -> int:
        """Where head ``head``'s d_head features of ``which`` start in ``qkv_module``'s output, (B, T, F) flat. For
        k and v under grouped-query attention ``head`` is the KV head (group); for q it is the query head."""
        idx, H, Dh = "qkv".index(which), self.n_heads, self.d_head
        if self.arch.qkv_layout == "separate":
            return head * Dh  # (B, T, H', Dh) flat
        if self.arch.qkv_layout == "qkv_blocks":
            return (idx * H + head) * Dh  # (B, T, 3, H, Dh) flat
        return (head * 3 + idx) * Dh  # per_head: (B, T, H, 3, Dh) flat

    def qkv_head_weights(self, layer: int, which: str, head: int) -> tuple[Float[Tensor, "d_head d_model"], Tensor | None]:
        """The rows of ``which``'s projection that make head ``head`` (a KV head for k and v): W (Dh, D) and bias (Dh,),
        so that head's ``which`` = x @ W.T + b."""
        start, Dh = self.qkv_start(which, head), self.d_head
        with onloaded(self.qkv_module(layer, which)) as proj:
            weight, bias = proj.weight, proj.bias
        w_out_in = weight.T if self.arch.conv1d else weight  # (F, D)
        return w_out_in[start:start + Dh], None if bias is None else bias[start:start + Dh]

    def mlp(self, layer: int) -> nn.Module:
        return _attr_path(self.blocks[layer], self.arch.mlp)

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        """The norm between the attention output projection and the residual add, if the family has one."""
        return None if self.arch.attn_post_norm is None else _attr_path(self.blocks[layer], self.arch.attn_post_norm)

    @property
    def parallel_residual(self) -> bool:
        """True when attention and MLP both read the block input (GPT-NeoX's default, GPT-J)."""
        return bool(getattr(self.model.config, "use_parallel_residual", False))

    def resid_mid(self, layer: int) -> nn.Module | None:
        """The module whose first input is the block input plus what attention wrote (None: parallel residual)."""
        return None if self.parallel_residual else _attr_path(self.blocks[layer], self.arch.resid_mid)

    def attn_written(self, layer: int, attn_out: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """What the attention block adds to the residual stream, given the output projection's output."""
        norm = self.attn_post_norm(layer)
        if norm is None:
            return attn_out
        return norm(attn_out.to(execution_device(norm))).to(attn_out.device)

    def attn_norm(self, layer: int) -> nn.Module | None:
        """The norm whose input is the residual stream that ``layer``'s attention reads (None: it reads it raw)."""
        return _attr_path(self.blocks[layer], self.arch.attn_norm) if self.arch.attn_norm else None

    def mlp_norm(self, layer: int) -> nn.Module:
        """The module whose first input is the residual stream that ``layer``'s MLP reads (its pre-norm)."""
        return _attr_path(self.blocks[layer], self.arch.mlp_norm)

    def mlp_written(self, layer: int) -> nn.Module:
        """The module whose output is what ``layer``'s MLP adds to the residual stream (the MLP, or its post-norm)."""
        path = self.arch.mlp_post_norm or self.arch.mlp
        return _attr_path(self.blocks[layer], path)

    def final_norm(self) -> nn.Module:
        return _attr_path(self.model, self.arch.final_norm)

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
        """Final-normed hidden states -> logits, including Gemma-style final logit soft-capping.

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
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        return {
            "architecture": self.arch.name, "model_type": self.model.config.model_type,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "d_head": self.d_head,
            "attn_out": f"{self.arch.blocks}[i].{self.arch.attn_out}",
        }


def get_adapter(model: nn.Module) -> Adapter:
    """Bind the matching ``Architecture`` to ``model`` (a HF *ForCausalLM).

    Example::

        adapter = get_adapter(model)  # model: a HF *ForCausalLM
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return Adapter(model, arch)
    raise UnsupportedArchitectureError(
        f"no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
        "Add an Architecture entry to actpatch/adapters.py (blocks, attn_out, mlp, n_heads, d_head)."
    )
