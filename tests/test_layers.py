"""Imports point one way: manifests -> encoders -> store/extract -> heads -> train -> evaluate -> sweep -> cli.

Read from the source (every import, the lazy ones inside functions too), so a back-edge fails here rather
than as an import cycle on some later day."""

from __future__ import annotations

import ast
from pathlib import Path

import fercache

ROOT = Path(fercache.__file__).parent

# Each module may import its own layer's modules (without a cycle) and those of the layers before it.
LAYERS = [
    {"errors", "registry", "labels", "metrics", "report", "devices", "published"},
    {"manifests", "adapters", "audit", "preprocess", "faces", "video"},
    {"encoders"},
    {"store", "extract", "data"},
    {"heads"},
    {"train", "recipe", "aus", "loop", "rundir", "stacked"},
    {"scoring", "neighbours", "compare", "runs", "predict", "tracking"},
    {"protocols", "sweeps", "bench", "backbones"},
    {"api", "pipeline"},
    # The package's own __init__ hands out the Python API (api), so it comes last: nothing imports it but the CLI.
    {"cli", "__main__", "fercache"},
]


def _unit(module: str) -> str:
    """The layer entry of a dotted module name: fercache.heads.mask -> heads, fercache -> fercache."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Which layer entries each one imports."""
    graph: dict[str, set[str]] = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("").parts
        package = rel[:-1]  # what a relative import starts from, for a package's __init__ too
        me = _unit(".".join(rel if f.name != "__init__.py" else package))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ((node.module,) if node.module else ()))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fercache"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("fercache")]
            else:
                continue
            graph.setdefault(me, set()).update(u for u in map(_unit, names) if u != me)
    return graph


def _layer(unit: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) if unit in layer]
    assert found, f"fercache/{unit} is in no layer: add it to LAYERS in {__file__}"
    return found[0]


def test_every_module_imports_only_its_own_or_earlier_layers():
    back = [f"{a} -> {b}" for a, deps in _imports().items() for b in deps if _layer(b) > _layer(a)]
    assert not back, f"imports against the layering: {back}"


def test_no_import_cycle_inside_a_layer():
    graph = _imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    cycles = sorted(u for u in graph if reaches(u, u, {u}))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_check_sees_lazy_imports_and_would_catch_a_back_edge(tmp_path):
    # the rule must be able to fail: a function-level import of the CLI from a head is a back-edge
    pkg = tmp_path / "fercache"
    (pkg / "heads").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("")
    (pkg / "heads" / "__init__.py").write_text("")
    (pkg / "heads" / "bad.py").write_text("def f():\n    from ..cli import app\n")
    graph = _imports(pkg)
    assert graph["heads"] == {"cli"} and _layer("cli") > _layer("heads")
