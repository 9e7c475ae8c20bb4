"""`FullyShard` (``strategy='fsdp'``): parameters and optimizer state sharded with FSDP2.

Each problem's module goes through ``torch.distributed.fsdp.fully_shard``: between global
steps every rank stores only its shard of each parameter (dim 0 split in ``world_size``
chunks), and the optimizer (rebuilt over the sharded parameters, same class, defaults and
param groups) keeps state for that shard only.

Hypergradients need a problem's whole parameters at once (the probes of darts move every
lower parameter, a Hessian-vector product differentiates through all of them, an upper's
loss calls its lowers' modules), so during a global step the modules are unsharded: one
all-gather per module at the step's start, after which betty computes exactly as under
'distributed' (gradients and Hessian-vector products averaged across ranks). FSDP2's own
forward hooks are removed: betty takes gradients with ``torch.autograd.grad``, which the
hooks' gradient reduce-scatter never sees, and it gathers and frees parameters itself.

During a step the gathered parameters are the truth: an optimizer step hands each rank's
slice of the averaged gradient to its shard, steps the shard, and all-gathers the result;
shards are re-synchronised from the gathered values (``param_callback`` edits included)
before each optimizer step and at the step's end, when the gathered copies are freed.
Validation runs on every rank (the modules are sharded), rank 0 logging its result.

Checkpoints are sharded (`betty.distributed.sharded_checkpoint`): a ``step_<N>.dcp`` folder
written through ``torch.distributed.checkpoint``, each rank its own shards, readable by any
number of processes (one process without a process group included); a one-file checkpoint
of another strategy loads too.

Mixed precision: bf16 autocasts the step's computation on the gathered parameters; fp16's
scaler unscales (and checks for inf) the gathered, averaged gradients, before the shards take
their slice, so every rank skips or steps alike and as one process would.

SAMA: its P reads the optimizer state of the whole parameter; the hop sees the optimizer's
parameters as their gathered copies (`optimizer_parameters`), and each shard's state is
gathered to compute P as one process would.

Reverse mode: an `IterativeProblem` (and a `TaskBatchedProblem`) stays replicated, as under
'distributed': its unroll window holds whole copies of its parameters and optimizer state
at every step anyway. Its uppers are sharded; the gathered upper parameters the window's
graph holds across global steps are freed at each step's end and refilled, with the same
values, at the next step's start (FSDP2 keeps their version counters, as for its own
reshard-after-forward), so back-propagating through the window at its end sees them.

roll_back: the window-start snapshot and its restore go through the module's state dict,
which FSDP2 reshards for (the state is the shards); the module is gathered again right after.
A checkpoint inside such a window is refused (the snapshot is each rank's shards).

Warm starts and f2sa keep parameter-sized vectors per hop across outer steps; between global
steps each rank keeps its shard of them, as of the parameters
(`betty.distributed.sharded_memory`).

Nothing else is refused. Launched as one process there is nothing to shard: the modules stay
whole (checkpoints are still sharded folders).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from betty.distributed import sharded_memory
from betty.distributed.data_parallel import DataParallel
from betty.distributed.zero import retarget_scheduler
from betty.errors import ConfigError

if TYPE_CHECKING:
    from betty.engine import Engine
    from betty.problems.problem import Problem

T = TypeVar("T")


class FullyShard(DataParallel):
    """FSDP2 over a torchrun process group (``EngineConfig.strategy='fsdp'``)."""

    name = "fsdp"
    whole_optimizer_state = False  # parameters and optimizer state are sharded

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sharded: list[torch.nn.Module] = []
        self._gathered = False

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, engine: Engine) -> None:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as err:
            raise ConfigError(f"EngineConfig.strategy='fsdp' needs FSDP2 (fully_shard), "
                              f"which this PyTorch lacks ({err}); use 'zero'") from None
        super().setup(engine)
        if self.world_size == 1:
            return  # nothing to shard (and the engine's loop skips step_context)
        for problem in engine.problems:
            assert problem.module is not None
            if getattr(problem, "supports_reverse_mode", False):
                continue  # replicated: its window carries whole copies of it anyway
            before = dict(problem.module.named_parameters())
            fully_shard(problem.module, reshard_after_forward=False)
            state = problem.module._get_fsdp_state()
            state._pre_forward_hook_handle.remove()  # betty gathers and frees by itself
            state._post_forward_hook_handle.remove()
            self._sharded.append(problem.module)
            self._regather_after_state_dict(problem.module)
            # its parameters now change identity (shards between steps, gathered copies
            # inside them): drop the copy of trainable_parameters() read at initialize
            problem.refresh_parameters(cache=False)
            if problem.optimizer is not None:
                after = dict(problem.module.named_parameters())
                moved = {id(p): after[name] for name, p in before.items()}
                self._rebuild_optimizer(problem, moved)
            if problem.grad_scaler is not None:
                _unscale_gathered(problem.grad_scaler, problem.module)

    def _regather_after_state_dict(self, module: torch.nn.Module) -> None:
        """FSDP2 reshards a module before its ``state_dict()`` and ``load_state_dict()``
        (the state is its shards); inside a step (roll_back's snapshot and restore) the
        module is gathered again right after, from the shards just read or written."""
        def regather(*_: Any) -> None:
            if self._gathered:
                module.unshard()

        module.register_state_dict_post_hook(regather)
        module.register_load_state_dict_post_hook(regather)

    def _rebuild_optimizer(self, problem: Problem, moved: dict[int, Tensor]) -> None:
        old = problem.optimizer
        assert old is not None
        if old.state:
            raise ConfigError(f"problem '{problem.name}': its optimizer already has state; "
                              "strategy='fsdp' shards the optimizer before the first step")
        groups = [{**group, "params": [moved[id(p)] for p in group["params"]]}
                  for group in old.param_groups]
        # every hyperparameter travels in the groups: ``defaults`` may hold entries the
        # constructor rejects (AdamW's decoupled_weight_decay), so it is copied afterwards
        new = type(old)(groups)
        new.defaults = dict(old.defaults)
        problem.set_optimizer(new)
        if problem.scheduler is not None and \
                getattr(problem.scheduler, "optimizer", None) is old:
            retarget_scheduler(problem.scheduler, old, new)

    # -- gathering and freeing -------------------------------------------------------------
    @contextmanager
    def step_context(self, engine: Engine) -> Iterator[None]:
        """Gather every module for the global step; re-shard (keeping the gathered values,
        which the step may have edited) and free them at its end."""
        if self._gathered:  # nested (validation inside a step): already gathered
            yield
            return
        for module in self._sharded:
            module.unshard()
        self._gathered = True
        sharded_memory.gather(_hop_memories(engine))
        try:
            yield
        finally:
            self._gathered = False
            sharded_memory.shard(_hop_memories(engine), self.rank, self.world_size)
            # a reverse-mode window's graph may hold gathered tensors across steps: FSDP2
            # frees their storage here and refills the same tensors at the next unshard
            # (version counters kept), as its own reshard-after-forward does for backward
            for module in self._sharded:
                _sync_shards(module, self.rank, self.world_size)
                module.reshard()

    @contextmanager
    def optimizer_step(self, problem: Problem) -> Iterator[None]:
        """Shards take the gathered values and their slice of the gradient; the optimizer
        steps the shards; the result is gathered again."""
        module = problem.module
        if module not in self._sharded:
            yield
            return
        _sync_shards(module, self.rank, self.world_size, with_grads=True)
        try:
            yield
        finally:
            for fsdp_param in _fsdp_params(module):
                fsdp_param.sharded_param.grad = None
            module.reshard()
            module.unshard()

    # -- SAMA's P ---------------------------------------------------------------------------
    def optimizer_parameters(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        own = super().optimizer_parameters(optimizer)
        if not self._gathered:
            return own
        gathered = {id(p.sharded_param): p.unsharded_param
                    for module in self._sharded for p in _fsdp_params(module)}
        return [gathered.get(id(p), p) for p in own]

    def update_jacobian_diag(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                             grads: Sequence[Tensor | None]) -> list[Tensor]:
        """P of the whole parameters: the optimizer state of each shard is gathered (one
        all-gather per state tensor), then P is computed as one process would."""
        from torch.distributed.tensor import DTensor

        from betty.optim import functional_optimizer, update_jacobian_diag

        state = functional_optimizer(optimizer).init_state(params, clone=False)
        whole = [{key: value.full_tensor() if isinstance(value, DTensor) else value
                  for key, value in entry.items()} for entry in state]
        return update_jacobian_diag(optimizer, params, grads, state=whole)

    def validate(self, engine: Engine, fn: Callable[[], T]) -> T:
        with self.step_context(engine):
            result = fn()
        return self.broadcast_object(result)

    def save_checkpoint(self, engine: Engine, path: str | None) -> str:
        """Every rank writes its shards (`betty.distributed.sharded_checkpoint`)."""
        from betty.distributed import sharded_checkpoint

        # the hop memory is written whole with the small state: gather it for the save
        gathered = sharded_memory.gather(_hop_memories(engine))
        try:
            return sharded_checkpoint.save(engine, path)
        finally:
            if gathered:
                sharded_memory.shard(_hop_memories(engine), self.rank, self.world_size)

    def load_checkpoint(self, engine: Engine, path: str) -> None:
        """A sharded folder saved on any number of ranks, or a one-file checkpoint."""
        from betty.distributed import sharded_checkpoint

        sharded_checkpoint.load(engine, path)


def _unscale_gathered(scaler: torch.amp.GradScaler, module: torch.nn.Module) -> None:
    """Make ``scaler.unscale_(optimizer)`` unscale (and check for inf) the gathered
    parameters' gradients: they hold the averaged gradient of the whole parameter, exactly
    what one process would unscale, while the optimizer's shards get their slice only later,
    inside `FullyShard.optimizer_step`. Every rank then skips or steps alike."""
    unscale = scaler.unscale_
    gathered = SimpleNamespace(param_groups=[{"params": []}])  # what unscale_ reads

    def unscale_gathered(optimizer: torch.optim.Optimizer) -> None:
        gathered.param_groups[0]["params"] = [p.unsharded_param for p in _fsdp_params(module)]
        unscale(gathered)  # type: ignore[arg-type]

    scaler.unscale_ = unscale_gathered  # type: ignore[method-assign]


def _hop_memories(engine: Engine) -> list[dict[str, Any]]:
    """Every hop memory of every problem, in the same order on every rank."""
    return [memory for problem in engine.problems
            for _, memory in sorted(problem.hop_memories().items())]


def _fsdp_params(module: torch.nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # type: ignore[operator]
    return [p for group in state._fsdp_param_groups for p in group.fsdp_params]


def _local_slice(full: Tensor, rank: int, world_size: int, shape: torch.Size) -> Tensor:
    """This rank's dim-0 chunk of ``full``, as FSDP2 shards it (``torch.chunk``; ranks past
    the last chunk hold an empty shard)."""
    chunks = torch.chunk(full, world_size, dim=0)
    local = chunks[rank] if rank < len(chunks) else full.new_empty(shape)
    return local if local.shape == shape else full.new_empty(shape)


@torch.no_grad()
def _sync_shards(module: torch.nn.Module, rank: int, world_size: int, *,
                 with_grads: bool = False) -> None:
    """Copy each gathered parameter's slice into this rank's shard (and the slice of its
    ``.grad`` into the shard's gradient)."""
    for fsdp_param in _fsdp_params(module):
        full = fsdp_param.unsharded_param
        shard = fsdp_param.sharded_param
        shape = fsdp_param.sharded_size
        shard.to_local().copy_(_local_slice(full.detach(), rank, world_size, shape))
        if with_grads and full.grad is not None:
            grad = _local_slice(full.grad, rank, world_size, shape).contiguous()
            shard.grad = fsdp_param.to_sharded_dtensor(grad)
