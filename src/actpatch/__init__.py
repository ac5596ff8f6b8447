"""actpatch: activation patching for HuggingFace causal LMs: IOI built in, and any contrastive task of your own.

Layers, each a folder that imports only from the ones before it (README's Layout table, checked by a test):
model -> engine -> tasks, analysis -> experiment -> report -> cli. The engine imports no task.

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

from .engine.attribution import Attribution, attribute
from .engine.batch import PairBatch, tokenize_pairs
from .engine.capture import ActivationCache, capture, last_logits
from .model.adapters import ARCHITECTURES, Adapter, Architecture, get_adapter, supported_model_types
from .errors import (
    ActpatchError, ConfigError, DataError, ModelLoadError, NumericalError, PairsFileError, ResumeError,
    SanityCheckError, SiteError, UnsupportedArchitectureError,
)
from .analysis.headclasses import class_rules, classify, near_misses
from .analysis.heads import characterise
from .analysis.patterns import AttentionPatterns, patterns
from .engine.checkpoint import Checkpoint, sweep_fingerprint
from .engine.continuation import ContinuationState, Readout
from .engine.generation import generate_patched
from .engine.hooks import count_hooks, hooks
from .engine.metrics import continuation_scores, ioi_scores, logit_diff, normalised_effect, prob_ratio, token_prob
from .engine.pairs import PromptPair, load_pairs_file
from .engine.patching import patch_variants, patched, run_chunk
from .engine.patternsite import PatternSite
from .engine.paths import Receiver, path_patch
from .engine.planning import plan_chunks, token_budget
from .engine.prefix import RecipientState
from .engine.sanity import SanityCheck, run_sanity_checks
from .engine.sites import AttnOutSite, HeadSite, HiddenSite, MlpOutSite
from .engine.eap_scores import edge_scores
from .engine.edge_patching import edge_patched_logits, sender_outputs
from .engine.circuit_graph import Graph, build_graph
from .experiment.circuit_discovery import CircuitConfig, run_circuit
from .experiment.circuit_result import CircuitResult
from .experiment.compare import run_compare
from .experiment.config import IOIConfig
from .experiment.contrast import PairsConfig, patch, run_pairs
from .experiment.experiments import plan_ioi, run_ioi
from .experiment.pairsresult import PairsResult
from .experiment.results import HeadGrid, IOIResult
from .experiment.selftest import SelfTest, check_model, load_checked, self_test
from .model.models import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .tasks.ioi import generate_pairs, tokenize_ioi
from .tasks.registry import TASKS, Task, get_task, register
from .report import plots as _plots  # noqa: F401,E402  registers the kinds of IOIResult.plot()
from .report import patternplots as _patternplots  # noqa: F401,E402  registers AttentionPatterns.plot_pattern

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
    "Task", "get_task", "register", "CircuitConfig", "CircuitResult", "Graph", "build_graph", "edge_patched_logits",
    "edge_scores", "run_circuit", "sender_outputs", "SelfTest", "check_model", "load_checked", "self_test",
    "ContinuationState", "Readout", "continuation_scores", "generate_patched", "AttentionPatterns", "patterns", "class_rules", "near_misses", "PatternSite",
]
