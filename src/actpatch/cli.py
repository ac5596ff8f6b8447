"""The ``actpatch`` command line: parse options, build a config, run, write the report folder.

    actpatch ioi --n-pairs 16 --out runs/demo      # the seed's experiment on the bundled model
    actpatch run --pairs-file facts.jsonl --positions subject END --out runs/facts   # your own task
    actpatch compare --models smollm2-135m gemma3-270m   # the same comparison on several models
    actpatch circuit ioi --method eap-ig --out runs/circuit   # the task's circuit and its faithfulness
    actpatch check-model my-org/my-model           # the self-test on your own model: feature x PASS/FAIL table
    actpatch models                                # supported architectures, bundled model status

Exit codes: 0 = done and every sanity check passed; 1 = a sanity check failed (results are still
written, and marked as failed), or a check-model feature failed; 2 = bad input (message from actpatch's error hierarchy);
130 = interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sys
import traceback
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from tabulate import tabulate

from . import __version__
from .engine.distributed import init_from_env, local_device, world
from .engine.metrics import TASK_METRICS
from .errors import ActpatchError, ConfigError
from .experiment.circuit import METHODS as CIRCUIT_METHODS
from .experiment.circuit import SELECTIONS, CircuitConfig, run_circuit
from .experiment.compare import plot_compare, render_compare, run_compare
from .experiment.taskcompare import plot_task_compare, render_task_compare, run_task_compare, task_summary
from .experiment.config import DIRECTIONS, METHODS, IOIConfig
from .experiment.contrast import PairsConfig, run_pairs, site_families
from .experiment.experiments import plan_ioi, run_ioi
from .experiment.selftest import check_model, summary
from .model.adapters import ARCHITECTURES
from .model.models import BUNDLED, DEFAULT_MODEL, DTYPES, bundled_gguf, install_hint
from .report.outputs import PARTIAL, discard, prepare_out, write_outputs
from .report.circuitreport import findings as circuit_findings
from .report.pairsreport import findings
from .tasks.ioi import DESIGNS


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actpatch",
        description="Activation patching for HuggingFace causal LMs: hidden states vs attention heads on IOI.",
    )
    parser.add_argument("--version", action="version", version=f"actpatch {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much actpatch logs to stderr (default: WARNING); INFO names each step")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ioi = sub.add_parser(
        "ioi", help="run the IOI experiment (baseline, layer sweeps, head sweep, sanity checks) and write a report",
        description="Transplant donor activations into IOI recipient prompts: hidden states (block outputs) vs "
        "attention heads (forward pre-hook on the attention output projection), per layer and per head.",
    )
    ioi.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                     help=f"bundled name ({', '.join(BUNDLED)}), HF hub id (gpt2, gpt2-medium, ...), local directory "
                     f"or .gguf file (default: {DEFAULT_MODEL}, offline)")
    _add_run_options(ioi, out="runs/ioi", n_pairs=32)
    ioi.add_argument("--pairs-file", metavar="FILE",
                     help="JSONL of your own pairs: one object per line with recipient, donor, answer (IO name with its "
                     "leading space) and wrong (S name); replaces the generator and --donor")
    ioi.add_argument("--direction", choices=DIRECTIONS, default="noising",
                     help="noising (default, the seed's): the clean prompt is the recipient and the corrupted one the "
                     "donor; denoising: the corrupted prompt is the recipient and the clean one the donor (TransformerLens's "
                     "usual setup); both: every design both ways, recorded as <design> and <design>-denoise")
    ioi.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in --out: patches it already finished (saved in --out/.partial) "
                     "are not run again; use the same options as the interrupted run")
    ioi.add_argument("--device-map", metavar="MAP",
                     help="auto: load a model too large for one device across the GPUs and CPU with accelerate "
                     "(hooks move tensors to each layer's device); replaces --device")
    ioi.add_argument("--offload-folder", metavar="DIR",
                     help="with --device-map: where accelerate may offload weights that fit on no device (disk)")
    ioi.add_argument("--trust-remote-code", action="store_true",
                     help="let transformers run Python code shipped with the checkpoint (off by default; only for "
                     "models whose authors you trust)")
    ioi.add_argument("--layers", type=int, nargs="+", metavar="L", help="sweep only these layers (default: all)")
    ioi.add_argument("--no-head-sweep", action="store_true", help="skip the layer x head single-head sweep")
    ioi.add_argument("--method", choices=METHODS, default="both",
                     help="exact: patch every head; attribution: gradient estimate for every head and position "
                     "(2 forwards + 1 backward), then exact patching of the top-k heads; both (default): the full "
                     "exact sweep plus attribution, compared in the report")
    ioi.add_argument("--top-k", type=int, default=None, metavar="K",
                     help="with --method attribution: heads re-checked by exact patching (default: 20)")
    ioi.add_argument("--by-position", action="store_true",
                     help="also patch hidden states, all heads and single heads at each named IOI position "
                     "(IO, S1, S1+1, S2, END); about 5x the single-head sweep's cost")
    ioi.add_argument("--no-analysis", action="store_true",
                     help="skip the head characterisation, the hidden-vs-heads account and path patching")
    ioi.add_argument("--max-batch", type=int, metavar="ROWS",
                     help="max rows (patch variants x pairs) per forward pass (default: automatic, from the "
                     "CPU cache size or free GPU memory)")
    ioi.add_argument("--dry-run", action="store_true",
                     help="print the plan (pairs, patches, forward passes, estimated cost) and exit without running")

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

    cmp = sub.add_parser(
        "compare", help="run the IOI experiment on several models and compare them on a shared depth axis",
        description="The seed's comparison across models (e.g. gpt2 vs gpt2-medium, or the bundled model vs a local "
        "or GGUF model): each model gets the full ioi run in DIR/model-<i>/; DIR/compare.md, compare.png and "
        "compare.json put them side by side with depth = layer / n_layers.",
    )
    cmp.add_argument("--models", nargs="+", metavar="SPEC", help="two or more model specs (as --model)")
    cmp.add_argument("--tasks", nargs="+", metavar="TASK",
                     help="instead of --models: one model, several tasks (ioi facts greater-than sva induction); each "
                     "runs hidden-state and all-heads patching at its named positions, and DIR/compare.md, compare.csv, "
                     "compare.png and compare.json say per task whether heads only nudge")
    cmp.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC", help="with --tasks: the model (default: %(default)s)")
    _add_run_options(cmp, out="runs/compare", n_pairs=16)
    cmp.add_argument("--head-sweep", action="store_true", help="also run every model's single-head sweep (slower)")

    circ = sub.add_parser(
        "circuit", help="find a task's circuit: edge attribution (EAP, EAP-IG), circuit selection, faithfulness curves",
        description="Score every edge of the model's graph (embeddings, heads, MLPs, logits; each head's q, k and v "
        "inputs apart), choose circuits of about ten sizes, and measure each one's faithfulness by exact edge "
        "patching, next to node-level circuits of the top single heads. Writes edges.csv, circuit.json, "
        "faithfulness.csv, faithfulness.png, circuit.png, report.md and report.html. Donor and recipient must have "
        "the same token length (facts: --donor noise).",
    )
    circ.add_argument("task", nargs="?", default="pairs", metavar="TASK",
                      help="a registered task (ioi, facts, greater-than, sva, induction), or give --pairs-file")
    circ.add_argument("--pairs-file", metavar="FILE", help="JSONL of your pairs (as for run)")
    circ.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC", help=f"model spec as for ioi (default: {DEFAULT_MODEL})")
    circ.add_argument("--method", choices=CIRCUIT_METHODS, default="eap-ig",
                      help="eap: gradient at the recipient (the donor's recording + 1 forward/backward of the recipient); eap-ig "
                      "(default): integrated gradients over --ig-steps runs from the donor's embeddings to the recipient's")
    circ.add_argument("--ig-steps", type=int, default=5, metavar="K", help="EAP-IG interpolation steps (default: 5)")
    circ.add_argument("--metric", choices=TASK_METRICS, default=None, help="as for run (default: the task's)")
    circ.add_argument("--edges", type=int, nargs="+", metavar="N",
                      help="circuit sizes (edges) of the faithfulness curve (default: about ten, log-spaced)")
    circ.add_argument("--select", choices=SELECTIONS, default="top",
                      help="top (default): the N edges of largest |score|, then pruned to paths from input to logits; "
                      "greedy: grown from the logits; exact: ACDC-style pruning, one exact pass per edge (small graphs)")
    circ.add_argument("--target", type=float, default=0.8, help="the faithfulness to reach (default: 0.8)")
    circ.add_argument("--resamples", type=int, default=3, metavar="R",
                      help="stability: circuits from R bootstrap resamples of the pairs, and from two halves of "
                      "the pairs split by template and at random (default: 3; 0 skips all of it)")
    circ.add_argument("--max-batch", type=int, metavar="ROWS", help="pairs per forward pass (default: automatic)")
    _add_run_options(circ, out="runs/circuit", n_pairs=16, designs=None)

    sub.add_parser("models", help="list supported architectures and whether the bundled model is installed")
    chk = sub.add_parser(
        "check-model", help="self-test every patching feature on a model (yours): PASS / FAIL / UNSUPPORTED per feature",
        description="Find the model's adapter (or build one from its module tree) and check every feature on 2 pairs of "
        "random token ids against the independent reference. Exit status: 0 all supported features pass, 1 one "
        "fails, 2 bad input.")
    chk.add_argument("model", help="a hub id, a local checkpoint folder (a tokenizer is not needed), a .gguf file "
                     f"or a bundled name ({', '.join(BUNDLED)})")
    chk.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    chk.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    chk.add_argument("--dtype", default="float32", choices=list(DTYPES))
    chk.add_argument("--trust-remote-code", action="store_true", help="let transformers run the checkpoint's own code")
    chk.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return parser


def cmd_check_model(args: argparse.Namespace, argv: list[str]) -> int:
    report, _ = check_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(report.to_json() if args.json else report.table() + "\n\n" + summary(report))
    return 0 if report.passed else 1


def _top_k(args: argparse.Namespace) -> int:
    if args.top_k is None:
        return IOIConfig.top_k
    if args.method != "attribution":
        raise ConfigError(f"--top-k applies with --method attribution (exact patching of the top-k heads only); "
                          f"got --top-k {args.top_k} with --method {args.method}, which patches every head")
    return args.top_k


def _ioi_config(args: argparse.Namespace, argv: list[str]) -> IOIConfig:
    return IOIConfig(
        model=args.model, n_pairs=args.n_pairs, pairs_file=args.pairs_file, designs=tuple(dict.fromkeys(args.donor)), direction=args.direction,
        seed=args.seed, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        device_map=args.device_map, offload_folder=args.offload_folder,
        layers=tuple(args.layers) if args.layers else None,
        head_sweep=not args.no_head_sweep, analysis=not args.no_analysis, method=args.method, top_k=_top_k(args), by_position=args.by_position,
        max_rows=args.max_batch, max_memory=args.max_memory, progress=False if args.quiet else None,
        command=shlex.join(["actpatch", *argv]),
    )


def _layer_list(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'layers 0-2, 5'; runs of consecutive layers are shortened."""
    runs: list[list[int]] = []
    for L in layers:
        if runs and L == runs[-1][-1] + 1:
            runs[-1].append(L)
        else:
            runs.append([L])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs]
    return f"{'layer' if len(layers) == 1 else 'layers'} {', '.join(parts)}" if layers else "no layers"


