"""Time ``actpatch check-model`` on the bundled SmolLM2-135M (issue 26's target: at most 90 s on 2 CPU cores).

    .venv/bin/python bench/bench_check_model.py --out bench/results-check-model.json    # about a minute

Rows: the whole command in a fresh process (``actpatch check-model smollm2-135m --json``: start-up, loading the
model from actpatch's converted cache, the self-test and the output), run ``--repeats`` times; and, in this process,
the self-test alone on the model loaded once, with the time of each feature check. The cache is warmed first, so
the first GGUF conversion (about 20 s, once per machine) is not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import actpatch
from actpatch.experiment import modelchecks
from actpatch.experiment.selftest import self_test

MODEL = "smollm2-135m"
TARGET_S = 90.0


def command_runs(repeats: int) -> list[dict]:
    exe = Path(sys.executable).with_name("actpatch")
    rows = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([str(exe), "check-model", MODEL, "--json", "--device", "cpu"], capture_output=True,
                              text=True, check=False)
        wall = time.perf_counter() - start
        report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
        rows.append({"wall_s": round(wall, 2), "exit": proc.returncode, "passed": report.get("passed"),
                     "statuses": {c["feature"]: c["status"] for c in report.get("checks", [])}})
    return rows


def feature_times(lm) -> tuple[float, dict[str, float]]:
    """The self-test in this process, with the seconds spent in each check (wrapped, not changed)."""
    spent: dict[str, float] = {}
    names = [n for n in dir(modelchecks) if n.startswith("check_")]
    originals = {n: getattr(modelchecks, n) for n in names}
    import actpatch.experiment.selftest as st

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return run

    for n in names:
        if hasattr(st, n):
            setattr(st, n, timed(n, originals[n]))
    try:
        start = time.perf_counter()
        report = self_test(lm)
        total = time.perf_counter() - start
    finally:
        for n in names:
            if hasattr(st, n):
                setattr(st, n, originals[n])
    assert report.passed, report.table()
    return total, {k: round(v, 2) for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lm = actpatch.load_model(MODEL, device="cpu")  # also warms the converted-weights cache
    self_s, per_check = feature_times(lm)
    runs = command_runs(args.repeats)
    result = {
        "model": MODEL, "target_s": TARGET_S, "command": f"actpatch check-model {MODEL} --json --device cpu",
        "command_runs": runs, "worst_wall_s": max(r["wall_s"] for r in runs),
        "within_target": all(r["wall_s"] <= TARGET_S and r["exit"] == 0 for r in runs),
        "self_test_in_process_s": round(self_s, 2), "per_check_s": per_check,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "actpatch": actpatch.__version__},
    }
    print(f"check-model {MODEL}: " + ", ".join(f"{r['wall_s']:.1f} s (exit {r['exit']})" for r in runs)
          + f"; the self-test alone {self_s:.1f} s; target {TARGET_S:.0f} s")
    print("per check: " + ", ".join(f"{k} {v:.1f} s" for k, v in per_check.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
