"""`Strategy`: what an engine does differently when it runs as several processes.

The engine, its problems and the hypergradient hops call the strategy at a few fixed points;
the single-process strategy defined here makes every call the identity (no copies, no
communication), so a one-process run is exactly the plain algorithm. `DataParallel`,
`Zero` and `FullyShard` (sibling modules) override these points:

* ``all_average(tensors)``: the mean over ranks of a list of tensors, flattened into one
  bucket per dtype and reduced by ONE collective; ``differentiable=True`` keeps it in the
  autograd graph (reverse mode differentiates through the lower's averaged gradients).
* ``setup(engine)``: after every problem is initialised (shard data, wrap optimizers).
* ``run_on_main(fn)``: run ``fn`` on rank 0 only, hand its result (or its error) to all
  (checkpoint writes); ``validate`` likewise for the engine's validation.
* ``step_context`` / ``optimizer_step``: around each global step and each optimizer step.
* ``update_jacobian_diag``: SAMA's P when the optimizer state is sharded.
* ``fail_together``: an error on one rank ends every rank with that error's message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from betty.engine import Engine
    from betty.problems.problem import Problem

T = TypeVar("T")
OptionalVector = list[Tensor | None]


class Strategy:
    """One process on one device: every collective is the identity.

    Attributes:
        name: the ``EngineConfig.strategy`` this implements.
        rank, world_size, local_rank: this process's place in the process group.
        device: the device this process trains on.
        whole_optimizer_state: every rank holds its optimizers' whole state and parameters,
            so SAMA's P is formed locally, one parameter at a time (not under ZeRO or FSDP).
    """

    name = "default"
    whole_optimizer_state = True

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device})")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs, validates and writes files."""
        return self.rank == 0

    # -- collectives -----------------------------------------------------------------------
    def all_average(self, tensors: Sequence[Tensor], *, differentiable: bool = False
                    ) -> list[Tensor]:
        """Mean over ranks of each tensor (one collective per dtype); here: the inputs."""
        return list(tensors)

    def all_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sum over ranks of each tensor (one collective per dtype); here: the inputs."""
        return list(tensors)

    def average_optional(self, vector: Sequence[Tensor | None], *,
                         differentiable: bool = False) -> OptionalVector:
        """`all_average` of the entries that are not ``None`` (which stay ``None``)."""
        return self.average_nested([vector], differentiable=differentiable)[0]

    def average_nested(self, vectors: Sequence[Sequence[Tensor | None]], *,
                       differentiable: bool = False) -> list[OptionalVector]:
        """`average_optional` of several vectors at once, in one bucket."""
        if self.world_size == 1:
            return [list(v) for v in vectors]
        present = [t for v in vectors for t in v if t is not None]
        averaged = iter(self.all_average(present, differentiable=differentiable))
        return [[None if t is None else next(averaged) for t in v] for v in vectors]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return flag

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result or raises its error."""
        return fn()

    def validate(self, engine: Engine, fn: Callable[[], T]) -> T:
        """Run the engine's validation ``fn`` (rank 0 only, result shared, for the
        replicated strategies; every rank for FSDP, whose modules are sharded)."""
        return fn()

    # -- the engine's hook points ----------------------------------------------------------
    def setup(self, engine: Engine) -> None:
        """Runs once every problem is initialised (module on its device, optimizer, data)."""

    def step_context(self, engine: Engine) -> Any:
        """Context around each global step and each validation."""
        return nullcontext()

    def optimizer_step(self, problem: Problem) -> Any:
        """Context around ``problem``'s optimizer step (after unscaling and clipping)."""
        return nullcontext()

    def optimizer_parameters(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """``optimizer``'s parameters as the step computes with them (FSDP: the gathered
        copies of its shards), in the flat order of its param groups."""
        return [p for group in optimizer.param_groups for p in group["params"]]

    def update_jacobian_diag(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                             grads: Sequence[Tensor | None]) -> list[Tensor]:
        """SAMA's ``P = du/dg`` of ``optimizer`` (see `betty.optim.update_jacobian_diag`)."""
        from betty.optim import update_jacobian_diag

        return update_jacobian_diag(optimizer, params, grads)

    def prepare_checkpoint(self, engine: Engine) -> None:
        """Runs on every rank before rank 0 writes a checkpoint (gathers sharded state)."""

    def save_checkpoint(self, engine: Engine, path: str | None) -> str:
        """Write the engine's checkpoint (every rank calls it): by default rank 0 writes
        one file after `prepare_checkpoint`; a sharding strategy may write shards instead."""
        from betty import checkpoint

        self.prepare_checkpoint(engine)
        return self.run_on_main(lambda: checkpoint.save(engine, path))

    def load_checkpoint(self, engine: Engine, path: str) -> None:
        """Restore the engine from ``path`` on every rank (by default: one file; a folder
        is a sharded checkpoint of strategy='fsdp', `betty.distributed.sharded_checkpoint`)."""
        from betty import checkpoint

        if os.path.isdir(path):
            from betty.distributed import sharded_checkpoint

            return sharded_checkpoint.load(engine, path)
        checkpoint.load(engine, path)

    @contextmanager
    def fail_together(self) -> Iterator[None]:
        """An error inside ends every rank with its message (here: just raised)."""
        yield

    def shutdown(self) -> None:
        """Leave the process group (if this strategy created it)."""


def strategy_of(problem: Problem) -> Strategy:
    """The strategy of ``problem``'s engine (single process before the engine sets it up)."""
    engine = problem.engine
    strategy = getattr(engine, "strategy", None) if engine is not None else None
    return strategy if isinstance(strategy, Strategy) else SINGLE_PROCESS


SINGLE_PROCESS = Strategy()
