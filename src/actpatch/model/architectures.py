"""The architecture table: one short declarative ``Architecture`` entry per model family.

Each entry says where a family keeps its blocks, the attention output projection (whose *input* is the heads),
q/k/v, the MLP and the norms, how to read n_heads, d_head and the key/value heads from the config, and what the
family does that a plain pre-norm transformer does not (a parallel residual, a fused q/k/v layout, a logit scale,
a residual multiplier, a projection after the final norm). A field given as a function of the config is read
when a model is bound (``Adapter``): Falcon's layout, for example, depends on ``new_decoder_architecture``.

To add a family, add one entry here and one tiny config to ``tests/families.py``; the parametrised reference
test and ``actpatch check-model`` then cover it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable, Union

Cfg = object
Pick = Union[str, None, Callable[[Cfg], "str | None"]]  # a path, or a function of the config that gives one


def d_head_of(config) -> int:
    """``head_dim`` when the config has one (Gemma 3: 256 != d_model / n_heads), else d_model / n_heads."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its parts (paths are relative to the *CausalLM* model, or to a block).

    Example::

        Architecture(name="mine", model_types=("mine",), blocks="model.layers", attn_out="self_attn.o_proj",
                     mlp="mlp", final_norm="model.norm")
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str                         # the ModuleList of decoder blocks
    attn_out: str                       # attention output projection, relative to a block (its input = heads)
    mlp: Pick                           # the module whose output is the MLP's write (relative to a block)
    final_norm: Pick                    # norm applied after the last block (None: none, OPT with post-norms)
    n_heads: Callable[[Cfg], int] = lambda c: c.num_attention_heads
    d_head: Callable[[Cfg], int] = d_head_of
    n_kv_heads: Callable[[Cfg], int] = _kv_heads
    conv1d: bool = False                # GPT-2's Conv1D stores W as (in, out) instead of Linear's (out, in)
    # where queries, keys and values are made: three paths (q, k, v), or one fused module whose output is laid out as
    #   "blocks"   [all q | all k | all v], sizes H, KV, KV heads (GPT-2, Phi-3, GPT-BigCode and Falcon multi-query)
    #   "per_head" [q k v] per head, (H, 3, Dh) (GPT-NeoX, Bloom, Falcon-RW)
    #   "grouped"  per KV group [its G queries, k, v], (KV, G + 2, Dh) (Falcon's new decoder architecture)
    qkv: tuple[str, ...] | Callable[[Cfg], tuple[str, ...]] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_layout: Pick = "separate"
    attn_post_norm: Pick = None         # a norm on attention's output before the residual add (Gemma 2/3, OLMo 2)
    # the module whose first input is the residual stream between attention and MLP (h + attention's write)
    resid_mid: Pick = "post_attention_layernorm"
    attn_norm: Pick = "input_layernorm"  # the norm whose input is the stream attention reads ("" : none)
    mlp_norm: Pick = "post_attention_layernorm"  # the module whose first input is the stream the MLP reads
    mlp_post_norm: Pick = None          # a norm after the MLP, before the residual add (Gemma 2/3, OLMo 2)
    # attention and MLP both read the block input and add to it together (GPT-J, Phi-2, Cohere, Falcon)
    parallel: bool | Callable[[Cfg], bool] = lambda c: bool(getattr(c, "use_parallel_residual", False))
    final_proj: Pick = None             # a projection after the final norm, before the LM head (OPT's project_out)
    logit_scale: Callable[[Cfg], float] | None = None   # logits = lm_head(h) * scale (Cohere; Granite: 1 / scaling)
    resid_scale: Callable[[Cfg], float] | None = None   # each block adds scale * (attention, MLP) (Granite)
    # norms after the residual add (OPT-350m, Bloom's apply_residual_connection_post_layernorm): the residual stream
    # is not a sum of writes, so the analyses that add writes up (DLA, the gap, circuits) refuse the model
    post_ln: bool | Callable[[Cfg], bool] = False
    # block call arguments laid out (rows * heads, ...) on their first axis (Bloom's ALiBi): prefix reuse repeats them
    head_batched_args: tuple[str, ...] = ()
    # q and k pass a norm over all heads together after their projection (OLMo 2, OLMoE): q and k are read after it
    qk_norm_spans_heads: bool = False
    # the MLP runs on the block's positions flattened to (B*T, D) rows (OPT): the mlp site and circuits refuse it
    flat_mlp: bool = False
    notes: str = field(default="", compare=False)

    def bind(self, config) -> "Architecture":
        """This entry with every field that is a function of the config evaluated on ``config``."""
        keep = {"n_heads", "d_head", "n_kv_heads", "logit_scale", "resid_scale"}
        return replace(self, **{f.name: getattr(self, f.name)(config) for f in fields(self)
                                if f.name not in keep and callable(getattr(self, f.name))})


