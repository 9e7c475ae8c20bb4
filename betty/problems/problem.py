"""`Problem`: one level of a multilevel program, and the local step every kind shares.

A local step: window start (`betty.schedule`) -> batch -> loss (under autocast) -> gradient
(`betty.problems.gradients`) -> the pipeline of `betty.problems.pipeline` (``grad_callback``
-> accumulate -> unscale -> clip -> update -> ``param_callback`` -> clear -> scheduler).
Each piece is an object that owns its state; this class wires them and saves their states.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.diagnostics import active_diagnostics
from betty.distributed.strategy import strategy_of
from betty.errors import ConfigError, HypergradientError, ProblemDefinitionError
from betty.guard import FiniteGuard
from betty.hypergradient.hop import seed_from
from betty.problems import setup
from betty.problems.base import ProblemBase
from betty.problems.bindings import recording_bindings
from betty.problems.data import BatchSource, move_to
from betty.problems.gradients import PathGradients, checked_loss
from betty.problems.hooks import BoundHooks, ProblemHooks, bind_hooks
from betty.problems.pipeline import Clip, InPlaceUpdate, LocalStep
from betty.problems.precision import Precision
from betty.problems.rollback import RollBack
from betty.problems.update_jacobian import (
    HeadScaling,
    forms_p_locally,
    reads_gradient,
    sole_reader,
    update_jacobian,
)

if TYPE_CHECKING:
    from betty.engine import Engine

log = logging.getLogger("betty")
# the library's own trainable_parameters(): cacheable (a user's override may change per call)
LIBRARY_PARAMETERS: set[Any] = {ProblemHooks.trainable_parameters}


class Problem(ProblemBase):
    """One level of a multilevel program: module, optimizer, data and ``training_step``.

    Args:
        name: a Python identifier; other problems reach this one as ``self.<name>``.
        config: this problem's `Config` (default ``Config()``).
        module, optimizer, scheduler, train_data_loader: or the ``configure_*`` hooks.
        extra_config: anything, kept as ``self.cfg``; device: where it trains (the
            original's argument; default: the engine's device).

    Raises:
        ProblemDefinitionError: ``name`` is not an identifier.

    Example:
        >>> class Inner(ImplicitProblem):
        ...     def training_step(self, batch):
        ...         x, y = batch
        ...         return F.cross_entropy(self.module(x), y) + self.hpo() * l2(self.module)
    """

    supports_reverse_mode = False  # IterativeProblem: its updates are differentiable

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the signature: ProblemBase
        super().__init__(*args, **kwargs)
        self._precision: Precision | None = None
        self._gradients: PathGradients | None = None
        self._local_step: LocalStep | None = None
        self._rollback = RollBack()
        self.hooks = BoundHooks()
        self._param_list: list[Tensor] | None = None
        self._param_cacheable = True
        self._last_grads: list[Tensor | None] | None = None  # sama's P reads them
        self._sole_reader: str | None = None  # the upper that may consume them (sama)
        self._consumed_by: str | None = None  # that upper did, since this problem's step
        self._keeps_gradient = self._retain_graph = self._replaying = False
        self._hop_memory: dict[str, dict[str, Any]] = {}  # per upper: a method's memory
        self._hop_base = 0
        self._guard: Any = None  # the engine's FiniteGuard (betty.guard)

    def bind_hooks(self) -> None:
        """Resolve the hooks again (set-up and each `Engine.run` do): a hook assigned on the
        instance after the engine was built takes effect from then on."""
        self.hooks = bind_hooks(self)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped: by the fp16 grad scaler (inf/NaN gradients), and by the
        non-finite guard under ``EngineConfig(nonfinite="skip")``."""
        return ((self._precision.skipped_steps if self._precision is not None else 0)
                + (self._guard.skipped.get(self._name, 0) if self._guard is not None else 0))

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler (None otherwise); FSDP makes it unscale gathered gradients."""
        return self._precision.scaler if self._precision is not None else None

    # -- set-up before training ----------------------------------------------------------
    def check_definition(self) -> None:
        """Raise `ProblemDefinitionError` for what this problem lacks (before training)."""
        if type(self).training_step is ProblemHooks.training_step:
            raise ProblemDefinitionError(
                f"problem '{self._name}' ({type(self).__name__}) does not define "
                "training_step(self, batch); subclass ImplicitProblem and return the loss"
            )
        try:
            self._config.validate()
        except ConfigError as err:  # a field edited after Config() was built
            raise ConfigError(f"problem '{self._name}': {err}") from None

    def initialize(self, engine: Engine, device: torch.device) -> None:
        """Resolve module/optimizer/scheduler/data (constructor or hooks), check them, and
        build this problem's step pipeline."""
        self._engine, self._device = engine, setup.placement(self, device)
        self._hop_base = seed_from(torch.get_rng_state().numpy().tobytes())  # read, not drawn
        self.check_definition()
        setup.check_reverse_only_fields(self)
        self.module = setup.given(self.configure_module(), self.module)
        setup.check_module(self)
        self.module.to(device)
        self.optimizer = setup.given(self.configure_optimizer(), self.optimizer)
        setup.check_optimizer(self)
        setup.check_has_parameters(self)
        self.scheduler = setup.given(self.configure_scheduler(), self.scheduler)
        self.train_data_loader = setup.given(self.configure_train_data_loader(),
                                             self.train_data_loader)
        setup.check_data(self, type(self).get_batch is not Problem.get_batch)
        if self.train_data_loader is not None:
            self._source = BatchSource(self._name, self.train_data_loader, self.epoch_callback)
        setup.check_sama_optimizer(self, list(getattr(engine, "problems", [])))
        self.refresh_parameters()
        setup.check_meta_trainable(self, type(self).meta_trainable_parameters
                                   is not ProblemHooks.meta_trainable_parameters)
        self._precision = Precision(self._name, self._config, device)
        self.bind_hooks()
        strategy = strategy_of(self)
        self._guard = getattr(engine, "guard", None) or FiniteGuard("off")
        self._gradients = PathGradients(self, strategy, active_diagnostics(engine), self._guard,
                                        scaled=self._precision.scaler is not None)
        context = None if strategy.world_size == 1 else lambda: strategy.optimizer_step(self)
        self._local_step = LocalStep(self, self._make_clip(),
                                     InPlaceUpdate(self, self._precision, context),
                                     allow=lambda: self._guard.allow_step(self._name))
        self._keeps_gradient = reads_gradient(self._config, self.optimizer)
        self._sole_reader = sole_reader(self, list(getattr(engine, "problems", []))) \
            if self._keeps_gradient else None
        self._retain_graph = self._config.retain_graph or setup.shares_a_window(self)

    def _make_clip(self) -> Clip:
        return Clip(self._config.gradient_clipping)

    def parameter_list(self) -> list[Tensor]:
        """`trainable_parameters()`, read once at set-up unless a subclass overrides it (the
        step asks for it several times); `refresh_parameters` re-reads it."""
        cached = self._param_list
        return cached if cached is not None else self.trainable_parameters()

    def refresh_parameters(self, *, cache: bool | None = None) -> None:
        """Re-read `trainable_parameters()` (after the module's parameters were replaced).
        ``cache=False``: read it at every use from now on (FSDP swaps a module's parameter
        objects between sharded and unsharded ones)."""
        if cache is not None:
            self._param_cacheable = cache
        overridden = type(self).trainable_parameters not in LIBRARY_PARAMETERS
        keep = self._param_cacheable and not overridden and self.module is not None
        self._param_list = list(self.trainable_parameters()) if keep else None

    def hop_memory(self, key: str) -> dict[str, Any]:
        """What hypergradient methods keep across outer steps for one hop through this
        problem (warm starts), by path and hop (``"upper > lower > upper #0"``); saved in
        checkpoints."""
        if key not in self._hop_memory:
            # each hop's own random stream (Nyström's coordinates), fixed at set-up: the same
            # on every rank and for any number of processes
            self._hop_memory[key] = {"seed": seed_from(self._hop_base, key)}
        return self._hop_memory[key]

    def close(self) -> None:
        """Let the data loaders' worker processes go (`Engine.close`)."""
        if self._source is not None:
            self._source.close()

    def hop_memories(self) -> dict[str, dict[str, Any]]:
        """Every `hop_memory` this problem holds, by key (strategies shard them)."""
        return self._hop_memory

    def window_parameters(self) -> list[Tensor] | None:
        """The functional parameters of a live unroll window (reverse mode); None here."""
        return None

    def engine_buffers(self) -> list[Tensor]:
        """Buffers of every problem's module (restored after hypergradient probes)."""
        return self._engine.all_buffers() if self._engine is not None else []

    # -- data and loss -------------------------------------------------------------------
    def get_batch(self) -> Any:
        """Next training batch (override to generate batches without a loader)."""
        assert self._source is not None
        batch = self._source.next_batch()
        return batch if self._device.type == "cpu" else move_to(batch, self._device)

    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        """``training_step(batch)`` under this problem's autocast, checked: the scalar loss
        and the dict to log."""
        assert self._precision is not None
        with recording_bindings():  # reverse mode: what a checkpoint's recomputation reads
            if self._precision.dtype is None:  # fp32: no autocast context on the hot path
                out = self.training_step(batch)
            else:
                with self._precision.autocast():
                    out = self.training_step(batch)
        return checked_loss(self._name, out, self.clock.count)

    def observe_loss(self) -> None:
        """Hand the latest loss to the non-finite guard (no host read)."""
        self._guard.observe(self._name, self.count, "loss", [self._last_loss])

    def hop_loss(self) -> Tensor:
        """This problem's loss on its current batch, for hypergradient hops through it."""
        loss = self.compute_loss(self.cur_batch)[0]
        return loss if loss.dtype in (torch.float32, torch.float64) else loss.float()

    # -- one local step ------------------------------------------------------------------
    def local_step(self, global_step: int | None = None) -> bool:
        """One local step of this problem alone; True when it ends an unroll window (the
        engine then triggers the uppers). `step` also steps the uppers."""
        opens, snapshot = self.clock.open_window()
        if opens:
            self._close_window()
            self.on_inner_loop_start()
        if snapshot:
            assert self.module is not None
            self._rollback.snapshot(self.module, self.optimizer)
        if opens:
            self._open_window()
        self.clock.tick(self._training)
        self.cur_batch = self.get_batch()
        loss_dict = self._descend(self.cur_batch)
        self._log(loss_dict, global_step)
        return self.clock.end_step(self._training)

    def _descend(self, batch: Any, *, step_scheduler: bool = True) -> dict[str, Any]:
        """Loss, gradient and the pipeline (which steps on the last micro-batch)."""
        assert self._precision is not None and self._gradients is not None
        assert self._local_step is not None
        loss, loss_dict = self.compute_loss(batch)
        self._last_loss = loss.detach()  # read only by the guard, once per global step
        if self._guard.active:
            self.observe_loss()
        micro = 1 if self._replaying else self._config.gradient_accumulation
        if self._precision.scaler is not None or micro != 1:
            loss = self._precision.scale(loss, micro)
        grads = self._gradients(loss, self.parameter_list(), retain_graph=self._retain_graph)
        last = self._replaying or self.clock.last_micro_batch
        stepped, total = self._local_step(grads, last=last)
        if total is not None:
            params = self.parameter_list()
            if stepped and self.hooks.param_callback is not None:
                self.hooks.param_callback(params)
            self._keep_stepped_gradient([p.grad for p in params])
            for p in params:
                p.grad = None
            if step_scheduler and not self.clock.will_roll_back() and self.scheduler:
                self.scheduler.step()
        return loss_dict

    def _open_window(self) -> None:
        """Runs after `on_inner_loop_start` at each window start (subclasses extend)."""

    def _close_window(self) -> None:
        """Runs before `on_inner_loop_start` at each window start (subclasses extend)."""

    def settle(self) -> None:
        """Runs when `Engine.run` returns: the module must hold its own parameters then."""

    def checkpoint_blocker(self) -> str | None:
        """Why a checkpoint cannot capture this problem now (None: it can)."""
        return None

    def roll_back_step(self) -> bool:
        """If a window just ended: restore the state cached at its start, then take one real
        step on its last batch (with the uppers' new parameters) and step the scheduler."""
        if not self.clock.window_start:
            return False
        assert self.module is not None
        if not self._rollback.restore(self.module, self.optimizer):
            return False
        for p in self.parameter_list():
            p.grad = None
        self._replaying = True
        try:
            self._descend(self.cur_batch, step_scheduler=False)
        finally:
            self._replaying = False
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    def update_jacobian(self, into: list[Tensor] | None = None) -> list[Tensor]:
        """Diagonal ``P = du/dg`` of this problem's optimizer update at its current state
        and latest gradient, one tensor per trainable parameter (0 where not optimized).

        Raises:
            HypergradientError: the upper that is this problem's only reader consumed that
                gradient in its backward (`head_scaling`), and this problem has not stepped
                since."""
        if self._consumed_by is not None:
            raise HypergradientError(
                f"problem '{self._name}': the gradient its P reads was consumed by the "
                f"hypergradient of '{self._consumed_by}' (which formed P v during its "
                "backward); read update_jacobian() before that upper steps, or after this "
                "problem's next step")
        grads = (self._last_grads or []) if self._keeps_gradient else None
        return update_jacobian(self._name, self.parameter_list(), self.optimizer, grads,
                               strategy_of(self), into=into)

    def _keep_stepped_gradient(self, grads: list[Tensor | None]) -> None:
        """sama's P is evaluated at the gradient actually stepped (if its rule reads it)."""
        if self._keeps_gradient:
            self._last_grads, self._consumed_by = grads, None

    def head_scaling(self, reader: str) -> HeadScaling | None:
        """SAMA's P for the backward of upper ``reader`` to apply as each gradient arrives,
        handing the kept gradient over (`HeadScaling`); None: its hop scales afterwards."""
        if (self._sole_reader != reader or self._last_grads is None
                or not forms_p_locally(strategy_of(self))):
            return None
        kept, self._last_grads, self._consumed_by = self._last_grads, None, reader
        return HeadScaling(self._name, self.parameter_list(), self.optimizer, kept)

    def _log(self, loss_dict: dict[str, Any], global_step: int | None) -> None:
        log_step = self._config.log_step
        if log_step > 0 and self.count % log_step == 0 and self._engine is not None:
            step = self.count if self._config.log_local_step else global_step
            self._engine.log_metrics(self._name, loss_dict, step)

    # -- modes and state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Module, optimizer, scheduler, scaler and step counter of this problem."""
        state: dict[str, Any] = {"count": self.count}
        for key in ("module", "optimizer", "scheduler"):
            if getattr(self, key) is not None:
                state[key] = getattr(self, key).state_dict()
        if self._precision is not None and self._precision.scaler is not None:
            state["scaler"] = self._precision.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict` (the module's, optimizer's, scheduler's, scaler's)."""
        self.clock.count = int(state.get("count", 0))
        for key in ("module", "optimizer", "scheduler"):
            if key in state and getattr(self, key) is not None:
                getattr(self, key).load_state_dict(state[key])
        if "scaler" in state and self._precision is not None and self._precision.scaler:
            self._precision.scaler.load_state_dict(state["scaler"])

    def training_state(self) -> dict[str, Any]:
        """`state_dict` plus everything else needed to continue this problem exactly
        (accumulated gradients, roll-back snapshot, batch, data position, precision); a
        subclass with more state extends it and `load_training_state`."""
        from betty.checkpoint import storable_batch

        assert self._local_step is not None and self._gradients is not None
        return {"state": self.state_dict(), "gradients": self._gradients.state_dict(),
                "accumulated": self._local_step.accumulator.state_dict(),
                "roll_back": self._rollback.state_dict(),
                "cur_batch": storable_batch(self._name, self.cur_batch),
                "data": None if self._source is None else self._source.state_dict(),
                "precision": None if self._precision is None else self._precision.state_dict(),
                "hop_memory": self._hop_memory}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Inverse of `training_state` (checkpoints; the data loaders are replayed)."""
        assert self._local_step is not None and self._gradients is not None
        self.load_state_dict(state["state"])
        self._gradients.load_state_dict(state["gradients"])
        self._local_step.accumulator.load_state_dict(state["accumulated"],
                                                     self.parameter_list())
        self._rollback.load_state_dict(state["roll_back"], self._device)
        self.cur_batch = move_to(state["cur_batch"], self._device)
        if self._source is not None and state["data"] is not None:
            self._source.load_state_dict(state["data"])
        if self._precision is not None and state["precision"] is not None:
            self._precision.load_state_dict(state["precision"])
        self._hop_memory = move_to(state["hop_memory"], self._device)
