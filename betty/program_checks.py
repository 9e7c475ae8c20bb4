"""Checks of a whole program before training, each a clear error naming what to change.

Per-problem checks live in `betty.problems.setup`; these need several problems or the
`EngineConfig` at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch

from betty.errors import ConfigError, DependencyError

log = logging.getLogger("betty")


def pick_device(strategy_name: str, strategy: Any) -> torch.device:
    """The engine's device for ``EngineConfig.strategy``; 'gpu' without CUDA is refused."""
    from betty.distributed import DISTRIBUTED_STRATEGIES

    if strategy_name in DISTRIBUTED_STRATEGIES:
        return strategy.device  # cuda:<LOCAL_RANK>, or the CPU
    if strategy_name == "gpu" and not torch.cuda.is_available():
        raise ConfigError("EngineConfig.strategy='gpu' but CUDA is not available; use "
                          "'cpu' or 'default'")
    if strategy_name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def check_orders(problems: list[Any]) -> None:
    """Every path hop must be differentiable the way its upper asks for."""
    for upper in problems:
        if upper.config.first_order:
            continue
        for path in upper.paths:
            for lower in path[1:-1]:
                if not lower.supports_reverse_mode:
                    raise ConfigError(
                        f"problem '{upper.name}' has Config(first_order=False) (reverse "
                        f"mode), but lower problem '{lower.name}' on its path is a "
                        f"{type(lower).__name__}, whose updates are not differentiable; "
                        "make it an IterativeProblem or set first_order=True on "
                        f"'{upper.name}' to use '{lower.name}''s Config.type "
                        f"({lower.config.type!r})"
                    )


def check_shared_parameters(problems: list[Any]) -> None:
    """A tensor stepped by two problems' optimizers would be trained by the upper on the
    lower's objective as well (e.g. on validation data): refuse it."""
    owner: dict[int, str] = {}
    for problem in problems:
        if problem.optimizer is None:
            continue
        for group in problem.optimizer.param_groups:
            for p in group["params"]:
                first = owner.setdefault(id(p), problem.name)
                if first != problem.name:
                    raise DependencyError(
                        f"problems '{first}' and '{problem.name}' both optimize the same "
                        f"parameter (shape {tuple(p.shape)}); each parameter belongs to one "
                        "level. Give each problem its own module, or read the other problem's "
                        "parameters in training_step without optimizing them"
                    )


def check_windows_fit(problems: list[Any], train_iters: int) -> None:
    """A lower whose first window ends after ``train_iters`` never lets its uppers step: a
    warning, since a short run that a later one continues is legitimate."""
    if train_iters == 0:
        return
    for problem in problems:
        if problem.children or not problem.parents:
            continue  # only leaves step once per global step
        config = problem.config
        length = config.unroll_steps * config.gradient_accumulation
        needed = (config.warmup_steps // length + 1) * length  # first window past warm-up
        if needed > train_iters:
            log.warning(
                "problem '%s' ends its first unroll window after %d local steps (unroll_steps"
                "=%d, gradient_accumulation=%d, warmup_steps=%d), but EngineConfig.train_iters"
                "=%d: its uppers %s will not step in this run. Raise train_iters or lower "
                "unroll_steps", problem.name, needed, config.unroll_steps,
                config.gradient_accumulation, config.warmup_steps, train_iters,
                [p.name for p in problem.parents])


def check_checkpoint_dir(directory: str | os.PathLike[str] | None) -> bool:
    """Create ``checkpoint_dir`` and prove it writable now, not at the first save. Returns
    whether the folder existed before."""
    if directory is None:
        return True
    path = os.fspath(directory)
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".betty-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"EngineConfig.checkpoint_dir={path!r} cannot be written ({err.strerror}); choose "
            "a folder this process can create files in"
        ) from None
    return existed
