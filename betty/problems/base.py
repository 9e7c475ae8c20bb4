"""`ProblemBase`: a problem's identity, the members users touch, and its wiring.

`betty.problems.problem.Problem` adds set-up, the local step and state on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.configs import Config
from betty.errors import ProblemDefinitionError
from betty.problems.data import BatchSource
from betty.problems.hooks import ProblemHooks
from betty.schedule import WindowClock

if TYPE_CHECKING:
    from betty.engine import Engine


class ProblemBase(ProblemHooks):
    """Name, config, module, optimizer, scheduler, data, and the links to other problems."""

    def __init__(self, name: str, config: Config | None = None,
                 module: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 train_data_loader: Any = None, extra_config: Any = None,
                 device: str | torch.device | None = None) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ProblemDefinitionError(
                f"Problem name {name!r} must be a Python identifier (problems reach each "
                "other as attributes, e.g. self.inner)"
            )
        self._name = name
        self._config = config if config is not None else Config()
        self.cfg = extra_config
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.train_data_loader = train_data_loader
        self.cur_batch: Any = None
        self.clock = WindowClock()
        self._parents: list[Any] = []
        self._children: list[Any] = []
        self._paths: list[list[Any]] = []
        self._leaf = False
        self._engine: Engine | None = None
        self._device = torch.device("cpu")
        # the original's argument: where this problem trains (default: the engine's device)
        self.requested_device = None if device is None else torch.device(device)
        self._source: BatchSource | None = None
        self._last_loss: Tensor | None = None
        self._training = True

    # -- members users touch -----------------------------------------------------------
    name = property(lambda self: self._name, doc="This problem's name (read-only).")
    config = property(lambda self: self._config, doc="This problem's `Config` (read-only).")
    children = property(lambda self: self._children,
                        doc="The lower problems that trigger this one (``l2u``).")
    parents = property(lambda self: self._parents,
                       doc="The upper problems this one triggers (``l2u``).")
    paths = property(lambda self: self._paths, doc="Hypergradient paths ``[self, ..., self]``.")
    engine = property(lambda self: self._engine, doc="The `Engine` running this problem.")

    @property
    def count(self) -> int:
        """Local steps taken (micro-batches)."""
        return self.clock.count

    @property
    def leaf(self) -> bool:
        return self._leaf

    @leaf.setter
    def leaf(self, value: bool) -> None:
        self._leaf = bool(value)

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

    @property
    def last_loss(self) -> Tensor | None:
        """The latest local step's loss, on the device (read it only when printing)."""
        return self._last_loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- wiring (the engine calls these; the original's unit tests call them too) ---------
    def train(self) -> None:
        """Training mode: local steps count, the module in train mode."""
        self._training = True
        if self.module is not None:
            self.module.train()

    def eval(self) -> None:
        """Evaluation mode (validation): steps do not count, the module in eval mode."""
        self._training = False
        if self.module is not None:
            self.module.eval()

    def cuda_devices(self) -> list[int]:
        """CUDA device indices whose random state a hypergradient probe must keep."""
        return [self._device.index or 0] if self._device.type == "cuda" else []

    def add_child(self, problem: Any) -> None:
        """Make ``problem`` a lower of this one (the engine wires ``l2u`` this way)."""
        if problem not in self._children:
            self._children.append(problem)

    def add_parent(self, problem: Any) -> None:
        """Make ``problem`` an upper of this one."""
        if problem not in self._parents:
            self._parents.append(problem)

    def add_paths(self, paths: list[list[Any]]) -> None:
        """Add hypergradient paths that start and end at this problem."""
        self._paths.extend(p for p in paths if p not in self._paths)

    def clear_dependencies(self) -> None:
        """Forget lowers, uppers and paths (the engine re-wires a program)."""
        self._children, self._parents, self._paths = [], [], []

    def set_module(self, module: torch.nn.Module) -> None:
        """Replace the module (its parameters are read again)."""
        self.module = module
        self.refresh_parameters()

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace the optimizer (used as given, never rebuilt)."""
        self.optimizer = optimizer

    def set_scheduler(self, scheduler: Any) -> None:
        """Replace the learning-rate scheduler."""
        self.scheduler = scheduler

    def set_train_data_loader(self, loader: Any) -> None:
        """Replace the data (a loader, a list of batches, or a tuple of them)."""
        self.train_data_loader = loader
        if self._source is not None:
            self._source = BatchSource(self._name, loader, self.epoch_callback)

    def attach_clock(self, clock: WindowClock) -> None:
        """Run on the schedule's clock for this problem (its step count carries over)."""
        clock.count = self.clock.count
        self.clock = clock

    def step(self, global_step: int | None = None) -> bool:
        """One local step and, as the original's ``Problem.step`` does, one step of every
        upper whose lowers have all completed a window (the engine's cascade, with
        roll-back). True when this problem's window ended. `Engine.train_step` calls it
        for every leaf; a user's ``train_step`` override may too."""
        engine = self._engine
        if engine is None or engine.cascading:
            return self.local_step(global_step)  # type: ignore[attr-defined]
        return engine.cascade_from(self)

    def refresh_parameters(self) -> None:
        """Re-read `trainable_parameters()` (after the module's parameters were replaced);
        `Problem` caches them."""
