"""Benchmark: a pattern sweep over every head against the head sweep's FLOP floor, on the bundled model.

Workload (fixed): SmolLM2-135M (bundled, float32, eager attention), 16 pairs x 16 tokens of random ids, donors
differing from position 3 on; cells = every head of every layer (30 x 9 = 270) at all positions, as a head sweep
(``HeadSite``) and as a pattern sweep (``PatternSite``: the donor's attention weights, the recipient's values);
metric = the logit difference of two fixed tokens. Each row includes its donor capture (for the pattern sweep the
donor and recipient forwards that build every head's swapped output, and their A @ V check).

The floor is the head sweep's: per cell, layers >= L at positions >= 3 (before it donor and recipient share their
tokens), in forward-equivalents (FE: one HF forward with full logits on the same 16 x 16 recipients, timed just
before each run), from the FLOP shares of the layer stack and of the unembedding in a forward pass, plus the
full-vocabulary unembedding at END. Each row runs ``--repeat`` times; the median run by FE counts.

    .venv/bin/python bench/bench_patterns.py --out bench/results-patterns.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import psutil
import torch
from tabulate import tabulate

import actpatch
from actpatch import HeadSite, PairBatch, PromptPair, capture, load_model, patch_variants
from actpatch.engine.metrics import task_scores
from actpatch.engine.patternsite import PatternSite

N_PAIRS, N_TOKENS, CHANGED = 16, 16, 3


def workload(vocab: int) -> PairBatch:
    gen = torch.Generator().manual_seed(0)
    rec = torch.randint(100, vocab, (N_PAIRS, N_TOKENS), generator=gen)  # (B, T)
    don = rec.clone()
    don[:, CHANGED:] = torch.randint(100, vocab, (N_PAIRS, N_TOKENS - CHANGED), generator=gen)
    answers = torch.randint(100, vocab, (N_PAIRS, 2), generator=gen)
    pairs = tuple(PromptPair("r", "d", " a", " b", "bench") for _ in range(N_PAIRS))
    return PairBatch(pairs, rec, don, torch.ones_like(rec), answers[:, 0].clone(), answers[:, 1].clone(),
                     {"END": torch.full((N_PAIRS,), N_TOKENS - 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results-patterns.json")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median (by FE) counts")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m", device="cpu")
    cfg, a = lm.model.config, lm.adapter
    d, f, vocab, L_, H = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, a.n_layers, a.n_heads
    kv = a.n_kv_heads * a.d_head
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * N_TOKENS * d  # q, o, k, v, gated MLP, attention
    per_token = L_ * per_layer + 2 * d * vocab  # one position of a forward with full logits
    batch = workload(vocab)
    a_, w_ = batch.answers()
    score = lambda lg: task_scores("logit_diff", lg, a_, w_)  # noqa: E731
    floor = sum((L_ - L) * per_layer * (N_TOKENS - CHANGED) + 2 * d * vocab for L in range(L_) for _ in range(H))
    floor /= N_TOKENS * per_token
    with torch.inference_mode():
        for _ in range(2):
            lm.model(batch.recipient_ids)
    rows, record = [], {}
    for name, make in (("head sweep (HeadSite)", HeadSite), ("pattern sweep (PatternSite)", PatternSite)):
        variants = [[make(L, h)] for L in range(L_) for h in range(H)]

        def run():
            donor, _ = capture(lm, batch.donor_ids, batch, [v[0] for v in variants])
            return patch_variants(lm, batch, donor, variants, score, donor_from_batch=True)

        reps = []
        for _ in range(args.repeat):
            with torch.inference_mode():
                unit = min(_timed(lambda: lm.model(batch.recipient_ids)) for _ in range(3))
            seconds = _timed(run)
            reps.append((seconds, seconds / unit, psutil.Process().memory_info().rss))
        seconds, fe, _ = sorted(reps, key=lambda r: r[1])[len(reps) // 2]
        label = f"{name}: {len(variants)} cells, all positions"
        record[label] = {"seconds": seconds, "fe": fe, "floor_fe": floor, "ratio": fe / floor,
                         "ratios_of_each_run": sorted(r[1] / floor for r in reps)}
        rows.append([label, f"{seconds:.2f}", f"{fe:.1f}", f"{floor:.1f}", f"{fe / floor:.2f}",
                     ", ".join(f"{r[1] / floor:.2f}" for r in sorted(reps, key=lambda r: r[1]))])
    print(tabulate(rows, ["sweep", "seconds", "FE", "head floor FE", "FE / floor", "runs"], tablefmt="github"))
    meta = {"machine": platform.platform(), "cpus": psutil.cpu_count(), "torch": torch.__version__,
            "actpatch": actpatch.__version__, "threads": torch.get_num_threads(),
            "workload": f"{N_PAIRS} pairs x {N_TOKENS} tokens, SmolLM2-135M float32 eager"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": record}, indent=2) + "\n")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
