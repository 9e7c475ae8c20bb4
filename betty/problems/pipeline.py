"""The local step after the gradient, written once for every kind of problem.

For each micro-batch gradient ``g_i`` (direct + hypergradients, of the loss divided by
``gradient_accumulation``), in this order (`docs/training.md#the-local-step`):

    grad_callback(g_i) -> accumulate -> [last micro-batch] non-finite guard -> unscale
        -> clip -> first-order stop-gradient -> update -> param_callback -> clear -> scheduler

Each piece is a small object or function in the shape of an optax transform, and the kind
of problem supplies only the update: `InPlaceUpdate` (an `ImplicitProblem`: the user's
optimizer steps ``.grad`` in place, around the precision plugin) or a functional update (an
`IterativeProblem`'s unroll window, `betty.problems.window`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor

from betty.problems.precision import Precision

Grads = list[Tensor | None]
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


# -- clip --------------------------------------------------------------------------------
def clip_factor(norm: Tensor, limit: float) -> Tensor:
    """``min(1, limit / (norm + 1e-6))``, the factor ``clip_grad_norm_`` scales by."""
    return torch.clamp(limit / (norm + CLIP_EPS), max=1.0)


def global_norm(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm of all tensors together (0-d, on the device: no host read)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def per_task_norm(grads: Sequence[Tensor]) -> Tensor:
    """``[T]`` norms of stacked per-task gradients ``[T, ...]``."""
    return torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads]).sum(0).sqrt()


class Clip:
    """Global-norm clipping at ``limit`` (``Config.gradient_clipping``; 0 = off), of the
    whole gradient or of each task's (``per_task``: stacked ``[T, ...]`` gradients)."""

    def __init__(self, limit: float, *, per_task: bool = False) -> None:
        self.limit = float(limit)
        self.per_task = per_task

    @property
    def active(self) -> bool:
        return self.limit > 0

    def __call__(self, grads: list[Tensor]) -> list[Tensor]:
        """Out of place and differentiable (reverse mode differentiates through it)."""
        if not self.active:
            return grads
        if not self.per_task:
            factor = clip_factor(global_norm(grads), self.limit)
            return [g * factor for g in grads]
        factor = clip_factor(per_task_norm(grads), self.limit)
        return [g * factor.reshape(-1, *([1] * (g.dim() - 1))) for g in grads]

    def in_place(self, grads: Sequence[Tensor | None]) -> None:
        """Scale the ``.grad`` tensors in place (what ``clip_grad_norm_`` does)."""
        present = [g for g in grads if g is not None]
        if self.active and present:
            torch._foreach_mul_(present, clip_factor(global_norm(present), self.limit))


# -- accumulate --------------------------------------------------------------------------
def add_grads(total: Grads | None, grads: Grads) -> Grads:
    if total is None:
        return list(grads)
    return [g if t is None else t if g is None else t + g for t, g in zip(total, grads)]


class Accumulator:
    """Sums the micro-batch gradients of one optimizer step; owns the partial sum."""

    def __init__(self) -> None:
        self.total: Grads | None = None

    @property
    def pending(self) -> bool:
        """Whether micro-batch gradients wait for the rest of their optimizer step."""
        return self.total is not None

    def add(self, grads: Grads, *, last: bool) -> Grads | None:
        """Add this micro-batch; the sum on the last one (then the state is empty)."""
        total = add_grads(self.total, grads)
        self.total = None if last else total
        return total if last else None

    def clear(self) -> None:
        self.total = None

    def state_dict(self) -> dict[str, Any]:
        return {"total": None if self.total is None else
                [None if g is None else g.detach() for g in self.total]}

    def load_state_dict(self, state: dict[str, Any], like: Sequence[Tensor]) -> None:
        total = state.get("total")
        self.total = None if total is None else [
            None if g is None else g.to(device=p.device, dtype=p.dtype)
            for g, p in zip(total, like)]


# -- the update at the end ---------------------------------------------------------------
class Update(Protocol):
    """What a kind of problem does with the accumulated gradient: True if it stepped."""

    def __call__(self, grads: Grads, clip: Clip) -> bool: ...


class InPlaceUpdate:
    """The user's optimizer on ``.grad``: unscale -> clip -> step, through the precision
    plugin; ``custom_optimizer_step`` (if defined) replaces ``optimizer.step()``; the
    strategy's context wraps the step when several processes train (FSDP moves the
    gradients to the shards). ``owner`` is read for its current optimizer, parameters and
    hooks at each step: strategies and ``set_optimizer`` may replace the optimizer after
    set-up, and hooks may be assigned on the instance."""

    def __init__(self, owner: Any, precision: Precision,
                 step_context: Callable[[], AbstractContextManager[Any]] | None) -> None:
        self.owner = owner
        self.precision = precision
        self.step_context = step_context

    def step_optimizer(self) -> None:
        custom = self.owner.hooks.custom_optimizer_step
        if custom is not None:
            custom()
        elif self.owner.optimizer is not None:
            self.owner.optimizer.step()

    def __call__(self, grads: Grads, clip: Clip) -> bool:
        params = self.owner.parameter_list()
        for p, g in zip(params, grads):
            p.grad = g
        if self.precision.scaler is None and self.step_context is None and not clip.active:
            self.step_optimizer()  # fp32 or bf16, one process, no clipping: nothing around it
            return True
        step = self.step_optimizer
        if self.step_context is not None:
            def step() -> None:
                with self.step_context():  # type: ignore[misc]
                    self.step_optimizer()
        return self.precision.step(self.owner.optimizer, [p.grad for p in params],
                                   clip=lambda: clip.in_place([p.grad for p in params]),
                                   step=step)


class LocalStep:
    """The pipeline of one problem (see the module docstring)."""

    def __init__(self, owner: Any, clip: Clip, update: Update,
                 allow: Callable[[], bool] | None = None) -> None:
        self.owner = owner  # read for its hooks (they may be assigned on the instance)
        self.clip = clip
        self.update = update
        self.allow = allow  # the non-finite guard (betty.guard): False skips the update
        self.accumulator = Accumulator()

    def __call__(self, grads: Grads, *, last: bool) -> tuple[bool, Grads | None]:
        """Feed one micro-batch's gradients. Returns ``(stepped, total)``: whether the
        update ran (and stepped), and the accumulated gradient it used (None before the
        last micro-batch)."""
        callback = self.owner.hooks.grad_callback
        if callback is not None:
            callback(grads)
        total = self.accumulator.add(grads, last=last)
        if total is None:
            return False, None
        if self.allow is not None and not self.allow():
            return False, total
        return self.update(total, self.clip), total
