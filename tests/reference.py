"""A stand-alone reference patcher for the tests: plain PyTorch hooks, one full forward per patch.

It uses nothing of actpatch (no adapter, no sites, no position logic, no patch hook): module paths
are written out per family below, positions are explicit ints per row, and the logit difference is
read from ``model(...).logits`` at each row's last real token.
"""

from __future__ import annotations

import torch

BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h",
          "falcon": "transformer.h", "bloom": "transformer.h", "gpt_bigcode": "transformer.h",
          "opt": "model.decoder.layers"}  # else model.layers
HEADS_IN = {"gpt2": "attn.c_proj", "gpt_neo": "attn.attention.out_proj", "gpt_neox": "attention.dense",
            "phi": "self_attn.dense", "gptj": "attn.out_proj", "falcon": "self_attention.dense",
            "bloom": "self_attention.dense", "gpt_bigcode": "attn.c_proj", "opt": "self_attn.out_proj"}  # else o_proj


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def module_of(model, kind: str, layer: int):
    """The module to hook: ``"hidden"`` = the block (its output), ``"heads"`` = the attention output projection."""
    family = model.config.model_type
    block = _get(model, BLOCKS.get(family, "model.layers"))[layer]
    return block if kind == "hidden" else _get(block, HEADS_IN.get(family, "self_attn.o_proj"))


def _run(model, ids, mask, kind, layer, fn):
    """One forward with ``fn`` applied to the hooked activation (B, T, F); returns full logits."""
    module = module_of(model, kind, layer)
    if kind == "hidden":
        handle = module.register_forward_hook(lambda m, a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:]))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def naive_patch_ld(model, rec_ids, don_ids, mask, answer, wrong, kind, layer, heads, positions, d_head):
    """LD per row after copying the donor's activation into the recipient run.

    kind: "hidden" or "heads"; heads: list of head indices (ignored for hidden); positions: one list of
    ints per row (the positions patched in that row). Donor and recipient rows have equal lengths.
    """
    donor = {}

    def keep(x):
        donor["x"] = x.detach().clone()
        return x

    _run(model, don_ids, mask, kind, layer, keep)

    def write(x):
        x = x.clone()
        for b, row in enumerate(positions):
            for p in row:
                if kind == "hidden":
                    x[b, p] = donor["x"][b, p]
                else:
                    for h in heads:
                        x[b, p, h * d_head:(h + 1) * d_head] = donor["x"][b, p, h * d_head:(h + 1) * d_head]
        return x

    logits = _run(model, rec_ids, mask, kind, layer, write)
    end = mask.sum(dim=1) - 1
    return torch.stack([logits[b, end[b], answer[b]] - logits[b, end[b], wrong[b]] for b in range(len(end))])


def naive_patch_end_logits(model, rec_ids, don_ids, kind, layer, heads, writes, d_head):
    """END logits (V,) of one recipient (a list of ids, no padding, a batch of one) after copying the donor's
    activation (its own list of ids, any length) from donor position q to recipient position p, for every
    ``(p, q)`` in ``writes``. kind: "hidden" or "heads" (the listed heads' slices only)."""
    donor = {}

    def keep(x):
        donor["x"] = x.detach().clone()
        return x

    _run(model, torch.tensor([don_ids]), torch.ones(1, len(don_ids), dtype=torch.long), kind, layer, keep)

    def write(x):
        x = x.clone()
        for p, q in writes:
            if kind == "hidden":
                x[0, p] = donor["x"][0, q]
            else:
                for h in heads:
                    x[0, p, h * d_head:(h + 1) * d_head] = donor["x"][0, q, h * d_head:(h + 1) * d_head]
        return x

    logits = _run(model, torch.tensor([rec_ids]), torch.ones(1, len(rec_ids), dtype=torch.long), kind, layer, write)
    return logits[0, -1]


def naive_patch_module(model, rec_ids, don_ids, module, pre: bool, cols, writes):
    """END logits (V,) of one recipient after copying the donor's ``module`` activation (its input when ``pre``, else
    its output), features ``cols`` (a slice), from donor position q to recipient position p for each (p, q)."""
    return naive_patch_cont_logits(model, rec_ids, don_ids, module, pre, cols, writes, [0])[-1]  # no continuation: END


def naive_patch_cont_logits(model, rec_ids, don_ids, module, pre: bool, cols, writes, cont):
    """Full logits (T + len(cont) - 1, V) of one recipient followed by ``cont`` minus its last token (a batch of one,
    no padding), after copying the donor's ``module`` activation (features ``cols``) from donor position q to
    recipient position p for each (p, q) in ``writes``, all of them prompt positions."""
    donor = {}

    def hook(fn):
        if pre:
            return module.register_forward_pre_hook(lambda m, a, kw: ((fn(a[0]), *a[1:]), kw) if a else
                                                    (a, {**kw, "hidden_states": fn(kw["hidden_states"])}), with_kwargs=True)
        return module.register_forward_hook(lambda m, a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out))

    def keep(x):
        donor["x"] = x.detach().clone()
        return x

    def write(x):
        x = x.clone()
        for p, q in writes:
            x[0, p, cols] = donor["x"][0, q, cols]
        return x

    out = {}
    for ids, fn, name in ((don_ids, keep, "donor"), (list(rec_ids) + list(cont[:-1]), write, "recipient")):
        handle = hook(fn)
        try:
            with torch.no_grad():
                out[name] = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            handle.remove()
    return out["recipient"]
