"""Endless batches from one loader or a tuple of loaders, restarting each at exhaustion."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from betty.errors import ProblemDefinitionError


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (tuples, lists, dicts nest) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        moved = [move_to(x, device) for x in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


class BatchSource:
    """Yields batches forever from ``loaders``; a tuple of loaders yields tuples of batches.

    Each loader restarts when exhausted; ``on_epoch_end`` runs when the first one does, and
    ``epochs[i]`` counts restarts of loader ``i``. ``positions[i]`` counts batches drawn in the
    current epoch (checkpoints use both).
    """

    def __init__(self, owner: str, loaders: Iterable[Any] | tuple[Iterable[Any], ...],
                 on_epoch_end: Callable[[], None]) -> None:
        self.owner = owner
        self.single = not isinstance(loaders, tuple)
        self.loaders: tuple[Iterable[Any], ...] = (loaders,) if self.single else loaders
        self.on_epoch_end = on_epoch_end
        for i, loader in enumerate(self.loaders):
            self._check_loader(i, loader)
        self.iterators: list[Iterator[Any] | None] = [None] * len(self.loaders)
        self.epochs = [0] * len(self.loaders)
        self.positions = [0] * len(self.loaders)

    def _check_loader(self, index: int, loader: Any) -> None:
        where = f"problem '{self.owner}': train_data_loader" + ("" if self.single else f"[{index}]")
        if not hasattr(loader, "__iter__"):
            raise ProblemDefinitionError(
                f"{where} is a {type(loader).__name__}, which cannot be iterated; pass a "
                "DataLoader, a list of batches or any iterable"
            )
        if isinstance(loader, Iterator):
            raise ProblemDefinitionError(
                f"{where} is an iterator, which cannot restart after an epoch; pass the "
                "iterable itself (a DataLoader, a list of batches)"
            )
        try:
            empty = len(loader) == 0
        except TypeError:
            empty = False
        if empty:
            raise ProblemDefinitionError(f"{where} is empty; it must yield at least one batch")

    def _next(self, index: int) -> Any:
        iterator = self.iterators[index]
        if iterator is None:
            iterator = self.iterators[index] = iter(self.loaders[index])
        try:
            batch = next(iterator)
        except StopIteration:
            if self.positions[index] == 0:
                raise ProblemDefinitionError(
                    f"problem '{self.owner}': train_data_loader yielded no batch; it must "
                    "yield at least one"
                ) from None
            if index == 0:
                self.on_epoch_end()
            self.epochs[index] += 1
            self.positions[index] = 0
            self._set_epoch(index)
            iterator = self.iterators[index] = iter(self.loaders[index])
            return self._next(index)
        self.positions[index] += 1
        return batch

    def _set_epoch(self, index: int) -> None:
        sampler = getattr(self.loaders[index], "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epochs[index])

    def next_batch(self) -> Any:
        if self.single:
            return self._next(0)
        return tuple(self._next(i) for i in range(len(self.loaders)))