_QKV_NEO = ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj")
_QKV_ATTN = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
_LLAMA = dict(blocks="model.layers", attn_out="self_attn.o_proj", mlp="mlp", final_norm="model.norm")


def _falcon_layout(c) -> str:
    if c.new_decoder_architecture:
        return "grouped"
    return "blocks" if c.multi_query else "per_head"


def _falcon_kv(c) -> int:
    return int(c.num_kv_heads) if (c.new_decoder_architecture or not c.multi_query) else 1


def _falcon_two_norms(c) -> bool:  # Falcon's new architecture has ln_attn and ln_mlp unless told to share one
    return bool(c.new_decoder_architecture and (c.num_ln_in_parallel_attn or 2) == 2)


def _falcon_parallel(c) -> bool:
    return bool(c.new_decoder_architecture or c.parallel_attn)


def _falcon_mlp_norm(c) -> str:
    if _falcon_two_norms(c):
        return "ln_mlp"
    return "input_layernorm" if _falcon_parallel(c) else "post_attention_layernorm"


def _opt_pre(c) -> bool:
    return bool(c.do_layer_norm_before)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="gpt2", model_types=("gpt2",), blocks="transformer.h", attn_out="attn.c_proj", mlp="mlp",
        final_norm="transformer.ln_f", n_heads=lambda c: c.n_head, d_head=lambda c: c.n_embd // c.n_head,
        n_kv_heads=lambda c: c.n_head, conv1d=True, qkv=("attn.c_attn",), qkv_layout="blocks", resid_mid="ln_2",
        attn_norm="ln_1", mlp_norm="ln_2",
    ),
    Architecture(name="llama", model_types=("llama", "olmo", "gemma"), **_LLAMA),
    Architecture(name="mistral", model_types=("mistral", "ministral"), **_LLAMA, notes="sliding window"),
    Architecture(name="qwen2", model_types=("qwen2",), **_LLAMA, notes="q/k/v biases"),
    Architecture(name="qwen3", model_types=("qwen3",), **_LLAMA, notes="per-head q/k norms after q_proj/k_proj"),
    Architecture(name="smollm3", model_types=("smollm3",), **_LLAMA, notes="layers without rotary"),
    Architecture(name="starcoder2", model_types=("starcoder2",), **_LLAMA),
    Architecture(name="granite", model_types=("granite",), **_LLAMA, logit_scale=lambda c: 1.0 / c.logits_scaling,
                 resid_scale=lambda c: float(c.residual_multiplier), notes="embedding/attention multipliers"),
    Architecture(name="qwen2_moe", model_types=("qwen2_moe",), **_LLAMA, notes="mlp = the sparse block's output"),
    Architecture(name="qwen3_moe", model_types=("qwen3_moe",), **_LLAMA, notes="mlp = the sparse block's output"),
    Architecture(name="mixtral", model_types=("mixtral",), **_LLAMA, notes="mlp = the sparse block's output"),
    Architecture(  # q_norm / k_norm span all heads, like OLMo 2, but with pre-norms
        name="olmoe", model_types=("olmoe",), **_LLAMA, qkv=("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj"),
        qk_norm_spans_heads=True, notes="mlp = the sparse block's output",
    ),
    Architecture(name="stablelm", model_types=("stablelm",), **_LLAMA,
                 mlp_norm=lambda c: "input_layernorm" if c.use_parallel_residual else "post_attention_layernorm"),
    Architecture(  # parallel block, one shared norm, logits multiplied by logit_scale
        name="cohere", model_types=("cohere",), **_LLAMA, parallel=True, mlp_norm="input_layernorm",
        logit_scale=lambda c: float(c.logit_scale),
    ),
    Architecture(  # Phi-2: parallel attention and MLP from one norm, partial rotary
        name="phi", model_types=("phi",), blocks="model.layers", attn_out="self_attn.dense", mlp="mlp",
        final_norm="model.final_layernorm", parallel=True, mlp_norm="input_layernorm",
    ),
    Architecture(  # fused qkv_proj [q | k | v] with GQA sizes; fused gate_up inside the MLP
        name="phi3", model_types=("phi3",), **_LLAMA, qkv=("self_attn.qkv_proj",), qkv_layout="blocks",
    ),
    Architecture(  # post-norms: the attention output is normalised before the residual add
        name="gemma2", model_types=("gemma2", "gemma3", "gemma3_text"), **_LLAMA,
        attn_post_norm="post_attention_layernorm", resid_mid="pre_feedforward_layernorm",
        mlp_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm",
    ),
    Architecture(  # no pre-norms; q_norm / k_norm normalise the whole projection, so q and k are read after them
        name="olmo2", model_types=("olmo2",), **_LLAMA, qkv=("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj"),
        attn_post_norm="post_attention_layernorm", resid_mid="mlp", attn_norm="", mlp_norm="mlp",
        mlp_post_norm="post_feedforward_layernorm", qk_norm_spans_heads=True,
    ),
    Architecture(
        name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers", attn_out="attention.dense", mlp="mlp",
        final_norm="gpt_neox.final_layer_norm", d_head=lambda c: c.hidden_size // c.num_attention_heads,
        n_kv_heads=lambda c: c.num_attention_heads, qkv=("attention.query_key_value",), qkv_layout="per_head",
    ),
    Architecture(
        name="gpt_neo", model_types=("gpt_neo",), blocks="transformer.h", attn_out="attn.attention.out_proj", mlp="mlp",
        final_norm="transformer.ln_f", n_heads=lambda c: c.num_heads, d_head=lambda c: c.hidden_size // c.num_heads,
        n_kv_heads=lambda c: c.num_heads, qkv=_QKV_NEO, resid_mid="ln_2", attn_norm="ln_1", mlp_norm="ln_2",
    ),
    Architecture(  # parallel residual from one norm (ln_1)
        name="gptj", model_types=("gptj",), blocks="transformer.h", attn_out="attn.out_proj", mlp="mlp",
        final_norm="transformer.ln_f", n_heads=lambda c: c.n_head, d_head=lambda c: c.n_embd // c.n_head,
        n_kv_heads=lambda c: c.n_head, qkv=_QKV_ATTN, parallel=True, attn_norm="ln_1", mlp_norm="ln_1",
    ),
    Architecture(  # fused query_key_value in three layouts; multi-query / GQA; parallel attention
        name="falcon", model_types=("falcon",), blocks="transformer.h", attn_out="self_attention.dense", mlp="mlp",
        final_norm="transformer.ln_f", d_head=lambda c: c.hidden_size // c.num_attention_heads, n_kv_heads=_falcon_kv,
        qkv=("self_attention.query_key_value",), qkv_layout=_falcon_layout, parallel=_falcon_parallel,
        attn_norm=lambda c: "ln_attn" if _falcon_two_norms(c) else "input_layernorm", mlp_norm=_falcon_mlp_norm,
    ),
    Architecture(  # learned positions (offset 2) and project_in are in front of block 0; MLP = fc1/fc2 in the block
        name="opt", model_types=("opt",), blocks="model.decoder.layers", attn_out="self_attn.out_proj", mlp="fc2",
        final_norm=lambda c: "model.decoder.final_layer_norm" if _opt_pre(c) else None,
        n_kv_heads=lambda c: c.num_attention_heads, d_head=lambda c: c.hidden_size // c.num_attention_heads,
        resid_mid=lambda c: "final_layer_norm" if _opt_pre(c) else "self_attn_layer_norm",
        attn_norm=lambda c: "self_attn_layer_norm" if _opt_pre(c) else "", mlp_norm="final_layer_norm",
        final_proj=lambda c: "model.decoder.project_out" if c.word_embed_proj_dim != c.hidden_size else None,
        post_ln=lambda c: not _opt_pre(c), flat_mlp=True,
    ),
    Architecture(  # ALiBi (rows * heads on the first axis), fused per-head qkv, embedding layernorm before block 0
        name="bloom", model_types=("bloom",), blocks="transformer.h", attn_out="self_attention.dense",
        mlp="mlp.dense_4h_to_h", final_norm="transformer.ln_f", n_heads=lambda c: c.n_head,
        d_head=lambda c: c.hidden_size // c.n_head, n_kv_heads=lambda c: c.n_head,
        qkv=("self_attention.query_key_value",), qkv_layout="per_head", head_batched_args=("alibi",),
        post_ln=lambda c: bool(c.apply_residual_connection_post_layernorm),
    ),
    Architecture(  # multi-query: c_attn is [q | k | v] with one KV head (per head [q k v] without multi_query)
        name="gpt_bigcode", model_types=("gpt_bigcode",), blocks="transformer.h", attn_out="attn.c_proj", mlp="mlp",
        final_norm="transformer.ln_f", n_heads=lambda c: c.n_head, d_head=lambda c: c.n_embd // c.n_head,
        n_kv_heads=lambda c: 1 if c.multi_query else c.n_head, qkv=("attn.c_attn",),
        qkv_layout=lambda c: "blocks" if c.multi_query else "per_head", resid_mid="ln_2", attn_norm="ln_1", mlp_norm="ln_2",
    ),
)


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` that has an adapter.

    Example::

        "llama" in supported_model_types()  # True
    """
    return tuple(t for arch in ARCHITECTURES for t in arch.model_types)


def find_architecture(model_type: str | None) -> Architecture | None:
    """The entry serving ``model_type``, or None."""
    return next((arch for arch in ARCHITECTURES if model_type in arch.model_types), None)
