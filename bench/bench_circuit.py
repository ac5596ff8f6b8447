"""Cost of circuit discovery on the bundled model: EAP and EAP-IG against their floor, measured in the same run.

    .venv/bin/python bench/bench_circuit.py --out bench/results-circuit.json     # about 4 minutes on 2 CPU cores

The floor of a gradient method is what it cannot avoid: the donor's recording (one forward that keeps every sender's
output) plus K x (one plain forward and backward of the same pairs, d metric / d input embeddings), K = 1 for EAP.
Each repetition times, back to back, the recording, the plain forward + backward and each method, so every ratio
compares times of the same minute; a row's time is its fastest repetition, and each repetition's own ratio is reported
too (this machine's speed drifts by up to 30% from minute to minute). Ratio = (recording + method) / (recording + K x
forward-backward). Each method keeps one ``workspace`` between its repetitions, as ``actpatch circuit``'s stability
and comparison runs do, so its large scratch blocks are not fresh memory each time (on this VM fresh memory costs
about 0.25 s per GiB in page faults); the "no workspace" row is EAP with fresh blocks in every call. The "no buffer"
row is EAP-IG without its summed-gradient buffer (``accumulate=False``): each step scored as it comes.

Memory, per method, from one further call with a fresh workspace, alone: the growth of the resident size over its
level just before the call (after ``gc`` and ``malloc_trim``), plus the model's parameters and the donor's recording
that the call reads (both already resident): peak = model + cache + growth, next to the issue's bound of 2 x (model
+ cache). The process's own peak above its size before the model was loaded is recorded too; it also counts what the
loader and the libraries keep (about 0.15 GiB here).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import platform

import psutil
import torch
from bench_sweeps import PeakRSS, timed

import actpatch
from actpatch.engine.attribution import _activation_gradients_only
from actpatch.engine.capture import last_logits
from actpatch.engine.eap_scores import EAP_TOKENS, edge_scores
from actpatch.engine.edge_patching import sender_outputs
from actpatch.engine.circuit_graph import build_graph
from actpatch.engine.metrics import logit_diff
from actpatch.tasks.registry import get_task

RSS0 = 0  # the process's resident size before the model was loaded (set in main)
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if platform.system() == "Linux" else None


def setup(lm, n_pairs: int):
    task = get_task("ioi")
    batch = task.tokenize(lm.tokenizer, task.generate(lm.tokenizer, n_pairs, ("swap",), 0)["swap"])
    ids, mask, end = batch.recipient_ids, batch.attention_mask, batch.position("END")

    def metric(logits, sl):
        return logit_diff(logits, batch.answer_ids[sl], batch.wrong_ids[sl])

    def forward_backward():  # the same metric's gradient with respect to the input embeddings, nothing else
        with _activation_gradients_only(lm), torch.enable_grad():
            leaf = lm.model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.detach().requires_grad_())
            try:
                metric(last_logits(lm, ids, mask, end), slice(None)).sum().backward()
            finally:
                leaf.remove()
    return batch, metric, forward_backward


def method_peak(fn) -> tuple[int, int]:
    """(growth, process peak) in bytes of one call of ``fn``: the resident size's rise over its level just before the
    call (after garbage collection and glibc's ``malloc_trim``, so memory freed by earlier rows is not counted as
    in use), and the process's peak above its size before the model was loaded."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    with PeakRSS() as mem:
        fn()
    return mem.peak, mem.peak + mem.base - RSS0


def measure(lm, graph, n_pairs: int, steps: int, repeats: int, tokens: int | None) -> dict:
    batch, metric, forward_backward = setup(lm, n_pairs)
    don = sender_outputs(lm, graph, batch, "donor")[0]
    rows_per_pass = None if tokens is None else max(1, tokens // batch.recipient_ids.shape[1])
    methods = {"EAP": dict(), "EAP, no workspace": dict(workspace=False),
               f"EAP-IG inputs (K={steps})": dict(steps=steps),
               f"EAP-IG activations (K={steps})": dict(steps=steps, interpolate="activations"),
               f"EAP-IG inputs (K={steps}), no buffer": dict(steps=steps, accumulate=False)}
    methods = {name: {**kw, "max_rows": rows_per_pass} for name, kw in methods.items()}
    works = {name: {} for name in methods}  # each method's workspace, kept between its repetitions

    def call(name, fresh=False):
        kw = dict(methods[name])
        use = kw.pop("workspace", True) and not fresh
        return edge_scores(lm, graph, batch, metric, don, workspace=works[name] if use else None, **kw)
    times: dict[str, list[float]] = {name: [] for name in ["record", "forward+backward", *methods]}
    for _ in range(repeats):
        times["record"].append(timed(lambda: sender_outputs(lm, graph, batch, "donor"))[0])
        times["forward+backward"].append(timed(forward_backward)[0])
        for name in methods:
            times[name].append(timed(lambda: call(name))[0])
    works.clear()
    peaks = {name: method_peak(lambda: call(name, fresh=True)) for name in methods}  # one cold call each, alone
    best = {k: min(v) for k, v in times.items()}
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    cache = don.numel() * don.element_size()
    bound = 2 * (params + cache)
    rows = []
    for name, kw in methods.items():
        k = kw.get("steps", 1)
        ratio = (best["record"] + best[name]) / (best["record"] + k * best["forward+backward"])
        runs = [(r + m) / (r + k * f) for r, f, m in zip(times["record"], times["forward+backward"], times[name])]
        growth, process = peaks[name]
        rows.append({"n_pairs": n_pairs, "tokens_per_pass": tokens or EAP_TOKENS, "method": name,
                     "workspace": kw.get("workspace", True), "gradient_buffer": kw.get("accumulate", True) if k > 1 else None,
                     "seconds": best[name], "floor_seconds": best["record"] + k * best["forward+backward"], "ratio": ratio,
                     "ratio_per_repeat": runs, "growth_gib": growth / 2**30,
                     "peak_gib": (params + cache + growth) / 2**30, "process_peak_gib": process / 2**30,
                     "memory_bound_gib": bound / 2**30})
        print(f"{n_pairs:3d} pairs  {name:36s} {best[name]:6.2f} s  floor {rows[-1]['floor_seconds']:6.2f} s  "
              f"ratio {ratio:.2f} (runs {', '.join(f'{x:.2f}' for x in runs)})  peak {rows[-1]['peak_gib']:.2f} GiB "
              f"(process {process / 2**30:.2f}; bound {bound / 2**30:.2f})", flush=True)
    return {"n_pairs": n_pairs, "tokens": int(batch.recipient_ids.shape[1]), "times": times, "best": best,
            "model_gib": params / 2**30, "donor_cache_gib": cache / 2**30, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-per-pass", type=int, help="pairs per gradient pass as tokens (default: the engine's)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    global RSS0
    RSS0 = psutil.Process().memory_info().rss
    lm = actpatch.load_model("smollm2-135m", device="cpu")
    graph = build_graph(lm.adapter)
    runs = [measure(lm, graph, n, args.ig_steps, args.repeats if n <= 16 else min(2, args.repeats), args.tokens_per_pass)
            for n in args.pairs]
    summary = {"n_edges": graph.n_edges, "eap_tokens_per_pass": EAP_TOKENS, "ig_steps": args.ig_steps,
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "actpatch": actpatch.__version__}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"summary": summary, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
