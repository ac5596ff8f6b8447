"""Benchmark: a sweep whose answers have k tokens (k = 1 and k = 4) on the bundled model, against its FLOP floor.

Workload (fixed): SmolLM2-135M (bundled, float32, eager), 16 pairs x 16 tokens of random ids, donors differing from
position 3 on, a named position "subject" at token 5; cells = hidden state and all heads of every layer at subject
and END (120 cells); metric = logprob(answer) - logprob(wrong) by teacher forcing, answer and wrong each k random
tokens. Each row includes capturing the donor and recording the recipient (and, for k > 1, its continuation rows and
their check against plain rows).

The floor counts what no method can skip, in forward-equivalents (FE: one HF forward with full logits on the same
16 x 16 recipients, measured in the same run): per cell, layers >= L at prompt positions >= p plus both
continuations' k - 1 positions, and the full-vocabulary unembedding at END and at those positions, from the
FLOP shares of the layer stack and of the unembedding in a forward pass. Peak memory: the resident-set growth over
the level before the row.

    .venv/bin/python bench/bench_continuations.py --out bench/results-continuations.json
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import psutil
import torch
from tabulate import tabulate

import actpatch
from actpatch import HeadSite, HiddenSite, PairBatch, PromptPair, capture, load_model, patch_variants
from actpatch.engine.metrics import continuation_scores, task_scores

N_PAIRS, N_TOKENS, CHANGED, SUBJECT = 16, 16, 3, 5


def workload(vocab: int, k: int) -> PairBatch:
    gen = torch.Generator().manual_seed(0)
    rec = torch.randint(100, vocab, (N_PAIRS, N_TOKENS), generator=gen)  # (B, T)
    don = rec.clone()
    don[:, CHANGED:] = torch.randint(100, vocab, (N_PAIRS, N_TOKENS - CHANGED), generator=gen)
    mask = torch.ones_like(rec)
    conts = torch.randint(100, vocab, (N_PAIRS, 2, k), generator=gen)  # (B, 2, k): answer, wrong
    pos = {"subject": torch.full((N_PAIRS,), SUBJECT), "END": torch.full((N_PAIRS,), N_TOKENS - 1)}
    pairs = tuple(PromptPair("r", "d", " a", " b", "bench") for _ in range(N_PAIRS))
    extra = {} if k == 1 else {"cont_ids": conts, "cont_side": torch.tensor([[1, -1]] * N_PAIRS)}
    return PairBatch(pairs, rec, don, mask, conts[:, 0, 0].clone(), conts[:, 1, 0].clone(), pos, **extra)


def peak_rss(fn):
    """(seconds, result, peak RSS growth in bytes) of one call."""
    proc, base, peak, stop = psutil.Process(), psutil.Process().memory_info().rss, [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    return seconds, out, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results-continuations.json")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median (by FE) counts")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m", device="cpu")
    cfg, a = lm.model.config, lm.adapter
    d, f, vocab, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, a.n_layers
    kv = a.n_kv_heads * a.d_head
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * N_TOKENS * d  # q, o, k, v, gated MLP, attention
    unembed = 2 * d * vocab
    per_token = n_layers * per_layer + unembed  # one position of a forward with full logits
    base = workload(vocab, 1)
    with torch.inference_mode():
        for _ in range(2):
            lm.model(base.recipient_ids)
        t_full = min(timed for timed in (peak_rss(lambda: lm.model(base.recipient_ids))[0] for _ in range(5)))
    variants = [[site(L, p)] for site in (HiddenSite, lambda L, p: HeadSite(L, None, p)) for L in range(n_layers)
                for p in ("subject", "END")]
    sites = [HiddenSite(L) for L in range(n_layers)] + [HeadSite(L) for L in range(n_layers)]
    rows, record = [], {}
    for k in (1, 4):
        batch = workload(vocab, k)
        if k == 1:
            a_, w_ = batch.answers()
            score = lambda lg: task_scores("logit_diff", lg, a_, w_)  # noqa: E731
        else:
            score = lambda ro: continuation_scores("logit_diff", ro.end, ro.tail, batch.cont_ids, batch.cont_side)  # noqa: E731

        def run():
            donor, _ = capture(lm, batch.donor_ids, batch, sites)
            return patch_variants(lm, batch, donor, variants, score, donor_from_batch=True)

        reps = []  # (seconds, FE, peak): each run's FE against a unit measured just before it, on a noisy machine
        for _ in range(args.repeat):
            with torch.inference_mode():
                unit = min(peak_rss(lambda: lm.model(base.recipient_ids))[0] for _ in range(3))
            seconds, _, peak = peak_rss(run)
            reps.append((seconds, seconds / min(unit, t_full), peak))
        seconds, fe, peak = sorted(reps, key=lambda r: r[1])[len(reps) // 2]  # the median run by FE
        floor = 0.0
        for (site,) in variants:
            p = SUBJECT if site.pos == "subject" else N_TOKENS - 1
            L = site.layer + (1 if isinstance(site, HiddenSite) else 0)  # a block output changes layers after it
            positions = N_TOKENS - p + 2 * (k - 1)  # the prompt from p, and both continuations
            floor += ((n_layers - L) * per_layer * positions + unembed * (1 + 2 * (k - 1))) / (N_TOKENS * per_token)
        name = f"k = {k}: {len(variants)} cells, answer and wrong of {k} token{'s' if k > 1 else ''}"
        record[name] = {"k": k, "seconds": seconds, "fe": fe, "floor_fe": floor, "ratio": fe / floor,
                        "peak_rss_mb": peak / 2**20, "ratios_of_each_run": sorted(r[1] / floor for r in reps)}
        rows.append([name, f"{seconds:.2f}", f"{fe:.1f}", f"{floor:.1f}", f"{fe / floor:.2f}", f"{peak / 2**20:.0f}"])
    print(tabulate(rows, ["sweep", "seconds", "FE", "floor FE", "FE / floor", "peak +RSS MB"], tablefmt="github"))
    meta = {"machine": platform.platform(), "processor": platform.processor(), "cpus": psutil.cpu_count(),
            "torch": torch.__version__, "actpatch": actpatch.__version__, "threads": torch.get_num_threads(),
            "unit_seconds": t_full, "workload": f"{N_PAIRS} pairs x {N_TOKENS} tokens, SmolLM2-135M float32"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": record}, indent=2) + "\n")


if __name__ == "__main__":
    main()
