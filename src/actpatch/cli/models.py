"""``actpatch models``: the supported architectures and whether each bundled model is installed."""

from __future__ import annotations

import importlib.util

from ..errors import ActpatchError
from ..model.adapters import ARCHITECTURES
from ..model.models import BUNDLED, bundled_gguf, install_hint


def add_parser(sub) -> None:
    """Register ``models`` (it takes no options)."""
    sub.add_parser("models", help="list supported architectures and whether the bundled model is installed")


def cmd_models() -> int:
    for arch in ARCHITECTURES:
        print(f"{arch.name:12s} model_type {', '.join(arch.model_types):30s} heads at {arch.blocks}[i].{arch.attn_out}")
    for name, entry in BUNDLED.items():
        if "assemble" in entry:  # do not write 250 MB just to list models
            installed = importlib.util.find_spec(entry["package"]) is not None
            where = "installed (assembled on first use)" if installed else f"not installed ({install_hint(name)})"
        else:
            try:
                where = f"installed: {bundled_gguf(name)}"
            except ActpatchError:
                where = f"not installed ({install_hint(name)})"
        print(f"bundled {name}: {entry['hf_id']}, {where}")
    return 0
