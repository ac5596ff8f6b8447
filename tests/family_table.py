"""The README's family x feature table, made from check-model's self-test on every family of ``tests/families.py``.

    .venv/bin/python tests/family_table.py      # runs the self-test on each tiny family, rewrites README's table

``test_families.test_readme_family_table_is_current`` renders the same table from the test run's own results and
fails when the README differs, so the table cannot drift from what the tests measured.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

START, END = "<!-- family-table: made by tests/family_table.py -->", "<!-- /family-table -->"
MARK = {"PASS": "✓", "FAIL": "✗", "UNSUPPORTED": "–"}


def render(results: dict) -> str:
    """Markdown for ``results`` (family -> SelfTest), families in the order given by ``families.CONFIGS``."""
    from families import CONFIGS

    from actpatch.experiment.selftest import FEATURES
    from actpatch.model.architectures import supported_model_types

    head = "| family (config) | model_type | " + " | ".join(FEATURES) + " |"
    lines = [head, "|" + "---|" * (len(FEATURES) + 2)]
    reasons: dict[str, list[str]] = {}
    for family in CONFIGS:
        report = results[family]
        status = {c.feature: c.status for c in report.checks}
        for c in report.checks:
            if c.status == "UNSUPPORTED":
                reasons.setdefault(f"{c.feature}: {c.detail}", []).append(family)
        cells = [MARK.get(status.get(f, "FAIL"), "?") for f in FEATURES]
        lines.append(f"| {family} | {report.model.get('model_type')} | " + " | ".join(cells) + " |")
    notes = [f"- – {why} ({', '.join(fams)})" for why, fams in reasons.items()]
    types = "Every model_type with an entry: " + ", ".join(f"`{m}`" for m in supported_model_types()) + "."
    return "\n".join([START, "", *lines, "", "✓ passes, ✗ fails, – unsupported:", *notes, "", types, "", END])


def main() -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_model
    from families import CONFIGS

    from actpatch import wrap_model
    from actpatch.experiment.selftest import self_test

    results = {f: self_test(wrap_model(tiny_model(f).to(torch.float64), None)) for f in CONFIGS}
    readme = Path(__file__).parent.parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    table = render(results)
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: table, text, flags=re.S)
    else:
        raise SystemExit(f"README.md has no {START!r} marker: put it where the table goes")
    readme.write_text(text, encoding="utf-8")
    failed = [f for f, r in results.items() if not r.passed]
    print(f"wrote the table for {len(results)} families" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
