"""A coarse-to-fine schedule of the teacher grid N: ``callbacks=[toy,teacher_grid]`` (conf/callbacks).

``grids`` lists [global step, N] pairs, the grid N used from that step on, e.g. ``[[0, 50], [300, 250]]``:
N = 50 for the first 300 steps, then 250 (a ``{step: N}`` mapping is read the same). A coarse grid
propagates the boundary condition in fewer jumps; a fine one is the more exact teacher. The last N must
be the strategy's own ``num_teacher_steps``: that grid is what the module records for inference and what
its exported LoRA carries, so the student ends on the grid it is sampled on. The grid in use follows
from the global step alone, so a resumed run continues on the right one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L

from tdd_lightning.errors import ConfigError, check, is_int

KEY = "callbacks.teacher_grid.grids"


class TeacherGridSchedule(L.Callback):
    def __init__(self, grids: Sequence[Sequence[int]] | Mapping[int, int]):
        pairs = list(grids.items()) if isinstance(grids, Mapping) else list(grids or [])
        ok = len(pairs) > 0 and all(len(p) == 2 and all(is_int(v) for v in p) for p in pairs)
        check(ok, KEY, grids, "a non-empty list of [global step, N] pairs")
        items = sorted((int(step), int(n)) for step, n in pairs)
        check(items[0][0] == 0, KEY, dict(items), "must give the N of step 0")
        check(all(n > 0 for _, n in items), KEY, dict(items), "every N must be > 0")
        self.grids = items

    def grid_at(self, step: int) -> int:
        """The N in use at global step ``step``."""
        return [n for start, n in self.grids if start <= step][-1]

    def on_fit_start(self, trainer, pl_module):
        final = pl_module.target_selection.N
        if self.grids[-1][1] != final:
            allowed = f"the last N must be target_selection.num_teacher_steps={final} (the recorded grid)"
            raise ConfigError(KEY, dict(self.grids), allowed)
        self.final = pl_module.target_selection
        self.stages = {n: self.final.with_grid(n) if n != final else self.final for _, n in self.grids}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        n = self.grid_at(trainer.global_step)
        if pl_module.target_selection.N != n:
            pl_module.target_selection = self.stages[n]
        pl_module.log("train/teacher_grid_N", float(n), on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module):
        pl_module.target_selection = self.final  # what evaluation and export see
