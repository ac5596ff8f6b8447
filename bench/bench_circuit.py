"""Cost of circuit discovery on the bundled model: EAP and EAP-IG against their floor, measured in the same run.

    .venv/bin/python bench/bench_circuit.py --out bench/results-circuit.json     # about 4 minutes on 2 CPU cores

The floor of a gradient method is what it cannot avoid: the donor's recording (one forward that keeps every sender's
output) plus K x (one plain forward and backward of the same pairs, d metric / d input embeddings), K = 1 for EAP.
Each repetition times, back to back, the recording, the plain forward + backward, EAP, EAP-IG on the inputs and
EAP-IG on the activations (K steps), so every ratio compares times of the same minute; a row's time is its fastest
repetition, and each repetition's own ratio is reported too (this machine's speed drifts by up to 30% from minute
to minute). Ratio = (recording + method) / (recording + K x forward-backward).

Memory: the process's peak resident size during each method, above its size before the model was loaded, next to
the issue's bound of 2 x (the model's parameters + one activation cache: the donor's recording for these pairs), at
16 and 64 pairs.
"""

from __future__ import annotations

import argparse
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


def measure(lm, graph, n_pairs: int, steps: int, repeats: int, rss0: int, tokens: int | None) -> dict:
    batch, metric, forward_backward = setup(lm, n_pairs)
    don = sender_outputs(lm, graph, batch, "donor")[0]
    rows_per_pass = None if tokens is None else max(1, tokens // batch.recipient_ids.shape[1])
    methods = {"EAP": dict(), f"EAP-IG inputs (K={steps})": dict(steps=steps),
               f"EAP-IG activations (K={steps})": dict(steps=steps, interpolate="activations")}
    methods = {name: {**kw, "max_rows": rows_per_pass} for name, kw in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in ["record", "forward+backward", *methods]}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        times["record"].append(timed(lambda: sender_outputs(lm, graph, batch, "donor"))[0])
        times["forward+backward"].append(timed(forward_backward)[0])
        for name, kw in methods.items():
            with PeakRSS() as whole:
                whole.base = rss0  # the process's peak above its level before the model was loaded
                secs = timed(lambda: edge_scores(lm, graph, batch, metric, don, **kw))[0]
            times[name].append(secs)
            peaks[name] = max(peaks.get(name, 0), whole.peak)
    best = {k: min(v) for k, v in times.items()}
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    cache = don.numel() * don.element_size()
    rows = []
    for name, kw in methods.items():
        k = kw.get("steps", 1)
        ratio = (best["record"] + best[name]) / (best["record"] + k * best["forward+backward"])
        runs = [(r + m) / (r + k * f) for r, f, m in zip(times["record"], times["forward+backward"], times[name])]
        rows.append({"n_pairs": n_pairs, "tokens_per_pass": tokens or EAP_TOKENS, "method": name, "seconds": best[name], "floor_seconds":
                     best["record"] + k * best["forward+backward"], "ratio": ratio, "ratio_per_repeat": runs,
                     "process_peak_gib": peaks[name] / 2**30, "memory_bound_gib": 2 * (params + cache) / 2**30})
        print(f"{n_pairs:3d} pairs  {name:28s} {best[name]:6.2f} s  floor {rows[-1]['floor_seconds']:6.2f} s  "
              f"ratio {ratio:.2f} (runs {', '.join(f'{x:.2f}' for x in runs)})  peak {peaks[name] / 2**30:.2f} GiB "
              f"(bound {rows[-1]['memory_bound_gib']:.2f})", flush=True)
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
    rss0 = psutil.Process().memory_info().rss
    lm = actpatch.load_model("smollm2-135m", device="cpu")
    graph = build_graph(lm.adapter)
    runs = [measure(lm, graph, n, args.ig_steps, args.repeats if n <= 16 else 1, rss0, args.tokens_per_pass)
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
