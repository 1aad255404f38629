"""``make device-wheels``: the pure-Python wheels the GPU image lacks, for its Python (3.12), in one folder.

    python -m tdd_lightning.bench.device_wheels [--out .device-wheels]

The GPU image (/work/.library/device/KINDS.md) has torch, lightning, transformers, safetensors, accelerate,
huggingface-hub, pyyaml, pillow, numpy, tqdm and matplotlib at versions our setup.cfg accepts, but not
diffusers, hydra-core, omegaconf (and its antlr4-python3-runtime), webdataset and braceexpand; its peft
version is not known, so peft travels too (the copy on PYTHONPATH wins). wandb stays behind: it is
imported only with ``logger=wandb`` and ``toy.eval --wandb``, and its wheels are platform-specific.
Each wheel is the version installed here, checked against setup.cfg's bounds; antlr4-python3-runtime
4.9.3 exists only as an sdist, so it is built into a (pure-Python) wheel here. Then: the list with sizes,
the working tree's size (the two together must fit the device's 64 MiB), each wheel's requirements
against the image's packages, and a dry ``pip install --no-index --no-deps --target`` into a temp folder.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata as md
import operator
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "diffusers", "hydra-core", "omegaconf", "antlr4-python3-runtime", "webdataset", "braceexpand", "peft",
)  # fmt: skip
SDIST_ONLY = {"antlr4-python3-runtime"}  # no wheel on PyPI: built here (pure Python)
LIMIT_MIB = 64
# what the GPU image holds (KINDS.md, "Python packages already there"), for the requirement check
DEVICE_IMAGE = set(
    "accelerate certifi charset-normalizer filelock fsspec huggingface-hub idna jinja2 lightning "
    "lightning-utilities matplotlib numpy packaging pillow psutil pyyaml regex requests safetensors "
    "tokenizers torch tqdm transformers typing-extensions urllib3 zipp pytorch-lightning".split()
)
# declared but not needed on the device's Python: diffusers imports importlib_metadata below 3.8 only
NOT_NEEDED = {"importlib-metadata"}


OPS = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">=": operator.ge, ">": operator.gt}
OPS["!="] = operator.ne
DEVICE_PYTHON = (3, 12)


def canonicalize_name(name: str) -> str:
    """PEP 503: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(v: str) -> tuple[int, ...]:
    """The leading numeric release of a version: ``1.0.2rc1`` -> (1, 0, 2)."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", v).group().split("."))


def bounds() -> dict[str, tuple[int, ...]]:
    """setup.cfg's install_requires lower bounds (all of them ``name>=X``), by canonical name."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    found = {}
    for line in cfg["options"]["install_requires"].splitlines():
        m = re.match(r"\s*([A-Za-z0-9._-]+)\s*>=\s*([\d.]+)", line)
        if m:
            found[canonicalize_name(m.group(1))] = version_tuple(m.group(2))
    return found


def pinned(name: str, lower: dict[str, tuple[int, ...]]) -> str:
    """``name==<installed version>``, refused if setup.cfg's lower bound does not accept it."""
    version = md.version(name)
    bound = lower.get(canonicalize_name(name))
    if bound is not None and version_tuple(version) < bound:
        raise SystemExit(f"error: installed {name} {version} is below setup.cfg's >= {bound}")
    return f"{name}=={version}"


def download(spec: str, out: Path) -> None:
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    name = spec.split("==")[0]
    if name in SDIST_ONLY:
        cmd = [*pip, "wheel", "--no-deps", "--no-binary", name, "-w", str(out), spec]
    else:
        cmd = [*pip, "download", "--no-deps", "--only-binary", ":all:", "--python-version", "3.12"]
        cmd += ["--platform", "any", "-d", str(out), spec]
    subprocess.run(cmd, check=True)


def wheel_name(path: Path) -> str:
    return canonicalize_name(path.name.split("-")[0])


def applies(marker: str) -> bool:
    """Whether a Requires-Dist marker holds on the device: extras never; ``python_version`` comparisons
    (joined by ``and``) against 3.12; any other marker is kept (conservative)."""
    if "extra" in marker:
        return False
    tests = re.findall(r"python_version\s*(<=|>=|==|!=|<|>)\s*[\"']([\d.]+)[\"']", marker)
    return all(OPS[op](DEVICE_PYTHON, version_tuple(v)) for op, v in tests)


def requirements(wheel: Path) -> list[str]:
    """The distribution names of the wheel's Requires-Dist that apply on the device (Python 3.12)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    names = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req, _, marker = line.split(":", 1)[1].partition(";")
            if applies(marker):
                names.append(canonicalize_name(re.match(r"\s*([A-Za-z0-9._-]+)", req).group(1)))
    return names


def tree_bytes() -> int:
    """What travels to the device: tracked and untracked-not-ignored files."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tdd_lightning.bench.device_wheels", description=__doc__)
    p.add_argument("--out", default=str(ROOT / ".device-wheels"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    reqs = bounds()
    specs = [pinned(n, reqs) for n in PACKAGES]
    wanted = {canonicalize_name(n) for n in PACKAGES}
    for old in out.glob("*.whl"):  # one version of each, and nothing else
        if wheel_name(old) not in wanted or not any(
            old.name.lower().startswith(s.replace("-", "_").replace("==", "-").lower() + "-") for s in specs
        ):
            old.unlink()
    for spec in specs:
        have = spec.replace("-", "_").replace("==", "-").lower() + "-"
        if not any(w.name.lower().startswith(have) for w in out.glob("*.whl")):
            download(spec, out)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels in {out}:")
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    tree = tree_bytes()
    print(f"  {total / 2**20:7.2f} MiB  wheels in all; working tree {tree / 2**20:.2f} MiB; together "
          f"{(total + tree) / 2**20:.2f} MiB of the device's {LIMIT_MIB} MiB")  # fmt: skip
    missing = set()
    for w in wheels:
        for n in requirements(w):
            if n not in wanted and n not in DEVICE_IMAGE and n not in NOT_NEEDED:
                missing.add(f"{n} (for {wheel_name(w)})")
    print("requirements not on the image and not carried: " + (", ".join(sorted(missing)) or "none"))
    with tempfile.TemporaryDirectory(prefix="tdd-dry-site-") as site:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*cmd, "--target", site, *map(str, wheels)], check=True)
        installed = sorted(x.name for x in Path(site).glob("*.dist-info"))
        print(f"dry install into a temp folder: {len(installed)} packages ({', '.join(installed)})")
    if len(installed) != len(wheels) or total + tree > LIMIT_MIB * 2**20 or missing:
        print("error: the wheels do not cover the device (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
