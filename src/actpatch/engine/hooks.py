"""Hook plumbing: PyTorch hooks that exist only inside a ``with`` block.

    with hooks([(module, "output", fn)]):      # fn(activation) -> new activation or None
        model(...)
    assert count_hooks(model) == 0             # removed in ``finally``, even on exceptions

``"output"`` hooks see a module's output (the first element when a block returns a tuple; in
transformers >= 5 decoder blocks return a plain tensor); ``"input"`` hooks are forward *pre*-hooks
and see the module's first positional input (for the attention output projection: the heads).
A hook function returns the replacement tensor, or None to leave the activation untouched.
``"call"`` hooks only observe: ``fn(args, kwargs)`` sees every argument of the module's call;
``"result"`` hooks only observe too: ``fn(output)`` sees the module's whole output (e.g. an
attention module's ``(output, weights)`` tuple).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Sequence

from torch import Tensor, nn

HookFn = Callable[[Tensor], "Tensor | None"]
HookSpec = tuple[nn.Module, Literal["input", "output", "call", "result"], Callable]


def _output_hook(fn: HookFn):
    def hook(module, args, output):
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return hook


def _input_hook(fn: HookFn):
    def hook(module, args, kwargs):
        if not args:  # a block called with hidden_states=... (its first input by name)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        new = fn(args[0])
        return None if new is None else ((new, *args[1:]), kwargs)

    return hook


def _result_hook(fn: Callable[[object], None]):
    def hook(module, args, output):
        fn(output)  # observe the module's whole result (e.g. attention's (output, weights)); never replace it

    return hook


def _call_hook(fn: Callable[[tuple, dict], None]):
    def hook(module, args, kwargs):
        fn(args, kwargs)  # observe only: the call goes ahead unchanged

    return hook


@contextmanager
def hooks(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Register ``specs`` on entry; remove them all in reverse order on exit, whatever happens.

    Example::

        with hooks([(adapter.attn_out(5), "input", lambda z: z * 0)]):
            model(input_ids)
    """
    handles = []
    try:
        for module, where, fn in specs:
            if where == "output":
                handles.append(module.register_forward_hook(_output_hook(fn)))
            elif where == "input":
                handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            elif where == "call":
                handles.append(module.register_forward_pre_hook(_call_hook(fn), with_kwargs=True))
            elif where == "result":
                handles.append(module.register_forward_hook(_result_hook(fn)))
            else:
                raise ValueError(f"hook kind must be 'input', 'output', 'call' or 'result', got {where!r}")
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on ``model`` and all its submodules.

    Example::

        assert count_hooks(lm.model) == 0
    """
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
