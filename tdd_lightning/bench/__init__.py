"""Benchmark of the real training step: phases, compute floor, naive baseline, FLOPs, memory.

``python -m tdd_lightning.bench --help``; the figures of record are in docs/results/performance.md.
"""
