"""`DataParallel` (``strategy='distributed'``): every rank holds the whole program and reads
its own shard of each problem's data; gradients are averaged so all ranks step identically.

Why not ``torch.nn.parallel.DistributedDataParallel``: its hooks reduce gradients during
``loss.backward()``, while betty takes gradients with ``torch.autograd.grad`` (direct
gradients, hypergradient heads, Hessian-vector products, finite-difference probes), which
DDP never sees. Instead the problems call `all_average` at the points where the math needs
a global quantity. With equal local batch sizes the mean loss of the union batch is the
mean of the local mean losses, so every averaged gradient or product below equals that of
one process on the union batch:

* each problem's gradient (direct + every path's hypergradient): averaged once per step;
* each path's first vector ``v = dL_upper/dw``: averaged before the hops, so darts and sama
  probe every rank at the same ``w +- eps v`` with the same radius;
* neumann and cg: every Hessian-vector product is averaged (the solver's iterates stay
  identical across ranks); the final mixed product is local and averaged with the gradient;
* reverse mode: the lower's updates use the averaged gradient inside the differentiable
  graph, so back-propagation through the window sums the other ranks' contributions too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from betty.distributed.group import (
    Group,
    PeerFailure,
    announce_failure,
    close_group,
    describe,
    open_group,
    peer_failure,
)
from betty.distributed.sampling import shard_loader
from betty.distributed.strategy import Strategy
from betty.errors import BettyError, ConfigError, DependencyError, ProblemDefinitionError

if TYPE_CHECKING:
    from betty.configs import EngineConfig
    from betty.engine import Engine
    from betty.problems.problem import Problem

log = logging.getLogger("betty")
T = TypeVar("T")


def _caused_by_peer(error: BaseException, message: str) -> bool:
    """Whether ``error`` here is the consequence of the failure another rank announced
    (``message``): a runtime error of a collective, not an error of this rank's own."""
    if isinstance(error, BettyError) or not isinstance(error, RuntimeError):
        return False
    return message.split(": ", 1)[-1] != describe(error)


class _AllAverage(torch.autograd.Function):
    """``y = mean over ranks of x``; its backward is the same mean of the output gradients
    (``dy_r/dx_s = 1/W`` for every pair of ranks), itself differentiable."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, world_size: int) -> Tensor:  # type: ignore[override]
        ctx.world_size = world_size
        out = flat.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out.div_(world_size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _AllAverage.apply(grad, ctx.world_size), None


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """Differentiable mean over the ranks of the default process group (``tensor`` itself
    on one process): the backward averages the output gradients the same way."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllAverage.apply(tensor, dist.get_world_size())


class DataParallel(Strategy):
    """Data parallelism over a torchrun process group (``EngineConfig.strategy='distributed'``).

    Example:
        >>> # torchrun --nproc_per_node=2 train.py
        >>> engine = Engine(problems, EngineConfig(strategy="distributed"), dependencies=deps)
        >>> engine.run()   # each rank reads 1/2 of every loader; rank 0 logs and saves
    """

    name = "distributed"

    def __init__(self, config: EngineConfig, group: Group | None = None) -> None:
        group = group if group is not None else open_group(
            config.strategy, backend=config.backend, timeout_s=config.distributed_timeout)
        super().__init__(group.device)
        self.group = group
        self.rank, self.world_size, self.local_rank = group.rank, group.world_size, \
            group.local_rank

    # -- collectives -----------------------------------------------------------------------
    def _reduce(self, tensors: Sequence[Tensor], *, average: bool, differentiable: bool
                ) -> list[Tensor]:
        """One collective per dtype over the flattened ``tensors``; results are new tensors
        (views into the reduced bucket)."""
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            parts = [tensors[i] if differentiable else tensors[i].detach() for i in indices]
            flat = torch.cat([p.reshape(-1) for p in parts])
            if differentiable and average:
                flat = _AllAverage.apply(flat, self.world_size)
            else:
                dist.all_reduce(flat)
                if average:
                    flat.div_(self.world_size)
            for i, piece in zip(indices, torch.split(flat, [p.numel() for p in parts])):
                out[i] = piece.view_as(tensors[i])
        return out  # type: ignore[return-value]

    def all_average(self, tensors: Sequence[Tensor], *, differentiable: bool = False
                    ) -> list[Tensor]:
        if not tensors or self.world_size == 1:
            return list(tensors)
        return self._reduce(tensors, average=True, differentiable=differentiable)

    def all_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        if not tensors or self.world_size == 1:
            return list(tensors)
        return self._reduce(tensors, average=False, differentiable=False)

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())  # host read: only where the engine needs a common decision

    def broadcast_object(self, obj: T) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def run_on_main(self, fn: Callable[[], T]) -> T:
        error: BaseException | None = None
        box: list[Any] = [None, None]
        if self.is_main:
            try:
                box = [True, fn()]
            except BaseException as err:  # handed to the other ranks, then re-raised here
                error, box = err, [False, describe(err)]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if not box[0]:
            raise PeerFailure(f"rank 0 failed: {box[1]}")
        return box[1]

    def validate(self, engine: Engine, fn: Callable[[], T]) -> T:
        return self.run_on_main(fn)

    # -- engine hook points ----------------------------------------------------------------
    def setup(self, engine: Engine) -> None:
        """Shard every problem's data loader(s) across the ranks."""
        for problem in engine.problems:
            self._shard_data(problem)

    def _shard_data(self, problem: Problem) -> None:
        loader = problem.train_data_loader
        if loader is None:
            return
        if isinstance(loader, tuple):
            sharded: Any = tuple(shard_loader(one, self, owner=f"{problem.name}[{i}]")
                                 for i, one in enumerate(loader))
            changed = any(a is not b for a, b in zip(sharded, loader))
        else:
            sharded = shard_loader(loader, self, owner=problem.name)
            changed = sharded is not loader
        if changed:
            problem.set_train_data_loader(sharded)

    @contextmanager
    def fail_together(self) -> Iterator[None]:
        """Re-raise a failure here after telling every rank; a failure caused by another
        rank's failure (a broken collective) becomes `PeerFailure` with that rank's
        message. An error every rank raises by itself (a bad config) stays as it is."""
        try:
            yield
        except (PeerFailure, ConfigError, DependencyError, ProblemDefinitionError):
            raise  # a program's definition fails the same way on every rank: nothing to tell
        except BaseException as err:
            if self.world_size == 1:
                raise
            message = peer_failure(self.group)
            if message is None:
                log.error("rank %d failed (%s); ending the other ranks", self.rank,
                          describe(err))
                announce_failure(self.group, err)
            elif _caused_by_peer(err, message):
                raise PeerFailure(f"{message} (reported to rank {self.rank})") from err
            raise

    def shutdown(self) -> None:
        close_group(self.group)
