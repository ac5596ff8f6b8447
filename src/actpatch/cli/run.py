"""``actpatch run``: patch your own pairs (a JSONL file) or a registered task at named positions, with any metric."""

from __future__ import annotations

import argparse
import shlex
from functools import partial
from pathlib import Path

from ..engine.metrics import TASK_METRICS
from ..errors import ConfigError
from ..experiment.contrast import PairsConfig, run_pairs, site_families
from ..model.models import DEFAULT_MODEL
from ..report.outputs import prepare_out
from ..report.pairsreport import findings
from .common import _add_run_options, _finish, _run_and_write


def add_parser(sub) -> None:
    """Register ``run`` and its options."""
    run = sub.add_parser(
        "run", help="patch your own pairs (or a registered task): named positions, pairs of different lengths, any metric",
        description="Hidden states vs attention heads on any contrastive task. With --pairs-file, each JSONL line has "
        "recipient, donor, answer and wrong (a string or a list of one-token strings) and optional positions "
        '{"name": ["substring in recipient", "substring in donor"]}; END is always defined. '
        "`actpatch run ioi ...` is `actpatch ioi ...` (the same options).",
    )
    run.add_argument("task", nargs="?", default="pairs", metavar="TASK",
                     help="a registered task (ioi, facts, greater-than, sva, induction), or leave it out and give "
                     "--pairs-file (default: pairs)")
    run.add_argument("--pairs-file", metavar="FILE", help="JSONL of your pairs (see above)")
    run.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC", help=f"model spec as for ioi (default: {DEFAULT_MODEL})")
    run.add_argument("--positions", nargs="+", metavar="NAME",
                     help="positions to patch at: names from the pairs' positions, END, or all (equal lengths only); "
                     "default: every named position and END")
    run.add_argument("--metric", choices=TASK_METRICS, default=None,
                     help="the task's metric by default (logit_diff for a pairs file): logit_diff (logsumexp over answer sets), prob_diff (P(answer set) - P(wrong set)), "
                     "logprob (log P(answer set)), kl (KL from the unpatched recipient's next-token distribution; needs "
                     "no answers)")
    run.add_argument("--sites", nargs="+", default=None, metavar="FAMILY",
                     help="hidden, all_heads, head, attn, mlp, embed, q, k, v, pattern (a head's attention weights from the "
                     "donor, the recipient's values), values (the reverse), or all (= hidden all_heads head), heads "
                     "(= all_heads head), layers (= hidden all_heads); default: the task's (all for a pairs file; facts "
                     "adds attn and mlp)")
    run.add_argument("--layers", type=int, nargs="+", metavar="L", help="patch only these layers (default: all)")
    run.add_argument("--trust-remote-code", action="store_true", help="as for ioi")
    run.add_argument("--max-batch", type=int, metavar="ROWS", help="max rows per forward pass (default: automatic)")
    run.add_argument("--answer-reduce", choices=("sum", "mean"), default="sum",
                     help="answers of several tokens: their log-prob summed over the tokens (default) or the mean")
    run.add_argument("--kl-over", choices=("end", "continuation"), default="end",
                     help="kl: the next-token distribution at END (default), or averaged over the answer's positions")
    run.add_argument("--generate", type=int, default=0, metavar="N",
                     help="show the greedy N-token continuation of 3 recipients under the 3 headline patches")
    _add_run_options(run, out="runs/pairs", n_pairs=16, designs=None)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.task != "pairs" and args.pairs_file is not None:
        raise ConfigError(f"give a task ({args.task!r}) or a pairs file (--pairs-file), not both")
    if args.task == "pairs" and args.donor:
        raise ConfigError(f"--donor picks a registered task's donor design; a pairs file has its own donors, got {args.donor}")
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = PairsConfig(model=args.model, task=args.task, pairs_file=args.pairs_file, n_pairs=args.n_pairs,
                      design=args.donor[0] if args.donor else None,
                      seed=args.seed, positions=tuple(args.positions) if args.positions else None, metric=args.metric,
                      sites=site_families(args.sites) if args.sites else None, layers=tuple(args.layers) if args.layers else None,
                      device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      max_memory=args.max_memory, max_rows=args.max_batch, progress=False if args.quiet else None,
                      answer_reduce=args.answer_reduce, kl_over=args.kl_over, generate=args.generate,
                      command=shlex.join(["actpatch", *argv]))
    result, plots = _run_and_write(partial(run_pairs, cfg), out, created)
    if not args.quiet:
        rec, don = result.baseline["recipient"], result.baseline["donor"]
        print(f"{result.model.get('model_id')}: {result.baseline['n_pairs']} pairs, {result.metric} recipient "
              f"{rec[f'mean_{result.metric}']:.4g}, donor {don[f'mean_{result.metric}']:.4g}")
        for line in findings(result):
            print(f"  {line}")
        for g in result.generations:
            print(f"  pair {g['pair']} under {g['patch']}: {g['patched_says']!r} (recipient {g['recipient_says']!r}, "
                  f"donor {g['donor_says']!r})")
    return _finish(result, out, plots, args.quiet)
