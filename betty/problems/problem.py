"""`Problem`: one level of a multilevel program and its local step.

One local step, in order: window-start hook -> batch -> loss (under autocast) -> gradients
(direct + hypergradients along every path, one backward for the direct part) ->
``grad_callback`` -> on the last micro-batch: unscale -> clip -> optimizer step -> scaler
update -> ``param_callback`` -> clear gradients -> scheduler step.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.configs import Config
from betty.diagnostics import active_diagnostics
from betty.distributed.strategy import strategy_of
from betty.errors import ConfigError, HypergradientError, ProblemDefinitionError, TrainingError
from betty.hypergradient.chain import path_hypergradient
from betty.problems.data import BatchSource, move_to
from betty.problems.hooks import ProblemHooks
from betty.problems.precision import Precision

if TYPE_CHECKING:
    from betty.engine import Engine

log = logging.getLogger("betty")


def _overrides(obj: object, name: str, base: type) -> bool:
    return getattr(type(obj), name) is not getattr(base, name)


class Problem(ProblemHooks):
    """One level of a multilevel program: module, optimizer, data and ``training_step``.

    Example:
        >>> class Inner(ImplicitProblem):
        ...     def training_step(self, batch):
        ...         x, y = batch
        ...         return F.cross_entropy(self.module(x), y) + self.hpo() * l2(self.module)
    """

    def __init__(self, name: str, config: Config | None = None,
                 module: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 train_data_loader: Any = None, extra_config: Any = None) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ProblemDefinitionError(
                f"Problem name {name!r} must be a Python identifier (problems reach each "
                "other as attributes, e.g. self.inner)"
            )
        self._name = name
        self._config = config if config is not None else Config()
        self.cfg = extra_config
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_data_loader = train_data_loader
        self.cur_batch: Any = None
        self._count = 0
        self._parents: list[Problem] = []
        self._children: list[Problem] = []
        self._paths: list[list[Problem]] = []
        self._leaf = False
        self._training = True
        self._engine: Engine | None = None
        self._source: BatchSource | None = None
        self._device = torch.device("cpu")
        self._precision: Precision | None = None
        self._window_start = True
        self._hypergradient_seen = False
        self._last_loss: Tensor | None = None
        self._cache: dict[str, Any] | None = None
        self._replaying = False
        self._shares_window_graph = False  # set when several uppers backprop one window
        self._param_cache: list[Tensor] | None = None
        self._hooks: dict[str, bool] = {}
        self._strategy: Any = None
        self._diagnostics: Any = None
        self._roll_back = False
        self._keeps_gradient = False
        self._last_grads: list[Tensor] = []  # latest gradient, for sama's P
        self.ready: list[bool] = []

    # -- read-only members users touch ---------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> Config:
        return self._config

    @property
    def count(self) -> int:
        return self._count

    @property
    def children(self) -> list[Problem]:
        return self._children

    @property
    def parents(self) -> list[Problem]:
        return self._parents

    @property
    def paths(self) -> list[list[Problem]]:
        return self._paths

    @property
    def leaf(self) -> bool:
        return self._leaf

    @leaf.setter
    def leaf(self, value: bool) -> None:
        self._leaf = bool(value)

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def device(self) -> torch.device:
        """The device this problem trains on (set by the engine before training)."""
        return self._device

    @property
    def env(self) -> Any:
        """The engine's ``env`` (the original's `betty.envs.Env`), None without one."""
        return None if self._engine is None else self._engine.env

    @property
    def _global_step(self) -> int:
        """The engine's global step (the original's programs read ``self._global_step``)."""
        return 0 if self._engine is None else self._engine.global_step

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- wiring (the engine calls these; the original's unit tests call them too) ---------
    def add_child(self, problem: Problem) -> None:
        if problem not in self._children:
            self._children.append(problem)

    def add_parent(self, problem: Problem) -> None:
        if problem not in self._parents:
            self._parents.append(problem)

    def add_paths(self, paths: list[list[Problem]]) -> None:
        self._paths.extend(p for p in paths if p not in self._paths)

    def clear_dependencies(self) -> None:
        self._children, self._parents, self._paths = [], [], []

    def set_module(self, module: torch.nn.Module) -> None:
        self.module = module
        self._param_cache = None

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def set_scheduler(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def set_train_data_loader(self, loader: Any) -> None:
        self.train_data_loader = loader
        if self._source is not None:
            self._source = BatchSource(self._name, loader, self.epoch_callback)

    # -- set-up before training ----------------------------------------------------------
    def check_definition(self) -> None:
        """Raise `ProblemDefinitionError` for what this problem lacks (before training)."""
        if not _overrides(self, "training_step", ProblemHooks):
            raise ProblemDefinitionError(
                f"problem '{self._name}' ({type(self).__name__}) does not define "
                "training_step(self, batch); subclass ImplicitProblem and return the loss"
            )
        try:
            self._config.validate()
        except ConfigError as err:  # a field edited after Config() was built
            raise ConfigError(f"problem '{self._name}': {err}") from None

    def initialize(self, engine: Engine, device: torch.device) -> None:
        """Resolve module/optimizer/scheduler/data (constructor or hooks) and check them."""
        self._engine = engine
        self._device = device
        self.check_definition()
        reverse_only = [f"{field}={getattr(self._config, field)!r}"
                        for field in ("truncation_steps", "first_order_updates")
                        if getattr(self._config, field)]
        if reverse_only and not getattr(self, "supports_reverse_mode", False):
            raise ConfigError(
                f"problem '{self._name}' is a {type(self).__name__}, but its Config sets "
                f"{', '.join(reverse_only)}, which only act on the differentiable updates of "
                "an IterativeProblem or TaskBatchedProblem; remove them or change the class"
            )
        self.module = _given(self.configure_module(), self.module)
        if not isinstance(self.module, torch.nn.Module):
            raise ProblemDefinitionError(
                f"problem '{self._name}' has no module; pass module=... or define "
                "configure_module()"
            )
        self.module.to(device)
        self.optimizer = _given(self.configure_optimizer(), self.optimizer)
        if self.optimizer is None and self.trainable_parameters():
            raise ProblemDefinitionError(
                f"problem '{self._name}' has no optimizer; pass optimizer=... or define "
                "configure_optimizer()"
            )
        self.scheduler = _given(self.configure_scheduler(), self.scheduler)
        self.train_data_loader = _given(self.configure_train_data_loader(),
                                        self.train_data_loader)
        if self.train_data_loader is not None:
            self._source = BatchSource(self._name, self.train_data_loader, self.epoch_callback)
        elif not _overrides(self, "get_batch", Problem):
            raise ProblemDefinitionError(
                f"problem '{self._name}' has no data; pass train_data_loader=..., define "
                "configure_train_data_loader(), or override get_batch()"
            )
        self._check_sama_optimizer(engine)
        self._precision = Precision(self._name, self._config, device)
        self._param_cache = (list(self.trainable_parameters()) if not _overrides(
            self, "trainable_parameters", ProblemHooks) else None)
        self._hooks = {name: _overrides(self, name, ProblemHooks)
                       for name in ("grad_callback", "param_callback", "custom_optimizer_step")}
        self._strategy = strategy_of(self)
        self._diagnostics = active_diagnostics(engine)
        self._roll_back = bool(self._parents) and engine.config.roll_back
        self._keeps_gradient = (self._config.type == "sama"
                                and not isinstance(self.optimizer, torch.optim.SGD))
        self.ready = [False] * len(self._children)
        self._window_start = True

    def _check_sama_optimizer(self, engine: Engine) -> None:
        """Config.type='sama' needs P = du/dg of this problem's optimizer: fail before
        training if an upper differentiates through this problem and no rule knows it."""
        if self._config.type != "sama" or self.optimizer is None:
            return
        uppers = [u.name for u in getattr(engine, "problems", []) if u.config.first_order
                  and any(self in path[1:-1] for path in u.paths)]
        if not uppers:
            return
        from betty.optim import find_rule

        try:
            find_rule(self.optimizer)
        except TypeError as err:
            raise ConfigError(
                f"problem '{self._name}' has Config(type='sama'), which needs the update "
                f"Jacobian of its optimizer (problems {uppers} differentiate through it): "
                f"{err} Config.type darts, neumann and cg work with any optimizer."
            ) from None

    def _trainable(self) -> list[Tensor]:
        """`trainable_parameters()`, read once at initialize unless a subclass overrides it
        (the hot path asks for it several times per step)."""
        cached = self._param_cache
        return cached if cached is not None else self.trainable_parameters()

    def engine_buffers(self) -> list[Tensor]:
        """Buffers of every problem's module (restored after hypergradient probes)."""
        return self._engine.all_buffers() if self._engine is not None else []

    def cuda_devices(self) -> list[int]:
        return [self._device.index or 0] if self._device.type == "cuda" else []

    # -- data ----------------------------------------------------------------------------
    def get_batch(self) -> Any:
        """Next training batch (override to generate batches without a loader)."""
        assert self._source is not None
        batch = self._source.next_batch()
        return batch if self._device.type == "cpu" else move_to(batch, self._device)

    # -- loss ----------------------------------------------------------------------------
    def _loss_and_dict(self, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        assert self._precision is not None
        if self._precision.dtype is None:
            out = self.training_step(batch)
        else:
            with self._precision.autocast():
                out = self.training_step(batch)
        if isinstance(out, dict):
            if "loss" not in out:
                raise TrainingError(
                    f"problem '{self._name}': training_step returned a dict without key "
                    f"'loss' (keys: {sorted(out)}); put the scalar loss under 'loss'"
                )
            loss, extras = out["loss"], out
        else:
            loss, extras = out, None
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TrainingError(
                f"problem '{self._name}': training_step must return a scalar loss tensor, got "
                f"{shape} at local step {self._count}; reduce it, e.g. with .mean()"
            )
        if loss.dim() != 0:
            loss = loss.reshape(())
        return loss, ({"loss": loss} if extras is None else {**extras, "loss": loss})

    def hop_loss(self) -> Tensor:
        """This problem's loss on its current batch, for hypergradient hops through it."""
        loss = self._loss_and_dict(self.cur_batch)[0]
        return loss if loss.dtype in (torch.float32, torch.float64) else loss.float()

    def check_finite(self, loss: Tensor | None = None) -> None:
        """Raise `TrainingError` if the latest loss is NaN or infinite (one host read)."""
        loss = self._last_loss if loss is None else loss
        if loss is not None and not math.isfinite(loss.detach().item()):
            raise TrainingError(
                f"problem '{self._name}': loss is {loss.detach().item()} at local step "
                f"{self._count} "
                f"(global step {self._engine.global_step if self._engine else '?'}); "
                "lower the learning rate, clip gradients (Config.gradient_clipping) or check "
                "the data"
            )

    # -- gradients -----------------------------------------------------------------------
    def _direct_and_heads(self, loss: Tensor, params: list[Tensor]
                          ) -> tuple[list[Tensor | None], list[list[Tensor | None]]]:
        """One backward for this problem's own gradient and every path's first vector."""
        heads = [path[1]._trainable() for path in self._implicit_paths()]
        inputs: list[Tensor] = list(params)
        index: dict[int, int] = {id(p): i for i, p in enumerate(inputs)} if heads else {}
        for head in heads:
            for p in head:
                if id(p) not in index:
                    index[id(p)] = len(inputs)
                    inputs.append(p)
        if not loss.requires_grad:
            raise TrainingError(
                f"problem '{self._name}': the loss does not depend on any parameter that "
                "requires grad; training_step must use this problem's module"
            )
        retain = self._config.retain_graph or self._shares_window_graph
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain, allow_unused=True)
        direct = list(grads[: len(params)])
        if not self._config.allow_unused and any(g is None for g in direct):
            unused = [i for i, g in enumerate(direct) if g is None]
            raise TrainingError(
                f"problem '{self._name}': parameters {unused} of trainable_parameters() are not "
                "used by the loss and Config.allow_unused=False; use them or set "
                "allow_unused=True"
            )
        return direct, [[grads[index[id(p)]] for p in head] for head in heads]

    def compute_gradients(self, loss: Tensor) -> list[Tensor | None]:
        """Direct gradient plus the hypergradient of every path, for trainable_parameters()."""
        params = self._trainable()
        reached = False
        if not self._config.first_order and not self._hypergradient_seen:
            reached = self._reverse_paths_reach(loss, params)
        if not self._paths and strategy_is_single(self._strategy):  # fast path: no hops
            retain = self._config.retain_graph or self._shares_window_graph
            if not loss.requires_grad or not self._config.allow_unused:
                return self._direct_and_heads(loss, params)[0]
            return list(torch.autograd.grad(loss, params, retain_graph=retain,
                                            allow_unused=True))
        direct, heads = self._direct_and_heads(loss, params)
        strategy = self._strategy
        if strategy.world_size > 1:  # several processes: one all-reduce for all heads
            heads = strategy.average_nested(heads)
        diagnostics = self._diagnostics
        if diagnostics is not None and self._paths:  # EngineConfig.diagnostics
            diagnostics.record_norm(self._name, "direct_norm", direct)
        total = direct
        for path, head in zip(self._implicit_paths(), heads):
            hyper = path_hypergradient(path, head)
            if hyper is None:
                continue
            reached = True
            total = [h if d is None else d + h for d, h in zip(total, hyper)]
        if self._paths and not reached and not self._hypergradient_seen:
            names = [" -> ".join(p.name for p in path) for path in self._paths]
            raise HypergradientError(
                f"problem '{self._name}': every hypergradient path ({names}) carries nothing: "
                f"the loss of '{self._name}' does not use the parameters of the lower problems "
                "on its paths, or those problems' losses do not use the parameters of "
                f"'{self._name}'. Fix training_step or dependencies['u2l']"
            )
        self._hypergradient_seen = self._hypergradient_seen or reached
        if strategy.world_size > 1:
            return strategy.average_optional(total)  # one all-reduce: direct + hypergradients
        return total

    def _reverse_paths_reach(self, loss: Tensor, params: list[Tensor]) -> bool:
        """Reverse mode, checked once: does the loss reach our parameters through the
        unrolled window of a lower on a path (not only directly)?"""
        for path in self._paths:
            window = getattr(path[1], "window_parameters", lambda: None)()
            # a window tensor may be a constant (e.g. a head that initial_parameters() fixes)
            window = [w for w in window or [] if w.requires_grad]
            if not window or not loss.requires_grad:
                continue
            v = torch.autograd.grad(loss, window, retain_graph=True, allow_unused=True)
            pairs = [(w, g) for w, g in zip(window, v) if g is not None]
            if not pairs:
                continue
            back = torch.autograd.grad([w for w, _ in pairs], params,
                                       grad_outputs=[g for _, g in pairs],
                                       retain_graph=True, allow_unused=True)
            if any(b is not None for b in back):
                return True
        return False

    def _implicit_paths(self) -> list[list[Problem]]:
        """Paths whose hops use implicit methods; in reverse mode (``first_order=False``)
        the lowers' unrolled updates are in the loss's graph and autograd covers them."""
        return self._paths if self._config.first_order else []

    # -- one local step ------------------------------------------------------------------
    def step(self, global_step: int | None = None) -> bool:
        """One local step; returns True when this step ends an unroll window (the engine
        then triggers the uppers). Use `Engine.train_step` to step a whole program."""
        if self._window_start:
            self._end_previous_window()
            self.on_inner_loop_start()
            self._window_start = False
            self._begin_window()
        elif self._roll_back and self._count % self._window_length() == 0:
            self._cache = self._snapshot()  # a warm-up window ended without a roll-back
        if self._training:
            self._count += 1
        self.cur_batch = self.get_batch()
        loss_dict = self._descend(self.cur_batch)
        logged = self._log(loss_dict, global_step)
        gas = self._config.gradient_accumulation
        ends_window = (self._training and self._count % (self._config.unroll_steps * gas) == 0
                       and self._count > self._config.warmup_steps)
        if logged or (ends_window and self._device.type == "cpu"):  # host read: free on CPU
            self.check_finite()
        if ends_window:
            self._window_start = True
        return ends_window

    def _descend(self, batch: Any, *, step_scheduler: bool = True) -> dict[str, Any]:
        """Loss, gradients and (on the last micro-batch) the optimizer step."""
        loss, loss_dict = self._loss_and_dict(batch)
        self._last_loss = loss.detach()  # read only when checked
        assert self._precision is not None
        replay = self._replaying  # a roll-back replay is one whole step on one batch
        precision = self._precision
        if precision.scaler is not None or self._config.gradient_accumulation != 1:
            loss = precision.scale(loss, self._config, whole_step=replay)
        grads = self.compute_gradients(loss)
        self.accumulate(grads)
        if replay or self._count % self._config.gradient_accumulation == 0:
            self.optimizer_step(step_scheduler=step_scheduler and not self._will_roll_back())
        return loss_dict

    def _end_previous_window(self) -> None:
        """Runs before `on_inner_loop_start` at each window start (subclasses extend)."""

    def _settle(self) -> None:
        """Runs when `Engine.run` returns: the module must hold its own parameters then."""

    def _unsaveable_window(self) -> str | None:
        """Why a checkpoint cannot capture this problem now (None: it can)."""
        return None

    def _begin_window(self) -> None:
        """Runs after `on_inner_loop_start` at each window start (subclasses extend)."""
        if self._rolls_back():
            self._cache = self._snapshot()

    # -- roll-back (EngineConfig.roll_back): the window is a look-ahead for the uppers -----
    def _rolls_back(self) -> bool:
        return self._roll_back

    def _window_length(self) -> int:
        return self._config.unroll_steps * self._config.gradient_accumulation

    def _will_roll_back(self) -> bool:
        """Whether the current local step is a look-ahead that its window's end will roll
        back (a warm-up window triggers nothing, so its steps are real ones)."""
        if not self._roll_back:
            return False
        length = self._window_length()
        return -(-self._count // length) * length > self._config.warmup_steps

    def _snapshot(self) -> dict[str, Any]:
        assert self.module is not None
        state = {"module": {k: v.detach().clone() for k, v in self.module.state_dict().items()}}
        if self.optimizer is not None:
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def roll_back_step(self) -> bool:
        """If a window just ended: restore the state cached at its start, then take one real
        step on its last batch (with the uppers' new parameters) and step the scheduler."""
        if self._cache is None or not self._window_start:
            return False
        assert self.module is not None
        self.module.load_state_dict(self._cache["module"])
        if self.optimizer is not None and "optimizer" in self._cache:
            self.optimizer.load_state_dict(self._cache["optimizer"])
        self._cache = None
        for p in self._trainable():
            p.grad = None
        self._replaying = True
        try:
            self._descend(self.cur_batch, step_scheduler=False)
        finally:
            self._replaying = False
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    def _p_reads_gradient(self) -> bool:
        """Only sama reads the stepped gradient, and SGD's P does not depend on it: keep a
        gradient's worth of memory alive only when it is needed."""
        return self._keeps_gradient

    def update_jacobian(self) -> list[Tensor]:
        """Diagonal ``P = du/dg`` of this problem's optimizer update at its current state
        and latest gradient, one tensor per trainable parameter (0 where not optimized)."""
        params = self._trainable()
        if self.optimizer is None:
            return [torch.zeros_like(p) for p in params]
        own = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._keeps_gradient:
            last = {id(p): g for p, g in zip(params, self._last_grads) if g is not None}
            grads = [last[id(p)] if id(p) in last else torch.zeros_like(p) for p in own]
        else:  # SGD's P does not read the gradient: pass the parameters, allocate nothing
            grads = list(own)
        try:  # the strategy reads sharded optimizer state (ZeRO) where it must
            diag = strategy_of(self).update_jacobian_diag(self.optimizer, own, grads)
        except TypeError as err:
            raise HypergradientError(f"problem '{self._name}' (Config.type='sama'): {err}") \
                from None
        by_id = {id(p): d for p, d in zip(own, diag)}
        return [by_id.get(id(p), torch.zeros_like(p)) for p in params]

    def accumulate(self, grads: list[Tensor | None]) -> None:
        """Add this micro-batch's gradients into ``.grad`` (then run `grad_callback`)."""
        params = self._trainable()
        for p, g in zip(params, grads):  # autograd.grad outputs: already detached
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        if self._hooks.get("grad_callback", True) or "grad_callback" in self.__dict__:
            self.grad_callback([p.grad for p in params])

    def optimizer_step(self, *, step_scheduler: bool = True) -> None:
        """unscale -> clip -> step -> scaler update -> param_callback -> clear -> scheduler."""
        assert self._precision is not None
        params = self._trainable()
        if self._precision.plain and self._strategy is not None \
                and self._strategy.world_size == 1:
            self._optimizer_step_here()  # fp32, no clipping, one process: nothing around it
            stepped = True
        else:
            stepped = self._precision.step(self, params)
        if stepped and (self._hooks.get("param_callback", True)
                        or "param_callback" in self.__dict__):
            self.run_param_callback(params)
        if self._keeps_gradient:  # sama's P at the gradient actually stepped (unscaled,
            self._last_grads = [p.grad for p in params]  # clipped, all micro-batches)
        for p in params:
            p.grad = None
        if step_scheduler and self.scheduler is not None:
            self.scheduler.step()

    def run_param_callback(self, params: list[Tensor]) -> None:
        """``param_callback(params)``, or ``param_callback()`` for the original's form."""
        if not self._hooks.get("param_callback", True) and "param_callback" not in self.__dict__:
            return
        if _param_callback_takes_args(self):
            self.param_callback(params)
        else:
            self.param_callback()  # type: ignore[call-arg]

    def run_optimizer(self) -> None:
        """``custom_optimizer_step`` if overridden, else ``optimizer.step()``."""
        if self._strategy is not None and self._strategy.world_size > 1:
            with self._strategy.optimizer_step(self):  # FSDP: gradients to the shards
                self._optimizer_step_here()
        else:
            self._optimizer_step_here()

    def _optimizer_step_here(self) -> None:
        if self._hooks.get("custom_optimizer_step", False):
            self.custom_optimizer_step()
        elif self.optimizer is not None:
            self.optimizer.step()

    def _log(self, loss_dict: dict[str, Any], global_step: int | None) -> bool:
        log_step = self._config.log_step
        if log_step > 0 and self._count % log_step == 0 and self._engine is not None:
            step = self._count if self._config.log_local_step else global_step
            self._engine.log_metrics(self._name, loss_dict, step)
            return True
        return False

    # -- modes and state -----------------------------------------------------------------
    def train(self) -> None:
        self._training = True
        if self.module is not None:
            self.module.train()

    def eval(self) -> None:
        self._training = False
        if self.module is not None:
            self.module.eval()

    def state_dict(self) -> dict[str, Any]:
        """Module, optimizer, scheduler, scaler and step counter of this problem."""
        state: dict[str, Any] = {"count": self._count}
        if self.module is not None:
            state["module"] = self.module.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self._precision is not None and self._precision.scaler is not None:
            state["scaler"] = self._precision.scaler.state_dict()
        return state

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 grad scaler (inf/NaN gradients)."""
        return self._precision.skipped_steps if self._precision is not None else 0

    def training_state(self) -> dict[str, Any]:
        """`state_dict` plus everything else a checkpoint needs to continue this problem
        exactly (window, accumulated gradients, roll-back cache, data position); a subclass
        with more state extends it and `load_training_state`."""
        from betty.checkpoint import problem_training_state

        return problem_training_state(self)

    def load_training_state(self, state: dict[str, Any]) -> None:
        from betty.checkpoint import load_problem_training_state

        load_problem_training_state(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._count = int(state.get("count", 0))
        if "module" in state and self.module is not None:
            self.module.load_state_dict(state["module"])
        if "optimizer" in state and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self._precision is not None and self._precision.scaler:
            self._precision.scaler.load_state_dict(state["scaler"])


def strategy_is_single(strategy: Any) -> bool:
    return strategy is None or strategy.world_size == 1


def _given(from_hook: Any, from_constructor: Any) -> Any:
    """A hook's non-None return value wins over the constructor argument."""
    return from_hook if from_hook is not None else from_constructor


def _param_callback_takes_args(problem: Problem) -> bool:
    import inspect

    fn = type(problem).param_callback
    cached = _PARAM_CALLBACK_ARITY.get(fn)
    if cached is None:
        params = list(inspect.signature(fn).parameters.values())[1:]
        cached = _PARAM_CALLBACK_ARITY[fn] = bool(params)
    return cached


_PARAM_CALLBACK_ARITY: dict[Any, bool] = {}
