"""Set-up checks of one problem, run by `Problem.initialize` before any training.

Each check raises with the problem's name and what to change.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from betty.errors import ConfigError, ProblemDefinitionError

log = logging.getLogger("betty")


def given(from_hook: Any, from_constructor: Any) -> Any:
    """A ``configure_*`` hook's non-None return value wins over the constructor argument."""
    return from_hook if from_hook is not None else from_constructor


def check_reverse_only_fields(problem: Any) -> None:
    """``truncation_steps`` and ``first_order_updates`` act only on differentiable updates."""
    config = problem.config
    fields = [f"{f}={getattr(config, f)!r}" for f in ("truncation_steps", "first_order_updates")
              if getattr(config, f)]
    if fields and not problem.supports_reverse_mode:
        raise ConfigError(
            f"problem '{problem.name}' is a {type(problem).__name__}, but its Config sets "
            f"{', '.join(fields)}, which only act on the differentiable updates of "
            "an IterativeProblem or TaskBatchedProblem; remove them or change the class"
        )


def check_module(problem: Any) -> None:
    if not isinstance(problem.module, torch.nn.Module):
        raise ProblemDefinitionError(
            f"problem '{problem.name}' has no module; pass module=... or define "
            "configure_module()"
        )


def check_optimizer(problem: Any) -> None:
    if problem.optimizer is None and problem.trainable_parameters():
        raise ProblemDefinitionError(
            f"problem '{problem.name}' has no optimizer; pass optimizer=... or define "
            "configure_optimizer()"
        )


def check_meta_trainable(problem: Any, overridden: bool) -> None:
    """The original's ``meta_trainable_parameters``: betty differentiates through
    ``trainable_parameters``; an override naming other tensors would be silently ignored."""
    if not overridden:
        return
    meta = {id(p) for p in problem.meta_trainable_parameters()}
    if meta != {id(p) for p in problem.trainable_parameters()}:
        raise ProblemDefinitionError(
            f"problem '{problem.name}' overrides meta_trainable_parameters() with tensors "
            "other than trainable_parameters(); betty differentiates hypergradients through "
            "trainable_parameters() (the parameters its optimizer steps): override that "
            "instead, or make a separate problem for the other parameters"
        )


def check_sama_optimizer(problem: Any, problems: list[Any]) -> None:
    """Config.type='sama' needs P = du/dg of the problem's optimizer: fail before training if
    an upper differentiates through this problem and no rule knows its optimizer."""
    if problem.config.type != "sama" or problem.optimizer is None:
        return
    uppers = [u.name for u in problems if u.config.first_order
              and any(problem in path[1:-1] for path in u.paths)]
    if not uppers:
        return
    from betty.optim import find_rule

    try:
        find_rule(problem.optimizer)
    except TypeError as err:
        raise ConfigError(
            f"problem '{problem.name}' has Config(type='sama'), which needs the update "
            f"Jacobian of its optimizer (problems {uppers} differentiate through it): "
            f"{err} Config.type darts, neumann and cg work with any optimizer."
        ) from None


def check_data(problem: Any, defines_get_batch: bool) -> None:
    loader = problem.train_data_loader
    if loader is None and not defines_get_batch:
        raise ProblemDefinitionError(
            f"problem '{problem.name}' has no data; pass train_data_loader=..., define "
            "configure_train_data_loader(), or override get_batch()"
        )
    if isinstance(loader, tuple) and any(isinstance(t, torch.Tensor) for t in loader):
        raise ProblemDefinitionError(
            f"problem '{problem.name}': train_data_loader is a tuple holding tensors, which "
            "betty reads as one loader per element (each yielding single rows). For one "
            "dataset of (x, y) batches pass a DataLoader(TensorDataset(x, y), ...) or a list "
            "of batches [(x, y)]; a tuple is for several loaders"
        )


def check_has_parameters(problem: Any) -> None:
    """A problem trains its parameters: none that require grad is a definition error."""
    if not list(problem.trainable_parameters()):
        raise ProblemDefinitionError(
            f"problem '{problem.name}' has no trainable parameters (its module has none "
            "that require grad, or trainable_parameters() returned none); give it a module "
            "with parameters, or read the module from another problem instead"
        )


def shares_a_window(problem: Any) -> bool:
    """Whether this reverse-mode upper back-propagates through a lower window that another
    reverse-mode upper back-propagates through too (so its backward keeps the graph)."""
    return not problem.config.first_order and any(
        c.supports_reverse_mode and sum(not u.config.first_order for u in c.parents) > 1
        for c in problem.children)


def placement(problem: Any, engine_device: torch.device) -> torch.device:
    """The engine's device, or the one given as ``Problem(..., device=...)`` (the original's
    argument) when this machine has it; a CUDA device without CUDA falls back, with a
    warning, so the original's programs (``device="cuda"`` by default) run on CPUs."""
    wanted = problem.requested_device
    if wanted is None or wanted == engine_device:
        return engine_device
    if wanted.type == "cuda" and not torch.cuda.is_available():
        log.warning("problem '%s': device=%s requested but CUDA is not available; training "
                    "on %s", problem.name, wanted, engine_device)
        return engine_device
    return wanted
