"""`Config` (one per problem) and `EngineConfig`: the original Betty's field names and defaults.

Both are dataclasses that check their fields when built, so a typo such as
``Config(type="cgg")`` fails at once with a message that lists the valid choices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from betty.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
LOGGER_TYPES = ("none", "tensorboard", "wandb", "console", "csv")
STRATEGIES = ("default", "cpu", "gpu", "distributed", "zero", "fsdp")
EARLY_STOPPING_MODES = ("min", "max")


def _choice(owner: str, field: str, value: object, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(
            f"{owner}.{field}={value!r} is not {what}; choose one of: {', '.join(choices)}"
        )


def _positive(owner: str, field: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)  # type: ignore[arg-type]
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{owner}.{field}={value!r} must be a finite number {bound}")


def _flags(owner: str, config: object, names: tuple[str, ...]) -> None:
    """Yes/no fields are bools: ``"no"`` or ``"False"`` would read as True."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{owner}.{name}={value!r} must be True or False (a bool, not "
                              f"{type(value).__name__})")


def _integer(owner: str, field: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner}.{field}={value!r} must be an integer >= {minimum}")


def _check_method(value: object) -> None:
    """``Config.type`` is a name in `betty.hypergradient.METHODS` (built-in or added with
    `betty.hypergradient.register`) or a method function itself."""
    from betty.hypergradient import METHODS  # lazy: betty.hypergradient imports Config

    if callable(value):
        return
    if not isinstance(value, str) or value not in METHODS:
        raise ConfigError(
            f"Config.type={value!r} is not a hypergradient method; choose one of: "
            f"{', '.join(METHODS)} (or add one with betty.hypergradient.register(name, fn))"
        )


