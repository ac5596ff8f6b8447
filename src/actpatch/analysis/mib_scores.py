"""Benchmark scores of a faithfulness curve, as the circuit-discovery benchmark MIB defines them.

    MIB_FRACTIONS                        # (0.001, 0.002, 0.005, ..., 0.5, 1): the circuit sizes, as fractions of edges
    mib_sizes(70651)                     # [70, 141, 353, ..., 70651]: int(fraction x edges), as MIB counts them
    cpr_cmd(fractions, faithfulness)     # (CPR, CMD) of one curve

Faithfulness of a circuit C is (m(C) - m(empty)) / (m(model) - m(empty)). MIB (Mueller et al., 2025) evaluates the
top-k edges for k on a log-spaced grid of edge fractions from 0.1% to 100% and integrates with trapezoids over the
fraction itself: CPR (circuit performance ratio) is the area under the curve, higher is better; CMD (circuit-model
difference) is the area between the curve and 1, i.e. of |1 - faithfulness|, lower is better. A method that is
faithful from the first 0.1% scores CPR about 1 and CMD about 0. The points near 100% weigh most, by design.
"""

from __future__ import annotations

from typing import Sequence

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def mib_sizes(n_edges: int) -> list[int]:
    """The circuit size (edges kept, before pruning) at each of ``MIB_FRACTIONS``: int(fraction x n_edges)."""
    return [int(f * n_edges) for f in MIB_FRACTIONS]


def cpr_cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD) of the curve through (fraction, faithfulness) points, by trapezoids between neighbouring points in
    order of fraction. Fewer than two points: (nan, nan)."""
    pts = sorted(zip(map(float, fractions), map(float, faithfulness)))
    if len(pts) < 2:
        return float("nan"), float("nan")
    cpr = cmd = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        cpr += (x1 - x0) * (y0 + y1) / 2
        cmd += (x1 - x0) * (abs(1 - y0) + abs(1 - y1)) / 2
    return cpr, cmd
