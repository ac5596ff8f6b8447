"""Model loading: hub ids offline, local paths, GGUF files, bad specs, device and dtype options."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from actpatch import ConfigError, ModelLoadError, load_model
from actpatch.models import bundled_gguf, resolve_device, resolve_dtype


def test_hub_id_offline_and_uncached_gives_clear_error(tmp_path):
    """gpt2 goes through the real from_pretrained path; offline and uncached it fails with instructions."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from actpatch import load_model, ModelLoadError\n"
        "try:\n    load_model('gpt2')\nexcept ModelLoadError as e:\n    print('MSG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MSG could not load 'gpt2'" in out.stdout
    assert "hf download gpt2" in out.stdout and "HF_HUB_OFFLINE=1" in out.stdout
    assert "Traceback" not in out.stderr


def test_missing_path_and_bad_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a loadable HF checkpoint"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))


def test_device_and_dtype_options():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="expected one of float32, float16, bfloat16"):
        resolve_dtype("int8")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda"):
        resolve_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_gguf_file_spec_loads_directly():
    """A .gguf path loads through transformers' GGUF support (the bundled file, ~15 s)."""
    lm = load_model(str(bundled_gguf()), device="cpu")
    assert lm.info["source"] == "gguf" and lm.info["revision"].startswith("gguf-sha256:")
    assert lm.adapter.n_layers == 30 and lm.model.config._attn_implementation == "eager"


def test_device_map_auto_loads_with_accelerate_and_gives_the_same_numbers(gpt2_dir):
    """On this CPU-only machine accelerate maps every module to the CPU; the dispatch path must not change numbers."""
    from actpatch import run_ioi

    plain = load_model(str(gpt2_dir), device="cpu")
    mapped = load_model(str(gpt2_dir), device_map="auto")
    assert mapped.info["device_map"] == "auto" and mapped.info["device"].startswith("device_map:")
    kw = dict(n_pairs=3, designs=("swap",), progress=False, analysis=False)
    a, b = run_ioi(lm=plain, **kw), run_ioi(lm=mapped, **kw)
    assert b.passed and [c["logit_diff"] for c in a.cells] == [c["logit_diff"] for c in b.cells]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_metrics_stay_float32(gpt2_dir, dtype):
    from actpatch import run_ioi
    from actpatch.metrics import ioi_scores

    lm = load_model(str(gpt2_dir), device="cpu", dtype=dtype)
    assert next(lm.model.parameters()).dtype == getattr(torch, dtype)
    res = run_ioi(lm=lm, n_pairs=3, designs=("swap",), progress=False)
    assert res.passed, {k: v["detail"] for k, v in res.sanity.items() if not v["passed"]}
    logits = torch.randn(2, 7).to(getattr(torch, dtype))
    assert ioi_scores(logits, torch.tensor([1, 2]), torch.tensor([3, 4]))["logit_diff"].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_cuda_half_precision_matches_cpu(gpt2_dir):
    from actpatch import run_ioi

    kw = dict(n_pairs=3, designs=("swap",), progress=False)
    cpu = run_ioi(lm=load_model(str(gpt2_dir), device="cpu"), **kw)
    gpu = run_ioi(lm=load_model(str(gpt2_dir), device="cuda", dtype="float16"), **kw)
    assert gpu.passed
    # float16 weights and activations against float32: about 1e-2 on LDs of order 1
    diff = max(abs(a["logit_diff"] - b["logit_diff"]) for a, b in zip(cpu.cells, gpu.cells))
    assert diff < 5e-2
