"""What determines an IOI run: ``IOIConfig`` (validated, saved with the result) and the environment record.

    cfg = IOIConfig(n_pairs=16, designs=("abc",), direction="both")
    cfg.validate()                    # ConfigError naming the bad field, what it expected and what it got
    environment()                     # Python, platform, package versions, CUDA, torch threads
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata

import torch

from ..errors import ConfigError
from ..model.models import DEFAULT_MODEL
from ..tasks.ioi import DESIGNS

METHODS = ("exact", "attribution", "both")
DIRECTIONS = ("noising", "denoising", "both")


@dataclass(frozen=True)
class IOIConfig:
    """Everything that determines an ``actpatch ioi`` run; saved next to its results.

    Example::

        cfg = IOIConfig(n_pairs=16, designs=("abc",), by_position=True)
        result = run_ioi(cfg)
    """

    model: str = DEFAULT_MODEL
    n_pairs: int = 32                 # generated pairs (ignored with pairs_file)
    pairs_file: str | None = None     # JSONL of user pairs: recipient, donor, answer, wrong
    designs: tuple[str, ...] = ("swap", "abc")
    direction: str = "noising"        # noising: recipient = clean prompt (the seed's); denoising: recipient =
                                      # corrupted, donor = clean; both: each design both ways
    seed: int = 0                     # seeds the pair generator's own RNG only
    device: str | None = None         # None/"auto": CUDA when available
    dtype: str = "float32"
    trust_remote_code: bool = False   # let transformers run code shipped with the checkpoint (off unless asked)
    device_map: str | None = None     # "auto": spread a large model over GPUs and CPU (accelerate); replaces device
    offload_folder: str | None = None  # with device_map: disk folder for weights that fit on no device
    layers: tuple[int, ...] | None = None   # sweep only these layers (None: all)
    head_sweep: bool = True           # run the layer x head sweep
    method: str = "both"              # exact | attribution | both (attribution = gradient estimate, 2 fwd + 1 bwd)
    top_k: int = 20                   # with method="attribution": heads re-checked by exact patching
    by_position: bool = False         # also patch at each named IOI position (IO, S1, S1+1, S2, END)
    analysis: bool = True             # head classes, the hidden-vs-heads account, path patching
    max_rows: int | None = None       # rows per forward pass (None: automatic)
    max_memory: int | None = None     # bytes for one chunk of pairs and its forward passes (None: 1 GiB on CPU,
                                      # a quarter of free GPU memory on CUDA); pairs are streamed in such chunks
    progress: bool | None = None      # None: progress bars only on a terminal
    command: str | None = None        # the command line, when run from the CLI

    def validate(self) -> None:
        if self.pairs_file is None and (not isinstance(self.n_pairs, int) or self.n_pairs < 1):
            raise ConfigError(f"n_pairs (--n-pairs) must be a positive int, got {self.n_pairs!r}")
        bad = [d for d in self.designs if d not in DESIGNS and not (d == "file" and self.pairs_file)]
        if bad or not self.designs:
            raise ConfigError(f"donor designs (--donor) must be among {', '.join(DESIGNS)}, got {list(self.designs)!r}")
        if self.pairs_file is not None and self.direction != "noising":
            raise ConfigError("--direction applies to generated pairs only; in a pairs file, write the prompt you want "
                              f"patched as the recipient (got direction {self.direction!r} with a pairs file)")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction (--direction) must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method (--method) must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k (--top-k) must be a positive int, got {self.top_k!r}")
        if self.offload_folder is not None and self.device_map is None:
            raise ConfigError("offload_folder (--offload-folder) only applies with a device map (--device-map auto); "
                              f"got offload_folder={self.offload_folder!r} and no device_map")
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory < 1):
            raise ConfigError(f"max_memory (--max-memory) must be a positive number of bytes, got {self.max_memory!r}; "
                              "e.g. --max-memory 2GiB (a chunk always holds at least one pair)")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows (--max-batch) must be >= 1, got {self.max_rows}")


def environment() -> dict[str, object]:
    """Versions and platform, saved with every result."""
    versions = {}
    for dist in ("actpatch", "torch", "transformers", "gguf", "accelerate", "numpy", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
