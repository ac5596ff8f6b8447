"""``actpatch check-model``: the self-test of every patching feature on a model, as a PASS / FAIL table or JSON."""

from __future__ import annotations

import argparse

from ..experiment.selftest import check_model, summary
from ..model.models import BUNDLED, DTYPES


def add_parser(sub) -> None:
    """Register ``check-model`` and its options."""
    chk = sub.add_parser(
        "check-model", help="self-test every patching feature on a model (yours): PASS / FAIL / UNSUPPORTED per feature",
        description="Find the model's adapter (or build one from its module tree) and check every feature on 2 pairs of "
        "random token ids against the independent reference. Exit status: 0 all supported features pass, 1 one "
        "fails, 2 bad input.")
    chk.add_argument("model", help="a hub id, a local checkpoint folder (a tokenizer is not needed), a .gguf file "
                     f"or a bundled name ({', '.join(BUNDLED)})")
    chk.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    chk.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    chk.add_argument("--dtype", default="float32", choices=list(DTYPES))
    chk.add_argument("--trust-remote-code", action="store_true", help="let transformers run the checkpoint's own code")
    chk.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)


def cmd_check_model(args: argparse.Namespace, argv: list[str]) -> int:
    report, _ = check_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(report.to_json() if args.json else report.table() + "\n\n" + summary(report))
    return 0 if report.passed else 1
