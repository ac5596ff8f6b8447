"""The ``actpatch`` command line: parse options, build a config, run, write the report folder.

    actpatch ioi --n-pairs 16 --out runs/demo      # the seed's experiment on the bundled model
    actpatch run --pairs-file facts.jsonl --positions subject END --out runs/facts   # your own task
    actpatch compare --models smollm2-135m gemma3-270m   # the same comparison on several models
    actpatch circuit ioi --method eap-ig --out runs/circuit   # the task's circuit and its faithfulness
    actpatch check-model my-org/my-model           # the self-test on your own model: feature x PASS/FAIL table
    actpatch models                                # supported architectures, bundled model status

Exit codes: 0 = done and every sanity check passed; 1 = a sanity check failed (results are still
written, and marked as failed), or a check-model feature failed; 2 = bad input (message from actpatch's error hierarchy);
130 = interrupted.

Each command is one module here with its options beside it (``ioi``, ``run``, ``compare``, ``circuit``,
``models``, ``check_model``; shared options in ``common``); this module assembles the parser and runs a command
with actpatch's logging, warnings and ``--quiet`` in place.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..errors import ActpatchError
from . import check_model, circuit, compare, ioi, models, run
from .check_model import cmd_check_model
from .circuit import cmd_circuit
from .common import memory_size
from .compare import cmd_compare, cmd_compare_tasks
from .ioi import _layer_list, cmd_dry_run, cmd_ioi
from .models import cmd_models
from .run import cmd_run

__all__ = ["build_parser", "main", "memory_size", "cmd_ioi", "cmd_dry_run", "cmd_run", "cmd_compare",
           "cmd_compare_tasks", "cmd_circuit", "cmd_models", "cmd_check_model"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actpatch",
        description="Activation patching for HuggingFace causal LMs: hidden states vs attention heads on IOI.",
    )
    parser.add_argument("--version", action="version", version=f"actpatch {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much actpatch logs to stderr (default: WARNING); INFO names each step")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (ioi, run, compare, circuit, models, check_model):  # the order of `actpatch --help`
        command.add_parser(sub)
    return parser


@contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """--quiet also silences transformers' own loading bars (restored afterwards).

    Its GGUF converter calls tqdm directly, past transformers' switch, so that name is swapped for a
    disabled tqdm for the duration.
    """
    if not quiet:
        yield
        return
    from unittest import mock

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", partial(tqdm, disable=True)):
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # src/actpatch: warnings raised anywhere in the package


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """actpatch's own warnings as one ``actpatch: warning:`` line; others as Python prints them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR) and issubclass(category, UserWarning):
        print(f"actpatch: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["run", "ioi"]:  # `actpatch run ioi ...` is `actpatch ioi ...`
        argv = ["ioi", *argv[2:]]
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("actpatch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("actpatch %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(args.log_level)
    try:
        if args.command == "models":
            return cmd_models()
        # transformers' loading bars follow ours: off with --quiet, and off when stderr is not a terminal
        quiet_loading = args.quiet or not sys.stderr.isatty()
        with _quiet_transformers(quiet_loading), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            commands = {"ioi": cmd_ioi, "run": cmd_run, "compare": cmd_compare, "circuit": cmd_circuit,
                        "check-model": cmd_check_model}
            return commands[args.command](args, argv)
    except ActpatchError as exc:
        print(f"actpatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actpatch: interrupted; hooks were removed, the model was left as loaded, and no results were "
              "written", file=sys.stderr)
        return 130
    except Exception:  # a bug, not bad input: exit status 1 stays reserved for failed sanity checks
        traceback.print_exc()
        print("actpatch: internal error (the traceback above); this is a bug in actpatch, please report it with the "
              "command line. Hooks were removed and no results were written.", file=sys.stderr)
        return 3
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
