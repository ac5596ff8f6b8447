"""Cost of circuit discovery on the bundled model, in forward-equivalents (FE) and memory.

    .venv/bin/python bench/bench_circuit.py --out bench/results-circuit.json     # about 2 minutes on 2 CPU cores

Rows: recording every sender's output in the donor run (one pass), a plain forward and backward (the floor of any
gradient method here), EAP over every edge (one forward and backward of the recipient that also records its senders;
the totals add the donor's recording), EAP-IG with K steps (K forwards and backwards, the first of them recording),
one faithfulness point (one edge-patched forward of every pair). FE = seconds / one plain forward of the same pairs
(END logits over the whole vocabulary). Each row runs 3 times, each time right after a plain forward, and FE is the
row's fastest run over the fastest of those forwards: this machine's speed drifts by 30% within a minute, so a
forward timed once at the start gave FE ratios 30% apart between runs. Memory: each
row's peak resident growth over the level before it, and for EAP the whole process's peak above its level before
the model was loaded, next to the issue's bound of 2 x (the model's parameters + one activation cache: every
sender's output for these pairs, what EAP keeps of the donor).
"""

from __future__ import annotations

import argparse
import json
import platform

import psutil
import torch
from bench_sweeps import PeakRSS, timed  # (seconds, result, peak RSS growth): the same measure as the sweep benchmarks

import actpatch
from actpatch.analysis.circuits import top_edges
from actpatch.engine.attribution import _activation_gradients_only
from actpatch.engine.capture import last_logits
from actpatch.engine.eap import edge_scores
from actpatch.engine.edges import edge_patched_logits, sender_outputs
from actpatch.engine.graph import build_graph
from actpatch.engine.metrics import logit_diff
from actpatch.tasks.registry import get_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-pairs", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rss0 = psutil.Process().memory_info().rss
    lm = actpatch.load_model("smollm2-135m", device="cpu")
    task = get_task("ioi")
    batch = task.tokenize(lm.tokenizer, task.generate(lm.tokenizer, args.n_pairs, ("swap",), 0)["swap"])
    graph = build_graph(lm.adapter)
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

    def forward():
        with torch.inference_mode():
            return last_logits(lm, ids, mask, end)

    forward()
    results, forwards = [], []

    def row(name, fn, note):
        runs, fwds, peak, out = [], [], 0, None
        for _ in range(3):  # a forward right before each run: FE compares times of the same minute
            fwds.append(timed(forward)[0])
            secs, out, grew = timed(fn)
            runs.append(secs)
            peak = max(peak, grew)
        secs, fwd = min(runs), min(fwds)
        forwards.extend(fwds)
        results.append({"row": name, "seconds": secs, "forward_seconds": fwd, "fe": secs / fwd,
                        "peak_rss_gib": peak / 2**30, "note": note})
        print(f"{name:28s} {secs:7.2f} s  {secs / fwd:6.1f} FE (forward {fwd:.2f} s)  +{peak / 2**30:.2f} GiB  {note}",
              flush=True)
        return out

    don = row("record senders (donor)", lambda: sender_outputs(lm, graph, batch, "donor")[0], "1 forward + writes")
    row("plain forward + backward", forward_backward, "d metric / d input embeddings")
    with PeakRSS() as whole:
        whole.base = rss0  # the process's peak above its level before the model was loaded
        eap = row("EAP scores", lambda: edge_scores(lm, graph, batch, metric, don), "+ the donor's recording")
    row(f"EAP-IG scores (K={args.ig_steps})", lambda: edge_scores(lm, graph, batch, metric, don, steps=args.ig_steps),
        "+ the donor's recording")
    keep = top_edges(graph, eap, 200)
    row("faithfulness point", lambda: edge_patched_logits(lm, graph, batch, don, (graph.allowed & ~keep).float()),
        "top-200 circuit")
    row("empty circuit", lambda: edge_patched_logits(lm, graph, batch, don, graph.allowed.float()), "every edge patched")
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    cache = don.numel() * don.element_size()
    summary = {
        "forward_seconds": min(forwards), "forward_seconds_max": max(forwards),
        "n_pairs": len(batch), "tokens": int(ids.shape[1]), "n_edges": graph.n_edges,
        "model_gib": params / 2**30, "sender_cache_gib": cache / 2**30,
        "eap_total_fe": results[2]["fe"] + results[0]["fe"],
        "eap_ig_total_fe": results[3]["fe"] + results[0]["fe"],
        "eap_process_peak_gib": whole.peak / 2**30,
        "memory_bound_gib": 2 * (params + cache) / 2**30,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "actpatch": actpatch.__version__,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"summary": summary, "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
