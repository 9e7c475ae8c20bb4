"""Endless batches from one loader or a tuple of loaders, restarting each at exhaustion."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from betty.errors import ProblemDefinitionError, TrainingError


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
    current epoch. Right before each ``iter(loader)`` the random state its shuffling draws from
    is recorded, so `load_state_dict` can rebuild an iterator mid-epoch exactly (checkpoints).

    Every loader's first iterator is created here, in the constructor, as the original Betty
    does at start-up: `Problem.initialize` builds this in the engine's problem order, so
    ``iter(loader)`` draws from torch's random state in the same order as the original and a
    seeded program gets the same batches (creating it at the first batch would interleave
    those draws with module set-up and the other problems' batches).
    """

    def __init__(self, owner: str, loaders: Iterable[Any] | tuple[Iterable[Any], ...],
                 on_epoch_end: Callable[[], None]) -> None:
        self.owner = owner
        self.single = not isinstance(loaders, tuple)
        self.loaders: tuple[Iterable[Any], ...] = (loaders,) if self.single else loaders
        self.on_epoch_end = on_epoch_end
        if not self.loaders:
            raise ProblemDefinitionError(
                f"problem '{owner}': train_data_loader is an empty tuple; pass one loader or a "
                "tuple of at least one loader"
            )
        for i, loader in enumerate(self.loaders):
            self._check_loader(i, loader)
        self.iterators: list[Iterator[Any] | None] = [None] * len(self.loaders)
        self.released = [False] * len(self.loaders)  # an iterator dropped by close()
        self.epochs = [0] * len(self.loaders)
        self.positions = [0] * len(self.loaders)
        self.start_rng: list[dict[str, Any] | None] = [None] * len(self.loaders)
        # the random state at each epoch's first batch: a sampler shuffling with torch's
        # global generator draws its seed then, not at iter(loader), and other draws (module
        # set-up, other problems' batches) may come in between
        self.first_rng: list[dict[str, Any] | None] = [None] * len(self.loaders)
        for index, loader in enumerate(self.loaders):
            if not (type(loader) is list or type(loader) is tuple):  # those never draw
                self._start(index)

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
        loader = self.loaders[index]
        if type(loader) is list or type(loader) is tuple:  # fast path: no iterator, no RNG
            position = self.positions[index]
            if position >= len(loader):
                if index == 0:
                    self.on_epoch_end()
                self.epochs[index] += 1
                position = 0
            self.positions[index] = position + 1
            return loader[position]
        iterator = self.iterators[index]
        if iterator is None:
            iterator = self._continue(index) if self.released[index] else self._start(index)
        if self.positions[index] == 0:
            self.first_rng[index] = _loader_rng_state(loader)
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
            self._start(index)
            return self._next(index)
        self.positions[index] += 1
        return batch

    def _start(self, index: int) -> Iterator[Any]:
        """A fresh iterator over loader ``index``, recording the random state it starts from."""
        self.start_rng[index] = _loader_rng_state(self.loaders[index])
        iterator = self.iterators[index] = iter(self.loaders[index])
        return iterator

    def close(self) -> None:
        """Drop every iterator now, so a DataLoader's worker processes exit at once (an
        iterator left to the garbage collector inside a reference cycle has its queues closed
        before its workers are told to stop: torch then waits 5 s per worker). The next batch
        continues where this left off, as a checkpoint resume does."""
        self.released = [it is not None for it in self.iterators]
        self.iterators = [None] * len(self.loaders)

    def _continue(self, index: int) -> Iterator[Any]:
        """Loader ``index``'s iterator rebuilt mid-epoch after `close`, leaving torch's random
        state and the loader's generators as they were."""
        generators = _generators(self.loaders[index])
        saved = [g.get_state() for g in generators]
        with torch.random.fork_rng(devices=[]):
            self._replay(index)
        for generator, state in zip(generators, saved):
            generator.set_state(state)
        self.released[index] = False
        iterator = self.iterators[index]
        assert iterator is not None
        return iterator

    def _set_epoch(self, index: int) -> None:
        sampler = getattr(self.loaders[index], "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epochs[index])

    def next_batch(self) -> Any:
        if self.single:
            return self._next(0)
        return tuple(self._next(i) for i in range(len(self.loaders)))

    # -- exact resume (betty.checkpoint) -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Epochs, positions, whether each iterator has started, the random state each
        epoch started from and the loaders' own generators now."""
        return {
            "epochs": list(self.epochs),
            "positions": list(self.positions),
            "started": [it is not None or released
                        for it, released in zip(self.iterators, self.released)],
            "start_rng": list(self.start_rng),
            "first_rng": list(self.first_rng),
            "generators": [[g.get_state() for g in _generators(loader)]
                           for loader in self.loaders],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild each iterator where `state` left it: rewind the random state to the
        epoch's start, iterate afresh and skip the batches already drawn (this loads them
        again: its cost is one partial epoch). Changes torch's global random state; the
        caller restores it afterwards (`betty.checkpoint` does)."""
        self.epochs = [int(e) for e in state["epochs"]]
        self.positions = [int(p) for p in state["positions"]]
        self.start_rng = list(state["start_rng"])
        self.first_rng = list(state.get("first_rng", [None] * len(self.loaders)))
        for index, loader in enumerate(self.loaders):
            self.iterators[index], self.released[index] = None, False
            if state["started"][index]:
                self._replay(index)
            for generator, saved in zip(_generators(loader), state["generators"][index]):
                generator.set_state(saved)

    def _replay(self, index: int) -> None:
        _set_loader_rng_state(self.loaders[index], self.start_rng[index])
        if self.epochs[index] > 0:
            self._set_epoch(index)
        iterator = self.iterators[index] = iter(self.loaders[index])
        for drawn in range(self.positions[index]):
            if drawn == 0 and self.first_rng[index] is not None:
                _set_loader_rng_state(self.loaders[index], self.first_rng[index])
            try:
                next(iterator)
            except StopIteration:
                raise TrainingError(
                    f"problem '{self.owner}': cannot resume train_data_loader[{index}] at batch "
                    f"{self.positions[index]} of epoch {self.epochs[index]}: it now yields "
                    f"only {drawn} batches; resume with the same data"
                ) from None


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader shuffles with: its own, its sampler's, its batch
    sampler's sampler's (each once)."""
    found: dict[int, torch.Generator] = {}
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            found.setdefault(id(generator), generator)
    return list(found.values())


def _loader_rng_state(loader: Any) -> dict[str, Any] | None:
    """Random state an ``iter(loader)`` may draw from; ``None`` for a plain list or tuple."""
    if isinstance(loader, (list, tuple)):
        return None
    return {"torch": torch.get_rng_state(),
            "generators": [g.get_state() for g in _generators(loader)]}


def _set_loader_rng_state(loader: Any, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["torch"])
    for generator, saved in zip(_generators(loader), state["generators"]):
        generator.set_state(saved)
