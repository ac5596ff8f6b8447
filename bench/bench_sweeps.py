"""Benchmark: actpatch's patching sweeps against TransformerLens and a naive HF hook loop.

Workload (fixed): random-init GPT-2 small architecture (12 x 12 x 768, eager attention, float32),
32 prompt pairs x 16 tokens of random ids, the donor differing at positions 3 and 10; metric =
mean logit(answer) - logit(wrong) at the last position. Everything runs in ONE process on the
same machine, so the ratios are comparable; seconds are also given as forward-equivalents (FE):
multiples of one plain HF forward pass with full logits on the same batch.

    python bench/bench_sweeps.py                   # everything; TL rows need transformer-lens
    python bench/bench_sweeps.py --skip-tl --skip-bundled --out bench/results.json

TransformerLens is a benchmark-only dependency (pip install transformer_lens==3.9.0 in the bench
environment); without it, or with --skip-tl, its rows are skipped. TL sweeps that would take
longer than --tl-budget seconds are estimated from a random subset of their patches (marked
"est."). The floor of a sweep is the layer-stack work its patches cannot avoid (layers >= L,
positions >= p where causality allows), in FE, from the FLOP share of the layer stack in a forward pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from tabulate import tabulate

import actpatch
from actpatch import HeadSite, HiddenSite, PairBatch, PromptPair, capture, patch_variants, wrap_model
from actpatch.engine.attribution import attribute
from actpatch.engine.metrics import logit_diff

N_PAIRS, N_TOKENS, CHANGED = 32, 16, (3, 10)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.proc, self.base, self.peak, self.stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def timed(fn, repeat: int = 1, fastest: bool = False):
    """(median seconds, or the fastest with ``fastest``, last result, peak RSS increase in bytes)."""
    times, out = [], None
    with PeakRSS() as mem:
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    return min(times) if fastest else sorted(times)[len(times) // 2], out, mem.peak


def workload(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    gen = torch.Generator().manual_seed(seed)
    cfg = GPT2Config()
    cfg._attn_implementation = "eager"
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    torch.random.set_rng_state(state)
    clean = torch.randint(0, cfg.vocab_size, (N_PAIRS, N_TOKENS), generator=gen)
    corrupt = clean.clone()
    corrupt[:, list(CHANGED)] = torch.randint(0, cfg.vocab_size, (N_PAIRS, len(CHANGED)), generator=gen)
    answer, wrong = torch.randint(0, cfg.vocab_size, (2, N_PAIRS), generator=gen)
    pairs = tuple(PromptPair("r", "d", " a", " b", "bench") for _ in range(N_PAIRS))
    end = torch.full((N_PAIRS,), N_TOKENS - 1)
    # donor = clean, recipient = corrupted: TransformerLens's denoising direction
    batch = PairBatch(pairs, corrupt, clean, torch.ones_like(clean), answer, wrong, {"END": end})
    return model, batch


def unequal_workload(seed: int = 1) -> PairBatch:
    """32 pairs whose donors differ in length from their recipients (recipients 12-16 tokens, donors 1-2 longer or
    shorter), sharing the first 3 tokens; a named position "subject" (recipient index 4-6, donor index shifted by
    the length difference) and END on each side."""
    gen = torch.Generator().manual_seed(seed)
    rec_len = 12 + torch.arange(N_PAIRS) % 5  # (B,) 12..16
    don_len = rec_len + torch.tensor([-2, -1, 1, 2])[torch.arange(N_PAIRS) % 4]  # (B,) never equal
    rec = torch.randint(0, 50257, (N_PAIRS, N_TOKENS), generator=gen)  # (B, T)
    don = torch.randint(0, 50257, (N_PAIRS, int(don_len.max())), generator=gen)  # (B, Td)
    don[:, :3] = rec[:, :3]  # a shared prefix the reuse may skip
    rec_mask = (torch.arange(N_TOKENS)[None] < rec_len[:, None]).long()
    don_mask = (torch.arange(don.shape[1])[None] < don_len[:, None]).long()
    subject = 4 + torch.arange(N_PAIRS) % 3
    answer, wrong = torch.randint(0, 50257, (2, N_PAIRS), generator=gen)
    pairs = tuple(PromptPair("r", "d", " a", " b", "bench") for _ in range(N_PAIRS))
    return PairBatch(pairs, rec, don, rec_mask, answer, wrong, {"subject": subject, "END": rec_len - 1},
                     donor_mask=don_mask, donor_positions={"subject": subject + (don_len - rec_len).clamp(min=0) // 2,
                                                           "END": don_len - 1})


def floor_named(variants, batch: PairBatch, n_layers: int, body_share: float) -> float:
    """The unavoidable work of a named-position sweep on one padded batch: layers >= L and positions >= the
    earliest row's recipient position (each row has its own), in FE of a full forward over the batch."""
    T, total = batch.recipient_ids.shape[1], 0.0
    for v in variants:
        p = min(int(batch.positions[s.pos].min()) for s in v)
        total += (n_layers - min(s.layer for s in v)) / n_layers * (T - p) / T
    return total * body_share


