"""The package's layers: folders that import only from the layers before them (README's Layout table), and an
engine that reaches no task."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "actpatch"


def _table() -> dict[str, tuple[int, list[str]]]:
    """README's Layout table: folder ("" for the root) -> (layer, module names)."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (`([a-z]+)/`|the root) \| (.+) \|$", section, flags=re.M)
    assert rows, "README's Layout section lost its table"
    return {folder: (int(layer), re.findall(r"`([a-z_]+)`", mods)) for layer, _, folder, mods in rows}


def _module(path: Path) -> str:
    """'engine.batch' for src/actpatch/engine/batch.py, 'cli' for src/actpatch/cli.py."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """The package modules a file imports (relative imports, top level or inside functions), as 'folder.module'."""
    here = path.relative_to(PACKAGE).parent.parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
            parts = base + (node.module.split(".") if node.module else [])
            names = [".".join(parts)] if node.module else [".".join(parts + [a.name]) for a in node.names]
            for name in names:
                if (PACKAGE / (name.replace(".", "/") + ".py")).is_file():
                    found.add(name)
                elif name and (PACKAGE / name.replace(".", "/")).is_dir():
                    found.add(name + ".__init__")
    return found


def _layer_of(module: str, table) -> tuple[str, int]:
    folder = module.split(".")[0] if "." in module else ""
    return folder, table[folder][0] if folder in table else -1


def test_every_module_is_in_the_readme_table():
    table = _table()
    listed = {(f"{folder}.{m}" if folder else m) for folder, (_, mods) in table.items() for m in mods}
    files = {_module(p) for p in PACKAGE.rglob("*.py") if p.stem != "__init__" and "__pycache__" not in p.parts}
    assert sorted(files - listed - {"errors", "__main__"}) == [], "modules missing from README's Layout table"
    assert sorted(listed - files) == [], "README's Layout table names modules that do not exist"


def test_layers_import_only_from_the_layers_before_them():
    table, wrong = _table(), []
    for path in PACKAGE.rglob("*.py"):
        if "__pycache__" in path.parts or path.parent == PACKAGE:
            continue  # the package root re-exports everything; errors is imported by all
        me = _module(path)
        folder, rank = _layer_of(me, table)
        for dep in _imports(path):
            dep_folder, dep_rank = _layer_of(dep, table)
            if dep.split(".")[0] == "errors" or dep == "__init__":
                continue
            if dep_folder != folder and dep_rank >= rank:
                wrong.append(f"{me} (layer {rank}) imports {dep} (layer {dep_rank})")
    assert wrong == [], wrong


def test_the_engine_imports_no_task():
    """Follow every engine module's imports, transitively: none reaches tasks/."""
    reached, todo = set(), [_module(p) for p in (PACKAGE / "engine").glob("*.py")]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += list(_imports(PACKAGE / (name.replace(".", "/") + ".py")))
    assert {n for n in reached if n.startswith("tasks.")} == set(), sorted(reached)
    assert "engine.batch" in reached and any(d.startswith("tasks.") for d in _imports(PACKAGE / "experiment" / "config.py"))


def test_the_package_docstring_names_the_layers():
    import actpatch

    doc = " ".join(actpatch.__doc__.split())
    assert "model -> engine -> tasks, analysis -> experiment -> report -> cli" in doc
