"""Lightning callbacks: sample grids, t/s histograms, throughput."""

from tdd_lightning.callbacks.grid import SampleGrid
from tdd_lightning.callbacks.monitors import SamplesPerSecond, TimeHistograms

__all__ = ["SampleGrid", "SamplesPerSecond", "TimeHistograms"]
