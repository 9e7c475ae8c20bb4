"""User hooks of a `Problem`: each is a documented no-op that says exactly when it runs.

The engine never probes for hooks with ``getattr``; it calls these methods, and a subclass
overrides the ones it needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


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
        """Runs after this step's gradients (direct + hypergradient) are computed and stored
        in ``.grad``, before accumulation is complete, unscaling, clipping and the optimizer
        step. ``grads`` are this step's gradients; editing them in place edits ``.grad``."""

    def custom_optimizer_step(self) -> None:
        """Replace the optimizer step. Only called when a subclass overrides it; it then runs
        instead of ``optimizer.step()`` (after unscaling and clipping)."""
        raise NotImplementedError

    def param_callback(self, params: list[torch.nn.Parameter] | None = None) -> None:
        """Runs after each optimizer step, before gradients are cleared (e.g. clamping)."""

    def epoch_callback(self) -> None:
        """Runs when the (first) data loader is exhausted, before it restarts."""

    # -- parameters.
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters this problem optimises and differentiates (default: the module's
        parameters that require grad)."""
        return [p for p in self.module.parameters() if p.requires_grad]  # type: ignore[attr-defined]

    def meta_trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters an upper problem's hypergradient flows through (default: trainable)."""
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
