"""The import graph of the installed layout, drawn from the source with ast (module-level and
function-level imports alike), and the two rules it must keep:

- the training/export side (slim_edge.* but the CLI and the demo, converters, devices, runtime_patches)
  never imports slim_edge.evals: evaluation code may use training code, not the other way round;
- shipped code (everything but slim_edge.evals.lab) never imports the lab: its research scripts may use
  shipped code, not the other way round, so that a script can change or go with its report;
- nothing in the package imports slim_edge.cli: it is the console entry, the top of the graph.

`python tests/test_imports.py` prints the arrows between the packages.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOP = ("slim_edge.cli", "slim_edge.demo")  # may use evaluation code: they run the whole job
LAB = "slim_edge.evals.lab"


PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def modules() -> dict[str, Path]:
    """Module name -> source file, from pyproject's package-dir (the names a wheel installs)."""
    found = {}
    for package, folder in PACKAGE_DIR.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _resolve(name: str, package: str, level: int) -> str:
    if level:
        base = package.split(".")
        base = base[: len(base) - level + 1]
        return ".".join(base + ([name] if name else []))
    return name


def import_graph() -> dict[str, set[str]]:
    """module -> the slim_edge modules it imports (a package when the import names no module of it)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        package = mod if path.stem == "__init__" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", package, node.level)
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        graph[mod] = {t for t in targets if t.split(".")[0] == "slim_edge" and t != mod}
    return graph


def area(mod: str) -> str:
    """The package (one folder of the tree) a module belongs to."""
    return max((p for p in PACKAGE_DIR if _is_under(mod, p)), key=len)


def training_side(mod: str) -> bool:
    return not _is_under(area(mod), "slim_edge.evals") and mod not in TOP


def _is_under(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def test_training_never_imports_evals():
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in import_graph().items()
        if training_side(m)
        for t in ts
        if _is_under(t, "slim_edge.evals")
    )
    assert not bad, "training/export code imports evaluation code:\n" + "\n".join(bad)


def test_shipped_code_never_imports_the_lab():
    bad = sorted(
        f"{m} -> {t}" for m, ts in import_graph().items() if not _is_under(m, LAB) for t in ts if _is_under(t, LAB)
    )
    assert not bad, f"shipped code imports the lab ({LAB}); move what it needs out of the lab:\n" + "\n".join(bad)


def test_the_graph_sees_the_lab():
    assert "slim_edge.evals.lab.qat_table" in import_graph()["slim_edge.evals.lab.ptq_zero_rule"]


def test_nothing_imports_the_cli():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if _is_under(t, "slim_edge.cli"))
    assert not bad, "only the console entry may import slim_edge.cli:\n" + "\n".join(bad)


def test_the_graph_sees_function_level_imports():
    assert "slim_edge.converters.gguf_retag" in import_graph()["slim_edge.cli"]  # imported inside retag_cmd()


def cross_arrows() -> list[str]:
    graph = import_graph()
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if area(m) != area(t))


if __name__ == "__main__":
    arrows = cross_arrows()
    counts = defaultdict(int)
    for a in arrows:
        m, t = a.split(" -> ")
        counts[f"{area(m)} -> {area(t)}"] += 1
    print("\n".join(arrows))
    print(f"\n{len(arrows)} arrows between packages:")
    print("\n".join(f"  {k}: {v}" for k, v in sorted(counts.items())))
    sys.exit(0)
