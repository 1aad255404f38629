"""Lightning callbacks: sample grids, histograms, throughput, preemption, LoRA export beside
checkpoints, the toy's end-of-training evaluation."""

from tdd_lightning.callbacks.export import LoRAExport
from tdd_lightning.callbacks.grid import SampleGrid
from tdd_lightning.callbacks.monitors import SamplesPerSecond, TimeHistograms
from tdd_lightning.callbacks.preemption import Preemption
from tdd_lightning.callbacks.toy_eval import ToyEvaluation

__all__ = ["LoRAExport", "Preemption", "SampleGrid", "SamplesPerSecond", "TimeHistograms", "ToyEvaluation"]
