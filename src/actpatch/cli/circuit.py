"""``actpatch circuit``: a task's circuit by edge attribution (EAP, EAP-IG), its selection at several sizes and
the faithfulness of each, written as a report folder."""

from __future__ import annotations

import argparse
import shlex
from functools import partial
from pathlib import Path

from ..engine.metrics import TASK_METRICS
from ..errors import ConfigError
from ..experiment.circuit_discovery import SELECTIONS, CircuitConfig, run_circuit
from ..experiment.method_comparison import ALIASES, METHODS as CIRCUIT_METHODS
from ..model.models import DEFAULT_MODEL
from ..report.circuit_report import findings as circuit_findings
from ..report.outputs import prepare_out
from .common import _add_run_options, _finish, _run_and_write


def add_parser(sub) -> None:
    """Register ``circuit`` and its options."""
    circ = sub.add_parser(
        "circuit", help="find a task's circuit: edge attribution (EAP, EAP-IG), circuit selection, faithfulness curves",
        description="Score every edge of the model's graph (embeddings, heads, MLPs, logits; each head's q, k and v "
        "inputs apart), choose circuits at MIB's edge fractions (0.1% to 100%), and measure each one's faithfulness by exact edge "
        "patching, next to node-level circuits of the top single heads. Writes edges.csv, circuit.json, "
        "faithfulness.csv, faithfulness.png, circuit.png, report.md and report.html. Donor and recipient must have "
        "the same token length (facts: --donor noise).",
    )
    circ.add_argument("task", nargs="?", default="pairs", metavar="TASK",
                      help="a registered task (ioi, facts, greater-than, sva, induction), or give --pairs-file")
    circ.add_argument("--pairs-file", metavar="FILE", help="JSONL of your pairs (as for run)")
    circ.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC", help=f"model spec as for ioi (default: {DEFAULT_MODEL})")
    circ.add_argument("--method", choices=CIRCUIT_METHODS + tuple(ALIASES), default="eap-ig",
                      help="eap: gradient at the recipient (the donor's recording + 1 forward/backward of the recipient); "
                      "eap-ig-inputs (= eap-ig, the default): integrated gradients over --ig-steps runs whose embeddings "
                      "move from the donor's to the recipient's; eap-ig-activations: every sender's write moves instead")
    circ.add_argument("--compare", action="store_true",
                      help="also score with the other methods and with exact edge patching (of --exact-candidates "
                      "top edges of each), and measure every method's curve: a side-by-side table with CPR and CMD")
    circ.add_argument("--exact-candidates", type=int, default=353, metavar="N",
                      help="--compare: exact single-edge patches of the union of each method's top N edges (default: "
                      "353, 0.5%% of the bundled model's edges; one edge-patched forward per edge)")
    circ.add_argument("--ig-steps", type=int, default=5, metavar="K", help="EAP-IG interpolation steps (default: 5)")
    circ.add_argument("--ig-no-buffer", dest="ig_buffer", action="store_false",
                      help="EAP-IG: score each step as it comes instead of summing the steps' gradients in one "
                      "(receivers x positions x d_model) buffer: less memory, slower (see bench/README.md)")
    circ.add_argument("--metric", choices=TASK_METRICS, default=None, help="as for run (default: the task's)")
    circ.add_argument("--edges", type=int, nargs="+", metavar="N",
                      help="circuit sizes (edges) measured besides MIB's grid (0.1%%, 0.2%%, 0.5%%, ..., 100%% of the edges)")
    circ.add_argument("--select", choices=SELECTIONS, default="top",
                      help="top (default): the N edges of largest |score|, then pruned to paths from input to logits; "
                      "greedy: grown from the logits; exact: ACDC-style pruning, one exact pass per edge (small graphs)")
    circ.add_argument("--target", type=float, default=0.8, help="the faithfulness to reach (default: 0.8)")
    circ.add_argument("--resamples", type=int, default=3, metavar="R",
                      help="stability: circuits from R bootstrap resamples of the pairs, and from two halves of "
                      "the pairs split by template and at random (default: 3; 0 skips all of it)")
    circ.add_argument("--max-batch", type=int, metavar="ROWS", help="pairs per forward pass (default: automatic)")
    _add_run_options(circ, out="runs/circuit", n_pairs=16, designs=None)


def cmd_circuit(args: argparse.Namespace, argv: list[str]) -> int:
    if args.task != "pairs" and args.pairs_file is not None:
        raise ConfigError(f"give a task ({args.task!r}) or a pairs file (--pairs-file), not both")
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = CircuitConfig(model=args.model, task=args.task, pairs_file=args.pairs_file, n_pairs=args.n_pairs,
                        design=args.donor[0] if args.donor else None, seed=args.seed, metric=args.metric,
                        method=args.method, ig_steps=args.ig_steps, ig_buffer=args.ig_buffer, select=args.select, compare=args.compare,
                        exact_candidates=args.exact_candidates,
                        edges=tuple(args.edges) if args.edges else None, target=args.target, resamples=args.resamples,
                        device=args.device, dtype=args.dtype, max_rows=args.max_batch,
                        progress=False if args.quiet else None, command=shlex.join(["actpatch", *argv]))
    result, plots = _run_and_write(partial(run_circuit, cfg), out, created)
    if not args.quiet:
        for line in circuit_findings(result):
            print(f"  {line}")
    return _finish(result, out, plots, args.quiet, "edges.csv, circuit.json, faithfulness.csv, results.json")
