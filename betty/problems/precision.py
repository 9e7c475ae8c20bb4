"""Mixed precision of one problem: autocast for the loss, a gradient scaler for fp16.

fp16 keeps a `torch.amp.GradScaler` (CPU and CUDA): the loss is scaled before the backward,
gradients are unscaled before clipping, and a step whose gradients hold inf/NaN is skipped
(and counted in ``skipped_steps``). bf16 needs no scaler.

Finite-difference hypergradients (darts, sama) evaluate the lower loss inside
`full_precision()`, which turns every problem's autocast off: their central difference
``[dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps)`` cancels two nearly equal gradients,
and bf16's 8-bit mantissa (fp16's 11) rounds the activations and losses of each probe far more
than the probe radius moves them, so under autocast the difference is mostly rounding noise.
Second-order products (neumann, cg) do not cancel and keep the problem's autocast.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.configs import Config

if TYPE_CHECKING:
    from betty.problems.problem import Problem

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SWITCH = threading.local()  # .off: autocast disabled in this thread (full_precision)


@contextmanager
def full_precision() -> Iterator[None]:
    """Inside this context every problem's `Precision.autocast` is a no-op (fp32 compute).

    Used around finite-difference probes (see the module docstring); nests and is per thread.
    """
    previous = getattr(_SWITCH, "off", False)
    _SWITCH.off = True
    try:
        yield
    finally:
        _SWITCH.off = previous


class Precision:
    """Autocast context, loss scaling and the guarded optimizer step of one problem."""

    def __init__(self, owner: str, config: Config, device: torch.device) -> None:
        self.owner = owner
        self.device_type = device.type
        self.dtype = _DTYPES.get(config.precision)
        self.clip = config.gradient_clipping
        self.skipped_steps = 0
        self.plain = self.dtype is None and self.clip <= 0  # nothing to do around a step
        self.scaler: torch.amp.GradScaler | None = None
        if config.precision == "fp16":
            self.scaler = torch.amp.GradScaler(
                self.device_type, init_scale=config.initial_dynamic_scale,
                growth_factor=config.scale_factor)

    def autocast(self) -> Any:
        if self.dtype is None or getattr(_SWITCH, "off", False):
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: Tensor, config: Config, *, whole_step: bool = False) -> Tensor:
        """Loss as differentiated: scaled for fp16, divided over accumulated micro-batches
        (unless this one batch makes a whole optimizer step, as a roll-back replay does)."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        gas = 1 if whole_step else config.gradient_accumulation
        return loss if gas == 1 else loss / gas

    def step(self, problem: Problem, params: list[torch.Tensor]) -> bool:
        """unscale -> clip -> optimizer step -> scaler update. Returns False if skipped."""
        optimizer = problem.optimizer
        if self.scaler is None:
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.clip)
            problem.run_optimizer()
            return True
        assert optimizer is not None
        self.scaler.unscale_(optimizer)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer) if not _custom(problem) else _custom_scaled(self, problem)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale_before  # host read: fp16 only
        self.skipped_steps += int(skipped)
        return not skipped


def _custom(problem: Problem) -> bool:
    from betty.problems.hooks import ProblemHooks

    return type(problem).custom_optimizer_step is not ProblemHooks.custom_optimizer_step


def _custom_scaled(precision: Precision, problem: Problem) -> None:
    state = precision.scaler._per_optimizer_states[id(problem.optimizer)]  # type: ignore[union-attr]
    found = sum(v.item() for v in state["found_inf_per_device"].values())
    if not found:
        problem.custom_optimizer_step()