def cmd_dry_run(args: argparse.Namespace, argv: list[str]) -> int:
    plan = plan_ioi(_ioi_config(args, argv))
    print(f"{plan['model']}: {plan['n_layers']} layers x {plan['n_heads']} heads; sweeping "
          f"{_layer_list(plan['layers'])}")
    rows = [[d, p["pairs"], p["pair_chunks"], p["tokens"], p["patches"], p["forward_passes"], p["forward_equivalents"],
             "yes" if p["attribution"] else "no", "yes" if p["analysis"] else "no"] for d, p in plan["designs"].items()]
    print(tabulate(rows, ["design", "pairs", "chunks", "tokens", "patches", "batched passes", "≈ full forwards",
                          "attribution", "analysis"], tablefmt="simple"))
    print(f"memory budget {plan['memory_budget'] / 2**20:.0f} MiB beyond the model (--max-memory): pairs are run "
          "in chunks that fit a quarter of it")
    print("nothing was run (--dry-run); ≈ full forwards counts the exact sweep's layer-stack work in recipient "
          "forward passes")
    return 0


def cmd_ioi(args: argparse.Namespace, argv: list[str]) -> int:
    if args.dry_run:
        return cmd_dry_run(args, argv)
    if args.device_map and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--device-map splits one model over this machine's devices, but this is a multi-process "
                          "launch (torchrun): every rank would load its own split. Run one process with "
                          "--device-map, or several without it (one GPU per rank)")
    if init_from_env():  # launched by torchrun / accelerate launch: shard the sweeps, rank 0 writes
        if args.device == "auto" and local_device():
            args.device = local_device()
        rank, size = world()
        try:
            if rank != 0:
                run_ioi(_ioi_config(args, argv))
                return 0
            return _cmd_ioi(args, argv)
        finally:
            dist.barrier()
            dist.destroy_process_group()
    return _cmd_ioi(args, argv)


