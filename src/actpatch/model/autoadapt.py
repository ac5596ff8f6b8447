"""An automatic ``Architecture`` for a model_type with no entry, read off the module tree.

    arch, missing = infer_architecture(model)    # (Architecture, []) or (None, ["no attention output projection"])

It looks for what every decoder-only transformer in transformers names in one of a few ways: a ModuleList of
``num_hidden_layers`` blocks; in a block an attention module with an output projection (o_proj, out_proj, dense or
c_proj) and q/k/v projections (q_proj/k_proj/v_proj, or one fused qkv_proj, query_key_value, c_attn or Wqkv); an
MLP (mlp, feed_forward, ffn); the norms before attention and the MLP; a final norm after the blocks. A fused q/k/v
is assumed to be [q | k | v]. Nothing here is trusted on its own: ``actpatch check-model`` accepts the result only
when the self-test passes on the model (the q/k/v isolation check catches a wrong fused layout).
"""

from __future__ import annotations

from torch import nn

from .architectures import Architecture, d_head_of

OUT_PROJ = ("o_proj", "out_proj", "dense", "c_proj")
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")
MLPS = ("mlp", "feed_forward", "ffn")
ATTN_NORMS = ("input_layernorm", "ln_1", "ln_attn", "attention_norm", "norm1")
MLP_NORMS = ("post_attention_layernorm", "ln_2", "ln_mlp", "ffn_norm", "norm2", "pre_feedforward_layernorm")
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def _blocks(model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList] | None:
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    fitting = [(n, m) for n, m in lists if n_layers is None or len(m) == n_layers]
    return max(fitting, key=lambda nm: len(nm[1]), default=None)


def _attention(block: nn.Module) -> tuple[str, str, tuple[str, ...]] | None:
    """(attention path, its output projection's name, its q/k/v paths) inside ``block``."""
    for name, module in block.named_modules():
        children = dict(module.named_children())
        proj = next((p for p in OUT_PROJ if isinstance(children.get(p), nn.Module) and hasattr(children[p], "weight")), None)
        if proj is None or ("attn" not in name.lower() and "attention" not in name.lower()):
            continue
        if all(k in children for k in ("q_proj", "k_proj", "v_proj")):
            return name, proj, tuple(f"{name}.{k}" for k in ("q_proj", "k_proj", "v_proj"))
        fused = next((f for f in FUSED_QKV if f in children), None)
        if fused:
            return name, proj, (f"{name}.{fused}",)
    return None


def infer_architecture(model: nn.Module) -> tuple[Architecture | None, list[str]]:
    """An ``Architecture`` for ``model`` found from its module names, and what was not found ([] when all was)."""
    config, missing = model.config, []
    n_layers = getattr(config, "num_hidden_layers", None)
    found = _blocks(model, n_layers)
    if found is None:
        return None, [f"a ModuleList of {n_layers or 'the'} decoder blocks"]
    blocks_path, blocks = found
    block = blocks[0]
    attn = _attention(block)
    if attn is None:
        missing.append(f"an attention module with an output projection named one of {', '.join(OUT_PROJ)} and q/k/v "
                       f"projections (q_proj, k_proj, v_proj, or a fused {', '.join(FUSED_QKV)})")
    children = dict(block.named_children())
    mlp = next((m for m in MLPS if m in children), None)
    if mlp is None:
        missing.append(f"an MLP named one of {', '.join(MLPS)}")
    attn_norm = next((n for n in ATTN_NORMS if n in children), None)
    mlp_norm = next((n for n in MLP_NORMS if n in children), None)
    if attn_norm is None:
        missing.append(f"a norm before attention named one of {', '.join(ATTN_NORMS)}")
    base = blocks_path.rpartition(".")[0]
    root = model.get_submodule(base) if base else model
    final = next((n for n in FINAL_NORMS if isinstance(getattr(root, n, None), nn.Module)), None)
    if final is None:
        missing.append(f"a final norm next to the blocks named one of {', '.join(FINAL_NORMS)}")
    if not all(hasattr(config, k) for k in ("num_attention_heads", "hidden_size")):
        missing.append("num_attention_heads and hidden_size in the config")
    if missing:
        return None, missing
    name, proj, qkv = attn
    parallel = mlp_norm is None or bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))
    arch = Architecture(
        name=f"auto:{config.model_type}", model_types=(config.model_type,), blocks=blocks_path,
        attn_out=f"{name}.{proj}", mlp=mlp, final_norm=f"{base}.{final}" if base else final, d_head=d_head_of,
        qkv=qkv, qkv_layout="separate" if len(qkv) == 3 else "blocks", attn_norm=attn_norm,
        mlp_norm=mlp_norm or attn_norm, resid_mid=mlp_norm or attn_norm, parallel=parallel,
        conv1d=type(getattr(block.get_submodule(name), proj)).__name__ == "Conv1D",
        notes="automatic: built from the module tree",
    )
    return arch, []


def entry_source(arch: Architecture) -> str:
    """The ``Architecture(...)`` entry to paste into ``model/architectures.py`` for ``arch``."""
    fields = ("name", "model_types", "blocks", "attn_out", "mlp", "final_norm", "qkv", "qkv_layout", "attn_norm",
              "mlp_norm", "resid_mid", "parallel")
    body = ", ".join(f"{f}={getattr(arch, f)!r}" for f in fields)
    return f"Architecture({body})"
