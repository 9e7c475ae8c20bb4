"""Hop memory sharded like the parameters (``strategy='fsdp'``).

What a hypergradient method keeps across outer steps for a hop (a warm start's solution,
f2sa's penalized copy) is a list of parameter-sized tensors. Under FSDP, between global steps
every rank keeps only its shard of the parameters, and so of this memory: the list is held as
this rank's ``1/W`` of its concatenation (`ShardedVector`), gathered at the start of a global
step (one all-gather per list) and sharded again at its end. Inside a step the methods see
whole tensors, as on one process. A checkpoint gathers them first (they are written whole
with the rest of the small state, so any number of processes reads them back).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class ShardedVector:
    """This rank's part of a list of tensors: elements ``[r P, (r + 1) P)`` of their
    concatenation, ``P = ceil(n / W)``, zero-padded to ``P``."""

    def __init__(self, tensors: list[Tensor], rank: int, world_size: int) -> None:
        self.shapes = [t.shape for t in tensors]
        self.world_size = world_size
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self.numel = flat.numel()
        per = -(-self.numel // world_size)
        part = flat[rank * per:(rank + 1) * per]
        self.local = flat.new_zeros(per)
        self.local[: part.numel()] = part

    def gather(self) -> list[Tensor]:
        """The whole tensors again (a collective: every rank calls it)."""
        parts = [torch.empty_like(self.local) for _ in range(self.world_size)]
        dist.all_gather(parts, self.local)
        flat = torch.cat(parts)[: self.numel]
        sizes = [s.numel() for s in self.shapes]
        return [piece.view(shape) for piece, shape in zip(flat.split(sizes), self.shapes)]


def _shardable(value: Any, world_size: int) -> bool:
    """A list of floating tensors of one dtype and device, worth splitting."""
    if not isinstance(value, list) or not value \
            or not all(isinstance(t, Tensor) and t.is_floating_point() for t in value):
        return False
    first = value[0]
    return all(t.dtype == first.dtype and t.device == first.device for t in value) \
        and sum(t.numel() for t in value) >= world_size


def shard(memories: Iterable[dict[str, Any]], rank: int, world_size: int) -> None:
    """Every shardable entry of ``memories`` becomes this rank's `ShardedVector`."""
    for memory in memories:
        for key, value in list(memory.items()):
            if _shardable(value, world_size):
                memory[key] = ShardedVector(value, rank, world_size)


def gather(memories: Iterable[dict[str, Any]]) -> bool:
    """Every `ShardedVector` of ``memories`` becomes whole again (same order on every rank:
    the memories are keyed alike). Whether anything was sharded."""
    found = False
    for memory in memories:
        for key in sorted(memory):
            if isinstance(memory[key], ShardedVector):
                memory[key] = memory[key].gather()
                found = True
    return found
