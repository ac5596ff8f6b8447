"""Draw the faithfulness curves of saved circuit runs side by side (the README's figure).

    .venv/bin/python docs/circuit_curves.py docs/circuits-ioi.png runs/smol-eap-ig runs/smol-eap runs/gemma-eap-ig ...

Each folder is an ``actpatch circuit --out`` folder; runs of the same model and task share a panel.
"""

from __future__ import annotations

import sys

from actpatch.experiment.circuit_result import CircuitResult
from actpatch.report.circuit_report import plot_curves


def main(out: str, *folders: str) -> None:
    fig = plot_curves([CircuitResult.load(f) for f in folders])
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
