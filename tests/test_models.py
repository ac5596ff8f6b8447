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
