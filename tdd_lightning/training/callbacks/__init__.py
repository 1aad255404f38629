"""Lightning callbacks: sample grids, histograms, throughput, preemption, LoRA export beside checkpoints,
checkpoint retention, a coarse-to-fine teacher grid.

(The toy's end-of-training evaluation lives with the toy: ``tdd_lightning.toy.callback``.)
"""

from tdd_lightning.training.callbacks.crash import CrashCheckpoint
from tdd_lightning.training.callbacks.export import LoRAExport
from tdd_lightning.training.callbacks.grid import SampleGrid
from tdd_lightning.training.callbacks.grid_schedule import TeacherGridSchedule
from tdd_lightning.training.callbacks.monitors import SamplesPerSecond, TimeHistograms
from tdd_lightning.training.callbacks.preemption import Preemption
from tdd_lightning.training.callbacks.retention import CheckpointRetention

__all__ = [
    "CheckpointRetention",
    "CrashCheckpoint",
    "LoRAExport",
    "Preemption",
    "SampleGrid",
    "SamplesPerSecond",
    "TeacherGridSchedule",
    "TimeHistograms",
]
