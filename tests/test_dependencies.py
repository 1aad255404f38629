"""Dependencies = imports: setup.cfg's requirements are exactly the distributions tdd_lightning/ imports.

Every third-party top-level import of the package (function-level ones too, found with ast) is mapped
to its distribution with ``importlib.metadata.packages_distributions()`` and compared with the core
``install_requires``; the extras hold only what the package itself never imports (EXTRAS_ONLY says
why each one is there), and the tests import nothing that no requirement provides.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# imported lazily by an opt-in feature, with a one-line error when missing; declared as an extra
OPTIONAL_IMPORTS = {
    "bitsandbytes": "optimizer=adamw8bit (CUDA machines): `pip install .[adamw8bit]`",
}


# declared in an extra, never imported by tdd_lightning/ at start-up: why each one is declared
EXTRAS_ONLY = {
    "hydra-submitit-launcher": "Hydra loads it from conf/hydra/launcher (SLURM multiruns), by name",
    "pytest": "the test suite",
    "ruff": "make lint / make format",
    "nbformat": "tests/test_notebooks.py reads the notebooks",
    "nbclient": "tests/test_notebooks.py executes the notebooks",
    "ipykernel": "the kernel the notebooks run in",
    **OPTIONAL_IMPORTS,
}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(block: str) -> set[str]:
    """Distribution names of a setup.cfg requirement list (one a line; comments and versions dropped)."""
    names = set()
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group()))
    return names


def declared() -> tuple[set[str], dict[str, set[str]]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = {k: requirement_names(v) for k, v in cfg["options.extras_require"].items()}
    return requirement_names(cfg["options"]["install_requires"]), extras


def third_party_imports(folder: Path, own: str) -> dict[str, str]:
    """Top-level module name -> one file importing it, for every absolute non-stdlib import under folder."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                skip = (own, "tdd_lightning", "tests", *OPTIONAL_IMPORTS)
                if top not in sys.stdlib_module_names and top not in skip:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def distributions(imports: dict[str, str], known: set[str]) -> dict[str, str]:
    """Distribution -> the import that needs it (an import provided by several: the declared one)."""
    mapping = importlib.metadata.packages_distributions()
    out = {}
    for module, where in imports.items():
        dists = [normalize(d) for d in mapping.get(module, [])]
        assert dists, f"{module} (imported in {where}) belongs to no installed distribution"
        out[next((d for d in dists if d in known), dists[0])] = f"{module} ({where})"
    return out


def test_normalize_and_parse_requirements():
    block = "\n# a comment\ntorch>=2.4\nhuggingface_hub>=1.32  # inline\nPyYAML>=6.0\nhydra-core>=1.3.2\n"
    assert requirement_names(block) == {"torch", "huggingface-hub", "pyyaml", "hydra-core"}


def test_install_requires_equal_the_package_imports():
    core, extras = declared()
    imported = distributions(third_party_imports(ROOT / "tdd_lightning", "tdd_lightning"), core)
    undeclared = {d: why for d, why in imported.items() if d not in core}
    unused = core - set(imported)
    assert not undeclared, f"imported but not in install_requires: {undeclared}"
    assert not unused, f"in install_requires but never imported by tdd_lightning/: {sorted(unused)}"


def test_extras_are_only_what_the_package_does_not_import():
    core, extras = declared()
    imported = set(distributions(third_party_imports(ROOT / "tdd_lightning", "tdd_lightning"), core))
    for extra, names in extras.items():
        assert not names & core, f"[{extra}] repeats core requirements: {names & core}"
        assert names <= set(EXTRAS_ONLY), f"[{extra}]: say in EXTRAS_ONLY why {names - set(EXTRAS_ONLY)}"
    assert not imported & set(EXTRAS_ONLY), "the package imports these: move them to install_requires"
    assert set(EXTRAS_ONLY) == set().union(*extras.values()), "EXTRAS_ONLY names an undeclared extra"


def test_the_tests_import_only_declared_distributions():
    core, extras = declared()
    known = core | set().union(*extras.values())
    used = distributions(third_party_imports(ROOT / "tests", "tests"), known)
    assert not {d: why for d, why in used.items() if d not in known}
