"""actpatch: activation patching for HuggingFace causal LMs: IOI built in, and any contrastive task of your own.

Data flows one way through small modules (the order is README's Layout line, checked by a test):
placement -> adapters -> models -> sites -> hooks -> pairs -> batch -> capture -> reference -> checkpoint
-> prefix -> planning -> patching -> distributed -> metrics -> attribution -> heads -> gap -> paths -> analysis
-> sanity -> audit -> pooling -> tasks -> ioi -> results -> pairsresult -> config -> sweeps -> experiments -> contrast -> plots -> report
-> htmlreport -> pairsreport -> outputs -> compare -> cli.

    import actpatch
    result = actpatch.run_ioi(n_pairs=16)          # bundled SmolLM2-135M, offline
    result.to_dataframe().head()
    df = actpatch.patch(lm, "facts.jsonl", sites="heads", positions=["subject", "END"], metric="kl")   # your own pairs
"""

import logging as _logging
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("actpatch")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .adapters import ARCHITECTURES, Adapter, Architecture, get_adapter, supported_model_types
from .attribution import Attribution, attribute
from .batch import PairBatch, tokenize_pairs
from .capture import ActivationCache, capture, last_logits
from .errors import (
    ActpatchError, ConfigError, DataError, ModelLoadError, NumericalError, PairsFileError, ResumeError,
    SanityCheckError, SiteError, UnsupportedArchitectureError,
)
from .checkpoint import Checkpoint, sweep_fingerprint
from .compare import run_compare
from .config import IOIConfig
from .contrast import PairsConfig, patch, run_pairs
from .experiments import plan_ioi, run_ioi
from .heads import characterise, classify
from .hooks import count_hooks, hooks
from .ioi import generate_pairs, tokenize_ioi
from .pairs import PromptPair, load_pairs_file
from .metrics import ioi_scores, logit_diff, normalised_effect, prob_ratio, token_prob
from .models import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .patching import patch_variants, patched, run_chunk
from .planning import plan_chunks, token_budget
from .paths import Receiver, path_patch
from .prefix import RecipientState
from .results import HeadGrid, IOIResult
from .pairsresult import PairsResult
from .tasks import TASKS, Task, get_task, register
from .sanity import SanityCheck, run_sanity_checks
from .sites import AttnOutSite, HeadSite, HiddenSite, MlpOutSite
from . import plots as _plots  # noqa: F401,E402  registers the kinds of IOIResult.plot()

_logging.getLogger(__name__).addHandler(_logging.NullHandler())  # the CLI's --log-level attaches a real one

__all__ = [
    "ARCHITECTURES", "ActivationCache", "ActpatchError", "Adapter", "Architecture", "Attribution", "AttnOutSite",
    "Checkpoint", "ConfigError", "Receiver", "characterise", "classify", "path_patch", "run_compare", "NumericalError", "RecipientState", "ResumeError", "attribute", "plan_chunks",
    "sweep_fingerprint", "token_budget",
    "DEFAULT_MODEL", "DataError", "HeadGrid", "HeadSite", "HiddenSite", "IOIConfig", "IOIResult", "LoadedModel",
    "MlpOutSite", "ModelLoadError", "PairBatch", "PairsFileError", "PromptPair", "SanityCheck", "SanityCheckError",
    "SiteError", "UnsupportedArchitectureError", "capture", "count_hooks", "generate_pairs", "get_adapter", "hooks",
    "ioi_scores", "last_logits", "load_model", "load_pairs_file", "logit_diff", "normalised_effect", "patch_variants",
    "patched", "plan_ioi", "prob_ratio", "run_chunk", "run_ioi", "run_sanity_checks", "supported_model_types", "token_prob",
    "tokenize_ioi", "tokenize_pairs", "wrap_model", "PairsConfig", "PairsResult", "patch", "run_pairs", "TASKS",
    "Task", "get_task", "register",
]
