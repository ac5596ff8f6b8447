"""Model loading: hub ids offline, local paths, GGUF files, bad specs, device and dtype options."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from actpatch import ConfigError, ModelLoadError, load_model
from actpatch.model.models import bundled_gguf, resolve_device, resolve_dtype


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
    with pytest.raises(ModelLoadError, match="does not exist"):  # a trailing slash: a folder, never a hub id
        load_model("no-such-local-folder/")
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
    """A .gguf path loads through transformers' GGUF support (the bundled file, ~15 s), with a device map too."""
    lm = load_model(str(bundled_gguf()), device_map="auto")
    assert lm.info["source"] == "gguf" and lm.info["revision"].startswith("gguf-sha256:")
    assert lm.info["device"] == ("device_map:cuda:0" if torch.cuda.is_available() else "device_map:cpu")
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
    from actpatch.engine.metrics import ioi_scores

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


OFFLOADED = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
             "transformer.h.1": "disk", "transformer.h.2": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"}


def test_device_map_with_offloaded_layers_gives_the_same_numbers(gpt2_dir, tmp_path):
    """Layers 1-2 and the final norm offloaded to disk: accelerate keeps their weights on ``meta`` and
    loads them only inside each forward, as it does for CPU-offloaded modules under a multi-GPU
    ``device_map="auto"``. Patching, attribution, the analysis (which reads W_O, W_U and the norm gains
    directly) and the checkpoint fingerprint must all see the real weights."""
    from actpatch import run_ioi
    from actpatch.engine.checkpoint import sweep_fingerprint
    from actpatch import generate_pairs, tokenize_ioi
    from actpatch.engine.sites import HeadSite

    plain = load_model(str(gpt2_dir), device="cpu")
    off = load_model(str(gpt2_dir), device_map=OFFLOADED, offload_folder=tmp_path / "offload")
    assert off.info["device"] == "device_map:cpu,disk" and off.device == torch.device("cpu")
    placed = {n: p.device.type for n, p in off.model.named_parameters()}
    assert placed["transformer.h.1.attn.c_proj.weight"] == "meta"

    kw = dict(n_pairs=3, designs=("swap",), progress=False, method="both", analysis=True)
    a, b = run_ioi(lm=plain, **kw), run_ioi(lm=off, **kw)
    assert b.passed, {k: v["detail"] for k, v in b.sanity.items() if not v["passed"]}
    da, db = a.to_dataframe(), b.to_dataframe()
    num = da.select_dtypes("number").columns
    # the same CPU kernels on the same weights: identical up to float32 rounding of the order of ops
    assert len(da) == len(db) and float((da[num] - db[num]).abs().max().max()) <= 1e-6
    ha, hb = a.analysis["heads"], b.analysis["heads"]
    assert ha["classes"] == hb["classes"] and ha["copy"] == hb["copy"]
    assert max(abs(x - y) for ra, rb in zip(ha["dla"], hb["dla"]) for x, y in zip(ra, rb)) <= 1e-4  # rounded to 4 d.p.
    assert a.analysis["designs"].keys() == b.analysis["designs"].keys()
    # the model is left as found: offloaded weights are back on meta
    assert {n: p.device.type for n, p in off.model.named_parameters()} == placed
    batch = tokenize_ioi(plain.tokenizer, generate_pairs(plain.tokenizer, 3, ("swap",))["swap"])
    assert sweep_fingerprint(plain, batch, [[HeadSite(1)]]) == sweep_fingerprint(off, batch, [[HeadSite(1)]])


def test_disk_offload_without_a_folder_says_which_option(gpt2_dir, tmp_path):
    """A .bin checkpoint must be re-saved to be offloaded to disk: transformers then needs a folder."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin-ckpt"
    folder.mkdir()
    for f in gpt2_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    torch.save(load_file(gpt2_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pass --offload-folder DIR"):
        load_model(str(folder), device_map=OFFLOADED)
    with pytest.raises(ConfigError, match="only applies with --device-map"):
        load_model(str(gpt2_dir), offload_folder=tmp_path / "x")


def test_quiet_silences_the_gguf_conversion_bar():
    """transformers' GGUF converter calls tqdm itself; --quiet swaps it for a disabled one, then restores it."""
    import contextlib
    import io

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from actpatch.cli import _quiet_transformers

    original = gguf_utils.tqdm
    for quiet, expect_bar in ((True, False), (False, True)):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), _quiet_transformers(quiet):
            list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert ("Converting" in err.getvalue()) is expect_bar
        assert gguf_utils.tqdm is original


def test_half_precision_logit_difference_is_not_quantised(gpt2_dir):
    """In bfloat16 the full-vocabulary logits are rounded to ~3 significant digits; the IO and S logits
    that the metrics read are recomputed in float32 from the same final hidden state."""
    from actpatch import generate_pairs, last_logits, tokenize_ioi

    lm = load_model(str(gpt2_dir), device="cpu", dtype="bfloat16")
    batch = tokenize_ioi(lm.tokenizer, generate_pairs(lm.tokenizer, 4, ("swap",))["swap"])
    args = (lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    rounded = last_logits(*args)
    exact = last_logits(*args, exact=batch.answer_columns())
    assert rounded.dtype == torch.bfloat16 and exact.dtype == torch.float32
    cols = batch.answer_columns()
    got = exact.gather(1, cols)
    # the reference: the same bf16 hidden state times the bf16 weights, accumulated in float32
    out = lm.model.base_model(input_ids=batch.recipient_ids, attention_mask=batch.attention_mask)
    h = out.last_hidden_state[torch.arange(4), batch.position("END")].float()  # (B, D)
    w = lm.model.get_output_embeddings().weight.float()  # (V, D)
    want = torch.einsum("bd,bnd->bn", h, w[cols])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 summation order only
    others = torch.ones_like(exact, dtype=torch.bool).scatter(1, cols, False)
    assert torch.equal(exact[others], rounded.float()[others])  # the other columns are untouched
    # the only-columns path agrees with the exact columns
    torch.testing.assert_close(last_logits(*args, columns=cols), got, rtol=1e-5, atol=1e-5)