def floor_fe(variants, n_layers: int, body_share: float) -> float:
    """Unavoidable layer-stack work of a sweep in forward-equivalents: layers >= L, positions >= p,
    where positions before the first donor/recipient difference (CHANGED[0]) never change."""
    total = 0.0
    for v in variants:
        L = min(s.layer for s in v)
        p = max(CHANGED[0], min(0 if s.pos is None else s.pos for s in v))
        total += (n_layers - L) / n_layers * (N_TOKENS - p) / N_TOKENS
    return total * body_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-tl", action="store_true", help="skip TransformerLens rows")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive HF hook loop")
    ap.add_argument("--skip-bundled", action="store_true", help="skip timing `actpatch ioi` on the bundled model")
    ap.add_argument("--skip-by-pos", action="store_true", help="skip the head x position sweeps (the longest rows)")
    ap.add_argument("--only-named", action="store_true",
                    help="only the named-position sweep on pairs of different lengths (and the forward it is measured in)")
    ap.add_argument("--tl-budget", type=float, default=600, help="seconds before a TL sweep is estimated from a subset")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--bundled-pairs", type=int, default=16)
    ap.add_argument("--bundled-python", default=".venv/bin/python" if Path(".venv/bin/python").exists() else sys.executable,
                    help="interpreter with actpatch and the bundled model installed (default: the project's .venv)")
    ap.add_argument("--out", default="bench/results.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, batch = workload()
    lm = wrap_model(model, tokenizer=None, info={"spec": "gpt2-small-random"})
    a = lm.adapter
    ids, mask = batch.recipient_ids, batch.attention_mask
    rows, record = [], {}

    def add(name, tool, seconds, fe_unit, floor=None, peak=None, note=""):
        fe = seconds / fe_unit
        record[f"{tool}: {name}"] = {"seconds": seconds, "fe": fe, "floor_fe": floor, "peak_rss_mb": peak and peak / 2**20, "note": note}
        rows.append([name, tool, f"{seconds:.2f}", f"{fe:.1f}", "" if floor is None else f"{floor:.1f}",
                     "" if floor is None else f"{fe / floor:.2f}", "" if peak is None else f"{peak / 2**20:.0f}", note])

    # the unit: one HF forward with full logits; and the body share of it (what layer-skipping can save)
    with torch.inference_mode():
        model(ids)  # warm-up
        model(ids)  # a second warm-up: the allocator settles
        t_full, _, _ = timed(lambda: model(ids, attention_mask=mask), repeat=7)
        t_keep1, _, _ = timed(lambda: model(ids, attention_mask=mask, logits_to_keep=1), repeat=7)
        t_body, _, _ = timed(lambda: model.transformer(ids, attention_mask=mask), repeat=7)
    # the floor uses the FLOP share of the body (12 layers) in a full forward (body + unembedding at
    # every position): a timing ratio moves 20 % between runs on a shared 2-core machine
    d, v, f = model.config.n_embd, model.config.vocab_size, 4 * model.config.n_embd
    per_token_layer = 2 * (4 * d * d + 2 * d * f) + 4 * N_TOKENS * d  # projections + MLP + attention scores
    body_flops = model.config.n_layer * per_token_layer
    body_share = body_flops / (body_flops + 2 * d * v)
    add("forward, full logits", "HF", t_full, t_full)
    add("forward, logits_to_keep=1", "HF", t_keep1, t_full)

    columns = torch.stack([batch.answer_ids, batch.wrong_ids], dim=1)  # (B, 2): all the metric needs

    def metric_rows(logits):  # logits of (answer, wrong) only
        return {"logit_diff": logits[..., 0] - logits[..., 1]}

    sites = [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(L) for L in range(a.n_layers)]
    head_all = [[HeadSite(L, h)] for L in range(a.n_layers) for h in range(a.n_heads)]
    hidden_pos = [[HiddenSite(L, p)] for L in range(a.n_layers) for p in range(N_TOKENS)]
    head_pos = [[HeadSite(L, h, p)] for L in range(a.n_layers) for p in range(N_TOKENS) for h in range(a.n_heads)]
    sweeps = [("144-head sweep, all positions", head_all), ("hidden layer x position", hidden_pos)]
    if not args.skip_by_pos:
        sweeps.append(("head x position", head_pos))
    if args.only_named:
        sweeps = []
    # named positions on pairs of different lengths: hidden states, all heads and single heads at subject and END
    named = unequal_workload()
    named_variants = [[HiddenSite(L, n)] for L in range(a.n_layers) for n in ("subject", "END")]
    named_variants += [[HeadSite(L, h, n)] for L in range(a.n_layers) for h in [None, *range(a.n_heads)]
                       for n in ("subject", "END")]

    def run_named():
        donor, _ = capture(lm, named.donor_ids, named, sites)
        return patch_variants(lm, named, donor, named_variants, metric_rows,
                              columns=torch.stack([named.answer_ids, named.wrong_ids], dim=1), donor_from_batch=True)

    seconds, _, peak = timed(run_named)
    add(f"named positions x {len(named_variants)} cells, different lengths", "actpatch", seconds, t_full,
        floor_named(named_variants, named, a.n_layers, body_share), peak, "incl. donor capture + recipient state")
    exact = {}
    cache_bytes = 0
    for name, variants in sweeps:
        def run(variants=variants):
            donor, _ = capture(lm, batch.donor_ids, batch, sites)
            return donor, patch_variants(lm, batch, donor, variants, metric_rows, columns=columns,
                                                 donor_from_batch=True)["logit_diff"]

        seconds, (donor, ld), peak = timed(run)
        cache_bytes = sum(t.numel() * t.element_size() for t in donor.values())
        exact[name] = ld.mean(1)
        add(name, "actpatch", seconds, t_full, floor_fe(variants, a.n_layers, body_share), peak,
            "incl. donor capture + recipient state")

    def att():
        donor, _ = capture(lm, batch.donor_ids, batch, sites)
        return attribute(lm, batch, donor)

    seconds, result, peak = timed(att, repeat=1 if args.only_named else 3)
    add("attribution, all heads x positions", "actpatch", seconds, t_full, None, peak, "2 forwards + 1 backward")
    att_heads = result.head_effect().flatten()
    rho = (actpatch.experiment.results.spearman(att_heads.numpy(), exact["144-head sweep, all positions"].numpy())
           if "144-head sweep, all positions" in exact else float("nan"))

    if args.only_named:
        args.skip_naive = args.skip_tl = args.skip_bundled = True
    if not args.skip_naive:  # one forward per head, pre-hook on c_proj, logits_to_keep=1
        with torch.inference_mode():
            donor_z = {}
            hs = [a.attn_out(L).register_forward_pre_hook(lambda m, x, L=L: donor_z.__setitem__(L, x[0].clone())) for L in range(a.n_layers)]
            model(batch.donor_ids, attention_mask=mask)
            for hnd in hs:
                hnd.remove()

            def naive():
                out = []
                for L in range(a.n_layers):
                    for h in range(a.n_heads):
                        lo, hi = h * a.d_head, (h + 1) * a.d_head

                        def pre(m, x, L=L, lo=lo, hi=hi):
                            z = x[0].clone()
                            z[..., lo:hi] = donor_z[L][..., lo:hi]
                            return (z,)

                        hnd = a.attn_out(L).register_forward_pre_hook(pre)
                        try:
                            lg = model(ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
                        finally:
                            hnd.remove()
                        out.append(logit_diff(lg, batch.answer_ids, batch.wrong_ids).mean())
                return torch.stack(out)

            seconds, naive_ld, peak = timed(naive)
        diff = float((naive_ld - exact["144-head sweep, all positions"]).abs().max())
        add("144-head sweep, all positions", "HF hook loop", seconds, t_full, None, peak, f"max |dLD| vs actpatch {diff:.1e}")

    tl_rows = {}
    if not args.skip_tl:
        try:
            from transformer_lens import HookedTransformer, HookedTransformerConfig, patching
        except ImportError:
            print("transformer_lens is not installed: skipping its rows (pip install transformer_lens==3.9.0)")
        else:
            import pandas as pd

            cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                                          n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=0)
            tl = HookedTransformer(cfg).eval()
            _, tl_cache = tl.run_with_cache(batch.donor_ids)

            def tl_metric(logits):
                return logit_diff(logits[:, -1], batch.answer_ids, batch.wrong_ids).mean()

            t_tl, _, _ = timed(lambda: tl(ids), repeat=3)
            add("forward, full logits", "TransformerLens 3.9", t_tl, t_full)
            gen = torch.Generator().manual_seed(0)
            for name, fn, axes, total in [
                ("144-head sweep, all positions", patching.get_act_patch_attn_head_out_all_pos, ("layer", "head"), 144),
                ("hidden layer x position", patching.get_act_patch_resid_pre, ("layer", "pos"), 12 * N_TOKENS),
                ("head x position", patching.get_act_patch_attn_head_out_by_pos, ("layer", "pos", "head"), 144 * N_TOKENS),
            ]:
                if args.skip_by_pos and name == "head x position":
                    continue
                est_total = total * t_tl * 1.02
                if est_total <= args.tl_budget:
                    seconds, _, peak = timed(lambda fn=fn: fn(tl, ids, tl_cache, tl_metric))
                    note = "full run"
                else:
                    n = max(8, int(args.tl_budget / 4 / t_tl))
                    sizes = {"layer": 12, "head": 12, "pos": N_TOKENS}
                    idx = {ax: torch.randint(0, sizes[ax], (n,), generator=gen).tolist() for ax in axes}
                    df = pd.DataFrame({ax: idx[ax] for ax in axes})  # TL's own axis names
                    # the helpers are partials that fix index_axis_names; a subset goes through the generic function
                    kw = {k: v for k, v in fn.keywords.items() if k != "index_axis_names"}
                    sub, _, peak = timed(lambda kw=kw, df=df: patching.generic_activation_patch(
                        tl, ids, tl_cache, tl_metric, index_df=df, **kw))
                    seconds, note = sub / n * total, f"est. from {n} of {total} patches"
                tl_rows[name] = seconds
                add(name, "TransformerLens 3.9", seconds, t_full, None, peak, note)

    bundled = None
    if not args.skip_bundled:
        out_dir = Path("runs/bench-bundled")
        cmd = [args.bundled_python, "-m", "actpatch.cli", "ioi", "--n-pairs", str(args.bundled_pairs), "--out", str(out_dir),
               "--overwrite", "--quiet"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        bundled = {"seconds": time.perf_counter() - t, "exit": proc.returncode, "command": " ".join(cmd[2:])}
        if proc.returncode:
            print(proc.stderr[-2000:])
        if proc.returncode == 0:
            res = json.loads((out_dir / "results.json").read_text())
            bundled["spearman_attribution_vs_exact"] = {
                d: v.get("spearman_attribution_vs_exact") for d, v in res["heads"]["designs"].items()}

    speedups = {name: tl_rows[name] / record[f"actpatch: {name}"]["seconds"] for name in tl_rows if f"actpatch: {name}" in record}
    if "HF hook loop: 144-head sweep, all positions" in record:
        speedups["144-head sweep vs HF hook loop"] = (record["HF hook loop: 144-head sweep, all positions"]["seconds"]
                                                      / record["actpatch: 144-head sweep, all positions"]["seconds"])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": psutil.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "actpatch": actpatch.__version__, "cuda": torch.cuda.is_available()},
        "workload": {"model": "GPT-2 small architecture, random init", "pairs": N_PAIRS, "tokens": N_TOKENS},
        "forward_seconds": t_full, "body_share_flops": body_share, "body_share_time": t_body / t_full, "rows": record, "speedups": speedups,
        "spearman_attribution_vs_exact_random_gpt2": rho, "bundled_ioi_run": bundled,
        "memory": {"model_mb": model_bytes / 2**20, "activation_cache_mb": cache_bytes / 2**20},
    }
    print(tabulate(rows, ["sweep", "tool", "seconds", "FE", "floor FE", "FE / floor", "peak +RSS MB", "note"], tablefmt="github"))
    print(f"\none forward (full logits, {N_PAIRS} x {N_TOKENS}) = {t_full:.3f} s; body share {body_share:.2f} by FLOPs, "
          f"{t_body / t_full:.2f} by time; "
          f"threads {torch.get_num_threads()}")
    for name, x in speedups.items():
        print(f"speed-up of actpatch, {name}: {x:.1f}x")
    print(f"attribution vs exact heads on random GPT-2: Spearman {rho:.3f}")
    print(f"model {model_bytes / 2**20:.0f} MB + one activation cache {cache_bytes / 2**20:.1f} MB")
    if bundled:
        print(f"bundled `actpatch ioi --n-pairs {args.bundled_pairs}`: {bundled['seconds']:.0f} s, exit {bundled['exit']}, "
              f"Spearman {bundled.get('spearman_attribution_vs_exact')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
