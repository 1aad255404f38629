"""Run one small fit for the distributed tests in its own process: python -m tests.distributed_fit ...

Lightning's script launchers (ddp, ModelParallelStrategy) re-run the command for each rank, so they
cannot be started from inside pytest; the tests call this module in a subprocess instead.
"""

import argparse
from pathlib import Path

from tests.test_distributed import fit

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    p.add_argument("--adversarial", action="store_true", help="with adversarial=hinge")
    a = p.parse_args()
    if a.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=a.devices, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    fit(a.model, a.out, a.tag, a.devices, strategy, adversarial=a.adversarial)