def _cmd_ioi(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, args.resume)
    cfg = _ioi_config(args, argv)
    try:
        result = run_ioi(cfg, checkpoint_dir=out / PARTIAL, resume=args.resume)
        plots = write_outputs(result, out)
    except KeyboardInterrupt:
        if (out / PARTIAL).is_dir():
            print(f"actpatch: interrupted; the finished patches are saved in {out / PARTIAL}. Rerun the same command "
                  "with --resume to continue.", file=sys.stderr)
        raise
    except BaseException:  # bad input or a failed run: leave no partial output behind
        discard(out, created)
        raise
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    if not args.quiet:
        b = result.baseline
        print(f"{result.model.get('model_id')}: recipients accuracy {b['accuracy']:.2f}, mean LD {b['mean_logit_diff']:.2f} "
              f"({int(b['n_pairs'])} pairs)")
    return _finish(result, out, plots, args.quiet)


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


def cmd_circuit(args: argparse.Namespace, argv: list[str]) -> int:
    if args.task != "pairs" and args.pairs_file is not None:
        raise ConfigError(f"give a task ({args.task!r}) or a pairs file (--pairs-file), not both")
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = CircuitConfig(model=args.model, task=args.task, pairs_file=args.pairs_file, n_pairs=args.n_pairs,
                        design=args.donor[0] if args.donor else None, seed=args.seed, metric=args.metric,
                        method=args.method, ig_steps=args.ig_steps, select=args.select,
                        edges=tuple(args.edges) if args.edges else None, target=args.target, resamples=args.resamples,
                        device=args.device, dtype=args.dtype, max_rows=args.max_batch,
                        progress=False if args.quiet else None, command=shlex.join(["actpatch", *argv]))
    result, plots = _run_and_write(partial(run_circuit, cfg), out, created)
    if not args.quiet:
        for line in circuit_findings(result):
            print(f"  {line}")
    return _finish(result, out, plots, args.quiet, "edges.csv, circuit.json, faithfulness.csv, results.json")


