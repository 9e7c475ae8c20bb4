"""`Zero` (``strategy='zero'``): data parallelism with each optimizer's state sharded.

Everything `DataParallel` does, and each `ImplicitProblem`'s optimizer becomes a
`torch.distributed.optim.ZeroRedundancyOptimizer` of the same class, hyperparameters and
param groups (per-group learning rates included): each rank keeps the state (Adam's moments,
momentum buffers) of the parameters it owns, steps those, and broadcasts them. This is the
one place betty rebuilds a user's optimizer; ``problem.optimizer`` and the problem's
scheduler point to the new one.

* SAMA's ``P = du/dg`` needs the optimizer state: each rank computes P for the parameters it
  owns from its local optimizer, and one all-reduce (a sum: each entry has one owner)
  assembles the whole P on every rank.
* `IterativeProblem`s keep their optimizer: their differentiable updates carry the whole
  optimizer state through the unroll window anyway (`betty.optim.functional_optimizer`).
* Checkpoints: `prepare_checkpoint` (all ranks) gathers the sharded state on rank 0, which
  then saves the optimizer's ordinary state dict; loading it (on every rank, or into a
  single process's plain optimizer) works either way.
* ``EngineConfig(roll_back=True)`` snapshots optimizer state every window; it is refused
  under ZeRO (use strategy='distributed').
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.optim import ZeroRedundancyOptimizer

from betty.distributed.data_parallel import DataParallel
from betty.errors import ConfigError

if TYPE_CHECKING:
    from betty.engine import Engine


class Zero(DataParallel):
    """ZeRO stage 1 over a torchrun process group (``EngineConfig.strategy='zero'``)."""

    name = "zero"
    whole_optimizer_state = False  # each rank steps its shard of the optimizer state

    def setup(self, engine: Engine) -> None:
        if engine.config.roll_back:
            raise ConfigError(
                "EngineConfig(roll_back=True) is not supported with strategy='zero' (each "
                "window would gather the sharded optimizer state); use strategy='distributed'"
            )
        super().setup(engine)
        for problem in engine.problems:
            if getattr(problem, "supports_reverse_mode", False) or problem.optimizer is None:
                continue
            optimizer = problem.optimizer
            if isinstance(optimizer, ZeroRedundancyOptimizer):
                continue
            sharded = shard_optimizer(optimizer)
            problem.set_optimizer(sharded)
            if problem.scheduler is not None and \
                    getattr(problem.scheduler, "optimizer", None) is optimizer:
                retarget_scheduler(problem.scheduler, optimizer, sharded)

    def update_jacobian_diag(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                             grads: Sequence[Tensor | None]) -> list[Tensor]:
        if not isinstance(optimizer, ZeroRedundancyOptimizer):
            return super().update_jacobian_diag(optimizer, params, grads)
        from betty.optim import update_jacobian_diag

        local = optimizer.optim
        ZeroRedundancyOptimizer._sync_param_groups(optimizer.param_groups, local.param_groups)
        mine = [p for group in local.param_groups for p in group["params"]]
        grad_of = {id(p): g for p, g in zip(params, grads)}
        diag = update_jacobian_diag(local, mine, [grad_of.get(id(p)) for p in mine]) \
            if mine else []
        owned = {id(p): d for p, d in zip(mine, diag)}
        return self.all_sum([owned.get(id(p), torch.zeros_like(p)) for p in params])

    def prepare_checkpoint(self, engine: Engine) -> None:
        for problem in engine.problems:
            if isinstance(problem.optimizer, ZeroRedundancyOptimizer):
                problem.optimizer.consolidate_state_dict(to=0)


def shard_optimizer(optimizer: torch.optim.Optimizer) -> ZeroRedundancyOptimizer:
    """A ZeroRedundancyOptimizer of ``optimizer``'s class and param groups (each group's own
    hyperparameters kept), holding its state if it has any.

    Nothing is passed to the class's constructor from ``optimizer.defaults``: that dict may
    hold entries the constructor rejects (AdamW's ``decoupled_weight_decay`` under recent
    PyTorch). Every hyperparameter travels in the param groups instead, and ``defaults`` is
    copied over afterwards (it only seeds groups added later)."""
    groups = [dict(group) for group in optimizer.param_groups]
    sharded = ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer))
    sharded.defaults = dict(optimizer.defaults)
    sharded.optim.defaults = dict(optimizer.defaults)
    if optimizer.state:
        sharded.load_state_dict(optimizer.state_dict())
    return sharded


def retarget_scheduler(scheduler: Any, old: torch.optim.Optimizer,
                       new: torch.optim.Optimizer) -> None:
    """Point ``scheduler`` at ``new``, with the step tracking torch's LR schedulers add to
    their optimizer (else they warn that the scheduler stepped first)."""
    scheduler.optimizer = new
    step = new.step

    @functools.wraps(step)
    def tracked(*args: Any, **kwargs: Any) -> Any:
        new._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    tracked._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    new.step = tracked  # type: ignore[method-assign]
    new._opt_called = getattr(old, "_opt_called", False)  # type: ignore[attr-defined]
