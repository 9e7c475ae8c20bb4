"""User hooks of a `Problem`: each is a documented no-op that says exactly when it runs.

A subclass overrides the hooks it needs (or assigns one on the instance). `bind_hooks`
resolves them into `BoundHooks` (bound callables, or None for a hook left at its no-op) at
set-up and at the start of each `Engine.run`, so the step never probes for hooks; a hook
assigned on the instance after the engine is built takes effect at the next `run`.

The order of one local step, for every kind of problem (`docs/training.md#the-local-step`):
loss -> gradient of this micro-batch (direct + hypergradients) -> ``grad_callback`` ->
accumulate -> on the last micro-batch: unscale (fp16) -> clip -> optimizer step ->
``param_callback`` -> clear gradients -> scheduler step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

HOOK_NAMES = ("grad_callback", "param_callback", "custom_optimizer_step")


class ProblemHooks:
    """Mixin holding every overridable hook of a problem, with its place in the step."""

    # -- construction: called once by `Engine` before training, when the constructor
    #    argument of the same name was not given (a non-None return value wins).
    def configure_module(self) -> torch.nn.Module | None:
        """Return the module of this problem (called once, before the optimizer hook)."""
        return None

    def configure_optimizer(self) -> torch.optim.Optimizer | None:
        """Return the optimizer of this problem (called once, after `configure_module`)."""
        return None

    def configure_scheduler(self) -> Any:
        """Return a learning-rate scheduler (called once, after `configure_optimizer`)."""
        return None

    def configure_train_data_loader(self) -> Any:
        """Return one iterable of batches, or a tuple of them (called once)."""
        return None

    # -- the loss: the one hook every problem must define.
    def training_step(self, batch: Any) -> torch.Tensor | dict[str, Any]:
        """Return the scalar loss of this level for ``batch`` (or a dict with key "loss")."""
        raise NotImplementedError

    # -- the local step, in the order they run.
    def on_inner_loop_start(self) -> None:
        """Runs at the start of each unroll window, before the window's first local step."""

    def grad_callback(self, grads: list[torch.Tensor | None]) -> None:
        """Runs once per local step (micro-batch), on that micro-batch's gradients (direct +
        hypergradients, of the loss divided by ``gradient_accumulation`` and scaled by the
        fp16 scaler), before they are accumulated, unscaled and clipped. Editing them in
        place edits what the optimizer steps with. For an `IterativeProblem` they are the
        gradients at the window's functional parameters; for a `TaskBatchedProblem` they
        are stacked ``[T, ...]`` per task. To keep them, clone them: betty goes on using
        these tensors (unscaling and clipping in place; sama's upper writes ``P v`` into a
        lower's stepped gradient)."""

    def custom_optimizer_step(self) -> None:
        """Replace the optimizer step. Only called when a subclass overrides it; it then runs
        instead of ``optimizer.step()`` (after unscaling and clipping)."""
        raise NotImplementedError

    def param_callback(self, params: list[torch.nn.Parameter] | None = None) -> None:
        """Runs after each optimizer step, before gradients are cleared (e.g. clamping); the
        original's zero-argument form ``param_callback(self)`` works too. An
        `IterativeProblem` runs it when a window's values are written back to its real
        parameters (inside a window they are functional tensors)."""

    def epoch_callback(self) -> None:
        """Runs when the (first) data loader is exhausted, before it restarts."""

    # -- parameters.
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters this problem optimises and differentiates (default: the module's
        parameters that require grad)."""
        return [p for p in self.module.parameters() if p.requires_grad]  # type: ignore[attr-defined]

    def meta_trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The original's name for the parameters an upper problem differentiates through.
        betty differentiates through `trainable_parameters` (which the optimizer steps), so
        overriding this instead is refused at set-up with an error saying so."""
        return self.trainable_parameters()

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """All parameters of the module."""
        return self.module.parameters()  # type: ignore[attr-defined]

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimizer (as given by the user; never rebuilt)."""
        return self.optimizer.param_groups  # type: ignore[attr-defined]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """What ``problem(x)`` computes (default: ``self.module(x)``)."""
        return self.module(*args, **kwargs)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class BoundHooks:
    """A problem's overridden hooks as bound callables; None where left at the no-op."""

    grad_callback: Callable[[list[torch.Tensor | None]], None] | None = None
    param_callback: Callable[[list[torch.Tensor]], None] | None = None
    custom_optimizer_step: Callable[[], None] | None = None


def _overridden(problem: Any, name: str) -> bool:
    return name in vars(problem) or getattr(type(problem), name) is not getattr(ProblemHooks,
                                                                                   name)


def bind_hooks(problem: Any) -> BoundHooks:
    """Resolve ``problem``'s hooks (class overrides or instance assignments) once."""
    found = {name: getattr(problem, name) for name in HOOK_NAMES if _overridden(problem, name)}
    param = found.get("param_callback")
    if param is not None and not _takes_arguments(param):
        zero_argument = param  # the original's form: param_callback(self)
        found["param_callback"] = lambda params: zero_argument()
    return BoundHooks(**found)


def _takes_arguments(fn: Callable[..., Any]) -> bool:
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature: pass the parameters
        return True
