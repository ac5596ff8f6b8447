"""What several commands share: the run options (pairs, donors, output folder, device, dtype, --max-memory),
writing a result into its folder, and the closing summary with its exit status."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..model.models import DTYPES
from ..report.outputs import discard, write_outputs
from ..tasks.ioi import DESIGNS

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def memory_size(text: str) -> int:
    """'2GB', '1.5GiB', '512MiB', '800M' or a number of bytes -> bytes (argparse type of --max-memory)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 1.5GiB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _add_run_options(p: argparse.ArgumentParser, out: str, n_pairs: int, designs: tuple | None = DESIGNS) -> None:
    """The options ``ioi``, ``run`` and ``compare`` share: pairs, donors, output folder, device, dtype, verbosity."""
    p.add_argument("--n-pairs", type=int, default=n_pairs, metavar="N",
                   help=f"generated prompt pairs per design (default: {n_pairs})")
    if designs is None:  # run: the task checks its own designs
        p.add_argument("--donor", nargs=1, default=None, metavar="DESIGN",
                       help="the task's donor design (default: its first): ioi swap|abc|s2io, facts subject|noise, "
                       "greater-than 01, sva number, induction fresh")
    else:
        p.add_argument("--donor", nargs="+", choices=designs, default=["swap", "abc"], metavar="DESIGN",
                       help="donor designs: swap (IO<->S), abc (three fresh names), s2io (S2 replaced by IO); "
                       "default: swap abc")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair generator's own RNG (default: 0)")
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights dtype (default: float32); "
                   "metrics are always computed in float32")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary, only errors")
    p.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                   help="memory for one chunk of pairs and its forward passes, beyond the model (e.g. 2GB, 512MiB); "
                   "pairs are streamed in chunks of that size, so a run's memory does not grow with --n-pairs "
                   "(default: 1GiB on CPU, a quarter of the free GPU memory on CUDA)")


def _run_and_write(run, out: Path, created: bool):
    """``run()``'s result and the plots written with it into ``out``; on any failure, ``out`` is cleaned up."""
    try:
        result = run()
        return result, write_outputs(result, out)
    except BaseException:
        discard(out, created)
        raise


def _finish(result, out: Path, plots: list[str], quiet: bool, tables: str = "results.json, results.csv") -> int:
    """Print the sanity checks and the files written; exit status 1 when a check failed."""
    if not quiet:
        for name, check in result.sanity.items():
            print(f"  sanity {name}: {'pass' if check['passed'] else 'FAIL'}")
        print(f"wrote {out}/report.html, report.md, {tables}, config.json, {', '.join(plots)}")
    if not result.passed:
        failed = [n for n, c in result.sanity.items() if not c["passed"]]
        print(f"actpatch: sanity checks failed: {', '.join(failed)}; see {out}/report.md", file=sys.stderr)
        return 1
    return 0
