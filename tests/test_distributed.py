"""Sharding a sweep over 2 CPU processes (torchrun, gloo) gives the single-process numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from actpatch.cli import main

# the ranks batch different subsets of variants: float32 summation order only
RTOL, ATOL = 1e-5, 1e-5


def test_torchrun_two_processes_equal_one(gpt2_dir, tmp_path):
    args = ["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--donor", "swap", "--quiet"]
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "actpatch.cli", *args, "--out", str(sharded)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                         "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (sharded, single))
    assert all(c["passed"] for c in a["sanity"].values())
    for key in ("logit_diff", "delta_logit_diff"):
        np.testing.assert_allclose(np.array(a["heads"]["designs"]["swap"][key], float),
                                   np.array(b["heads"]["designs"]["swap"][key], float), rtol=RTOL, atol=ATOL)
    for ra, rb in zip(a["layers"], b["layers"]):
        for exp in ("hidden", "all_heads"):
            for pos in ("all", "END"):
                assert abs(ra[exp]["swap"][pos]["logit_diff"] - rb[exp]["swap"][pos]["logit_diff"]) <= ATOL + RTOL * 10
    assert a["baseline"] == b["baseline"]
