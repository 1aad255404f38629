"""Lightning callbacks: sample grids, histograms, throughput, preemption, LoRA export beside checkpoints."""

from tdd_lightning.callbacks.export import LoRAExport
from tdd_lightning.callbacks.grid import SampleGrid
from tdd_lightning.callbacks.monitors import SamplesPerSecond, TimeHistograms
from tdd_lightning.callbacks.preemption import Preemption

__all__ = ["LoRAExport", "Preemption", "SampleGrid", "SamplesPerSecond", "TimeHistograms"]
