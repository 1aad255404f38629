"""Sample a toy run's teacher cells first: ``python -m tdd_lightning.toy.warm experiment=toy_tdd``.

The toy callbacks (``toy_eval``: the final table's teacher rows and agreement reference; ``toy_curves``:
the curves' agreement reference) sample the teacher once per machine and keep the results in their disk
cache. This does that sampling up front, from the same composed config the run will use (the same
overrides), so that ``make train`` shows it as a one-time set-up phase. A cell already cached costs only
the cache read; a config whose cells differ (another CFG, n or seed) warms those cells. The run itself
reads the cache and recomputes whatever is missing, so skipping this never changes a result.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WARMED = ("toy_eval", "toy_curves")  # callbacks with a teacher to sample
SKIPPED_KEYS = ("_target_", "out_dir")  # out_dir needs a running Hydra job, and warming writes no report


def callback_kwargs(node) -> dict:
    """The callback's arguments, each resolved on its own (``out_dir`` left out)."""
    from omegaconf import OmegaConf

    return {k: OmegaConf.to_object(node[k]) if OmegaConf.is_config(node[k]) else node[k]
            for k in node if k not in SKIPPED_KEYS}  # fmt: skip


def warm(cfg, log=print) -> list[str]:
    """Warm the teacher cells of every toy callback in ``cfg``; the names of the callbacks warmed."""
    from hydra.utils import get_class

    callbacks = cfg.get("callbacks") or {}
    teacher = str(cfg.model.pretrained)
    uncond = cfg.guidance.get("uncond")
    done = []
    for name in WARMED:
        node = callbacks.get(name)
        if node is None:
            continue
        callback = get_class(node["_target_"])(**callback_kwargs(node))
        t0 = time.time()
        callback.warm(teacher, uncond)
        log(f"{name}: teacher cells ready ({time.time() - t0:.0f} s)")
        done.append(name)
    return done


def main(argv: list[str] | None = None) -> int:
    from tdd_lightning.errors import exit_on_user_error
    from tdd_lightning.training import resolvers
    from tdd_lightning.training.overrides import compose, first_of_sweeps, overrides_from_argv, precheck

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    os.environ.setdefault("TDD_ROOT", str(ROOT))
    resolvers.register()

    overrides = overrides_from_argv(argv)
    if overrides is None:
        raise SystemExit("toy.warm: --config-name/--config-path are not supported; give overrides only")

    def run() -> int:
        precheck(argv, str(ROOT / "conf"), "train")  # an unknown key: one line naming the valid ones
        cfg = compose(str(ROOT / "conf"), "train", first_of_sweeps(overrides))
        if not warm(cfg):  # not an error: the run needs no teacher cells
            print("toy.warm: no toy callback (toy_eval, toy_curves) in this config: nothing to warm")
        return 0

    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
