"""Imports flow one way (docs/ARCHITECTURE.md): a module never imports from a layer above its own, and
the top-level units (subpackages and root modules) form no cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tdd_lightning"

# lowest first; a unit may import from its own layer or any layer below (never above)
LAYERS: list[set[str]] = [
    {"errors", "checkpoint_io", "plotting", "progress", "diffusion"},  # pure maths and leaf helpers
    {"strategies", "models"},  # the method's swappable parts; model loading, families, LoRA roles
    {"data"},  # webdataset shards, preprocessing, offline encode
    # the LightningModule (and its adversarial step) and its glue
    {"module", "adversarial", "scheduling_tdd", "scheduling_tdd_flow", "export", "pipelines", "training"},
    {"toy", "bench", "sample"},  # tools built on everything: toy benchmark, performance bench, sampler
]


def unit_of(module: str) -> str:
    """``tdd_lightning.training.run`` -> ``training``; ``tdd_lightning`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise KeyError(unit)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every tdd_lightning import in the file, function-level ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("tdd_lightning")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = here.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if not name.startswith("tdd_lightning"):
                continue
            if name == "tdd_lightning":  # from tdd_lightning import x: x is the unit
                out += [(node.lineno, f"tdd_lightning.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, name))
    return out


def edges() -> list[tuple[str, int, str, str]]:
    """(file, line, from unit, to unit) for every import between two different units."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(module_name(path))
        for line, name in imported_modules(path):
            dst = unit_of(name)
            if dst not in ("__init__", src):
                found.append((str(path.relative_to(PACKAGE.parent)), line, src, dst))
    return found


def test_every_unit_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    units |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    unknown = sorted(u for u in units if not any(u in layer for layer in LAYERS))
    assert not unknown, f"add these to LAYERS (and docs/ARCHITECTURE.md): {unknown}"


def test_no_import_from_a_layer_above():
    upward = [
        f"{file}:{line}: {src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for file, line, src, dst in edges()
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for _, _, src, dst in edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a, {b}))
    assert not cycles, f"cycles between units: {cycles}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The test is live: a diffusion module importing the LightningModule is reported."""
    fake = tmp_path / "tdd_lightning"
    (fake / "diffusion").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "diffusion" / "__init__.py").write_text("")
    (fake / "diffusion" / "bad.py").write_text("def f():\n    from tdd_lightning.module import TDDModule\n")
    (fake / "module.py").write_text("from .diffusion import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"diffusion/bad.py:2: diffusion \(layer 0\) imports module"):
        test_no_import_from_a_layer_above()
