"""Lightning callbacks: sample grids, t/s histograms, throughput, LoRA export beside checkpoints."""

from tdd_lightning.callbacks.export import LoRAExport
from tdd_lightning.callbacks.grid import SampleGrid
from tdd_lightning.callbacks.monitors import SamplesPerSecond, TimeHistograms

__all__ = ["LoRAExport", "SampleGrid", "SamplesPerSecond", "TimeHistograms"]
