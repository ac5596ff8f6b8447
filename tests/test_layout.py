"""The package's one-way data flow: each module imports only from modules to its left in README's Layout line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "actpatch"


def _chain() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1]
    arrows = re.search(r"`([a-z_]+(?: →\s+[a-z_]+)+)`", section)
    assert arrows, "README's Layout section lost its `a → b → ...` line"
    return [m.strip() for m in arrows.group(1).split("→")]


def _local_imports(path: Path) -> set[str]:
    """Sibling modules a file imports (``from .x import``, ``from . import x``), top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # ``from . import plots``; ``from . import __version__`` reads the package, not a module
                found.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file())
    return found


def test_every_module_is_in_the_readme_chain():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "errors"}
    chain = _chain()
    assert sorted(modules - set(chain)) == [], "modules missing from README's Layout line"
    assert sorted(set(chain) - modules) == [], "README's Layout line names modules that do not exist"


def test_modules_import_only_from_their_left():
    chain = _chain()
    rank = {m: i for i, m in enumerate(chain)}
    wrong = []
    for name in chain:
        for dep in _local_imports(PACKAGE / f"{name}.py") - {"errors", "__init__"}:
            if dep not in rank or rank[dep] >= rank[name]:
                wrong.append(f"{name} imports {dep}")
    assert wrong == [], wrong


def test_the_package_docstring_names_the_same_chain():
    import actpatch

    doc = " ".join(actpatch.__doc__.split())
    assert " -> ".join(_chain()) in doc


ENGINE = ["sites", "hooks", "pairs", "batch", "capture", "reference", "checkpoint", "prefix", "planning", "patching",
          "distributed", "metrics", "attribution", "sanity", "pooling"]
TASK_MODULES = {"tasks", "ioi"}


def test_the_engine_imports_no_task():
    """Follow every engine module's imports, transitively: none reaches a task (ioi) or the task registry."""
    reached, todo = set(), list(ENGINE)
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += [d for d in _local_imports(PACKAGE / f"{name}.py") if (PACKAGE / f"{d}.py").is_file()]
    assert reached & TASK_MODULES == set(), f"the engine reaches {sorted(reached & TASK_MODULES)}"
    assert "ioi" in _local_imports(PACKAGE / "experiments.py")  # the check can see an import when there is one