def cmd_compare_tasks(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = PairsConfig(model=args.model, n_pairs=args.n_pairs, seed=args.seed, device=args.device, dtype=args.dtype,
                      max_memory=args.max_memory, progress=False if args.quiet else None,
                      command=shlex.join(["actpatch", *argv]))

    def save(i: int, result) -> None:
        folder = out / f"task-{i + 1}"  # numbered: no path is built from user input
        folder.mkdir(exist_ok=True)
        write_outputs(result, folder)
        if not args.quiet:
            print(f"{args.tasks[i]}: sanity {'passed' if result.passed else 'FAILED'}; wrote {folder}")

    try:
        results = run_task_compare(args.tasks, cfg, on_result=save)
        table = task_summary(results)
        fig = plot_task_compare(results)
        try:
            fig.savefig(out / "compare.png", dpi=120, bbox_inches="tight")
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        table.to_csv(out / "compare.csv", index=False)
        (out / "compare.md").write_text(render_task_compare(results), encoding="utf-8")
        (out / "compare.json").write_text(json.dumps({
            "tasks": [{"folder": f"task-{i + 1}", **row} for i, row in enumerate(table.to_dict("records"))],
            "model": results[0].model, "command": cfg.command}, indent=2, default=str) + "\n", encoding="utf-8")
    except BaseException:
        discard(out, created)
        raise
    if not args.quiet:
        print(table[["task", "heads_only_nudge", "hidden_first_flip", "all_heads_flip_layers"]].to_string(index=False))
        print(f"wrote {out}/compare.md, compare.csv, compare.png, compare.json")
    return 0 if all(r.passed for r in results) else 1


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    if (args.models is None) == (args.tasks is None):
        raise ConfigError("compare needs --models SPEC SPEC ... (IOI on several models) or --tasks TASK ... (several "
                          "tasks on one model), one of the two")
    if args.tasks is not None:
        return cmd_compare_tasks(args, argv)
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = IOIConfig(n_pairs=args.n_pairs, designs=tuple(dict.fromkeys(args.donor)), seed=args.seed, device=args.device,
                    dtype=args.dtype, head_sweep=args.head_sweep, method="exact" if args.head_sweep else "both",
                    max_memory=args.max_memory,
                    progress=False if args.quiet else None, command=shlex.join(["actpatch", *argv]))

    def save(i: int, result) -> None:
        folder = out / f"model-{i + 1}"  # numbered: no path is built from a model spec
        folder.mkdir(exist_ok=True)
        write_outputs(result, folder)
        if not args.quiet:
            print(f"{result.model.get('model_id')}: sanity {'passed' if result.passed else 'FAILED'}; wrote {folder}")

    try:
        results = run_compare(args.models, cfg, on_result=save)
        fig = plot_compare(results)
        try:
            fig.savefig(out / "compare.png", dpi=120, bbox_inches="tight")  # long model names: nothing clipped
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        (out / "compare.md").write_text(render_compare(results), encoding="utf-8")
        (out / "compare.json").write_text(json.dumps({
            "models": [{"folder": f"model-{i + 1}", "model": r.model, "n_layers": r.n_layers, "n_heads": r.n_heads,
                        "passed": r.passed, "baseline": r.baseline} for i, r in enumerate(results)],
            "command": cfg.command}, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        discard(out, created)
        raise
    if not args.quiet:
        print(f"wrote {out}/compare.md, compare.png, compare.json")
    return 0 if all(r.passed for r in results) else 1


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


@contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """--quiet also silences transformers' own loading bars (restored afterwards).

    Its GGUF converter calls tqdm directly, past transformers' switch, so that name is swapped for a
    disabled tqdm for the duration.
    """
    if not quiet:
        yield
        return
    from unittest import mock

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", partial(tqdm, disable=True)):
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """actpatch's own warnings as one ``actpatch: warning:`` line; others as Python prints them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR) and issubclass(category, UserWarning):
        print(f"actpatch: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["run", "ioi"]:  # `actpatch run ioi ...` is `actpatch ioi ...`
        argv = ["ioi", *argv[2:]]
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("actpatch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("actpatch %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(args.log_level)
    try:
        if args.command == "models":
            return cmd_models()
        # transformers' loading bars follow ours: off with --quiet, and off when stderr is not a terminal
        quiet_loading = args.quiet or not sys.stderr.isatty()
        with _quiet_transformers(quiet_loading), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            commands = {"ioi": cmd_ioi, "run": cmd_run, "compare": cmd_compare, "circuit": cmd_circuit,
                        "check-model": cmd_check_model}
            return commands[args.command](args, argv)
    except ActpatchError as exc:
        print(f"actpatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actpatch: interrupted; hooks were removed, the model was left as loaded, and no results were "
              "written", file=sys.stderr)
        return 130
    except Exception:  # a bug, not bad input: exit status 1 stays reserved for failed sanity checks
        traceback.print_exc()
        print("actpatch: internal error (the traceback above); this is a bug in actpatch, please report it with the "
              "command line. Hooks were removed and no results were written.", file=sys.stderr)
        return 3
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
