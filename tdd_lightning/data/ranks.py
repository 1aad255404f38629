"""This process's (rank, world size): the one place that asks the trainer, torch.distributed or the launcher.

The data layer needs it to split shards and batches over ranks, and the LightningModule to slice the
global batch's random draws; both import it from here.
"""

from __future__ import annotations

import os

import torch


def rank_and_world(trainer=None) -> tuple[int, int]:
    """(global rank, world size): the attached trainer's; else an initialised process group's; else the
    launcher's ``RANK`` / ``WORLD_SIZE`` environment (torchrun, SLURM via Lightning); else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (a collective: every rank must call it); [obj] without a
    process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]
