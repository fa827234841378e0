"""The house stays as drawn (docs/architecture.md): each folder of ``sinkguard`` imports only the
folders below it, lazy imports inside functions included, and no modules import each other in a
circle. Read from the source with ``ast``, so a forbidden import fails here before it runs anywhere."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import sinkguard

PACKAGE = Path(sinkguard.__file__).parent
BASE = {"sinkguard", "sinkguard.errors", "sinkguard._version"}  # importable from everywhere

# layer -> the layers it may import (besides itself and BASE); the longest matching prefix names a module's layer
ALLOWED: dict[str, set[str]] = {
    "sinkguard.core": set(),
    "sinkguard.interventions": {"sinkguard.core"},
    "sinkguard.sources": {"sinkguard.core"},
    "sinkguard.engines.architectures": set(),
    "sinkguard.engines.hf": {"sinkguard.core", "sinkguard.interventions", "sinkguard.sources",
                             "sinkguard.engines.architectures"},
    "sinkguard.serving": {"sinkguard.core", "sinkguard.interventions"},
    "sinkguard.engines.vllm": {"sinkguard.core", "sinkguard.interventions", "sinkguard.serving",
                               "sinkguard.engines.architectures"},
    "sinkguard.offline": {"sinkguard.core", "sinkguard.interventions", "sinkguard.sources", "sinkguard.engines.hf",
                          "sinkguard.engines.architectures"},
    "sinkguard.evaluation": {"sinkguard.core", "sinkguard.interventions", "sinkguard.sources", "sinkguard.serving",
                             "sinkguard.engines.hf"},
    "sinkguard.cli": {"*"},
    "sinkguard.__main__": {"sinkguard.cli"},
    "sinkguard.__init__": {"sinkguard.core", "sinkguard.offline"},  # the public API: scan/calibrate lazily
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> str | None:
    if module in BASE:
        return None
    if module == "sinkguard.__main__":
        return module
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else "<no layer>"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every ``sinkguard`` module ``path`` imports (module level and inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "sinkguard"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "sinkguard":
            found.append((node.lineno, node.module))
            # ``from sinkguard.cli import ab``: the names may be submodules themselves
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                      or (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/") / "__init__.py").exists()]
    return found


def module_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def violations() -> list[str]:
    found = []
    for module, path in module_files().items():
        own = "sinkguard.__init__" if module == "sinkguard" else layer_of(module)
        allowed = ALLOWED.get(own, set())
        for line, target in imports_of(path):
            target_layer = layer_of(target)
            if own == "<no layer>":
                found.append(f"{module} belongs to no layer (add it to a folder and to ALLOWED)")
            elif target_layer is None or target_layer == own or "*" in allowed:
                continue
            elif not any(target_layer == a or target_layer.startswith(a + ".") for a in allowed):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} may not import {target}")
    return found


def cycles() -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan) in the graph of every sinkguard import."""
    files = module_files()
    graph = {m: sorted({t for _, t in imports_of(p) if t in files and t != m}) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_every_folder_imports_only_the_folders_below_it():
    assert violations() == []


def test_no_modules_import_each_other_in_a_circle():
    assert cycles() == []


def test_the_rules_see_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a core module that imports the vLLM adapter is reported."""
    fake = tmp_path / "sinkguard" / "core" / "leaky.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from sinkguard.engines.vllm import plugin\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "sinkguard")
    assert violations() == ["sinkguard/core/leaky.py:2: sinkguard.core may not import sinkguard.engines.vllm"]
