"""Where a module's weights are, under a device map: execution devices and on-loading offloaded weights.

A model loaded with ``device_map`` is split by accelerate, which attaches an ``AlignDevicesHook`` to
modules. Modules it *offloads* (to the CPU while GPUs compute, or to disk) hold parameters on the
``meta`` device and receive the real ones only inside their forward call. Calling such a module is
fine; reading its weights directly (W_O per head, W_U rows, norm gains) is not. This module gives
the two answers the rest of actpatch needs:

* ``execution_device(module)``: where the module computes (its hook's execution device, else its
  parameters' device);
* ``onloaded(module)``: a ``with`` block inside which the module's (and its submodules') parameters
  are real tensors on that device. Tensors read inside stay valid after the block.

Without a device map both are trivial: the first parameter's device, and a no-op.

Example::

    with onloaded(lm.adapter.attn_out(5)) as proj:
        w_o = proj.weight.clone()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn


def _hook_device(module: nn.Module) -> torch.device | None:
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is None:
        return None
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's, else its first real parameter's.

    Example::

        hidden = hidden.to(execution_device(lm.model.get_output_embeddings()))
    """
    own = _hook_device(module)
    if own is not None:
        return own
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    for sub in module.modules():  # all parameters offloaded: ask the submodules' hooks
        dev = _hook_device(sub)
        if dev is not None:
            return dev
    return torch.device("cpu")


def _offloaded(module: nn.Module) -> bool:
    # still on meta: an enclosing ``onloaded`` block may have loaded it already
    return has_offloaded_params(module) and any(p.is_meta for p in module.parameters(recurse=False))


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every parameter of ``module`` (and its submodules) is a real tensor.

    Offloaded ones are loaded onto their execution device by accelerate's own hook, and put back on
    ``meta`` when the block ends, even on error. Modules that are not offloaded are left untouched.

    Example::

        with onloaded(lm.model.get_output_embeddings()) as head:
            rows = head.weight[ids].clone()
    """
    with ExitStack() as stack:
        for m in module.modules():
            if _offloaded(m):
                stack.enter_context(align_module_device(m))
        yield module


def parameter_sums(model: nn.Module) -> list[float]:
    """Each parameter's sum in float64, offloaded ones included: a cheap weight checksum.

    Example::

        sums = parameter_sums(lm.model)  # one float per parameter, in named_parameters() order
    """
    sums: dict[str, float] = {}
    with torch.inference_mode():
        for prefix, module in model.named_modules():
            with align_module_device(module) if _offloaded(module) else nullcontext():
                for name, p in module.named_parameters(recurse=False):  # float64 in slices: no full copy
                    sums[f"{prefix}.{name}" if prefix else name] = sum(
                        float(part.double().sum()) for part in p.detach().flatten().split(1 << 24))
    order = [name for name, _ in model.named_parameters()]
    return [sums[n] for n in order]