@dataclass
class Config:
    """Settings of one problem (one level of the program).

    ``type`` is the method used to differentiate through THIS problem's solution when an
    upper problem asks for a hypergradient; ``first_order`` is read on the UPPER problem.
    """

    type: str = "darts"
    unroll_steps: int = 1
    first_order: bool = True
    retain_graph: bool = False
    allow_unused: bool = True
    gradient_accumulation: int = 1
    gradient_clipping: float = 0.0
    precision: str = "fp32"
    initial_dynamic_scale: float = 4096.0
    scale_factor: float = 2.0
    warmup_steps: int = 0
    log_step: int = -1
    log_local_step: bool = False
    darts_alpha: float = 0.01
    darts_multitask: bool = False
    sama_adam_alpha: float = 1.0
    sama_multitask: bool = False
    neumann_iterations: int = 1
    neumann_alpha: float = 1.0
    cg_iterations: int = 1
    cg_alpha: float = 1.0
    warm_start: bool = False  # ours: cg/neumann start from the previous outer step's solution
    nystrom_rank: int = 5  # ours: Hessian columns of the Nystrom approximation
    nystrom_rho: float = 0.01  # ours: damping, Nystrom solves (H_k + rho I) x = v
    nystrom_seed: int | None = None  # ours: fixed coordinates; None: a per-hop stream
    f2sa_lambda: float = 10.0  # ours, F2SA: the penalty at the first outer step
    f2sa_lambda_growth: float = 0.01  # ours, F2SA: added to the penalty every outer step
    f2sa_steps: int = 5  # ours, F2SA: steps of the penalized copy per outer step
    f2sa_lr: float = 0.1  # ours, F2SA: their step size (below 2 / the lower's smoothness)
    truncation_steps: int = 0  # ours: reverse mode back-propagates the last N updates only
    first_order_updates: bool = False  # ours, TaskBatchedProblem: first-order MAML
    fp16: bool = False  # the original's earlier spelling of precision="fp16"

    def __post_init__(self) -> None:
        if self.fp16 and self.precision == "fp32":
            self.precision = "fp16"
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that holds an unusable value."""
        _flags("Config", self, ("first_order", "retain_graph", "allow_unused", "log_local_step",
                                "darts_multitask", "sama_multitask", "first_order_updates",
                                "fp16"))
        _check_method(self.type)
        _choice("Config", "precision", self.precision, PRECISIONS, "a supported precision")
        _integer("Config", "unroll_steps", self.unroll_steps, minimum=1)
        _integer("Config", "gradient_accumulation", self.gradient_accumulation, minimum=1)
        _integer("Config", "warmup_steps", self.warmup_steps, minimum=0)
        _integer("Config", "neumann_iterations", self.neumann_iterations, minimum=0)
        _integer("Config", "cg_iterations", self.cg_iterations, minimum=1)
        _integer("Config", "nystrom_rank", self.nystrom_rank, minimum=1)
        _integer("Config", "f2sa_steps", self.f2sa_steps, minimum=1)
        _positive("Config", "f2sa_lambda_growth", self.f2sa_lambda_growth, allow_zero=True)
        if self.nystrom_seed is not None:
            _integer("Config", "nystrom_seed", self.nystrom_seed, minimum=0)
        _integer("Config", "truncation_steps", self.truncation_steps, minimum=0)
        if not isinstance(self.warm_start, bool):
            raise ConfigError(f"Config.warm_start={self.warm_start!r} must be True or False")
        if not isinstance(self.log_step, int) or self.log_step == 0 or self.log_step < -1:
            raise ConfigError(
                f"Config.log_step={self.log_step!r} must be a positive integer, or -1 for never"
            )
        _positive("Config", "gradient_clipping", self.gradient_clipping, allow_zero=True)
        for name in ("f2sa_lambda", "f2sa_lr", "darts_alpha", "sama_adam_alpha", "neumann_alpha",
                     "cg_alpha", "nystrom_rho",
                     "initial_dynamic_scale", "scale_factor"):
            _positive("Config", name, getattr(self, name))


@dataclass
class EngineConfig:
    """Settings of the whole program: how long to train, validation, logging, strategy."""

    train_iters: int = 50000
    valid_step: int = 500
    logger_type: str = "none"
    roll_back: bool = False
    backend: str = "nccl"
    strategy: str = "default"
    early_stopping: bool = False
    early_stopping_mode: str = "min"
    early_stopping_tolerance: int = 5
    early_stopping_metric: str = "loss"
    checkpoint_dir: str | None = None
    checkpoint_step: int = 0
    resume_from: str | None = None
    keep_checkpoints: int = 0
    # seeing a run (docs/observability.md)
    log_dir: str | None = None  # tensorboard: <log_dir or "betty_tensorboard">/<run_name>;
    # csv: <log_dir or "runs">/<run_name>; wandb: its dir
    run_name: str | None = None  # default: a time stamp; wandb: the run's name
    progress_bar: bool = True  # tqdm over global steps; off anyway when not on a terminal
    diagnostics: bool = False  # hypergradient norms, CG residual, Neumann radius, step times
    # several processes (docs/distributed.md): seconds a collective waits before it fails
    distributed_timeout: float = 1800.0
    # non-finite losses, gradients, hypergradients (docs/reliability.md): raise, skip or off
    nonfinite: str = "raise"
    distributed: bool = False  # the original's field, which its engine never read: see strategy

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that holds an unusable value."""
        _flags("EngineConfig", self, ("roll_back", "early_stopping", "progress_bar",
                                      "diagnostics", "distributed"))
        _integer("EngineConfig", "train_iters", self.train_iters, minimum=0)
        _integer("EngineConfig", "valid_step", self.valid_step, minimum=1)
        _choice("EngineConfig", "logger_type", self.logger_type, LOGGER_TYPES, "a logger")
        _choice("EngineConfig", "strategy", self.strategy, STRATEGIES, "a strategy")
        _choice("EngineConfig", "early_stopping_mode", self.early_stopping_mode,
                EARLY_STOPPING_MODES, "an early-stopping mode")
        _integer("EngineConfig", "early_stopping_tolerance", self.early_stopping_tolerance,
                 minimum=1)
        _positive("EngineConfig", "distributed_timeout", self.distributed_timeout)
        _choice("EngineConfig", "nonfinite", self.nonfinite, ("raise", "skip", "off"),
                "a non-finite policy")
        self._validate_checkpointing()
        for name in ("log_dir", "run_name"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"EngineConfig.{name}={value!r} must be a str or None")

    def _validate_checkpointing(self) -> None:
        """checkpoint_dir: folder of ``step_<N>.pt`` files (also where Ctrl-C saves);
        checkpoint_step: save every N global steps (0 = off); resume_from: a checkpoint
        path, or "latest" (the newest in checkpoint_dir; none there = start afresh);
        keep_checkpoints: keep only the newest N in checkpoint_dir (0 = keep all)."""
        for name in ("checkpoint_dir", "resume_from"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"EngineConfig.{name}={value!r} must be a path (str) or None")
        _integer("EngineConfig", "checkpoint_step", self.checkpoint_step, minimum=0)
        _integer("EngineConfig", "keep_checkpoints", self.keep_checkpoints, minimum=0)
        needs_dir = [f"{name}={getattr(self, name)!r}"
                     for name in ("checkpoint_step", "keep_checkpoints") if getattr(self, name)]
        needs_dir += ["resume_from='latest'"] if self.resume_from == "latest" else []
        if self.checkpoint_dir is None and needs_dir:
            raise ConfigError(
                f"EngineConfig.{needs_dir[0]} needs a folder of checkpoints; set "
                "EngineConfig.checkpoint_dir (e.g. checkpoint_dir='checkpoints')"
            )
