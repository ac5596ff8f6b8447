"""``actpatch ioi``: the seed's IOI experiment (and its ``--dry-run`` plan), on one process or sharded over a
torchrun / accelerate launch where rank 0 writes the report."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from tabulate import tabulate

from ..engine.distributed import init_from_env, local_device, world
from ..errors import ConfigError
from ..experiment.config import DIRECTIONS, METHODS, IOIConfig
from ..experiment.experiments import plan_ioi, run_ioi
from ..model.models import BUNDLED, DEFAULT_MODEL
from ..report.outputs import PARTIAL, discard, prepare_out, write_outputs
from .common import _add_run_options, _finish


def add_parser(sub) -> None:
    """Register ``ioi`` and its options."""
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
